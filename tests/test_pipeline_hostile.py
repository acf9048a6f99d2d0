"""`mrnet encode` against a hostile user (issue 13): bad input lines, special files, stray files in OUT, readers of
an OUT with no failures, and two jobs on one OUT at once. Real local Ray, real files."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.cli import main
from pipeline.collection import render_collection
from pipeline.encode import run
from test_pipeline import TINY, rows, synthetic

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("local_ray")  # tests/conftest.py


def test_bad_lines_and_special_files_are_failure_rows(tmp_path, monkeypatch, capsys):
    images = synthetic(tmp_path / "in", 1)
    good = images / "img000.png"
    os.mkfifo(images / "fifo.png")
    os.symlink(images / "loop.png", images / "loop.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(images / "sock.png"))
    monkeypatch.chdir(images)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(["./img000.png", str(good), "foo://bar/x.png", "fifo.png", "loop.png", "sock.png",
                                  "/dev/null"]) + "\n")
    out = tmp_path / "out"
    # --strict: the job goes on past bad inputs, then exits 1 because some failed
    assert main(["encode", str(listing), "--out", str(out), "--preset", "fast", "--levels", "2", "--size", "32",
                 "--no-render", "--strict"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["listed"], summary["done"], summary["failed"]) == (6, 1, 5)  # ./img000.png is the same file
    assert [r["uri"] for r in rows(out)] == [str(good)]
    failed = {r["uri"]: r for r in rows(out, "failures")}
    for uri, reason in [("foo://bar/x.png", "Unrecognized filesystem"), (str(images / "fifo.png"), "a FIFO"),
                        (str(images / "loop.png"), "symbolic links"), (str(images / "sock.png"), "a socket"),
                        ("/dev/null", "a character device")]:
        assert failed[uri]["stage"] == "read" and failed[uri]["error_kind"] == "unreadable", failed[uri]
        assert failed[uri]["message"].startswith(uri) and reason in failed[uri]["message"]
    # A folder holding the same special files is listed and read without hanging: all recorded already.
    again = run(str(images), str(out), TINY, size=32)
    assert (again["listed"], again["skipped"], again["done"], again["failed"]) == (4, 4, 0, 0)
    sock.close()


def test_stray_files_in_out_are_skipped_and_listed_and_readers_find_failures(tmp_path, capsys):
    images = synthetic(tmp_path / "in", 2)
    out = tmp_path / "out"
    first = run(str(images), str(out), TINY, size=32)
    assert (first["done"], first["failed"]) == (2, 0)
    # Nothing failed, yet OUT/failures/*.parquet is a table with its columns for DuckDB, Polars and pandas.
    failure_parts = sorted((out / "failures").glob("*.parquet"))
    assert failure_parts and pq.read_table(failure_parts).schema.names == store.FAILURES.names
    assert list(pd.read_parquet(out / "failures").columns) == store.FAILURES.names

    part = next((out / "encodings").glob("part-*.parquet"))
    (out / "encodings" / "README.txt").write_text("these are my encodings\n")
    (out / "encodings" / "part-truncated.parquet").write_bytes(part.read_bytes()[:100])
    (out / "failures" / "notes.md").write_text("# failures\n")
    (out / "manifest.json").write_text('{"configs": ["not", "a", "table"]}')  # edited by hand, badly
    with pytest.raises(ValueError, match="manifest.json: not a manifest written by mrnet encode"):
        render_collection(str(out))  # one line naming the file, not a traceback from deep inside
    logs = []
    again = run(str(images), str(out), TINY, size=32, log=logs.append)
    assert (again["done"], again["skipped"]) == (0, 2) and len(rows(out)) == 2
    aside = [p.name for p in out.glob("manifest.json.corrupt-*")]  # kept for a person to read, and a warning says so
    assert len(aside) == 1 and (out / aside[0]).read_text() == '{"configs": ["not", "a", "table"]}'
    assert sum(aside[0] in line for line in logs) == 1
    skipped = json.loads((out / "manifest.json").read_text())["skipped_files"]
    assert sorted(os.path.basename(s["file"]) for s in skipped) == ["README.txt", "notes.md",
                                                                   "part-truncated.parquet"]
    assert "not a readable Parquet file" in {s["file"].rsplit("/", 1)[1]: s["reason"]
                                             for s in skipped}["part-truncated.parquet"]
    assert sum("warning" in line and "README.txt" in line for line in logs) == 1
    # The final stage reads the same tables: it renders both images and ignores the stray files.
    assert render_collection(str(out), again["config_id"], log=logs.append)["rendered"] == 2


def test_live_lease_stops_a_second_job_before_any_file_and_a_stale_one_is_taken_over(tmp_path, capsys):
    images = synthetic(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    theirs = {"holder": "cron-host pid 4242", "host": "cron-host", "pid": 4242, "token": "cron",
              "started_at": time.time() - 60, "expires_at": time.time() + 60}
    (out / "_lease.json").write_text(json.dumps(theirs))
    command = ["encode", str(images), "--out", str(out), "--preset", "fast", "--levels", "2", "--no-render"]
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cron-host pid 4242" in err and "--wait" in err and "\n" not in err
    assert os.listdir(out) == ["_lease.json"]

    (out / "_lease.json").write_text(json.dumps({**theirs, "expires_at": time.time() - 1}))  # killed: expired
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["done"] == 1
    assert not (out / "_lease.json").exists()  # released at the end


def test_two_jobs_at_once_on_one_out_encode_each_image_once(tmp_path):
    images = synthetic(tmp_path / "in", 6)
    out = tmp_path / "out"
    config = tmp_path / "tiny.toml"
    config.write_text('[job]\npreset = "fast"\nbatch_size = 2\n[fit]\nlevels = 2\n')
    command = [sys.executable, "-m", "pipeline.cli", "encode", str(images), "--out", str(out), "--config",
               str(config), "--no-render", "--ray-address", "local"]  # each job a Ray of its own
    # This checkout's code in the children, with or without a PYTHONPATH already set.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    jobs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c in (command, command + ["--wait"])]
    (plain_out, plain_err), (waiting_out, waiting_err) = (j.communicate(timeout=400) for j in jobs)
    assert jobs[1].returncode == 0, waiting_err[-2000:]
    # Without -v a job's stderr holds its own lines only, not Ray's or Ray Data's Python logs (the C++ core
    # worker's own lines, "[date ...] file.cc:line: ...", are left alone: hiding them would hide them from the
    # cluster's log files too).
    own = [line for line in waiting_err.splitlines() if not re.match(r"\[\d{4}-\d\d-\d\d ", line)]
    assert own and all(line.startswith(("encode:", "mlflow:")) for line in own), waiting_err[-2000:]
    waited = json.loads(waiting_out.strip().splitlines()[-1])
    if jobs[0].returncode == 2:  # the waiting job won the race for the lease, or was first
        last = plain_err.strip().splitlines()[-1]  # after Ray's own lines
        assert last.startswith("error: ") and "another encode job holds this folder" in last
        assert "Traceback" not in plain_err
        assert waited["done"] == 6
    else:  # the plain job won; the other waited for it, then found everything done
        assert jobs[0].returncode == 0, plain_err[-2000:]
        assert json.loads(plain_out.strip().splitlines()[-1])["done"] + waited["done"] == 6
        assert "waiting for the job holding this folder" in waiting_err
    got = rows(out)
    assert sorted(os.path.basename(r["uri"]) for r in got) == [f"img{i:03d}.png" for i in range(6)]
    assert not (out / "_lease.json").exists()


def test_sigterm_ends_a_job_with_its_lease_released_and_its_run_marked_failed(tmp_path):
    images = synthetic(tmp_path / "in", 4, size=64)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    job = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "encode", str(images), "--out", str(out),
                            "--preset", "fast", "--batch-size", "1", "--no-render", "--ray-address", "local"],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "_listing").exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # the listing is written once the lease is held and the MLflow run is open
        assert job.poll() is None, job.communicate()[1][-2000:]
        job.terminate()  # SIGTERM, as a scheduler stops a job
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert not (out / "_lease.json").exists()  # released: the next run need not wait for it to expire
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mrnet-out").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_sigterm_lost_in_a_finaliser_still_stops_the_job(capfd):
    """Python drops an exception raised in a weakref callback ("Exception ignored in ..."): SIGTERM's exit landing
    there must still end the job, at its next check, and print no traceback."""
    import gc
    import signal
    import weakref

    from pipeline.encode import exit_on_sigterm, stop_if_terminated

    class Thing:
        pass

    with pytest.raises(SystemExit) as stopped:
        with exit_on_sigterm():
            thing = Thing()
            ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM) or sum(range(1000)))
            del thing
            gc.collect()
            assert ref() is None  # the callback ran, and its SystemExit was swallowed
            stop_if_terminated()
    assert stopped.value.code == 143 and "Traceback" not in capfd.readouterr().err
    stop_if_terminated()  # outside the block the flag is down again: later jobs in this process run
