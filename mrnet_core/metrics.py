"""Quality and size figures: PSNR and SSIM per image, parameter and byte counts."""
from collections.abc import Iterable

import torch
import torch.nn.functional as F


LOSSLESS_DB = 120.0  # what `psnr` gives identical images (their squared error is taken as 1e-12)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of [B, C, H, W] images in [0, 1]: one value per image; LOSSLESS_DB for
    identical images."""
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def is_lossless(db: float | None) -> bool:
    """Whether a PSNR says the images were identical: such a figure is a label ("lossless"), never averaged."""
    return db is not None and db >= LOSSLESS_DB - 1e-3


def lossy_mean(values: Iterable[float | None]) -> tuple[float | None, int]:
    """(mean of the PSNRs that are not lossless or None, how many were lossless): means of PSNR leave out exact
    matches, which would otherwise count as 120 dB."""
    values = list(values)
    lossy = [v for v in values if v is not None and not is_lossless(v)]
    return (sum(lossy) / len(lossy) if lossy else None), sum(is_lossless(v) for v in values)


def _gaussian_window(size, sigma, device):
    x = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, Gaussian window) of [B, C, H, W] images in [0, 1], per image.

    Small images use the largest odd window that fits, so coarse pyramid levels get a value too.
    """
    a, b = a.float().clamp(0, 1), b.float().clamp(0, 1)
    bsz, c, h, w = a.shape
    size = min(window, h - (h + 1) % 2, w - (w + 1) % 2)
    g = _gaussian_window(size, sigma * size / window, a.device)
    kernel_h, kernel_v = g.view(1, 1, 1, size).repeat(c, 1, 1, 1), g.view(1, 1, size, 1).repeat(c, 1, 1, 1)

    def filt(x):
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_v, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def seam(images: torch.Tensor) -> torch.Tensor:
    """How visible the tile boundary is when [B, C, H, W] images are tiled: per image, the larger over the two
    directions of (mean jump across the boundary, last row or column to first) / (mean jump between neighbouring
    pixels inside). About 1 is seamless; a seam shows as a jump several times the typical one.
    """
    a = images.float()
    ratios = []
    for dim in (2, 3):
        inside = a.diff(dim=dim).abs().flatten(1).mean(1)
        across = (a.select(dim, 0) - a.select(dim, -1)).abs().flatten(1).mean(1)
        ratios.append(across / inside.clamp_min(1e-8))
    return torch.maximum(*ratios)
