"""Gaussian and Laplacian pyramids on image batches [B, C, H, W].

Levels follow the specification's notation: index 0 is the full resolution, the last index the coarsest.
Resampling works on the continuous domain [-1, 1]^2 with pixel centres at -1 + (2j + 1) / n, so any size
(odd ones included) maps onto the next level consistently, and every level samples the same domain.
"""
import torch
import torch.nn.functional as F

BORDERS = ("reflect", "wrap")
_PAD_MODE = {"reflect": "reflect", "wrap": "circular"}
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def level_sizes(height: int, width: int, levels: int | None = None, min_size: int = 8) -> list[tuple[int, int]]:
    """Sizes (h, w) of each level, finest first. Each level halves the last (rounding up).

    Give `levels` for an exact count, or let the count run until the next level's short side would fall below
    `min_size`.
    """
    sizes = [(height, width)]
    while True:
        h, w = sizes[-1]
        if levels is not None and len(sizes) == levels:
            return sizes
        nh, nw = (h + 1) // 2, (w + 1) // 2
        if levels is None and min(nh, nw) < min_size:
            return sizes
        if min(h, w) < 2:
            raise ValueError(f"a {width}x{height} image is too small for {levels} levels")
        sizes.append((nh, nw))


def _pad(images, amount, border):
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, not {border!r}")
    h, w = images.shape[-2:]
    if border == "reflect" and min(h, w) <= amount:  # reflect padding needs more pixels than it pads
        return F.pad(images, (amount,) * 4, mode="replicate")
    return F.pad(images, (amount,) * 4, mode=_PAD_MODE[border])


def blur(images: torch.Tensor, border: str = "reflect") -> torch.Tensor:
    """Separable 5-tap binomial blur (a close approximation of a Gaussian with sigma 1)."""
    b, c, h, w = images.shape
    k = _BINOMIAL.to(images)
    x = _pad(images, 2, border).reshape(b * c, 1, h + 4, w + 4)
    x = F.conv2d(x, k.view(1, 1, 1, 5))
    x = F.conv2d(x, k.view(1, 1, 5, 1))
    return x.reshape(b, c, h, w)


# Blurring with the binomial [1, 4, 6, 4, 1] / 16 and then halving an even size, which samples midway between pixel
# pairs, is one filter at stride 2: [1, 4, 6, 4, 1] convolved with [1, 1], over 32.
_HALVING = (1 / 32, 5 / 32, 10 / 32, 10 / 32, 5 / 32, 1 / 32)


def halve(images: torch.Tensor, border: str = "reflect") -> torch.Tensor:
    """`resample(blur(images), H / 2, W / 2)` of images [B, C, H, W] of even H and W (up to rounding), as sums of
    strided slices: several times faster than `blur`'s one-channel convolutions, forwards and backwards
    (`latent.LatentNet.mipmaps` runs it at every fitting step)."""
    h, w = images.shape[-2:]
    padded = _pad(images, 2, border)
    rows = sum(c * padded[..., e : e + h : 2, :] for e, c in enumerate(_HALVING))
    return sum(c * rows[..., e : e + w : 2] for e, c in enumerate(_HALVING))


def resample(images: torch.Tensor, height: int, width: int, border: str = "reflect") -> torch.Tensor:
    """Bilinear resampling onto an (height, width) grid of pixel centres covering the same domain."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    pad = 2
    padded = _pad(images, pad, border)
    # Target pixel centres in the source's [-1, 1] frame, rescaled into the padded frame.
    ys = (torch.arange(height, device=images.device, dtype=images.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=images.device, dtype=images.dtype) * 2 + 1) / width - 1
    ys, xs = ys * h / (h + 2 * pad), xs * w / (w + 2 * pad)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    grid = grid.unsqueeze(0).expand(images.shape[0], -1, -1, -1)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_pyramid(images: torch.Tensor, levels: int | None = None, min_size: int = 8,
                     border: str = "reflect") -> list[torch.Tensor]:
    """[G_0 (full resolution), ..., G_{N-1} (coarsest)]: G_{k+1} = downsample(blur(G_k))."""
    sizes = level_sizes(*images.shape[-2:], levels=levels, min_size=min_size)
    pyramid = [images]
    for h, w in sizes[1:]:
        pyramid.append(resample(blur(pyramid[-1], border), h, w, border))
    return pyramid


def laplacian_pyramid(images: torch.Tensor, levels: int | None = None, min_size: int = 8,
                      border: str = "reflect") -> list[torch.Tensor]:
    """[L_0, ..., L_{N-1}] with L_k = G_k - upsample(G_{k+1}) and L_{N-1} = G_{N-1}."""
    gaussians = gaussian_pyramid(images, levels, min_size, border)
    return laplacian_from_gaussian(gaussians, border)


def laplacian_from_gaussian(gaussians: list[torch.Tensor], border: str = "reflect") -> list[torch.Tensor]:
    bands = [g - resample(coarser, *g.shape[-2:], border) for g, coarser in zip(gaussians, gaussians[1:])]
    return bands + [gaussians[-1]]


def reconstruct(laplacians: list[torch.Tensor], border: str = "reflect") -> torch.Tensor:
    """Invert a Laplacian pyramid: G_k = L_k + upsample(G_{k+1}). Returns G_0."""
    image = laplacians[-1]
    for band in reversed(laplacians[:-1]):
        image = band + resample(image, *band.shape[-2:], border)
    return image



def pixel_grid(height: int, width: int, window: tuple[float, float, float, float] = (-1.0, -1.0, 1.0, 1.0),
               device: str | torch.device | None = None) -> torch.Tensor:
    """Pixel-centre coordinates (x, y) of a height x width image of `window` = (x0, y0, x1, y1), row-major: [H*W, 2].

    y grows downwards, like image rows; the default window is the whole domain [-1, 1]^2.
    """
    x0, y0, x1, y1 = window
    xs = x0 + (x1 - x0) * (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    ys = y0 + (y1 - y0) * (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
