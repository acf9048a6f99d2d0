"""CUDA smoke tests: fit, render, the model-file round trip, batched against single fits, and batches sized by the
device's memory, all on a GPU. Skipped where torch has no CUDA device (bench/gpu_check.sh runs them)."""
import pytest
import torch

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.encode import choose_prior, encode, encode_in_batches
from mrnet_core.fit import fit
from mrnet_core.metrics import psnr
from mrnet_core.render import render

from conftest import sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = make_config("fast", {"levels": 2, "max_epochs": [150, 80]})


def photos(size=64):
    # Long side 1.5 x size, so that coffee.png (3:2) still has `size` rows to crop.
    return torch.stack([sample(name, size * 3 // 2)[:, :size, :size] for name in ("astronaut.png", "coffee.png")])


def test_a_fit_on_cuda_is_as_good_as_on_the_cpu():
    images = photos()
    gpu, _ = fit(images, CFG, device="cuda")
    cpu, _ = fit(images, CFG, device="cpu")
    assert next(gpu.parameters()).is_cuda
    on_gpu = psnr(render(gpu, 64, 64).cpu(), images)
    on_cpu = psnr(render(cpu, 64, 64), images)
    assert on_gpu.min() > 20 and torch.allclose(on_gpu, on_cpu, atol=0.5), (on_gpu, on_cpu)


def test_render_on_cuda_equals_the_cpu_render_of_the_same_weights():
    model, _ = fit(photos(), CFG, device="cuda")
    window = (-1.3, -0.7, 0.9, 1.2)
    gpu = render(model, 97, 61, t=1.5, window=window).cpu()
    cpu = render(model.cpu(), 97, 61, t=1.5, window=window)
    assert (gpu - cpu).abs().max() < 1e-3  # sin(30 z) in fp32 on two kinds of kernels


@pytest.mark.parametrize("bits", [32, 8])
def test_model_file_round_trip_from_cuda(bits):
    cfg = make_config("fast", {"levels": 2, "max_epochs": [40, 20], "weight_bits": bits, "qat_epochs": 2})
    images = photos()
    records, blobs = encode(images, cfg, device="cuda")
    for i, blob in enumerate(blobs):
        model, meta = modelfile.from_bytes(blob, f"image {i}")
        assert psnr(render(model, 64, 64).clamp(0, 1), images[i : i + 1]).item() == pytest.approx(
            records[i].levels[-1].psnr, abs=0.05)


def test_a_batched_fit_on_cuda_equals_single_fits():
    # A batched product and a single one may take different CUDA kernels, so equal within rounding, not bitwise:
    # each image's quality is the same to within a tenth of a dB.
    images = photos()
    batched, _ = fit(images, CFG, device="cuda")
    together = psnr(render(batched, 64, 64).cpu(), images)
    for i in range(len(images)):
        single, _ = fit(images[i : i + 1], CFG, device="cuda")
        alone = psnr(render(single, 64, 64).cpu(), images[i : i + 1])
        assert abs(together[i].item() - alone.item()) < 0.1, (i, together[i].item(), alone.item())


def test_batches_fit_in_the_device_memory():
    torch.cuda.reset_peak_memory_stats()
    results = encode_in_batches(photos(), CFG, device="cuda")
    assert all(isinstance(r, tuple) for r in results)
    assert torch.cuda.max_memory_allocated() < torch.cuda.get_device_properties(0).total_memory


def test_a_latent_pyramid_encoded_on_cuda_decodes_on_the_cpu_to_what_was_measured():
    # The file is coded in integers on the CPU whichever device fitted it, so a CUDA encode decodes anywhere; the
    # record's quality (measured on the GPU) is the CPU render's to within float rounding.
    images = photos()
    cfg = make_config("default", {"levels": 4, "max_epochs": [300], "target_bpp": 1.5}, model="g")
    records, blobs = encode(images, cfg, device="cuda")
    for i, blob in enumerate(blobs):
        assert len(blob) <= 1.5 * 64 * 64 / 8 and records[i].rate.met
        model, _ = modelfile.from_bytes(blob, f"image {i}")
        quality = psnr(render(model, 64, 64).clamp(0, 1), images[i : i + 1]).item()
        assert quality == pytest.approx(records[i].levels[-1].psnr, abs=0.05) and quality > 15  # CPU: 18.1, 22.0


def test_an_encode_from_the_shipped_prior_on_cuda_decodes_on_the_cpu():
    cfg = make_config("default", {"target_bpp": 2.0})  # 1 bpp at 64 px (512 bytes) is too few for an M-Net
    prior = choose_prior(cfg)
    assert prior is not None  # a rate target starts from the shipped prior
    images = photos()
    records, blobs = encode(images, cfg, device="cuda", prior=prior)
    for i, blob in enumerate(blobs):
        assert len(blob) <= 2 * 64 * 64 / 8 and records[i].prior_id == prior.prior_id
        model, _ = modelfile.from_bytes(blob, f"image {i}", prior)
        quality = psnr(render(model, 64, 64).clamp(0, 1), images[i : i + 1]).item()
        assert quality == pytest.approx(records[i].levels[-1].psnr, abs=0.05) and quality > 17  # CPU: 19.2, 19.7
