"""`mrnet encode` ends with thumbnails, a comparison with codecs, a report and an MLflow run: all real (Ray,
Parquet, SQLite, an `mlflow server`, headless Chromium)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import compare as cmp
from pipeline import store, track
from pipeline.cli import main
from pipeline.compare import CURVES, IMAGES

from conftest import dump_dom, sample

SAMPLES = ("astronaut.png", "camera.png", "rocket.jpg")  # RGB, grey, JPEG
ENCODE = ["--preset", "fast", "--levels", "2", "--size", "32"]


pytestmark = pytest.mark.usefixtures("local_ray")  # tests/conftest.py


@pytest.fixture(scope="module")
def job(tmp_path_factory, samples):
    """Three samples encoded by the CLI into OUT with the embedded (SQLite) MLflow store."""
    root = tmp_path_factory.mktemp("collection")
    src, out = root / "src", root / "out"
    src.mkdir()
    for name in SAMPLES:
        shutil.copy(samples / name, src / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["encode", str(src), "--out", str(out), *ENCODE]) == 0
    return src, out


def encodings(out):
    return store.read_table(str(out), "encodings").to_pylist()


def compared(out):
    return store.read_table(str(out), "comparison/images", schema=IMAGES).to_pylist()


def test_thumbnails_every_level_and_comparison_against_the_pyramid(job):
    _, out = job
    rows, comp = encodings(out), {r["image_id"]: r for r in compared(out)}
    assert len(rows) == len(comp) == 3
    for r in rows:
        folder = out / "thumbnails" / r["image_id"]
        h, w = r["height"], r["width"]
        assert Image.open(folder / "level_0.png").size == ((w + 1) // 2, (h + 1) // 2)  # k = 0 is the coarsest
        assert Image.open(folder / "level_1.png").size == (w, h)
        assert Image.open(folder / "strip.png").height == 128
        c = comp[r["image_id"]]
        # Rendered from the weights and measured against the re-read original's pyramid: the encode's own figures.
        assert c["psnr"] == pytest.approx(r["psnr"], abs=0.05) and c["ssim"] == pytest.approx(r["ssim"], abs=2e-3)
        assert c["ratio_raw"] == pytest.approx(r["raw_bytes"] / r["model_bytes"], rel=1e-3)
        for codec in cmp.CODECS:
            assert c[f"{codec}_bytes"] <= r["model_bytes"] and c[f"{codec}_psnr"] > 25
            assert c[f"{codec}_quality"] == 100 and "highest" in c[f"{codec}_note"]  # these models are huge
    curves = store.read_table(str(out), "comparison/curves", schema=CURVES).to_pylist()
    assert len(curves) == 3 * len(cmp.CODECS) * len(cmp.LADDER)
    jpeg = sorted((c["quality"], c["bytes"]) for c in curves
                  if c["codec"] == "jpeg" and c["image_id"] == rows[0]["image_id"])
    assert [b for _, b in jpeg] == sorted(b for _, b in jpeg)  # bigger files at higher quality
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height == 3 * 64 + 2 * 4


def test_codec_quality_is_the_highest_that_fits_the_budget():
    image = sample("astronaut.png", 64)
    pil = cmp.to_pil(image)
    for codec in cmp.CODECS:
        for options in cmp.OPTIONS[codec]:
            budget = len(cmp.encode_with(pil, codec, 50, options)) + 1
            quality, data = cmp.fit_budget(pil, codec, budget, options)
            assert len(data) <= budget and quality >= 50
            assert len(cmp.encode_with(pil, codec, quality + 1, options)) > budget
        # At a budget, the best of the codec's settings counts
        budget = 600
        row = cmp.codec_at_budget(image, codec, budget)
        for options in cmp.OPTIONS[codec]:
            quality, data = cmp.fit_budget(pil, codec, budget, options)
            if quality is not None:
                assert row[f"{codec}_psnr"] >= cmp.score(cmp.decoded(data, 3), image)[0]
        row = cmp.codec_at_budget(image, codec, 10)  # below even the lowest quality
        assert row[f"{codec}_psnr"] is None and "over the budget of 10" in row[f"{codec}_note"]


def test_render_collection_needs_only_the_weights_and_reruns_add_nothing(job, tmp_path, capsys):
    src, out = job
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("thumbnails", "comparison", "mlflow.db", "mlartifacts"))
    moved = tmp_path / "gone"
    shutil.move(src, moved)  # the originals disappear: thumbnails still come from the Parquet weights
    try:
        assert main(["render-collection", str(copy)]) == 0
    finally:
        shutil.move(moved, src)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rendered"] == 3
    for r in encodings(copy):
        assert all((copy / "thumbnails" / r["image_id"] / f"level_{k}.png").exists() for k in (0, 1))
    rows = compared(copy)
    assert len(rows) == 3 and all(r["psnr"] is None and "original not compared" in r["note"] and
                                  os.path.basename(r["uri"]) in r["note"] for r in rows)
    assert main(["render-collection", str(copy)]) == 0
    assert len(compared(copy)) == 3  # no duplicates
    assert main(["render-collection", str(tmp_path / "nothing")]) == 2
    assert "nothing: no manifest.json" in capsys.readouterr().err


def runs(uri, experiment):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def check_run(client, run, done, skipped):
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert (m["images/done"], m["images/skipped"], m["images/failed"]) == (done, skipped, 0)
    for name in ("psnr/level_0/mean", "psnr/level_1/median", "psnr/level_1/p5", "ssim/level_1/mean", "bpp/mean",
                 "compression_ratio/raw", "images_per_second", "jpeg/psnr_at_budget/mean"):
        assert name in m
    assert m["psnr/level_1/p5"] <= m["psnr/level_1/median"]
    assert run.data.params["fit.levels"] == "2" and run.data.params["job.size"] == "32"
    assert run.data.params["job.preset"] == "fast"  # every job setting, the preset among them
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head and run.data.tags["devices"].startswith("cpu")
    assert "node(s)" in run.data.tags["ray.cluster"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    names |= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report.html", "contact_sheet.png", "report/summary.parquet", "report/rate_distortion.svg"} <= names
    local = client.download_artifacts(run.info.run_id, "report/summary.parquet")
    assert pq.read_table(local).num_rows == 3


def test_mlflow_run_in_the_embedded_sqlite_store(job):
    _, out = job
    client, found = runs(f"sqlite:///{out}/mlflow.db", "mrnet-out")
    assert len(found) == 1
    check_run(client, found[0], done=3, skipped=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_run_on_a_tracking_server(job, tmp_path, monkeypatch, capsys):
    src, out = job
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert main(["encode", str(src), "--out", str(out), *ENCODE, "--experiment", "served"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["mlflow"]["error"] is None and summary["skipped"] == 3
        client, found = runs(uri, "served")
        assert [r.info.run_id for r in found] == [summary["mlflow"]["run_id"]]
        check_run(client, found[0], done=0, skipped=3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_dead_tracking_server_is_reported_not_fatal(job, monkeypatch, capsys):
    src, out = job
    before = sorted(p.name for p in (out / "encodings").iterdir())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(track, "WAIT", 0.1)
    start = time.perf_counter()
    assert main(["encode", str(src), "--out", str(out), *ENCODE]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["mlflow"]["run_id"] is None and "open run" in summary["mlflow"]["error"]
    assert captured.err.count("mlflow: attempt") == 2 * track.ATTEMPTS  # retried at the start and at the end
    assert "the Parquet output is complete" in captured.err
    assert time.perf_counter() - start < 120
    assert sorted(p.name for p in (out / "encodings").iterdir()) == before and len(encodings(out)) == 3
    assert (out / "report.html").exists()


def test_a_tracking_server_that_never_answers_costs_the_job_its_deadline_only(job, monkeypatch, capsys):
    src, out = job
    silent = socket.socket()  # the kernel completes connections on a listening socket; nobody ever reads them
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
    try:
        start = time.perf_counter()
        assert main(["encode", str(src), "--out", str(out), *ENCODE, "--tracking-deadline", "3"]) == 0
        seconds = time.perf_counter() - start
    finally:
        silent.close()
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["mlflow"]["run_id"] is None and "deadline" in summary["mlflow"]["error"]
    assert summary["skipped"] == 3 and len(encodings(out)) == 3
    # Without a deadline each call waits out MLflow's HTTP timeout and retries (minutes); here the calls share 3 s.
    assert seconds < 60, seconds


def test_report_renders_in_headless_chromium_with_its_images(job, tmp_path, browser):
    _, out = job
    html = (out / "report.html").read_text()
    assert not re.search(r'src="(?!data:)', html)  # self-contained: every image is a data URI
    dom = dump_dom(browser, (out / "report.html").as_uri(), tmp_path / "profile")
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    ok, total = map(int, loaded.groups())
    # Two plots; crops of the best, median and worst image (original, MR-Net and three codecs, each shown or
    # said not to fit); and every image's level strip, collapsed.
    crops, fitting = html.count("<figure>"), html.count("<figure><img")
    assert crops == 3 * 5 and html.count("<details") == 3
    assert ok == total == 2 + fitting + 3 and fitting >= 3 * 2
    assert "rate-distortion plot" in dom and "astronaut.png" in dom and "Failures (0)" in dom
    assert "At equal bytes" in dom and "q " in dom
    # The report's live viewer holds the three images, best first, and draws them.
    assert 'href="viewer.html"' in html and (out / "viewer.html").exists()
    viewer = dump_dom(browser, (out / "viewer.html").as_uri(), tmp_path / "profile")
    assert 'data-ready="yes"' in viewer and viewer.count("<option") == 3


def copies(job_out, out, n):
    """OUT with `n` encodings rows copied from the job's (distinct image_ids, same files), in parts of 4 rows,
    nothing compared yet."""
    base = encodings(job_out)
    shutil.copytree(job_out, out, ignore=shutil.ignore_patterns("encodings", "thumbnails", "comparison", "mlflow.db",
                                                                "mlartifacts", "report*", "contact_sheet.png"))
    rows = [{**base[i % len(base)], "image_id": f"{i:064x}"} for i in range(n)]
    for i in range(0, n, 4):
        store.write_part(str(out), "encodings", f"part-{i:04d}.parquet", rows[i:i + 4], store.ENCODINGS)
    return rows


def by_image(rows):
    return sorted(rows, key=lambda r: (r["image_id"], r.get("codec") or "", r.get("quality") or 0))


def test_final_stage_is_exactly_once_resumable_and_the_same_on_two_workers(job, tmp_path):
    from pipeline.collection import render_collection
    _, out = job
    one, two = tmp_path / "one", tmp_path / "two"
    rows = copies(out, one, 12)
    copies(out, two, 12)
    assert render_collection(str(one), workers=1, log=lambda line: None)["rendered"] == 12
    assert render_collection(str(two), workers=2, log=lambda line: None)["rendered"] == 12
    for folder, schema in (("comparison/images", IMAGES), ("comparison/curves", CURVES)):
        a, b = (by_image(store.read_table(str(o), folder, schema=schema).to_pylist()) for o in (one, two))
        assert a == b and len({r["image_id"] for r in a}) == 12  # every image once, the same figures
    assert sorted(os.listdir(two / "thumbnails")) == sorted(r["image_id"] for r in rows)

    parts = sorted((two / "comparison" / "images").glob("part-*.parquet"))
    assert len(parts) >= 2  # several calls, each its own part
    lost = set(pq.read_table(parts[0]).column("image_id").to_pylist())
    parts[0].unlink()  # as if the run had been killed before this batch committed
    before = by_image(compared(two))
    summary = render_collection(str(two), workers=2, log=lambda line: None)
    assert summary["rendered"] == len(lost) and summary["compared"] == 12
    after = by_image(compared(two))
    assert len(after) == 12 and {r["image_id"] for r in after} - {r["image_id"] for r in before} == lost
    assert after == by_image(compared(one))  # exactly the missing rows back, the same as before
    curves = (by_image(store.read_table(str(o), "comparison/curves", schema=CURVES).to_pylist()) for o in (one, two))
    assert next(curves) == next(curves)  # the orphaned curves part was replaced, not added to
    assert render_collection(str(two), workers=2, log=lambda line: None)["rendered"] == 0  # nothing left to do
    assert len(compared(two)) == 12
