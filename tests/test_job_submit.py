"""`ray job submit` of jobs/encode.py to a `ray start --head` cluster, as the README's scheduled runs do."""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline import store
from test_pipeline import synthetic
from conftest import kill_together

try:
    import ray.dashboard.optional_deps  # noqa: F401  # the dashboard's job server: ray[default]
except ImportError as e:
    pytest.skip(f"ray[default] is not installed (pip install '.[test]'): {e}", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"  # the CLI of the Python running the tests


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:  # all bound at once, so the n ports differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def session(sid):
    """The processes of session `sid`: `ray start` was its leader, and every Ray process it started stays in it."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except OSError:  # gone meanwhile
            pass
    return found


def stop(head):
    """End `ray start --block` and every process it started (GCS, raylet, dashboard, workers), by pid."""
    kill_together(session(head.pid))  # SIGKILL, all at once: a SIGTERMed `ray start` drains the node for up to 30 s
    head.wait()


@pytest.fixture
def cluster(tmp_path):
    """A one-node Ray cluster of its own (ports, temp dir, token): its dashboard's address and the env to reach it."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it (< 108 chars)
    gcs, dashboard, client, agent = free_ports(4)
    # Token auth on, with a token of its own, for both commands: with RAY_AUTH_MODE unset `ray start` turns it on
    # when it finds a token (~/.ray/auth_token), but `ray job submit` sends the token only with RAY_AUTH_MODE=token.
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    command = [str(RAY), "start", "--head", "--block", "--port", str(gcs),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port",
               str(client), "--dashboard-agent-listen-port", str(agent), "--num-cpus", "2", "--num-gpus", "0",
               "--object-store-memory", str(100 << 20), "--temp-dir", temp_dir, "--disable-usage-stats"]
    with open(tmp_path / "ray_start.log", "w") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        version = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
        while True:  # the dashboard's HTTP server answers once the head is up
            assert head.poll() is None, (tmp_path / "ray_start.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(version, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the dashboard did not start"
                time.sleep(0.5)
        yield address, env
    finally:
        stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submitted_job_encodes_each_image_once_and_records_an_mlflow_run(cluster, tmp_path):
    address, env = cluster
    images = synthetic(tmp_path / "images", 3)
    out = tmp_path / "out"
    db = tmp_path / "mlflow.db"
    # The driver runs jobs/encode.py in place (no working dir to upload: the job runs on this machine); PYTHONPATH
    # makes the fitting workers import this checkout too, not whatever `pip install -e` points at.
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}",
                                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}}
    submit = [str(RAY), "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env), "--",
              sys.executable, str(REPO / "jobs" / "encode.py"), str(images), "--out", str(out),
              "--config", str(REPO / "jobs" / "configs" / "smoke.toml"), "--no-render"]
    job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    log = job.stdout[-3000:] + job.stderr[-3000:]
    assert job.returncode == 0 and re.search(r"Job '\w+' succeeded", job.stdout), log

    # The job's stdout is tailed by `ray job submit`: its last JSON line is the encode's summary.
    summary = json.loads([line for line in job.stdout.splitlines() if line.startswith('{"')][-1])
    assert (summary["done"], summary["failed"], summary["skipped"]) == (3, 0, 0)
    got = store.read_table(str(out), "encodings").to_pylist()
    assert sorted(r["uri"] for r in got) == sorted(str(p) for p in images.iterdir())
    assert not (out / "_lease.json").exists()  # released at the end

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("mrnet-out").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow"]["run_id"]]
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["images/done"] == 3
