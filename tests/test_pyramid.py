import pytest
import torch

from mrnet_core.pyramid import gaussian_pyramid, laplacian_pyramid, level_sizes, pixel_grid, reconstruct, resample


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 1, 37, 50), (3, 3, 17, 9), (1, 3, 255, 128)])
@pytest.mark.parametrize("border", ["reflect", "wrap"])
def test_laplacian_reconstruction_is_exact(shape, border):
    images = torch.rand(shape)
    bands = laplacian_pyramid(images, min_size=4, border=border)
    assert len(bands) >= 2
    assert torch.allclose(reconstruct(bands, border), images, atol=1e-6)


def test_level_sizes_halve_rounding_up_and_stop_at_min_size():
    assert level_sizes(256, 171, levels=3) == [(256, 171), (128, 86), (64, 43)]
    assert level_sizes(37, 50, min_size=8) == [(37, 50), (19, 25), (10, 13)]
    with pytest.raises(ValueError, match="too small"):
        level_sizes(2, 2, levels=4)


def test_gaussian_levels_have_expected_sizes_and_keep_the_mean():
    images = torch.rand(2, 3, 40, 24)
    pyramid = gaussian_pyramid(images, levels=3)
    assert [tuple(g.shape[-2:]) for g in pyramid] == [(40, 24), (20, 12), (10, 6)]
    # A low-pass pyramid keeps the average colour (up to border effects).
    assert torch.allclose(pyramid[-1].mean((2, 3)), images.mean((2, 3)), atol=0.03)


def test_gaussian_levels_remove_fine_detail():
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]) % 2
    images = checker.float()[None, None]
    coarse = gaussian_pyramid(images, levels=2)[1]
    assert coarse.std() < 0.05 * images.std()


def test_wrap_border_commutes_with_periodic_shifts():
    images = torch.rand(1, 3, 32, 32)
    shifted = torch.roll(images, shifts=(8, 4), dims=(2, 3))
    a = gaussian_pyramid(images, levels=3, border="wrap")
    b = gaussian_pyramid(shifted, levels=3, border="wrap")
    for k, (ga, gb) in enumerate(zip(a, b)):
        assert torch.allclose(torch.roll(ga, shifts=(8 >> k, 4 >> k), dims=(2, 3)), gb, atol=1e-5)


def test_resample_to_same_size_is_identity_and_constant_stays_constant():
    images = torch.rand(1, 1, 9, 7)
    assert resample(images, 9, 7) is images
    flat = torch.full((1, 2, 9, 7), 0.3)
    assert torch.allclose(resample(flat, 4, 13), torch.full((1, 2, 4, 13), 0.3))


def test_pixel_grid_uses_pixel_centres():
    grid = pixel_grid(2, 4)
    assert grid.shape == (8, 2)
    assert torch.allclose(grid[:4, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(grid[::4, 1], torch.tensor([-0.5, 0.5]))
    window = pixel_grid(1, 2, window=(1.0, 1.0, 3.0, 3.0))
    assert torch.allclose(window, torch.tensor([[1.5, 2.0], [2.5, 2.0]]))
