"""Encoding in batches that fit the device: halving on out of memory, retries outside the failed attempt, device
faults that propagate, and devices named clearly. Allocation failures are injected into the real `encode`."""
import sys
from pathlib import Path

import pytest
import torch

from mrnet_core import device as devices
from mrnet_core.config import make_config
from mrnet_core.encode import Failure, encode, encode_in_batches
from mrnet_core.memory import encode_memory_bytes

CFG = make_config("fast", {"levels": 2, "max_epochs": [3, 3]})
PLENTY = 1 << 40


def images(count, size=16):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(count))


class Injected:
    """`encode` that fails the way `fail(batch)` says (an exception or None), recording every batch it was given."""

    def __init__(self, fail):
        self.fail, self.batches, self.handling = fail, [], []

    def __call__(self, batch, cfg, device=None, progress=None):
        self.batches.append(len(batch))
        self.handling.append(sys.exc_info()[0])  # an exception still being handled holds the last attempt's tensors
        error = self.fail(batch)
        if error is not None:
            raise error
        return encode(batch, cfg, device, progress)


def test_a_batch_out_of_memory_is_halved_outside_the_failed_attempt_until_it_fits():
    fn = Injected(lambda b: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if len(b) > 2
                  else None)
    results = encode_in_batches(images(8), CFG, "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [8, 4, 2, 2, 4, 2, 2]
    assert fn.handling == [None] * 7
    assert all(isinstance(r, tuple) for r in results)
    # Every image's model is the one it gets when encoded alone (a batched fit equals single fits).
    alone = encode(images(8)[5:6], CFG, "cpu")[1][0]
    assert results[5][1] == alone


def test_an_image_out_of_memory_alone_is_deferred_not_failed():
    first = images(3)[0]
    fn = Injected(lambda b: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
                  if any(torch.equal(x, first) for x in b) else None)
    results = encode_in_batches(images(3), CFG, "cpu", PLENTY, encode_fn=fn)
    assert isinstance(results[0], Failure) and results[0].retry and results[0].kind == "out_of_memory"
    assert all(isinstance(r, tuple) for r in results[1:])


def test_a_bad_image_fails_alone_and_for_good():
    second = images(4)[1]
    fn = Injected(lambda b: ValueError("weights went non-finite") if any(torch.equal(x, second) for x in b) else None)
    results = encode_in_batches(images(4), CFG, "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [4, 1, 1, 1, 1]
    assert results[1] == Failure("ValueError", "weights went non-finite", retry=False)
    assert sum(isinstance(r, tuple) for r in results) == 3


def test_a_device_fault_propagates_so_the_worker_is_replaced():
    fn = Injected(lambda b: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(torch.AcceleratorError):
        encode_in_batches(images(4), CFG, "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [4]


def test_batches_are_sized_by_the_memory_model():
    fn = Injected(lambda b: None)
    memory = encode_memory_bytes(CFG, 3, 16, 16, batch=3)
    results = encode_in_batches(images(7), CFG, "cpu", memory, encode_fn=fn)
    assert fn.batches == [3, 2, 2] and all(isinstance(r, tuple) for r in results)  # as even as the limit allows


def test_latent_pyramids_on_a_cpu_run_in_batches_that_stay_in_cache():
    fn = Injected(lambda b: None)
    cfg = make_config("default", {"levels": 2, "max_epochs": [2]}, model="g")
    results = encode_in_batches(images(7, size=256), cfg, "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [4, 3] and all(isinstance(r, tuple) for r in results)  # six 256 px images at most
    fn.batches.clear()
    encode_in_batches(images(7, size=64), cfg, "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [7]


def test_an_image_larger_than_the_device_fails_without_an_attempt():
    fn = Injected(lambda b: None)
    results = encode_in_batches(images(2), CFG, "cpu", encode_memory_bytes(CFG, 3, 16, 16) - 1, encode_fn=fn)
    assert fn.batches == []
    assert [r.kind for r in results] == ["too_large"] * 2 and not results[0].retry
    assert "16x16 image needs about" in results[0].message


def test_errors_are_classified():
    with pytest.raises(RuntimeError) as cpu_oom:
        torch.empty(1 << 55)  # a real failed allocation from the CPU allocator
    assert devices.is_out_of_memory(cpu_oom.value) and not devices.is_device_fault(cpu_oom.value)
    assert devices.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert devices.is_device_fault(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert not devices.is_device_fault(ValueError("a bad image"))


@pytest.mark.parametrize("name, words", [("bogus", "not a device name"), ("mps", "runs on cpu or cuda"),
                                         ("cuda:99", "cuda:99")])
def test_a_device_that_cannot_be_used_is_one_clear_error(name, words):
    with pytest.raises(devices.DeviceError, match=words):
        devices.resolve(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_cuda_without_a_usable_cuda_names_the_cause():
    assert devices.cuda_unusable_reason()
    with pytest.raises(devices.DeviceError, match="device cuda: torch .*"):
        devices.resolve("cuda")


def test_full_precision_turns_cudnn_tf32_off():
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    devices.use_full_precision()
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


@pytest.mark.parametrize("name", ["bogus", "cuda:99"])
def test_fit_on_a_device_that_cannot_be_used_is_one_line_before_any_work(name, tmp_path, capsys):
    from pipeline.cli import main
    camera = str(Path(__file__).resolve().parent.parent / "samples/camera.png")
    status = main(["fit", camera, "--out", str(tmp_path / "out"), "--size", "16", "--device", name])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: device ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_images_too_small_for_the_levels_fail_without_an_attempt():
    fn = Injected(lambda b: None)
    results = encode_in_batches(images(2, size=4), make_config("fast", {"levels": 5}), "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [] and [r.kind for r in results] == ["too_small"] * 2


def test_images_over_a_latent_pyramids_limits_fail_as_too_large_without_an_attempt():
    fn = Injected(lambda b: None)
    cfg = make_config("default", {"levels": 1}, model="g")
    thin = torch.zeros(2, 1, 1, 70000)  # a context model would take a decoder one step per latent
    results = encode_in_batches(thin, cfg, "cpu", PLENTY, encode_fn=fn)
    assert fn.batches == [] and [r.kind for r in results] == ["too_large"] * 2
    assert "steps to decode" in results[0].message
