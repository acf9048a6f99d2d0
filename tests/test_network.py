import pytest
import torch

from mrnet_core.config import make_config
from mrnet_core.network import Architecture, MRNet, StageSpec
from mrnet_core.pyramid import pixel_grid


def reference_mnet(channels=3):
    stages = (StageSpec(64, (128,), 8.0), StageSpec(128, (192,), 16.0), StageSpec(192, (256,), 32.0))
    return Architecture("m", channels, stages)


def test_reference_mnet_parameter_count():
    # The research code's 3-stage M-Net for RGB images has 159,113 parameters.
    arch = reference_mnet()
    assert arch.params() == 159_113
    model = MRNet(arch, batch=2)
    assert sum(p.numel() for p in model.parameters()) == 2 * 159_113
    assert make_config().architecture(3) == arch


def test_integer_t_is_the_partial_sum_of_stages():
    model = MRNet(reference_mnet(), batch=2, seed=3)
    x = pixel_grid(5, 7)
    outputs, _ = model.stage_outputs(x)
    for i in range(3):
        assert torch.allclose(model(x, t=i + 1), sum(outputs[: i + 1]), atol=1e-6)
    assert torch.equal(model(x, t=0), torch.zeros_like(outputs[0]))


def test_fractional_t_blends_the_next_stage_in():
    model = MRNet(Architecture("l", 1, (StageSpec(8, (8,), 4.0), StageSpec(8, (8,), 8.0))), seed=1)
    x = pixel_grid(4, 4)
    g0, g1 = model.stage_outputs(x)[0]
    assert torch.allclose(model(x, t=1.25), g0 + 0.25 * g1, atol=1e-6)
    assert torch.allclose(model(x, t=0.5), 0.5 * g0, atol=1e-6)
    with pytest.raises(ValueError, match="level of detail"):
        model(x, t=2.5)


def test_mnet_hidden_layer_reads_own_features_and_previous_basis():
    arch = Architecture("m", 3, (StageSpec(4, (6,), 4.0), StageSpec(5, (7,), 8.0)))
    model = MRNet(arch, seed=2)
    x = pixel_grid(3, 3)[None]
    s0, s1 = model.stages
    _, basis = s0(x)
    # Explicit concatenation, as in the specification.
    h1 = torch.sin(s1.omegas[0] * (x @ s1.weights[0] + s1.biases[0][:, None]))
    z = torch.cat([h1, basis], -1) @ s1.weights[1] + s1.biases[1][:, None]
    expected = torch.sin(arch.omega_hidden * z) @ s1.weights[2] + s1.biases[2][:, None]
    assert torch.allclose(s1(x, basis)[0], expected, atol=1e-5)
    assert arch.layer_shapes(1) == [(2, 5), (5 + 6, 7), (7, 3)]


def test_siren_initialisation_ranges_and_same_start_for_every_image():
    model = MRNet(reference_mnet(), batch=3, seed=0)
    first, hidden = model.stages[2].weights[0], model.stages[2].weights[1]
    assert first.abs().max() <= 1 and first.abs().max() > 0.9
    bound = (6 / hidden.shape[1]) ** 0.5 / 30
    assert hidden.abs().max() <= bound
    assert torch.equal(first[0], first[2])


def test_architecture_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hidden"):
        Architecture("s", 3, (StageSpec(4, (4,), 1.0),))
    with pytest.raises(ValueError, match="model"):
        Architecture("x", 3, (StageSpec(4, (4,), 1.0),))
    with pytest.raises(ValueError, match="positive"):
        Architecture("l", 3, (StageSpec(0, (4,), 1.0),))
