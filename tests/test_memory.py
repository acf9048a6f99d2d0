"""The memory model bounds the real peak of an encode, measured by torch's allocator through the profiler."""
import sys
from pathlib import Path

import pytest
import torch

from mrnet_core.config import make_config
from mrnet_core.encode import encode
from mrnet_core.memory import encode_memory_bytes, max_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.memory_model import peak_allocated_bytes  # noqa: E402


@pytest.mark.parametrize("model", ["s", "l", "m"])
@pytest.mark.parametrize("size", [32, 64])
def test_the_estimate_bounds_the_measured_peak_of_an_encode(model, size):
    # The default widths, every phase of an encode (fit, fine-tuning through the quantiser, measuring), few epochs:
    # the peak does not depend on how many.
    cfg = make_config("default", {"max_epochs": [2], "qat_epochs": 1, "weight_bits": 8}, model=model)
    batch = torch.rand(2, 3, size, size)
    measured = peak_allocated_bytes(lambda: encode(batch, cfg, device="cpu"))
    estimate = encode_memory_bytes(cfg, 3, size, size, batch=2)
    assert measured <= estimate <= 3 * measured, (measured, estimate)


def test_rate_control_is_estimated_at_the_widths_it_can_choose():
    cfg = make_config("compact", {"max_epochs": [2], "qat_epochs": 1, "target_bpp": 2.0})
    batch = torch.rand(2, 3, 64, 64)
    measured = peak_allocated_bytes(lambda: encode(batch, cfg, device="cpu"))
    assert measured <= encode_memory_bytes(cfg, 3, 64, 64, batch=2) <= 3 * measured


def test_max_batch_is_the_largest_that_fits():
    cfg = make_config("fast")
    one, ten = encode_memory_bytes(cfg, 3, 128, 128, 1), encode_memory_bytes(cfg, 3, 128, 128, 10)
    assert encode_memory_bytes(cfg, 3, 256, 256) > 2 * one  # four times the pixels
    assert max_batch(cfg, 3, 128, 128, ten) == 10
    assert max_batch(cfg, 3, 128, 128, ten - 1) == 9
    assert max_batch(cfg, 3, 128, 128, one - 1) == 0
    assert max_batch(cfg, 3, 128, 128, 1 << 60, limit=256) == 256


@pytest.mark.parametrize("size, levels, grid_channels", [(32, 4, 1), (64, 5, 1), (64, 5, 4), (64, 5, [4, 1])])
def test_the_estimate_bounds_the_measured_peak_of_a_latent_pyramid_encode(size, levels, grid_channels):
    cfg = make_config("default", {"max_epochs": [3], "levels": levels, "grid_channels": grid_channels}, model="g")
    batch = torch.rand(3, 3, size, size)
    measured = peak_allocated_bytes(lambda: encode(batch, cfg, device="cpu"))
    estimate = encode_memory_bytes(cfg, 3, size, size, batch=3)
    assert measured <= estimate <= 3 * measured, (measured, estimate)
