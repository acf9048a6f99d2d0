import pytest
import torch

from conftest import sample
from mrnet_core.config import ConfigError, load_file, make_config
from mrnet_core.encode import level_metrics
from mrnet_core.fit import fit, fit_stage, level_targets, loss_and_grads
from mrnet_core.network import MRNet

TINY = {"first": [8, 12], "hidden": [12, 16], "levels": 2, "max_epochs": [15, 15], "lr": 1e-3, "lr_final": 1e-4}


def tiny(**over):
    return make_config("fast", {**TINY, **over})


def test_training_a_stage_leaves_earlier_stages_bit_identical(astronaut64):
    cfg = tiny()
    images = astronaut64[None]
    model = MRNet(cfg.architecture(3), seed=0)
    targets = level_targets(images, cfg)
    generator = torch.Generator().manual_seed(0)
    fit_stage(model, 0, targets[0], cfg, generator)
    before = [p.clone() for p in model.stages[0].parameters()]
    later = [p.clone() for p in model.stages[1].parameters()]
    fit_stage(model, 1, targets[1], cfg, generator)
    assert all(torch.equal(a, b) for a, b in zip(before, model.stages[0].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(later, model.stages[1].parameters()))


@pytest.mark.parametrize("batch_pixels", [0, 512])
def test_batch_matches_each_image_fitted_alone(batch_pixels):
    cfg = tiny(batch_pixels=batch_pixels)
    images = torch.stack([sample(n, 32)[:, :21, :21] for n in ("astronaut.png", "coffee.png", "chelsea.png")])
    together, _ = fit(images, cfg, device="cpu")
    for i in range(3):
        alone, _ = fit(images[i : i + 1], cfg, device="cpu")
        for p, q in zip(together.parameters(), alone.parameters()):
            assert torch.allclose(p[i], q[0], atol=1e-4), "batched fit drifted from the single fit"


def test_same_seed_reproduces_and_another_seed_differs(astronaut64):
    images = astronaut64[None, :, :32, :32]
    a, _ = fit(images, tiny(seed=5), device="cpu")
    b, _ = fit(images, tiny(seed=5), device="cpu")
    c, _ = fit(images, tiny(seed=6), device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_images_in_one_batch_stop_at_their_own_epoch():
    flat = torch.full((3, 16, 16), 0.5)
    busy = sample("astronaut.png", 16)
    cfg = tiny(loss_tol=2e-3, max_epochs=[60, 60])
    _, reports = fit(torch.stack([flat, busy]), cfg, device="cpu")
    epochs = reports[1].epochs  # the flat image's residual is flat: it stops early in stage 2
    assert epochs[0] < epochs[1] == 60
    assert reports[1].loss[0] < 2e-3 <= reports[1].loss[1]


def test_stall_stops_a_stage_early():
    flat = torch.full((1, 3, 16, 16), 0.25)
    cfg = tiny(stall_epochs=3, stall_tol=0.5, max_epochs=[200, 200])
    _, reports = fit(flat, cfg, device="cpu")
    assert all(r.epochs[0] < 200 for r in reports)


def test_fast_preset_learns_a_photo(astronaut64):
    cfg = make_config("fast", {"levels": 3})
    model, reports = fit(astronaut64[None], cfg, device="cpu")
    levels = level_metrics(model, astronaut64[None], cfg)[0]
    assert [(lv.height, lv.width) for lv in levels] == [(16, 16), (32, 32), (64, 64)]
    assert levels[-1].psnr > 22 and levels[0].psnr > 22
    assert 0 < levels[-1].ssim <= 1
    assert [r.params for r in reports] == [model.arch.stage_params(i) for i in range(3)]


def test_laplacian_targets_fit_bands_independently(astronaut64):
    cfg = make_config("fast", {"model": "l", "target": "laplacian", "levels": 2})
    model, _ = fit(astronaut64[None], cfg, device="cpu")
    assert level_metrics(model, astronaut64[None], cfg)[0][-1].psnr > 20


def test_bad_configs_are_one_clear_line():
    with pytest.raises(ConfigError, match="unknown config key"):
        make_config("default", {"learning_rate": 1})
    with pytest.raises(ConfigError, match="M-Net"):
        make_config("default", {"target": "laplacian"})
    with pytest.raises(ConfigError, match="lr: must be a number above 0 and at most 1, not -1.0"):
        make_config("default", {"lr": -1.0})
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ConfigError, match="levels: must be an integer from 1 to 16, not 'three'"):
        make_config("default", {"levels": "three"})


def test_levels_override_keeps_the_finest_stages():
    cfg = make_config("default", {"levels": 4})
    arch = cfg.architecture(3)
    assert [s.omega_0 for s in arch.stages] == [4.0, 8.0, 16.0, 32.0]
    assert [s.first for s in arch.stages] == [64, 64, 128, 192]


@pytest.mark.parametrize("model", ["s", "l", "m", "f"])
def test_hand_written_gradients_match_autograd(model):
    cfg = make_config("fast", {"model": model, "hidden_layers": 2} if model != "s" else {"model": model})
    net = MRNet(cfg.architecture(3), batch=2, seed=1).requires_grad_(False)
    stage = net.stages[1]
    x = torch.rand(2, 50, 2) * 2 - 1
    basis = torch.rand(2, 50, cfg.architecture(3).stages[0].hidden[-1]) if model == "m" else None
    target = torch.rand(2, 50, 3)
    weight = torch.tensor([1.0, 0.5])
    per_image = loss_and_grads(stage, x, basis, target, weight)
    manual = [p.grad for p in stage.parameters()]
    if model == "f":  # the Fourier-feature MLP's fixed embedding gets no gradients
        assert manual[0] is None and manual[len(stage.weights)] is None
    stage.requires_grad_(True)
    for p in stage.parameters():
        p.grad = None
    pred, _ = stage(x, basis)
    expected = (pred - target).square().mean(dim=(1, 2))
    (expected * weight).sum().backward()
    assert torch.allclose(per_image, expected.detach(), atol=1e-6)
    for got, p in zip(manual, stage.parameters()):
        if got is not None:
            assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-6)


def test_config_files_hold_fit_keys_flat_or_in_a_fit_table(tmp_path):
    flat, tables = tmp_path / "flat.toml", tmp_path / "tables.toml"
    flat.write_text("lr = 1e-3\nlevels = 2\n")
    tables.write_text("[fit]\nlevels = 2\n[job]\nsize = 64\n")
    assert load_file(flat) == ({"lr": 1e-3, "levels": 2}, {})
    assert load_file(tables) == ({"levels": 2}, {"job": {"size": 64}})
    mixed = tmp_path / "mixed.json"
    mixed.write_text('{"lr": 0.001, "fit": {"levels": 2}}')
    with pytest.raises(ConfigError, match="lr: put fit keys"):
        load_file(mixed)
    broken = tmp_path / "broken.toml"
    broken.write_text("levels = [")
    with pytest.raises(ConfigError, match="broken.toml: cannot read config"):
        load_file(broken)
