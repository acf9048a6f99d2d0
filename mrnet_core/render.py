"""Render an MR-Net at any size, over any window of the domain, at any level of detail.

Rendering never needs the original image: a thumbnail evaluates only the coarse stages its pixel footprint
can show, which is both cheaper and free of aliasing.
"""
import math
from collections.abc import Sequence

import torch

from .network import MRNet
from .pyramid import pixel_grid

FULL_DOMAIN = (-1.0, -1.0, 1.0, 1.0)
CHUNK = 1 << 16  # pixels x images evaluated at once: bounds the memory of a render of any size


def antialiased_level(level_sizes: Sequence[tuple[int, int]], width: int, height: int,
                      window: tuple[float, float, float, float] = FULL_DOMAIN) -> float:
    """The level of detail t whose band limit fits an output of width x height over `window`.

    `level_sizes` are the (h, w) the stages were fitted at, coarse to fine. An output that samples the domain
    at the finest level's density or more gets every stage (t = N); each halving of the density drops one
    stage, with fractional t blending between neighbours; the coarsest stage is always shown.
    """
    n = len(level_sizes)
    fine_h, fine_w = level_sizes[-1]
    x0, y0, x1, y1 = window
    density = min(width * 2 / abs(x1 - x0) / fine_w, height * 2 / abs(y1 - y0) / fine_h)
    return min(float(n), max(1.0, n + math.log2(density)))


@torch.no_grad()
def render(model: MRNet, width: int, height: int, t: float | None = None,
           window: tuple[float, float, float, float] = FULL_DOMAIN, chunk: int = CHUNK,
           index: int | None = None) -> torch.Tensor:
    """Evaluate f(x, t) on a height x width grid of pixel centres over `window` = (x0, y0, x1, y1).

    Returns [B, C, H, W] (or [C, H, W] for image `index`), unclamped. t=None shows every stage. Pixels are
    evaluated `chunk` (pixels x images) at a time, so memory stays bounded at any output size.
    """
    device = next(model.parameters()).device
    coords = pixel_grid(height, width, window, device=device)
    chunk = max(1, chunk // model.batch)
    parts = [model(coords[i : i + chunk], t) for i in range(0, coords.shape[0], chunk)]
    out = torch.cat(parts, dim=1).reshape(model.batch, height, width, -1).permute(0, 3, 1, 2)
    return out if index is None else out[index]
