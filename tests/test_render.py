import pytest
import torch

from mrnet_core.config import make_config
from mrnet_core.network import MRNet
from mrnet_core.pyramid import pixel_grid
from mrnet_core.render import antialiased_level, render

LEVELS = [(16, 16), (32, 32), (64, 64)]


def test_antialiased_level_follows_the_pixel_footprint():
    assert antialiased_level(LEVELS, 64, 64) == 3
    assert antialiased_level(LEVELS, 128, 128) == 3
    assert antialiased_level(LEVELS, 32, 32) == pytest.approx(2)
    assert antialiased_level(LEVELS, 16, 16) == pytest.approx(1)
    assert antialiased_level(LEVELS, 4, 4) == 1
    assert 2 < antialiased_level(LEVELS, 45, 45) < 3
    # Zooming into a quarter of the domain needs every stage at a quarter of the pixels.
    assert antialiased_level(LEVELS, 16, 16, window=(-1, -1, -0.5, -0.5)) == 3


def test_render_any_size_and_window_matches_direct_evaluation():
    model = MRNet(make_config("fast").architecture(3), batch=2, seed=1)
    out = render(model, 7, 5, t=2.5, window=(-3.0, -1.0, 3.0, 2.0), chunk=8)
    assert out.shape == (2, 3, 5, 7)
    direct = model(pixel_grid(5, 7, (-3.0, -1.0, 3.0, 2.0)), t=2.5).reshape(2, 5, 7, 3).permute(0, 3, 1, 2)
    assert torch.allclose(out, direct, atol=1e-6)


def test_an_anti_aliased_thumbnail_renders_only_the_coarse_stages():
    model = MRNet(make_config("fast").architecture(1), seed=1)
    thumbnail = render(model, 16, 16, t=antialiased_level(LEVELS, 16, 16))
    assert torch.allclose(thumbnail, render(model, 16, 16, t=1.0))
    assert not torch.allclose(thumbnail, render(model, 16, 16))
