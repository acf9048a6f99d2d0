"""`mrnet encode` with INPUT and OUT on an object store: a real S3 API over HTTP on 127.0.0.1 (moto's standalone
server, started and stopped here), reached through pyarrow's own S3 client, and MLflow's artifacts through boto3.

moto serves the S3 REST API from one Python process with no other service to install, and pyarrow and boto3 talk
to it exactly as to AWS (both read AWS_ENDPOINT_URL), so nothing in mrnet knows it is a test.
"""
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray

from pipeline import store
from pipeline.cli import main
from test_pipeline import synthetic

REPO = Path(__file__).resolve().parent.parent
ENCODE = ["--preset", "fast", "--levels", "2", "--size", "32"]


@pytest.fixture(scope="module")
def s3():
    """The endpoint's environment, with a fresh bucket; the server stops with the module."""
    moto_server = pytest.importorskip("moto.server", reason="moto[s3] is in the test extra")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before Ray starts: its workers inherit the driver's environment
    bucket = f"mrnet-{uuid.uuid4().hex[:12]}"  # new each run: sources.filesystem caches a client per bucket
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(bucket)
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        yield {"env": env, "bucket": bucket}
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload(folder, uri):
    """Every file of a local folder to the object store under uri."""
    fs, path = store.filesystem(uri)
    for name in sorted(os.listdir(folder)):
        with fs.open_output_stream(f"{path}/{name}") as f:
            f.write((folder / name).read_bytes())


def listing(uri):
    """Names of every object under uri, relative to it."""
    fs, path = store.filesystem(uri)
    return sorted(i.path[len(path) + 1:] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if i.type == pafs.FileType.File)


def test_encode_from_and_to_s3_puts_every_output_there(s3, tmp_path, monkeypatch, capsys):
    bucket = s3["bucket"]
    upload(synthetic(tmp_path / "local", 2), f"s3://{bucket}/in")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # where the embedded MLflow store of a remote OUT goes
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = f"s3://{bucket}/out"
    assert main(["encode", f"s3://{bucket}/in", "--out", out, *ENCODE]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["done"] == 2 and summary["render"]["rendered"] == 2 and summary["mlflow"]["error"] is None

    names = listing(out)
    ids = sorted({r["image_id"] for r in store.read_table(out, "encodings").to_pylist()})
    assert len(ids) == 2
    for image_id in ids:
        assert {f"thumbnails/{image_id}/{n}" for n in ("level_0.png", "level_1.png", "strip.png")} <= set(names)
    for name in ("manifest.json", "report.html", "contact_sheet.png", "report/rate_distortion.svg",
                 "report/psnr_per_level.svg", "report/summary.parquet"):
        assert name in names
    for folder in ("encodings", "failures", "comparison/images", "comparison/curves"):
        assert any(n.startswith(f"{folder}/part-") for n in names), folder
    assert not [n for n in names if "/." in n or n.startswith((".", "_"))]  # no temporaries, lease or listing
    assert b"<h1>MR-Net encoding report</h1>" in store.read_bytes(out, "report.html")

    # The run: in the local store, its artifacts in OUT on the object store (through MLflow's boto3 client).
    from mlflow.tracking import MlflowClient
    assert os.listdir(work) == ["mlruns.db"]  # nothing else written locally
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"{out}/mlartifacts/")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.html", "contact_sheet.png", "report"}
    logged = [n for n in listing(out) if n.startswith("mlartifacts/")]
    assert any(n.endswith("/artifacts/report/summary.parquet") for n in logged), logged

    # A rerun does nothing twice, and render-collection works on the remote OUT too.
    assert main(["encode", f"s3://{bucket}/in", "--out", out, *ENCODE]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["skipped"] == 2 and again["done"] == 0 and again["render"]["rendered"] == 0
    assert main(["render-collection", out]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["compared"] == 2
    assert len(store.read_table(out, "encodings")) == 2


def test_two_jobs_at_once_on_one_s3_out_encode_each_image_once(s3, tmp_path):
    bucket = s3["bucket"]
    upload(synthetic(tmp_path / "local", 4, seed=1), f"s3://{bucket}/both")
    out = f"s3://{bucket}/overlap"
    config = tmp_path / "tiny.toml"
    config.write_text('[job]\npreset = "fast"\nbatch_size = 2\n[fit]\nlevels = 2\n')
    command = [sys.executable, "-m", "pipeline.cli", "encode", f"s3://{bucket}/both", "--out", out, "--config",
               str(config), "--no-render", "--ray-address", "local"]  # each job a Ray of its own
    env = {**os.environ, **s3["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    jobs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in (command, command + ["--wait"])]
    (plain_out, plain_err), (waiting_out, waiting_err) = (j.communicate(timeout=400) for j in jobs)
    assert jobs[1].returncode == 0, waiting_err[-2000:]
    waited = json.loads(waiting_out.strip().splitlines()[-1])
    if jobs[0].returncode == 2:  # the waiting job took the lease first
        assert "another encode job holds this folder" in plain_err.strip().splitlines()[-1]
        assert "Traceback" not in plain_err and waited["done"] == 4
    else:  # the plain job won; the other waited for it, then found everything done
        assert jobs[0].returncode == 0, plain_err[-2000:]
        assert json.loads(plain_out.strip().splitlines()[-1])["done"] + waited["done"] == 4
    uris = sorted(r["uri"] for r in store.read_table(out, "encodings").to_pylist())
    assert uris == [f"s3://{bucket}/both/img{i:03d}.png" for i in range(4)]
    assert "_lease.json" not in listing(out)
