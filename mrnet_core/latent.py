"""Latent pyramids ("g"): an image as a pyramid of quantised latent grids read by one small shared MLP.

Grid k (k = 0 coarsest, ..., N-1 finest) holds one value per pixel of level k of the image's pyramid
(`pyramid.level_sizes`). The network is

    f(x, t) = MLP([c_0(t) z_0(x), ..., c_{N-1}(t) z_{N-1}(x)]),   c_k(t) = clamp(t - k, 0, 1),

where z_k(x) is grid k bilinearly interpolated at the point x of the domain [-1, 1]^2 (wrapped around for periodic
textures) and the MLP has ReLU hidden layers and a linear output. Like an MR-Net's stages, t = k shows level k from
the coarsest k grids alone, fractional t blends, and f can be drawn at any size and window (`render.render`).

Where an MR-Net keeps the image in its weights, this keeps it in the latents, which entropy-code far better: they
are trained for it, under a rate-distortion loss (`fit`): every level's squared error plus `lam` times the latents'
bits per pixel under a zero-mean Laplace per grid, with uniform noise standing in for rounding (Ballé et al. 2017),
then straight-through rounding to finish (as Cool-chic, Ladune et al. 2023, does). The file format is in modelfile.py.
"""
import json
import math
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import DEFAULT_MAX_PIXELS
from .pyramid import gaussian_pyramid, level_sizes, pixel_grid

NOISE_SHARE = 0.8  # of the steps trained through uniform noise; the rest through straight-through rounding
# Latents per image, at most: a 12.5 Mpx image's pyramid (about 4/3 of its pixels). It bounds what a model file can
# make a reader allocate and decode (at about a million symbols a second) whatever its header says.
MAX_LATENTS = 2**24


@dataclass(frozen=True)
class LatentArchitecture:
    channels: int
    width: int
    height: int
    levels: int  # grids, one per level of detail
    hidden: tuple = (16, 16)  # the MLP's hidden widths
    periodic: bool = False  # grids wrap around: the image tiles the plane with period 2
    model: str = "g"

    def __post_init__(self):
        if self.channels < 1 or not self.hidden or any(w < 1 for w in self.hidden):
            raise ValueError(f"channels and hidden widths must be positive, not {self.channels}, {self.hidden}")
        sizes = level_sizes(self.height, self.width, levels=self.levels)  # ValueError when too small for the levels
        latents = sum(h * w for h, w in sizes)
        if latents > MAX_LATENTS:
            raise ValueError(f"a {self.width}x{self.height} image's {self.levels} grids hold {latents:,} latents, "
                             f"over a latent pyramid's limit of {MAX_LATENTS:,} (about 12.5 Mpx); use --size")

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each grid, coarse to fine."""
        return level_sizes(self.height, self.width, levels=self.levels)[::-1]

    def layer_shapes(self) -> list[tuple[int, int]]:
        widths = [self.levels, *self.hidden, self.channels]
        return list(zip(widths, widths[1:]))

    def params(self) -> int:
        """Weights and latents per image."""
        return sum((fi + 1) * fo for fi, fo in self.layer_shapes()) + sum(h * w for h, w in self.sizes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def sample(grids: torch.Tensor, coords: torch.Tensor, periodic: bool) -> torch.Tensor:
    """Bilinear interpolation of grids [B, h, w] (pixel centres tiling [-1, 1]^2) at coords [P, 2]: [B, P].
    Outside the grid its edge values continue, or, when `periodic`, the grid repeats."""
    b, h, w = grids.shape
    u = (coords[:, 0] + 1) * (w / 2) - 0.5  # [P], in grid columns
    v = (coords[:, 1] + 1) * (h / 2) - 0.5  # [P], in grid rows
    u0, v0 = u.floor(), v.floor()
    fu, fv = u - u0, v - v0  # [P], the weights of the right and lower neighbours

    def index(i, n):
        i = i.long()
        return i.remainder(n) if periodic else i.clamp(0, n - 1)

    left, right, top, bottom = index(u0, w), index(u0 + 1, w), index(v0, h), index(v0 + 1, h)
    flat = grids.reshape(b, h * w)

    def at(row, col):
        return flat[:, row * w + col]  # [B, P]

    upper = at(top, left) * (1 - fu) + at(top, right) * fu
    lower = at(bottom, left) * (1 - fu) + at(bottom, right) * fu
    return upper * (1 - fv) + lower * fv


class LatentNet(nn.Module):
    """The latents and MLP of B images of one `LatentArchitecture`: every tensor has a leading image dimension."""

    def __init__(self, arch: LatentArchitecture, batch: int = 1, seed: int = 0):
        super().__init__()
        self.arch, self.batch = arch, batch
        self.exponents = [None] * batch  # per image: its MLP weights are multiples of 2^-e (`quantise_weights`)
        generator = torch.Generator().manual_seed(seed)
        self.grids = nn.ParameterList([nn.Parameter(torch.zeros(batch, h, w)) for h, w in arch.sizes])
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in arch.layer_shapes():
            bound = math.sqrt(6 / fan_in) / 2  # He-uniform for ReLU, halved: the latents start at zero anyway
            # One draw for every image: an image starts the same in any batch.
            draw = (torch.rand(1, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(draw.repeat(batch, 1, 1)))
            self.biases.append(nn.Parameter(torch.zeros(batch, fan_out)))

    def forward(self, coords: torch.Tensor, t: float | None = None,
                latents: list[torch.Tensor] | None = None) -> torch.Tensor:
        """f(coords, t) for every image: [B, P, C] at coords [P, 2]; t=None shows every level. `latents` stand in for
        the grids (noisy or rounded ones while fitting)."""
        grids = self.grids if latents is None else latents
        features = [sample(g, coords, self.arch.periodic) for g in grids]  # N of [B, P]
        return self.mlp(torch.stack(features, dim=-1), t)

    def on_pixels(self, height: int, width: int, t: float | None = None,
                  latents: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`forward` at the pixel centres of a height x width image of the whole domain (`pyramid.pixel_grid`), for
        fitting: there bilinear interpolation is torch's upsampling, which is several times faster (the same values,
        up to rounding; periodic grids go through `sample`)."""
        if self.arch.periodic:
            return self(pixel_grid(height, width, device=self.grids[0].device), t, latents)
        grids = self.grids if latents is None else latents
        up = [F.interpolate(g.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False)
              for g in grids]  # N of [B, 1, H, W]
        return self.mlp(torch.cat(up, dim=1).flatten(2).transpose(1, 2), t)  # features [B, H*W, N]

    def mlp(self, features: torch.Tensor, t: float | None = None) -> torch.Tensor:
        """The MLP on interpolated grids [B, P, N], the finer ones faded out by c_k(t): [B, P, C]."""
        t = float(self.arch.levels) if t is None else float(t)
        fade = torch.tensor([min(max(t - k, 0.0), 1.0) for k in range(self.arch.levels)], device=features.device)
        h = features * fade  # [B, P, N]
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b.unsqueeze(1), h, w)  # [B, P, fan_out]
            if j < len(self.weights) - 1:
                h = torch.relu(h)
        return h


def laplace_bits(symbols: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Bits of each value of `symbols` [B, ...] (integers, or integers plus noise) under a zero-mean Laplace of scale
    exp(log_scale) [B], integrated over its unit-wide bin: [B, ...]."""
    scale = log_scale.clamp(-6, 12).exp().view(-1, *[1] * (symbols.dim() - 1))

    def cdf(v):  # of the Laplace, at v / scale
        tail = 0.5 * torch.exp(-v.abs())
        return torch.where(v < 0, tail, 1 - tail)

    centred, half = symbols / scale, 0.5 / scale
    return -torch.log2((cdf(centred + half) - cdf(centred - half)).clamp_min(2**-30))


def fit(images: torch.Tensor, arch: LatentArchitecture, lam: float, steps: int = 3000, lr: float = 1e-2,
        coarse_weight: float = 0.1, border: str = "reflect", seed: int = 0,
        progress: Callable[[int, torch.Tensor], None] | None = None) -> LatentNet:
    """Fit one latent pyramid per image of [B, C, H, W] in [0, 1], all at once: Adam on latents and MLP against
    every level's squared error (the finest weighing 1, each coarser `coarse_weight`) plus `lam` times the latents'
    bits per pixel. Returns the model with its latents rounded to integers. Images are independent: each has its own
    loss terms, starts from the same draw and sees the same noise, and Adam is per element, so a batch fits each image
    as it would be fitted alone (up to the order of floating-point sums). `progress(step, error)` gets each step's
    full-resolution squared error per image [B]."""
    b, c, h, w = images.shape
    if (c, h, w) != (arch.channels, arch.height, arch.width):
        raise ValueError(f"images of {c}x{h}x{w} do not fit a latent architecture of "
                         f"{arch.channels}x{arch.height}x{arch.width}")
    torch.manual_seed(seed)
    model = LatentNet(arch, batch=b, seed=seed).to(images.device)
    log_scales = nn.Parameter(torch.zeros(b, arch.levels, device=images.device))  # the rate's Laplace per grid
    targets = gaussian_pyramid(images, levels=arch.levels, border="wrap" if arch.periodic else border)[::-1]
    levels = [(g.shape[-2:], g.flatten(2).transpose(1, 2), k) for k, g in enumerate(targets)]  # target [B, P, C]
    optimizer = torch.optim.Adam([*model.parameters(), log_scales], lr=lr)
    for step in range(steps):
        noisy = step < NOISE_SHARE * steps
        for group in optimizer.param_groups:  # cosine decay, a tenth of it once rounding takes over
            group["lr"] = lr * (1.0 if noisy else 0.1) * 0.5 * (1 + math.cos(math.pi * step / steps))
        if noisy:  # the same noise for every image, so that an image is fitted the same in any batch
            latents = [g + torch.rand_like(g[:1]) - 0.5 for g in model.grids]
        else:  # rounded on the way forward, the identity on the way back
            latents = [g + (torch.round(g) - g).detach() for g in model.grids]
        loss = 0
        for (height, width), target, k in levels:
            error = (model.on_pixels(height, width, k + 1, latents) - target).square().mean(dim=(1, 2))  # [B]
            loss = loss + error * (1.0 if k == arch.levels - 1 else coarse_weight)
        finest = error.detach()
        bits = sum(laplace_bits(z, log_scales[:, k]).sum(dim=(1, 2)) for k, z in enumerate(latents))  # [B]
        loss = (loss + lam * bits / (h * w)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress(step, finest)
    with torch.no_grad():
        for g in model.grids:
            g.copy_(torch.round(g))
    return model.requires_grad_(False)


def quantise_weights(model: LatentNet, images: torch.Tensor, lam: float, exponents: range = range(4, 13)) -> list[int]:
    """Round each image's MLP weights to multiples of 2^-e, with the e of `exponents` that minimises its squared error
    at full resolution plus `lam` times the weights' bits per pixel (estimated under a Laplace per tensor); the
    model keeps the rounded weights and each image's e (`model.exponents`), which it also returns."""
    b, _, h, w = images.shape
    target = images.flatten(2).transpose(1, 2)  # [B, P, C]
    tensors = [*model.weights, *model.biases]
    kept = [t.detach().clone() for t in tensors]
    best = torch.full((b,), math.inf, device=images.device)
    chosen = torch.zeros(b, dtype=torch.long)
    rounded = [k.clone() for k in kept]
    with torch.no_grad():
        for e in exponents:
            step = 2.0**-e
            bits = torch.zeros(b, device=images.device)
            for t, k in zip(tensors, kept):
                symbols = torch.round(k / step)
                t.copy_(symbols * step)
                spread = symbols.abs().flatten(1).mean(1).clamp_min(2**-4)  # [B], the Laplace's scale
                bits += laplace_bits(symbols, spread.log()).flatten(1).sum(1)
            error = (model.on_pixels(h, w) - target).square().mean(dim=(1, 2))  # [B]
            loss = error + lam * bits / (h * w)
            better = loss < best
            best = torch.where(better, loss, best)
            chosen[better.cpu()] = e
            for r, t in zip(rounded, tensors):
                r[better] = t[better]
        for t, r in zip(tensors, rounded):
            t.copy_(r)
    model.exponents = chosen.tolist()
    return model.exponents


# The payload of a model file of version `modelfile.LATENT_VERSION` (the envelope, version and checksum are
# modelfile.py's). All numbers little-endian:
#     header   channels, flags (1: periodic), level count, hidden-layer count: four uint8; width, height: uint32;
#              hidden widths: uint16 each; the MLP's step exponent e: uint8
#     groups   the grids coarse to fine, then each layer's weight [fan_in, fan_out] and bias: per group its Laplace
#              scale code (uint8) and its largest |symbol| (uint32)
#     symbols  word count (uint32) and the range-coded symbols (uint32 words) of every group whose largest |symbol|
#              is not 0, under a zero-mean quantised Laplace of the group's scale: latents as they are, weights as
#              multiples of 2^-e. Decoding is exact.
_HEAD = struct.Struct("<4BII")
_GROUP = struct.Struct("<BI")
MAX_HIDDEN = 4
MAX_WIDTH = 1024
MAX_EXPONENT = 24
MAX_SYMBOL = 2**20
MIN_LOG2_SCALE = -3  # scale codes 0..255 are scales 2^(-3 + code / 16)
# The smallest scale makes the likeliest symbol cost at least -log2(1 - e^-4) = 0.027 bits, so a payload of W words
# cannot hold more than about 1,200 W symbols: a header asking for more is forged, and is refused before decoding.
MAX_SYMBOLS_PER_WORD = 1200


def _scale_code(symbols: np.ndarray) -> int:
    """The code of the Laplace scale that fits `symbols` (their mean absolute value: the maximum-likelihood scale)."""
    spread = max(float(np.abs(symbols).mean()), 2.0**MIN_LOG2_SCALE)
    return int(np.clip(round((math.log2(spread) - MIN_LOG2_SCALE) * 16), 0, 255))


def _laplace(top: int, code: int):
    scale = 2.0 ** (MIN_LOG2_SCALE + code / 16)
    return constriction.stream.model.QuantizedLaplace(-top, top, 0.0, scale)


def _groups(model: LatentNet, index: int, exponent: int) -> list[np.ndarray]:
    """Each group's symbols as int32: the grids, then each layer's weight and bias in units of 2^-exponent."""
    out = [g[index].detach().cpu().numpy().astype(np.float64).ravel() for g in model.grids]
    for w, b in zip(model.weights, model.biases):
        out += [t[index].detach().cpu().double().numpy().ravel() * 2.0**exponent for t in (w, b)]
    symbols = []
    for values in out:
        rounded = np.round(values)
        if not np.array_equal(rounded, values):
            raise ValueError("the model is not quantised: fit and quantise_weights make the values integers")
        if rounded.size and np.abs(rounded).max() > MAX_SYMBOL:
            raise ValueError(f"a value of {np.abs(rounded).max():.0f} steps is more than a file holds ({MAX_SYMBOL})")
        symbols.append(rounded.astype(np.int32))
    return symbols


def to_payload(model: LatentNet, index: int = 0) -> bytes:
    """Image `index`'s header and symbols (see above); ValueError for a model that is not quantised."""
    arch, exponent = model.arch, model.exponents[index]
    if exponent is None:
        raise ValueError("the MLP weights are not quantised yet (quantise_weights)")
    groups = _groups(model, index, exponent)
    parts = [_HEAD.pack(arch.channels, int(arch.periodic), arch.levels, len(arch.hidden), arch.width, arch.height),
             struct.pack(f"<{len(arch.hidden)}HB", *arch.hidden, exponent)]
    encoder = constriction.stream.queue.RangeEncoder()
    for symbols in groups:
        top = int(np.abs(symbols).max()) if symbols.size else 0
        code = _scale_code(symbols) if top else 0
        parts.append(_GROUP.pack(code, top))
        if top:
            encoder.encode(symbols, _laplace(top, code))
    words = encoder.get_compressed()
    parts += [struct.pack("<I", len(words)), words.astype("<u4").tobytes()]
    return b"".join(parts)


def from_payload(data, offset: int, end: int, fail: Callable[[str], Exception]) -> LatentNet:
    """The model (batch 1) of a payload at data[offset:end]; `fail(reason)` makes the error for anything wrong."""
    try:
        channels, flags, levels, n_hidden, width, height = _HEAD.unpack_from(data, offset)
        offset += _HEAD.size
        if channels not in (1, 3) or flags > 1 or not 1 <= levels <= 16 or not 1 <= n_hidden <= MAX_HIDDEN:
            raise fail(f"bad header: channels {channels}, flags {flags}, {levels} levels, {n_hidden} hidden layers")
        if not 1 <= width * height <= DEFAULT_MAX_PIXELS:
            raise fail(f"bad header: {width}x{height} is not 1 to {DEFAULT_MAX_PIXELS:,} pixels")
        *hidden, exponent = struct.unpack_from(f"<{n_hidden}HB", data, offset)
        offset += 2 * n_hidden + 1
        if not all(1 <= h <= MAX_WIDTH for h in hidden) or exponent > MAX_EXPONENT:
            raise fail(f"bad header: hidden widths {hidden} (1 to {MAX_WIDTH}), step exponent {exponent}")
        try:
            arch = LatentArchitecture(channels, width, height, levels, tuple(hidden), bool(flags & 1))
        except ValueError as e:
            raise fail(f"bad header: {e}") from None
        shapes = [(h, w) for h, w in arch.sizes] + [s for fi, fo in arch.layer_shapes() for s in ((fi, fo), (fo,))]
        groups = []
        for _ in shapes:
            groups.append(_GROUP.unpack_from(data, offset))
            offset += _GROUP.size
        (n_words,) = struct.unpack_from("<I", data, offset)
        offset += 4
    except struct.error:
        raise fail("truncated header") from None
    if any(top > MAX_SYMBOL for _, top in groups):
        raise fail(f"bad header: a group's largest symbol is over {MAX_SYMBOL}")
    if offset + 4 * n_words != end:
        raise fail(f"payload is {end - offset} bytes, not the {4 * n_words} its word count says")
    coded = sum(math.prod(shape) for shape, (_, top) in zip(shapes, groups) if top)
    if coded > MAX_SYMBOLS_PER_WORD * (n_words + 1):
        raise fail(f"bad header: {coded:,} symbols cannot come from {n_words:,} words")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4", n_words, offset).astype(np.uint32))
    model = LatentNet(arch, batch=1)
    tensors = [*model.grids, *(t for pair in zip(model.weights, model.biases) for t in pair)]
    with torch.no_grad():
        for i, (tensor, shape, (code, top)) in enumerate(zip(tensors, shapes, groups)):
            n = math.prod(shape)
            try:
                symbols = decoder.decode(_laplace(top, code), n) if top else np.zeros(n, np.int32)
            except (AssertionError, ValueError):  # constriction: words that no symbols could have made
                raise fail("payload is corrupt: its words are not a coding of these symbols") from None
            values = torch.from_numpy(symbols.astype(np.float32)).reshape(1, *shape)
            tensor.copy_(values if i < levels else values * 2.0**-exponent)  # latents, then weights in 2^-e steps
    if output_bound(model) > MAX_OUTPUT:
        raise fail("its latents and weights can drive the output beyond any pixel value (overflow)")
    model.exponents = [exponent]
    return model.requires_grad_(False)


MAX_OUTPUT = 1e30  # far above any fitted model's bound (a pixel is 0 to 1), far below float32's overflow


@torch.no_grad()
def output_bound(model: LatentNet, index: int = 0) -> float:
    """A bound on |f(x, t)| for image `index` at every x and t, by interval arithmetic: interpolation and c_k(t)
    keep features within the largest |latent|, and each layer maps a bound b to max_j sum_i |W_ij| b + |b_j|."""
    bound = max(float(g[index].abs().max()) for g in model.grids)
    for w, b in zip(model.weights, model.biases):
        bound = float((w[index].abs().sum(0) * bound + b[index].abs()).max())
    return bound
