import os
from pathlib import Path

import psutil
import pytest
import torch

from mrnet_core.images import read_image, resize_long_side

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

# Ray Data reads Parquet footers on a pool of 32 actors by default, started for every read: on 2 cores each
# encode job's read of its listing (a file or two) then costs seconds of worker processes starting. One actor
# reads them all the same. Set before any Ray starts, so that every local Ray's workers, and every job these
# tests start in a process of its own, inherit it.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


@pytest.fixture(scope="session")
def samples():
    return SAMPLES


def kill_together(processes):
    """SIGKILL `processes` (started by the test, by pid) all at once, then wait up to 10 s for them to go."""
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def sample(name, size):
    """A bundled sample photo, resized so that its long side is `size`: [C, H, W] in [0, 1]."""
    image, _ = read_image(SAMPLES / name)
    return resize_long_side(image, size)


@pytest.fixture
def astronaut64():
    return sample("astronaut.png", 64)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium's executable: skipped where it is missing, but required under CI (.ci/run installs it)."""
    import shutil
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing under CI (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed (apt-get install chromium); required under CI")
    return found


def dump_dom(browser, url, profile, budget_ms=5000):
    """The page's DOM after its scripts ran, from headless Chromium (no network, a profile of its own)."""
    import subprocess
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180).stdout


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray of 2 CPUs and no GPU, shared by the modules that need no other: each start costs seconds, and
    so do Ray Data's own actors on a fresh Ray's first job. Those modules run last (below), after every module that
    starts a Ray of its own (a cluster, a GPU in Ray's books, an environment for its workers)."""
    import ray
    # address="local": a Ray of its own, whatever else runs on this machine. num_gpus=0: these tests assert CPU
    # plans, which must hold where a GPU is visible too.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(items):
    # The tests on the shared Ray after all others, so that it starts once and no other Ray in this process meets
    # it; a stable sort, so each group keeps its order.
    items.sort(key=lambda item: "local_ray" in item.fixturenames)
