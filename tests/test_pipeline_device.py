"""The encode job on a real local Ray when the device misbehaves: a GPU torch cannot use, a device fault, and an
image that runs out of memory even alone. Faults are injected into the real `encode` the actors run."""
import pytest
import ray
import torch

from mrnet_core.config import make_config
from mrnet_core.device import DeviceError
from mrnet_core.encode import encode
from mrnet_core.images import read_image
from pipeline import store
from pipeline.encode import run
from test_pipeline import rows, synthetic

TINY = make_config("fast", {"levels": 2, "max_epochs": [20, 10]})


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    # A GPU in Ray's books only: this machine's torch decides whether it is usable.
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_a_gpu_that_torch_cannot_use_stops_the_job_before_any_work(tmp_path):
    images = synthetic(tmp_path / "images", 2)
    with pytest.raises(DeviceError, match="cannot use it: torch .* CPU-only build.*num_gpus = 0"):
        run(str(images), str(tmp_path / "out"), TINY)
    assert not (tmp_path / "out" / "encodings").exists()


def test_a_device_fault_restarts_the_worker_and_fails_no_image(tmp_path):
    images = synthetic(tmp_path / "images", 4)
    faulted = tmp_path / "faulted"

    def faulty_once(batch, cfg, device=None, progress=None):
        if not faulted.exists():  # the first call on any actor, once: a fresh actor then succeeds
            faulted.touch()
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return encode(batch, cfg, device, progress)

    summary = run(str(images), str(tmp_path / "out"), TINY, num_gpus=0, encode_fn=faulty_once)
    assert faulted.exists()
    assert (summary["done"], summary["failed"], summary["deferred"]) == (4, 0, 0)
    assert len(rows(tmp_path / "out")) == 4


def test_an_image_out_of_memory_alone_is_deferred_and_the_rerun_encodes_it(tmp_path):
    images = synthetic(tmp_path / "images", 3)
    out = str(tmp_path / "out")
    unlucky = read_image(images / "img001.png")[0]

    def short_of_memory(batch, cfg, device=None, progress=None):
        if any(torch.equal(x, unlucky) for x in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return encode(batch, cfg, device, progress)

    first = run(str(images), out, TINY, num_gpus=0, encode_fn=short_of_memory)
    assert (first["done"], first["failed"], first["deferred"]) == (2, 0, 1)
    assert store.read_table(out, "failures").num_rows == 0
    second = run(str(images), out, TINY, num_gpus=0)
    assert (second["done"], second["skipped"], second["deferred"]) == (1, 2, 0)
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in rows(tmp_path / "out")) == ["img000.png", "img001.png",
                                                                                  "img002.png"]
