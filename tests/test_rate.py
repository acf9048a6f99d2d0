"""Compact weights: quantisation-aware fine-tuning and rate control, on a real photo."""
import copy

import pytest
import torch

from mrnet_core.config import ConfigError, make_config
from mrnet_core.encode import encode, measure
from mrnet_core.fit import fit
from mrnet_core.modelfile import ImageMeta, from_bytes, to_bytes
from mrnet_core.network import MRNet
from mrnet_core.quantize import dequantise, fake_quantise, finetune, level_outputs, quantise, quantised_parameters
from mrnet_core.rate import within_budget

from conftest import sample


def photo(name):
    return sample(name, 32)


@pytest.mark.parametrize("model", ["s", "l", "m"])
def test_the_joint_step_evaluates_every_level_as_the_network_does(model):
    # Each stage runs once over the rows of all the levels it contributes to; level k must still be f(x, k + 1).
    net = MRNet(make_config("fast", model=model).architecture(3), batch=2, seed=1)
    rows = [5, 7, 11]
    x = torch.rand(2, sum(rows), 2) * 2 - 1
    starts = [0, 5, 12]
    out = level_outputs(net, dict(net.named_parameters()), x, starts)
    for k, (start, n) in enumerate(zip(starts, rows)):
        expected = net(x[:, start : start + n], k + 1)
        assert torch.allclose(out[:, start : start + n], expected, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 6, 8, 12])
def test_fake_quantisation_is_the_stored_grid(bits):
    for shape in [(2, 64, 40), (2, 10, 7), (2, 33)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 0.3
        assert torch.equal(fake_quantise(w, bits), dequantise(*quantise(w, bits)))


def test_quantisation_aware_finetuning_beats_rounding_after_the_fit():
    images = photo("astronaut.png")[None]
    cfg = make_config("fast", {"levels": 2, "max_epochs": [150, 150], "weight_bits": 4})
    fitted, _ = fit(images, cfg, device="cpu")
    rounded = measure(fitted, images, cfg)[0][0].levels[-1].psnr  # measure leaves `fitted` as trained
    tuned = copy.deepcopy(fitted)
    finetune(tuned, images, 4, epochs=40, lr=1e-4, batch_pixels=1024, levels=2)
    after = measure(tuned, images, cfg)[0][0].levels[-1].psnr
    assert after > rounded + 0.3


def test_target_bpp_keeps_every_image_under_it():
    images = torch.stack([photo("astronaut.png"), photo("camera.png").expand(3, -1, -1)])
    for target in (3.0, 6.0):
        cfg = make_config("fast", {"levels": 2, "max_epochs": [40, 40], "qat_epochs": 2, "target_bpp": target})
        records, blobs = encode(images, cfg, device="cpu")
        for r, blob in zip(records, blobs):
            assert r.model_bytes == len(blob) <= target * 32 * 32 / 8
            assert r.bpp <= target and r.rate.met and r.weight_bits == 8
            # within reach of the budget: rate control sizes the widths up to it, not far below
            assert r.bpp > 0.7 * target


def test_a_file_over_its_budget_gets_coarser_steps_until_it_fits():
    images = photo("rocket.jpg")[None]
    cfg = make_config("fast", {"levels": 2, "max_epochs": [60, 60], "qat_epochs": 0, "weight_bits": 8})
    model, _ = fit(images, cfg, device="cpu")
    meta = ImageMeta(32, images.shape[-2], 3, 2)
    natural = to_bytes(model, meta, 8)
    assert within_budget(model, meta, 8, 0, len(natural)) == (natural, 0)
    sizes = [len(to_bytes(model, meta, 8, coarser=k)) for k in (0, 4, 8, 16)]
    assert sizes == sorted(sizes, reverse=True) and sizes[2] < 0.95 * sizes[0]  # 8 codes: one bit less a weight
    blob, coarser = within_budget(model, meta, 8, 0, sizes[2])
    assert len(blob) <= sizes[2] and 0 < coarser <= 8
    # The file holds the coarser grid, and decodes to it exactly.
    grid = quantised_parameters(model, 8, fake=False, coarser=coarser)
    for name, p in from_bytes(blob)[0].named_parameters():
        assert torch.equal(p[0], grid[name][0]), name
    with pytest.raises(ValueError, match="over the budget of 100"):
        within_budget(model, meta, 8, 0, 100)
    with pytest.raises(ValueError, match="needs quantised weights"):
        within_budget(model, meta, 32, 0, 10**6)


def test_a_bigger_budget_buys_a_bigger_and_better_model():
    images = photo("coffee.png")[None]
    small, large = (encode(images, make_config("fast", {"levels": 2, "max_epochs": [60, 60], "qat_epochs": 2,
                                                         "target_bpp": t}), device="cpu")[0][0] for t in (2.0, 8.0))
    assert large.params > 2 * small.params
    assert large.levels[-1].psnr > small.levels[-1].psnr


def test_target_psnr_takes_the_smallest_model_that_reaches_it():
    images = photo("chelsea.png")[None]
    cfg = make_config("fast", {"levels": 2, "max_epochs": [300, 300], "qat_epochs": 2, "weight_bits": 8})
    top = encode(images, cfg, device="cpu")[0][0]
    target = top.levels[-1].psnr - 10  # reachable with a smaller model than the config's own (measured: -8 dB
    # at 0.63 of the widths, 42% of the parameters)
    record = encode(images, make_config("fast", {**cfg.to_dict(), "target_psnr": target}), device="cpu")[0][0]
    assert record.rate.met and record.levels[-1].psnr >= target
    assert record.params < top.params
    unreachable = encode(images, make_config("fast", {**cfg.to_dict(), "target_psnr": 99.0}), device="cpu")[0][0]
    assert not unreachable.rate.met and unreachable.rate.scale == pytest.approx(1.0)


def test_a_budget_below_the_smallest_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="below the smallest MR-Net"):
        encode(photo("astronaut.png")[None], make_config("fast", {"levels": 2, "target_bpp": 0.01}), device="cpu")
    with pytest.raises(ConfigError, match="less than a byte"):  # a budget of 0 bytes is not "no target"
        encode(photo("astronaut.png")[None], make_config("fast", {"levels": 2, "target_bpp": 1e-5}), device="cpu")
    with pytest.raises(ConfigError, match="periodic"):
        make_config("texture", {"weight_bits": 6})


def test_finetuning_keeps_a_fourier_embedding_as_drawn():
    images = photo("astronaut.png")[None]
    cfg = make_config("default", {"levels": 1, "max_epochs": [5], "first": [16], "hidden": [16]}, model="f")
    model, _ = fit(images, cfg, device="cpu")
    embedding = model.stages[0].weights[0].clone(), model.stages[0].biases[0].clone()
    hidden = model.stages[0].weights[1].clone()
    finetune(model, images, 6, epochs=3, batch_pixels=256, levels=1)
    assert torch.equal(model.stages[0].weights[0], embedding[0])
    assert torch.equal(model.stages[0].biases[0], embedding[1])
    assert not torch.equal(model.stages[0].weights[1], hidden)
