"""OUT's lease (pipeline/lease.py) on real files: one holder, stale take-over, and races with exactly one winner."""
import io
import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

from pipeline import lease


def write_lease(path, expires_in, holder="elsewhere pid 1", token="theirs"):
    """A lease as another job on another host would leave it."""
    path.write_text(json.dumps({"holder": holder, "host": "elsewhere", "pid": 1, "machine": "another machine",
                                "token": token, "started_at": time.time() - 100,
                                "expires_at": time.time() + expires_in}))


def race(fs, path, jobs, **kw):
    """Tokens of the jobs that won the lease when `jobs` threads try to take it at the same moment."""
    winners, start = [], threading.Barrier(jobs)

    def job():
        start.wait()
        try:
            winners.append(lease.acquire(fs, path, log=lambda line: None, **kw)["token"])
        except lease.LeaseHeld:
            pass

    threads = [threading.Thread(target=job) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return winners


def test_one_holder_then_released(tmp_path):
    fs, path = lease.lease_path(str(tmp_path))
    mine = lease.acquire(fs, path)
    with pytest.raises(lease.LeaseHeld, match="another encode job holds this folder .* --wait"):
        lease.acquire(fs, path)
    assert lease.renew(fs, path, mine)
    lease.release(fs, path, mine)
    assert os.listdir(tmp_path) == []
    lease.release(fs, path, lease.acquire(fs, path))


def test_live_lease_of_another_host_is_never_taken(tmp_path):
    write_lease(tmp_path / "_lease.json", expires_in=60)
    fs, path = lease.lease_path(str(tmp_path))
    with pytest.raises(lease.LeaseHeld, match="elsewhere pid 1"):
        lease.acquire(fs, path)


@pytest.mark.parametrize("local", [True, False], ids=["local", "object-store"])
def test_stale_lease_is_taken_over_by_exactly_one_of_many(tmp_path, local):
    # SubTreeFileSystem is not LocalFileSystem: it takes the object-store path (write, settle, read back).
    fs = pafs.LocalFileSystem() if local else pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    path = str(tmp_path / "_lease.json") if local else "_lease.json"
    for round_ in range(10 if local else 2):
        write_lease(tmp_path / "_lease.json", expires_in=-1, token=f"dead{round_}")
        winners = race(fs, path, 4, settle=0.3)
        assert len(winners) == 1
        assert json.loads((tmp_path / "_lease.json").read_text())["token"] == winners[0]
        assert os.listdir(tmp_path) == ["_lease.json"]  # no claim or temporary left behind


def test_free_folder_is_won_by_exactly_one_of_many(tmp_path):
    fs, path = lease.lease_path(str(tmp_path))
    for _ in range(10):
        winners = race(fs, path, 4)
        assert len(winners) == 1
        os.unlink(path)


def test_lease_of_a_killed_process_on_this_machine_is_taken_at_once(tmp_path):
    fs, path = lease.lease_path(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    theirs = {"holder": "killed", "pid": child.pid, "machine": lease._machine(), "token": "killed",
              "expires_at": time.time() + 60}
    (tmp_path / "_lease.json").write_text(json.dumps(theirs))
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(fs, path)
    child.kill()
    child.wait()
    assert lease.acquire(fs, path, log=lambda line: None)["token"] != "killed"


def test_heartbeat_renews_and_a_lost_lease_is_noticed(tmp_path):
    with lease.held(str(tmp_path), ttl=2, heartbeat=0.2, log=lambda line: None) as lost:
        before = json.loads((tmp_path / "_lease.json").read_text())["expires_at"]
        time.sleep(0.7)
        assert json.loads((tmp_path / "_lease.json").read_text())["expires_at"] > before and not lost.is_set()
        write_lease(tmp_path / "_lease.json", expires_in=60, token="usurper")
        deadline = time.time() + 5
        while not lost.is_set() and time.time() < deadline:
            time.sleep(0.05)
        assert lost.is_set()
    assert json.loads((tmp_path / "_lease.json").read_text())["token"] == "usurper"  # not released: not ours


def test_released_on_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with lease.held(str(tmp_path), log=lambda line: None):
            raise KeyboardInterrupt
    assert not (tmp_path / "_lease.json").exists()


def test_wait_takes_the_lease_when_the_holder_releases(tmp_path):
    fs, path = lease.lease_path(str(tmp_path))
    first = lease.acquire(fs, path)
    threading.Timer(1.5, lease.release, (fs, path, first)).start()
    started = time.time()
    second = lease.acquire(fs, path, wait=True, log=lambda line: None)
    assert second["token"] != first["token"] and time.time() - started >= 1.4


class BreaksOff:
    """An object store whose first `failures` reads break off, as a dropped connection does."""

    def __init__(self, data, failures, error=OSError("AWS Error NETWORK_CONNECTION: Failed to flush response stream")):
        self.data, self.failures, self.error, self.reads = data, failures, error, 0

    def open_input_stream(self, path):
        self.reads += 1
        if self.reads <= self.failures:
            raise self.error
        return io.BytesIO(self.data)


def test_object_store_reads_that_break_off_are_tried_again_but_not_forever_and_not_when_missing():
    from pipeline.sources import read_object
    fs = BreaksOff(b"lease", failures=2)
    assert read_object(fs, "b/k", wait=0) == b"lease" and fs.reads == 3
    fs = BreaksOff(b"lease", failures=10)
    with pytest.raises(OSError, match="flush response stream"):
        read_object(fs, "b/k", attempts=3, wait=0)
    assert fs.reads == 3
    fs = BreaksOff(b"", failures=10, error=FileNotFoundError("b/k"))
    with pytest.raises(FileNotFoundError):
        read_object(fs, "b/k", wait=0)
    assert fs.reads == 1
