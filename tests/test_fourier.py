import math

import pytest
import torch

from mrnet_core.config import ConfigError, make_config
from mrnet_core.fit import fit
from mrnet_core.modelfile import ImageMeta, from_bytes, to_bytes
from mrnet_core.network import Architecture, MRNet, StageSpec
from mrnet_core.render import render

SMALL = {"first": [32], "hidden": [32], "omega_0": [8.0], "levels": 1, "max_epochs": [100], "lr_final": 1e-4,
         "batch_pixels": 256}


def waves(size=32):
    """A smooth RGB test image: a couple of sinusoids per channel, in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([0.5 + 0.25 * torch.sin(3 * x + c) + 0.2 * torch.cos(2 * y - 4 * x * c) for c in range(3)])


def test_first_layer_is_a_sin_cos_embedding_with_relu_layers_above():
    arch = Architecture("f", 3, (StageSpec(6, (8, 8), 5.0),))
    stage = MRNet(arch, batch=2, seed=0).stages[0]
    w, b = stage.weights[0][0], stage.biases[0][0]
    assert torch.equal(w[:, :3], w[:, 3:])  # the cos features reuse the sin features' frequencies
    assert torch.equal(b[:3], torch.zeros(3)) and torch.allclose(5.0 * b[3:], torch.full((3,), math.pi / 2))
    assert stage.activations == ["sin", "relu", "relu"] and stage.omegas == [5.0, 1.0, 1.0]
    x = torch.rand(2, 10, 2) * 2 - 1
    features = torch.sin(5.0 * (x @ stage.weights[0] + stage.biases[0][:, None]))
    assert torch.allclose(features[..., 3:], torch.cos(5.0 * x @ stage.weights[0][:, :, :3]), atol=1e-5)


def test_fit_learns_and_leaves_the_embedding_bit_identical():
    cfg = make_config("default", SMALL, model="f")
    image = waves()[None]
    initial = MRNet(cfg.architecture(3), seed=cfg.seed)  # what `fit` starts from
    start = initial.stages[0]
    model, reports = fit(image, cfg, device="cpu")
    stage = model.stages[0]
    assert torch.equal(stage.weights[0], start.weights[0]) and torch.equal(stage.biases[0], start.biases[0])
    assert not torch.equal(stage.weights[1], start.weights[1])
    initial_loss = (render(initial, 32, 32) - image).square().mean()
    assert reports[0].loss[0] < initial_loss / 100


@pytest.fixture(scope="module")
def fitted():
    model, _ = fit(waves()[None], make_config("default", SMALL, model="f"), device="cpu")
    return model


@pytest.mark.parametrize("bits", [32, 8])
def test_model_file_round_trip(fitted, bits):
    model = fitted
    meta = ImageMeta(32, 32, 3, 1)
    loaded, read_meta = from_bytes(to_bytes(model, meta, bits))
    assert loaded.arch == model.arch and read_meta == meta
    before, after = render(model, 32, 32), render(loaded, 32, 32)
    assert (before - after).abs().max() <= (0 if bits == 32 else 0.02)  # 8 bits: about 0.006 measured


def test_config_defaults_and_levels():
    one = make_config("default", {"levels": 1}, model="f")
    assert [(s.first, s.hidden, s.omega_0) for s in one.architecture(3).stages] == [(256, (256,), 40.0)]
    three = make_config("default", {"target": "laplacian"}, model="f").architecture(3)
    assert three.model == "f" and [s.omega_0 for s in three.stages] == [10.0, 20.0, 40.0]
    with pytest.raises(ConfigError, match="periodic"):
        make_config("default", {"periodic": True}, model="f")
