"""Latent pyramids ("g"): an image as a pyramid of quantised latent grids read by one small shared MLP.

Grid k (k = 0 coarsest, ..., N-1 finest) holds one value per pixel of level k of the image's pyramid
(`pyramid.level_sizes`). The network is

    f(x, t) = MLP([z_0^t(x), ..., z_{N-1}^t(x)]),

where z_k^t(x) is grid k as level of detail t reads it, bilinearly interpolated at the point x of the domain [-1, 1]^2
(wrapped around for periodic textures), and the MLP has ReLU hidden layers and a linear output. At t = j + 1, level
j, it reads the grids of levels 0 to j as they are and each finer grid through its mipmap at level j: the grid pooled
down to level j's size as the image's pyramid is (`LatentNet.mipmaps`), so that no input holds detail finer than the
level and the finer grids' coarse content still shows. Between integers t blends two levels' reads, and below t = 1
level 0's fades to 0. So, like an MR-Net's stages, t = k shows level k, fractional t blends, and f can be drawn at any
size and window (`render.render`) without aliasing. Files written before mipmaps (flag 16) fade the finer grids out
instead, z_k^t = clamp(t - k, 0, 1) z_k, which left levels 0 to 3 4 to 14 dB worse. With `grid_channels` G above
1, each level has G grids of its size, and the MLP reads N x G; G may also be one count per level (say more grids at
the coarse levels, whose grids are small).

Where an MR-Net keeps the image in its weights, this keeps it in the latents, which entropy-code far better: they
are trained for it, under a rate-distortion loss (`fit`): every level's squared error plus `lam` times the latents'
bits per pixel under their entropy model (a context model over the latents decoded before each, or a Laplace per
grid), with a stand-in for rounding: soft rounding plus uniform noise (Ballé et al. 2017's noise, and the soft
rounding of Agustsson and Theis 2020 as C3, Kim et al. 2024, anneals it), then straight-through rounding to finish
(as Cool-chic, Ladune et al. 2023, does). The payload format is below; the file's envelope is modelfile.py's.
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
from .pyramid import blur, gaussian_pyramid, halve, level_sizes, pixel_grid, resample

NOISE_SHARE = 0.8  # of the steps trained through soft rounding and noise; the rest through straight-through rounding
# The soft rounding's temperature, from the first step to the last noisy one (`soft_round`; C3's schedule).
SOFT_ROUND = (0.3, 0.1)
# A rate target steers the rate weight (`fit`) from this share of the steps on (from the first in a warm restart), by
# up to e^(RATE_GAIN / 2) over a fit.
RATE_WARMUP = 0.2
RATE_GAIN = 20.0
# Latents per image, at most: a 12.5 Mpx image's pyramid (about 4/3 of its pixels). It bounds what a model file can
# make a reader allocate and decode (at about a million symbols a second) whatever its header says.
MAX_LATENTS = 2**24
# Wavefronts of a context-coded pyramid, at most (`decode_order`): about 3h + w per grid, each a vectorised step of a
# fraction of a millisecond, so no file, however small, can make decoding take minutes.
MAX_DECODE_STEPS = 2**16
# A latent's Laplace scale is 2^(MIN_LOG2_SCALE + code / 16) for a code of 0 to 255, in fitting as in files.
MIN_LOG2_SCALE = -3
MAX_LOG2_SCALE = MIN_LOG2_SCALE + 255 / 16
MAX_GRID_CHANNELS = 4  # grids per level of detail
# The MLP's multiply-adds to draw an image at its own size, at most: seconds on a CPU. A model this much work to draw
# (say 3,500 px square through four layers of 1,024) is refused, so that no small file can make a render take
# minutes; the default MLP draws the largest image in about 2% of it.
MAX_DRAW_MACS = 2**38


class TooLarge(ValueError):
    """An image over a latent pyramid's limits: too many latents, or too many steps to decode."""


@dataclass(frozen=True)
class LatentArchitecture:
    channels: int
    width: int
    height: int
    levels: int  # levels of detail, each with `grid_channels` grids
    hidden: tuple = (16, 16)  # the MLP's hidden widths
    periodic: bool = False  # grids wrap around: the image tiles the plane with period 2
    context: bool = True  # the latents' probabilities come from a context model (below); False: a Laplace per grid
    model: str = "g"
    # Grids per level, all of its resolution: one count for every level, or a tuple of one per level, coarse to fine
    # (held as one int when they are all equal, so that equal architectures compare and serialise equal).
    grid_channels: int | tuple = 1
    # How a coarser level of detail reads the grids finer than it: through their mipmaps (each pooled down to the
    # level's size, as the image's pyramid is), or faded out to 0 (files written before mipmaps, flag 16 unset).
    mipmaps: bool = True

    def __post_init__(self):
        if self.channels < 1 or not self.hidden or any(w < 1 for w in self.hidden):
            raise ValueError(f"channels and hidden widths must be positive, not {self.channels}, {self.hidden}")
        counts = self.grid_channels
        if isinstance(counts, (tuple, list)):
            if len(counts) != self.levels:
                raise ValueError(f"grid channels must be one count or {self.levels} (one per level), not {counts}")
            counts = tuple(counts)
            object.__setattr__(self, "grid_channels", counts[0] if len(set(counts)) == 1 else counts)
        if not all(1 <= n <= MAX_GRID_CHANNELS for n in self.level_grids):
            raise ValueError(f"grid channels must be 1 to {MAX_GRID_CHANNELS}, not {self.grid_channels}")
        sizes = self.sizes  # ValueError when too small for the levels
        latents = sum(h * w for h, w in sizes)
        if latents > MAX_LATENTS:
            fits = MAX_LATENTS * self.width * self.height / latents / 1e6  # Mpx at this image's latents per pixel
            raise TooLarge(f"a {self.width}x{self.height} image's {self.grid_count} grids hold {latents:,} latents, "
                           f"over a latent pyramid's limit of {MAX_LATENTS:,} (about {fits:.3g} Mpx); use --size")
        macs = sum(fan_in * fan_out for fan_in, fan_out in self.layer_shapes()) * self.width * self.height
        if macs > MAX_DRAW_MACS:
            raise TooLarge(f"a {self.width}x{self.height} image through an MLP of {list(self.hidden)} takes {macs:.3g} "
                           f"multiply-adds to draw, over a latent pyramid's limit of {MAX_DRAW_MACS:.3g}; use --size "
                           "or a narrower MLP")
        steps = sum(3 * (h - 1) + w for h, w in sizes)  # wavefronts (`decode_order`): a bound on a decode's time
        if self.context and steps > MAX_DECODE_STEPS:
            raise TooLarge(f"a {self.width}x{self.height} image's grids take {steps:,} steps to decode, over the "
                           f"limit of {MAX_DECODE_STEPS:,} (a long, thin image); use entropy = \"factorised\"")

    @property
    def level_grids(self) -> tuple[int, ...]:
        """Grids per level, coarse to fine."""
        counts = self.grid_channels
        return counts if isinstance(counts, tuple) else (counts,) * self.levels

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each level of detail, coarse to fine."""
        return level_sizes(self.height, self.width, levels=self.levels)[::-1]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each grid, coarse to fine: a level's grids one after another."""
        shapes = self.level_shapes
        return [shapes[k] for k in self.grid_levels]

    @property
    def grid_levels(self) -> list[int]:
        """The level of each grid: its size, and from which level of detail on it is read as it is."""
        return [k for k, n in enumerate(self.level_grids) for _ in range(n)]

    @property
    def grid_count(self) -> int:
        return sum(self.level_grids)

    def layer_shapes(self) -> list[tuple[int, int]]:
        widths = [self.grid_count, *self.hidden, self.channels]
        return list(zip(widths, widths[1:]))

    def params(self) -> int:
        """Weights and latents per image (with the context model's weights)."""
        shapes = self.layer_shapes() + (CONTEXT_SHAPES if self.context else [])
        return sum((fi + 1) * fo for fi, fo in shapes) + sum(h * w for h, w in self.sizes)

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
        self.rate_weights = [None] * batch  # per image: the rate weight its fit ended at (`fit`)
        self._drawn_mipmaps = None  # (grids, their versions, mipmaps) last drawn without gradients (`mipmaps`)
        generator = torch.Generator().manual_seed(seed)
        self.grids = nn.ParameterList([nn.Parameter(torch.zeros(batch, h, w)) for h, w in arch.sizes])
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in arch.layer_shapes():
            bound = math.sqrt(6 / fan_in) / 2  # He-uniform for ReLU, halved: the latents start at zero anyway
            # One draw for every image: an image starts the same in any batch.
            draw = (torch.rand(1, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            self.weights.append(nn.Parameter(draw.repeat(batch, 1, 1)))
            self.biases.append(nn.Parameter(torch.zeros(batch, fan_out)))
        # The entropy model: each grid's log2 Laplace scale (the context model's offset for that grid), and the
        # context model's layers, whose last starts at zero (every latent at mean 0 and its grid's scale).
        self.grid_scales = nn.Parameter(torch.zeros(batch, arch.grid_count))
        self.context_weights, self.context_biases = nn.ParameterList(), nn.ParameterList()
        self.context_exponents = [None] * batch  # per image: its context weights are multiples of 2^-e
        for j, (fan_in, fan_out) in enumerate(CONTEXT_SHAPES if arch.context else []):
            bound = math.sqrt(6 / fan_in) / 2 if j == 0 else 0.0
            draw = (torch.rand(1, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            self.context_weights.append(nn.Parameter(draw.repeat(batch, 1, 1)))
            self.context_biases.append(nn.Parameter(torch.zeros(batch, fan_out)))

    def select(self, indices: list[int]) -> "LatentNet":
        """The images `indices` of this model, as a model of their own on the same device (parameters copied)."""
        out = LatentNet(self.arch, batch=len(indices)).to(self.grids[0].device)
        with torch.no_grad():
            for mine, theirs in zip(out.parameters(), self.parameters(), strict=True):
                mine.copy_(theirs[indices])
        for name in ("exponents", "context_exponents", "rate_weights"):
            setattr(out, name, [getattr(self, name)[i] for i in indices])
        return out.requires_grad_(self.grids[0].requires_grad)

    def forward(self, coords: torch.Tensor, t: float | None = None,
                latents: list[torch.Tensor] | None = None) -> torch.Tensor:
        """f(coords, t) for every image: [B, P, C] at coords [P, 2]; t=None shows every level. `latents` stand in for
        the grids (noisy or rounded ones while fitting)."""
        reads = self.reads(t, self.grids if latents is None else latents)
        features = [_blend(read, lambda g: sample(g, coords, self.arch.periodic)) for read in reads]  # N of [B, P]
        return self.mlp(torch.stack(features, dim=1)).transpose(1, 2)

    def on_pixels(self, height: int, width: int, t: float | None = None,
                  latents: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`forward` at the pixel centres of a height x width image of the whole domain (`pyramid.pixel_grid`)."""
        return self.mlp(self.pixel_features(height, width, latents, t)).transpose(1, 2)

    def pixel_features(self, height: int, width: int, latents: list[torch.Tensor] | None = None,
                       t: float | None = None) -> torch.Tensor:
        """The MLP's inputs [B, N, H*W] at level of detail t, at the pixel centres of a height x width image of the
        whole domain. There bilinear interpolation is torch's upsampling, which is several times faster than
        `sample` (the same values, up to rounding; periodic grids go through `sample`)."""
        reads = self.reads(t, self.grids if latents is None else latents)
        if self.arch.periodic:
            coords = pixel_grid(height, width, device=reads[0][0][0].device)
            return torch.stack([_blend(read, lambda g: sample(g, coords, True)) for read in reads], dim=1)
        def upsample(g):  # a grid (or mipmap) of the image's size is its own interpolation
            g = g.unsqueeze(1)
            return g if g.shape[-2:] == (height, width) else F.interpolate(g, size=(height, width), mode="bilinear",
                                                                           align_corners=False)

        up = [_blend(read, upsample) for read in reads]  # N of [B, 1, H, W]
        return torch.cat(up, dim=1).flatten(2)

    def mipmaps(self, grids: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each grid [B, h, w] at every level up to its own, coarse to fine: pooled down level by level as the image's
        pyramid is (`pyramid.gaussian_pyramid`), so that a coarse level reads a finer grid as its low-pass. Drawing
        (no gradients) keeps the last grids' mipmaps: `render` draws a large image a chunk at a time."""
        drawing = not torch.is_grad_enabled() or not any(g.requires_grad for g in grids)
        versions = [(g._version, g.data_ptr()) for g in grids]  # changed in place, or its data moved (`to`)
        if drawing and self._drawn_mipmaps is not None:
            kept, kept_versions, chains = self._drawn_mipmaps
            if len(kept) == len(grids) and all(a is b for a, b in zip(kept, grids)) and kept_versions == versions:
                return chains
        shapes, border = self.arch.level_shapes, "wrap" if self.arch.periodic else "reflect"
        chains = [[g] for g in grids]  # fine to coarse, until the end
        for level in range(self.arch.levels - 1, 0, -1):  # every grid at this level's size, halved at once
            members = [j for j, k in enumerate(self.arch.grid_levels) if k >= level]
            stack = torch.stack([chains[j][-1] for j in members], 1)  # [B, n, h, w]
            h, w = shapes[level - 1]
            even = stack.shape[-2:] == (2 * h, 2 * w)
            low = halve(stack, border) if even else resample(blur(stack, border), h, w, border)
            for i, j in enumerate(members):
                chains[j].append(low[:, i])
        chains = [chain[::-1] for chain in chains]
        self._drawn_mipmaps = (list(grids), versions, chains) if drawing else None
        return chains

    def reads(self, t: float | None, grids: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, float]]]:
        """What the MLP reads of each grid at level of detail t: terms (grid, weight) whose interpolations add up to
        its input. At t = k + 1 (level k) the grids of levels 0 to k as they are and, with mipmaps, each finer one
        pooled to level k's size (without, 0); between integers, a blend of the two levels' reads; below t = 1, level
        0's read fades to 0. t=None (or t >= the level count) reads every grid as it is."""
        levels = self.arch.levels
        if t is None or t >= levels:
            return [[(g, 1.0)] for g in grids]
        t = max(float(t), 0.0)
        if not self.arch.mipmaps:
            return [[(g, min(max(t - k, 0.0), 1.0))] for g, k in zip(grids, self.arch.grid_levels)]
        level = max(t - 1, 0.0)
        low, blend, fade = int(level), level - int(level), min(t, 1.0)
        reads = []
        for chain, k in zip(self.mipmaps(grids), self.arch.grid_levels):
            read = [(chain[min(low, k)], fade * (1 - blend))]
            if blend:
                read.append((chain[min(low + 1, k)], fade * blend))
            reads.append(read)
        return reads

    def mlp(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP on interpolated grids [B, N, P]: [B, C, P]. Channels first: with P the long, contiguous dimension
        the narrowest products run about 3 times faster."""
        h = features
        for j, (w, b) in enumerate(zip(self.weights, self.biases)):  # w [B, fan_in, fan_out], or shared: [1, ...]
            h = torch.baddbmm(b.unsqueeze(2), w.transpose(1, 2).expand(len(h), -1, -1), h)  # [B, fan_out, P]
            if j < len(self.weights) - 1:
                h = torch.relu(h)
        return h


def _blend(read: list[tuple[torch.Tensor, float]], interpolate: Callable) -> torch.Tensor:
    """The sum of weight x interpolate(grid) over a read's terms (`LatentNet.reads`)."""
    if len(read) == 1 and read[0][1] == 1.0:
        return interpolate(read[0][0])
    return sum(c * interpolate(g) for g, c in read)


def laplace_bits(symbols: torch.Tensor, log2_scale: torch.Tensor) -> torch.Tensor:
    """Bits of each value of `symbols` (integers, or integers plus noise, less the Laplace's mean) under a
    zero-mean Laplace of scale 2^log2_scale (broadcast to `symbols`), integrated over its unit-wide bin."""
    scale = torch.exp2(log2_scale.clamp(MIN_LOG2_SCALE, MAX_LOG2_SCALE))

    def cdf(v):  # of the Laplace, at v / scale
        tail = 0.5 * torch.exp(-v.abs())
        return torch.where(v < 0, tail, 1 - tail)

    centred, half = symbols / scale, 0.5 / scale
    return -torch.log2((cdf(centred + half) - cdf(centred - half)).clamp_min(2**-30))


# The context model. A latent's probability is a Laplace whose mean and scale a small MLP predicts from the 12
# latents before it in its grid (two rows above, five wide, and two to its left; 0 beyond the edges), as Cool-chic's
# does. A decoder must reproduce every probability bit for bit, so files are coded with the MLP run in integers
# (`context_codes`); fitting runs the same MLP in floats (`context_laplace`). Those 12 are all decoded before a latent
# once the grid is decoded in wavefronts (`decode_order`): latent (r, c) in front 3r + c, a grid of h x w in about
# 3h + w vectorised steps rather than one per latent.
CAUSAL = tuple((dr, dc) for dr in (-2, -1) for dc in range(-2, 3)) + ((0, -2), (0, -1))
CONTEXT_INPUTS = len(CAUSAL)
CONTEXT_HIDDEN = 8
CONTEXT_SHAPES = [(CONTEXT_INPUTS, CONTEXT_HIDDEN), (CONTEXT_HIDDEN, 2)]  # outputs: mean, log2 scale offset
HIDDEN_CAP = 2**32  # integer hidden units are clamped here, so no sum can overflow int64 (see `context_codes`)


def context_inputs(grid: torch.Tensor) -> torch.Tensor:
    """The context model's inputs for every latent of grid [B, h, w]: [B, h * w, CONTEXT_INPUTS] (integers for an
    integer grid)."""
    b, h, w = grid.shape
    padded = F.pad(grid, (2, 2, 2, 0))  # two rows above, two columns either side
    shifted = torch.stack([padded[:, 2 + dr : 2 + dr + h, 2 + dc : 2 + dc + w] for dr, dc in CAUSAL], 1)
    return shifted.flatten(2).transpose(1, 2)  # stored channels first, for `context_laplace`


def decode_order(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, fronts) of an h x w grid: `order` lists its latents (row-major indices) front by front, each front by
    row; front f is order[fronts[f]:fronts[f + 1]] (none is empty)."""
    rows, cols = np.divmod(np.arange(h * w), w)
    wave = 3 * rows + cols  # every CAUSAL input of a latent is in an earlier front (3 dr + dc < 0)
    order = np.lexsort((rows, wave))
    counts = np.bincount(wave)
    return order, np.concatenate([[0], np.cumsum(counts[counts > 0])])


def causal_neighbours(index: np.ndarray, h: int, w: int) -> np.ndarray:
    """The row-major indices [len(index), CONTEXT_INPUTS] of the CAUSAL inputs of the latents `index` of an h x w grid;
    h * w for one beyond the edge."""
    rows, cols = np.divmod(index, w)
    out = np.empty((len(index), CONTEXT_INPUTS), np.int64)
    for j, (dr, dc) in enumerate(CAUSAL):
        r, c = rows + dr, cols + dc
        out[:, j] = np.where((r >= 0) & (c >= 0) & (c < w), r * w + c, h * w)
    return out


def context_laplace(inputs: torch.Tensor, weights, biases) -> tuple[torch.Tensor, torch.Tensor]:
    """The float context model on inputs [B, P, CONTEXT_INPUTS]: (mean, log2 scale offset), each [B, P]. It runs
    channels first, as `LatentNet.mlp` does (inputs stored so, as `context_inputs` makes them, need no copy)."""
    b, x = len(inputs), inputs.transpose(1, 2)  # the weights may be one image's, shared by all: [1, ...]
    hidden = torch.relu(torch.baddbmm(biases[0].unsqueeze(2), weights[0].transpose(1, 2).expand(b, -1, -1), x))
    out = torch.baddbmm(biases[1].unsqueeze(2), weights[1].transpose(1, 2).expand(b, -1, -1), hidden)  # [B, 2, P]
    return out[:, 0], out[:, 1]


def context_codes(inputs: torch.Tensor, weights, biases, exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The context model in integers, exactly as a decoder runs it: inputs [P, CONTEXT_INPUTS] (integer latents),
    weights and biases as integer multiples of 2^-exponent (3 to MAX_CONTEXT_EXPONENT), each int64 or float64 (float64
    needs no conversion). Returns each latent's mean in eighths and its log2 scale offset in sixteenths, [P] each
    (int64), rounded half up. Inputs of at most MAX_SYMBOL and weights of at most MAX_CONTEXT_SYMBOL keep every sum
    below 2^52, so the products run in float64, whose sums of integers below 2^53 are exact in any order: the same
    integers as int64 products, about 6x faster on a CPU."""
    inputs, weights, biases = inputs.double(), [t.double() for t in weights], [t.double() for t in biases]
    hidden = (inputs @ weights[0] + biases[0]).clamp(0, HIDDEN_CAP)  # units of 2^-e
    out = (hidden @ weights[1] + biases[1] * 2**exponent).long()  # units of 2^-2e
    mean8 = torch.div(out[:, 0] + 2 ** (2 * exponent - 4), 2 ** (2 * exponent - 3), rounding_mode="floor")
    offset16 = torch.div(out[:, 1] + 2 ** (2 * exponent - 5), 2 ** (2 * exponent - 4), rounding_mode="floor")
    return mean8, offset16


def latent_bits(model: LatentNet, latents: list[torch.Tensor]) -> torch.Tensor:
    """The bits of `latents` (the model's grids, noisy or rounded) under its entropy model, per image: [B]. All grids
    are coded in one pass, which runs faster than one pass per grid."""
    symbols = torch.cat([z.flatten(1) for z in latents], 1)  # [B, P], P the latents of every grid
    counts = torch.tensor([z[0].numel() for z in latents], device=symbols.device)
    log2_scale = model.grid_scales.repeat_interleave(counts, dim=1, output_size=symbols.shape[1])  # [B, P]
    if model.arch.context:
        inputs = torch.cat([context_inputs(z).transpose(1, 2) for z in latents], 2).transpose(1, 2)  # channels first
        mean, offset = context_laplace(inputs, model.context_weights, model.context_biases)  # [B, P] each
        symbols, log2_scale = symbols - mean, log2_scale + offset
    return laplace_bits(symbols, log2_scale).sum(1)


def fit(images: torch.Tensor, arch: LatentArchitecture, lam: float | torch.Tensor, steps: int = 3000, lr: float = 1e-2,
        coarse_weight: float = 0.1, border: str = "reflect", seed: int = 0,
        progress: Callable[[int, torch.Tensor], None] | None = None,
        target_bits: torch.Tensor | None = None, start: list[torch.Tensor] | None = None,
        shared: bool = False, watch: Callable[[int, "LatentNet", torch.Tensor], None] | None = None,
        resume: LatentNet | None = None, horizon: int | None = None) -> LatentNet:
    """Fit one latent pyramid per image of [B, C, H, W] in [0, 1], all at once: Adam on latents and MLP against
    every level's squared error (the finest weighing 1, each coarser `coarse_weight`) plus `lam` times the latents'
    bits per pixel. Returns the model with its latents rounded to integers. Images are independent: each has its own
    loss terms, starts from the same draw and sees the same noise, and Adam is per element, so a batch fits each image
    as it would be fitted alone (up to the order of floating-point sums). `progress(step, error)` gets each step's
    full-resolution squared error per image [B].

    With `target_bits` [B], each image's rate weight starts at `lam` and is steered, step by step, towards the one
    whose latents cost that many bits (dual ascent on the rate constraint: up while they cost more, down while
    less); `model.rate_weights` holds where each ended. A rate weight moves by up to e^(RATE_GAIN / 2) over
    `horizon` steps (default `steps`). `lam` is one rate weight or one per image [B].

    `resume` (a fitted model of these images, `LatentNet.select` picks them; quantised or not) is a warm restart:
    every parameter starts where that model's are and the schedule (noise, then rounding, under a cosine learning
    rate not cut at the switch) runs again over `steps`; a target steers from the first step, as the latents have
    grown already. It replaces `start`.

    `start` (tensors in `start_shapes` order, a prior's: `prior.Prior.latent_start`) replaces the random draw of
    the MLP, the context model and the grid scales. With `shared`, one MLP and context model serve every image and
    are fitted to all of them together: how `learn_start` learns a start from a collection. `watch(step, model,
    rate_weights)` is called after every step (bench/latent_trace.py traces fits with it)."""
    b, c, h, w = images.shape
    if (c, h, w) != (arch.channels, arch.height, arch.width):
        raise ValueError(f"images of {c}x{h}x{w} do not fit a latent architecture of "
                         f"{arch.channels}x{arch.height}x{arch.width}")
    if resume is not None and (resume.arch != arch or resume.batch != b or shared):
        raise ValueError(f"a warm restart needs a fitted model of these {b} images' architecture, not shared; got "
                         f"{resume.batch} of {resume.arch.to_json()}")
    torch.manual_seed(seed)
    model = LatentNet(arch, batch=b, seed=seed)
    if shared:  # the MLP and context model of image 0, for all
        one = LatentNet(arch, batch=1, seed=seed)
        model.weights, model.biases = one.weights, one.biases
        model.context_weights, model.context_biases = one.context_weights, one.context_biases
    if start is not None:
        with torch.no_grad():
            for t, s in zip(_start_tensors(model), start, strict=True):
                t.copy_(s.expand_as(t))
    if resume is not None:
        with torch.no_grad():
            for t, s in zip(model.parameters(), resume.parameters(), strict=True):
                t.copy_(s)
    model = model.to(images.device)

    def level_reads(latents):  # per level k, the grids it reads, one term each (`LatentNet.reads` at t = k + 1)
        chains = model.mipmaps(latents) if arch.mipmaps else [[torch.zeros_like(g)] * j + [g] for g, j in
                                                               zip(latents, arch.grid_levels)]
        return [[chain[min(k, j)] for chain, j in zip(chains, arch.grid_levels)] for k in range(arch.levels)]

    targets = gaussian_pyramid(images, levels=arch.levels, border="wrap" if arch.periodic else border)[::-1]
    levels = [(g.shape[-2:], g.flatten(2), k) for k, g in enumerate(targets)]  # target [B, C, P]
    counts = [target.shape[2] for _, target, _ in levels]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=images.device).expand(b).clone()
    for step in range(steps):
        noisy = step < NOISE_SHARE * steps
        # Cosine decay, a tenth of it once rounding takes over; not in a warm restart, whose rounding steps are
        # few and must still move the latents where its rate target steers them.
        cut = 1.0 if noisy or resume is not None else 0.1
        for group in optimizer.param_groups:
            group["lr"] = lr * cut * 0.5 * (1 + math.cos(math.pi * step / steps))
        # The same noise for every image, so that an image is fitted the same in any batch. As in C3, the rate is of
        # the noisy values (their density is the entropy model's bins') and the MLP reads them soft-rounded again;
        # the colder the temperature, the closer both come to what the file will hold.
        if noisy:
            temperature = SOFT_ROUND[0] + (SOFT_ROUND[1] - SOFT_ROUND[0]) * step / (NOISE_SHARE * steps)
            noisy_values = [soft_round(g, temperature) + torch.rand_like(g[:1]) - 0.5 for g in model.grids]
            latents = [soft_round(v, temperature) for v in noisy_values]
        else:  # rounded on the way forward, the identity on the way back
            latents = [g + (torch.round(g) - g).detach() for g in model.grids]
        # Every level's pixels through the MLP in one pass, which runs faster than one pass per level. Level k is
        # t = k + 1: the grids of levels 0 to k as they are, the finer ones pooled to its size (`LatentNet.reads`).
        reads = level_reads(latents)
        features = torch.cat([model.pixel_features(*size, reads[k]) for size, _, k in levels], dim=2)
        errors = [(out - target).square().mean(dim=(1, 2))  # [B] per level
                  for out, (_, target, _) in zip(model.mlp(features).split(counts, dim=2), levels)]
        loss = sum(errors[:-1]) * coarse_weight + errors[-1]
        finest = errors[-1].detach()
        bits = latent_bits(model, noisy_values if noisy else latents)  # [B]
        loss = (loss + lam * bits / (h * w)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # A target steers once the latents have grown (from the first step of a warm restart), by what the rounded
        # latents cost: noise makes them look dearer.
        if target_bits is not None and (resume is not None or step >= RATE_WARMUP * steps):
            with torch.no_grad():
                spent = latent_bits(model, [torch.round(g) for g in model.grids]) if noisy else bits.detach()
            lam = lam * torch.exp(RATE_GAIN / (horizon or steps) * torch.log(spent / target_bits).clamp(-0.5, 0.5))
        if progress is not None:
            progress(step, finest)
        if watch is not None:
            watch(step, model, lam)
    with torch.no_grad():
        for g in model.grids:
            g.copy_(torch.round(g))
    model.rate_weights = lam.tolist()
    return model.requires_grad_(False)


def soft_round(y: torch.Tensor, temperature: float) -> torch.Tensor:
    """A differentiable stand-in for rounding (Agustsson and Theis 2020): each step from n to n + 1 is a tanh centred
    on n + 1/2, as steep as `temperature` is small (rounding at 0, the identity as it grows), and continuous."""
    floor = torch.floor(y)
    return floor + 0.5 + 0.5 * torch.tanh((y - floor - 0.5) / temperature) / math.tanh(0.5 / temperature)


def start_shapes(levels: int, hidden: tuple, context: bool, channels: int = 3) -> list[tuple[int, ...]]:
    """The shapes of a latent pyramid's start (`fit`'s `start`, a prior's; one grid per level): each MLP layer's
    weight [fan_in, fan_out] and bias, the context model's likewise, and the grid scales [levels]."""
    widths = [levels, *hidden, channels]
    shapes = [s for fi, fo in zip(widths, widths[1:]) for s in ((fi, fo), (fo,))]
    return shapes + (_context_shapes() if context else []) + [(levels,)]


def _start_tensors(model: LatentNet) -> list[torch.Tensor]:
    """The model's tensors in `start_shapes` order, each with its image dimension first."""
    pairs = [*zip(model.weights, model.biases), *zip(model.context_weights, model.context_biases)]
    return [t for pair in pairs for t in pair] + [model.grid_scales]


def learn_start(images: torch.Tensor, arch: LatentArchitecture, lams: list[float], steps: int, lr: float = 1e-2,
                seed: int = 0, progress: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """A start for latent pyramids of `arch`, learned from a collection: training images [N, C, H, W] are fitted
    together (`fit`, each at its own rate weight of `lams`, so the start has seen many rates) with one MLP and
    context model for all, which become the start (grid scales: their mean over the images). Returns tensors in
    `start_shapes` order without the image dimension."""
    model = fit(images, arch, torch.tensor(lams), steps, lr, seed=seed, progress=progress, shared=True)
    tensors = _start_tensors(model)
    return [t[0].detach().cpu().clone() for t in tensors[:-1]] + [tensors[-1].detach().mean(0).cpu()]


def tensor_bits(symbols: torch.Tensor) -> torch.Tensor:
    """Estimated bits of each image's integer symbols [B, ...] under a zero-mean Laplace of their own mean absolute
    value (how a file codes a weight tensor): [B]."""
    spread = symbols.abs().flatten(1).mean(1).clamp_min(2**-4)  # [B], the Laplace's scale
    return laplace_bits(symbols.flatten(1), spread.log2()[:, None]).sum(1)


def quantise_weights(model: LatentNet, images: torch.Tensor, lam: float | list[float],
                     exponents: range = range(4, 13)) -> list[int]:
    """Round each image's MLP weights to multiples of 2^-e, with the e of `exponents` that minimises its squared error
    at full resolution plus `lam` times the weights' bits per pixel (estimated under a Laplace per tensor); the
    model keeps the rounded weights and each image's e (`model.exponents`), which it also returns."""
    b, _, h, w = images.shape
    lam = torch.as_tensor(lam, dtype=torch.float32, device=images.device)  # one, or one per image
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
                bits += tensor_bits(symbols)
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
    quantise_context(model)
    return model.exponents


MAX_CONTEXT_EXPONENT = 12
MAX_CONTEXT_SYMBOL = 2**16  # of a context weight, in steps of 2^-e


def scale_codes(log2_scales: torch.Tensor) -> torch.Tensor:
    """The codes (0 to 255) of the nearest stored scales to log2 scales."""
    return torch.round((log2_scales - MIN_LOG2_SCALE) * 16).clamp(0, 255).long()


@torch.no_grad()
def quantise_context(model: LatentNet, exponents: range = range(3, MAX_CONTEXT_EXPONENT + 1)) -> list[int | None]:
    """Round each image's grid scales to stored codes and its context weights to multiples of 2^-e, with the e that
    makes the fewest bits: its latents' under the integer context model, plus the weights' own (estimated under a
    Laplace per tensor). The model keeps the rounded values and each image's e (`model.context_exponents`)."""
    if not model.arch.context:  # the factorised model's scale is the one that fits each grid's latents best
        for k, g in enumerate(model.grids):
            for i in range(model.batch):
                model.grid_scales[i, k] = MIN_LOG2_SCALE + _scale_code(g[i].cpu().numpy()) / 16
        return model.context_exponents
    model.grid_scales.copy_(MIN_LOG2_SCALE + scale_codes(model.grid_scales) / 16)
    tensors = [*model.context_weights, *model.context_biases]
    counts = torch.tensor([g[0].numel() for g in model.grids])
    for i in range(model.batch):
        grids = [g[i : i + 1].cpu().double() for g in model.grids]  # integers, held as `context_codes` multiplies them
        # Every grid's latents and context inputs in one pass per step tried (they do not depend on the step); rows
        # stored contiguous, as products want them.
        inputs = torch.cat([context_inputs(z)[0] for z in grids]).contiguous()
        latents = torch.cat([z.flatten() for z in grids])
        codes = scale_codes(model.grid_scales[i].cpu()).repeat_interleave(counts)
        kept = [t[i].cpu().double() for t in tensors]
        best = (math.inf, None, None)
        for e in exponents:
            symbols = [torch.round(k * 2**e).clamp(-MAX_CONTEXT_SYMBOL, MAX_CONTEXT_SYMBOL).long() for k in kept]
            bits = sum(tensor_bits(q[None].double()).sum() for q in symbols)
            mean8, offset16 = context_codes(inputs, symbols[:2], symbols[2:], e)
            log2_scale = MIN_LOG2_SCALE + (codes + offset16).clamp(0, 255) / 16
            bits += laplace_bits(latents - mean8 / 8, log2_scale).sum()
            if bits < best[0]:
                best = (float(bits), e, symbols)
        _, e, symbols = best
        for t, q in zip(tensors, symbols):
            t[i].copy_(q.to(t.dtype) * 2.0**-e)
        model.context_exponents[i] = e
    return model.context_exponents


# The payload of a model file of version `modelfile.LATENT_VERSION` (the envelope, version and checksum are
# modelfile.py's). All numbers little-endian:
#     header   channels, flags (1: periodic, 2: context model, 4: grid channels, 8: grid channels per level, 16:
#              coarser levels read finer grids through their mipmaps, `LatentArchitecture.mipmaps`), level
#              count, hidden-layer count: four uint8; width, height: uint32; hidden widths: uint16 each; the MLP's
#              step exponent e: uint8; with a context model, its step exponent: uint8; with flag 4, grids per level (2
#              to MAX_GRID_CHANNELS): uint8; with flag 8 (never with 4), each level's grids, coarse to fine (1 to
#              MAX_GRID_CHANNELS, not all equal): uint8 each. Without either, one a level, so files of one grid per
#              level are as they were before the flags.
#     groups   per group its Laplace scale code (uint8) and its largest |symbol| (uint32), in the order they are
#              coded: without a context model the grids coarse to fine (a level's one after another), then each
#              layer's weight [fan_in, fan_out] and bias; with one, each layer's weight and bias, the context model's,
#              then the grids
#     symbols  word count (uint32) and the range-coded symbols (uint32 words) of every group whose largest |symbol|
#              is not 0. Weights (multiples of their 2^-e) under a zero-mean quantised Laplace of the group's scale;
#              latents likewise, or, with a context model, grid by grid (coarse to fine) in `decode_order`, each
#              under a Laplace of the mean and scale code (plus the grid's) that `context_codes` gives it.
#              Decoding is exact.
_HEAD = struct.Struct("<4BII")
_GROUP = struct.Struct("<BI")
PERIODIC, CONTEXT, GRID_CHANNELS, LEVEL_GRIDS, MIPMAPS = 1, 2, 4, 8, 16
MAX_HIDDEN = 4
MAX_WIDTH = 1024
MAX_EXPONENT = 24
MAX_SYMBOL = 2**20
SCALES = np.array([2.0 ** (MIN_LOG2_SCALE + code / 16) for code in range(256)])
# No symbol costs less than -log2(1 - e^-4 / 2) = 0.013 bits (the smallest scale, with a context model's mean at
# the edge of the range, which folds a tail onto it), so a payload of W words cannot hold more than about 2,400 W
# symbols: a header asking for more is forged, and is refused before decoding.
MAX_SYMBOLS_PER_WORD = 2500
# A reader finds the causal neighbours of this many latents at once (about 25 MB): a whole grid up to 512 x 512 in
# one vectorised call, and no more for a forged grid of millions (whose other arrays take about 40 bytes a latent).
NEIGHBOUR_CHUNK = 2**18


def _scale_code(symbols: np.ndarray) -> int:
    """The code of the Laplace scale that fits `symbols` (their mean absolute value: the maximum-likelihood scale)."""
    spread = max(float(np.abs(symbols).mean()), 2.0**MIN_LOG2_SCALE)
    return int(np.clip(round((math.log2(spread) - MIN_LOG2_SCALE) * 16), 0, 255))


def _laplace(top: int, code: int):
    return constriction.stream.model.QuantizedLaplace(-top, top, 0.0, float(SCALES[code]))


def _context_laplace(inputs, weights, biases, exponent, code, top):
    """Means and scales (float64 arrays) of latents of integer context inputs [P, CONTEXT_INPUTS] under the integer
    context model (integer weights and biases in steps of 2^-exponent; see `context_codes`) and their grid's scale
    code and largest |symbol|: what coder and decoder agree on."""
    mean8, offset16 = context_codes(inputs, weights, biases, exponent)
    means = (mean8.double() / 8).clamp(-top, top).numpy()
    return means, SCALES[(offset16 + code).clamp(0, 255).numpy()]


def _weight_groups(model: LatentNet, index: int) -> list[np.ndarray]:
    """The symbols of each layer's weight and bias (multiples of 2^-e), then the context model's (of 2^-e')."""
    e, ce = model.exponents[index], model.context_exponents[index]
    out = [t[index] * 2.0**e for pair in zip(model.weights, model.biases) for t in pair]
    context = [t[index] * 2.0**ce for pair in zip(model.context_weights, model.context_biases) for t in pair]
    groups = [_integers(t.detach().cpu().double().numpy().ravel()) for t in out + context]
    if any(np.abs(g).max() > MAX_CONTEXT_SYMBOL for g in groups[len(out):]):
        raise ValueError(f"a context weight is over {MAX_CONTEXT_SYMBOL} steps: more than a file holds")
    return groups


def _integers(values: np.ndarray) -> np.ndarray:
    rounded = np.round(values)
    if not np.array_equal(rounded, values):
        raise ValueError("the model is not quantised: fit and quantise_weights make the values integers")
    if rounded.size and np.abs(rounded).max() > MAX_SYMBOL:
        raise ValueError(f"a value of {np.abs(rounded).max():.0f} steps is more than a file holds ({MAX_SYMBOL})")
    return rounded.astype(np.int32)


def to_payload(model: LatentNet, index: int = 0) -> bytes:
    """Image `index`'s header and symbols (see above); ValueError for a model that is not quantised."""
    arch, exponent, context_exponent = model.arch, model.exponents[index], model.context_exponents[index]
    if exponent is None or (arch.context and context_exponent is None):
        raise ValueError("the MLP weights are not quantised yet (quantise_weights)")
    grids = [_integers(g[index].detach().cpu().double().numpy()) for g in model.grids]
    weights = _weight_groups(model, index)
    codes = scale_codes(model.grid_scales[index].detach().cpu()).tolist()
    per_level = isinstance(arch.grid_channels, tuple)
    several = not per_level and arch.grid_channels > 1
    flags = (PERIODIC * arch.periodic + CONTEXT * arch.context + GRID_CHANNELS * several + LEVEL_GRIDS * per_level
             + MIPMAPS * arch.mipmaps)
    parts = [_HEAD.pack(arch.channels, flags, arch.levels, len(arch.hidden), arch.width, arch.height),
             struct.pack(f"<{len(arch.hidden)}HB", *arch.hidden, exponent)]
    encoder = constriction.stream.queue.RangeEncoder()

    def factorised(symbols, code=None):
        top = int(np.abs(symbols).max()) if symbols.size else 0
        code = (_scale_code(symbols) if top else 0) if code is None else code
        parts.append(_GROUP.pack(code, top))
        if top:
            encoder.encode(symbols.ravel(), _laplace(top, code))

    if arch.context:
        parts.append(struct.pack("<B", context_exponent))
    if several:
        parts.append(struct.pack("<B", arch.grid_channels))
    if per_level:
        parts.append(struct.pack(f"<{arch.levels}B", *arch.grid_channels))
    if not arch.context:
        for grid, code in zip(grids, codes):
            factorised(grid, code)
        for symbols in weights:
            factorised(symbols)
    else:
        for symbols in weights:
            factorised(symbols)
        context = [torch.from_numpy(w.astype(np.float64)).reshape(shape) for w, shape in  # as context_codes
                   zip(weights[-4:], _context_shapes())]  # multiplies them
        for grid, code in zip(grids, codes):
            top = int(np.abs(grid).max())
            parts.append(_GROUP.pack(code, top))
            if top:
                inputs = context_inputs(torch.from_numpy(grid.astype(np.float64))[None])[0].contiguous()
                means, scales = _context_laplace(inputs, context[0::2], context[1::2], context_exponent, code, top)
                order = decode_order(*grid.shape)[0]
                encoder.encode(grid.ravel()[order], constriction.stream.model.QuantizedLaplace(-top, top),
                               means[order], scales[order])
    words = encoder.get_compressed()
    parts += [struct.pack("<I", len(words)), words.astype("<u4").tobytes()]
    return b"".join(parts)


def _context_shapes() -> list[tuple[int, ...]]:
    """The context model's groups as coded: each layer's weight [fan_in, fan_out], then its bias."""
    return [s for fi, fo in CONTEXT_SHAPES for s in ((fi, fo), (fo,))]


def from_payload(data, offset: int, end: int, fail: Callable[[str], Exception]) -> LatentNet:
    """The model (batch 1) of a payload at data[offset:end]; `fail(reason)` makes the error for anything wrong."""
    data = memoryview(data)[:end]  # a header cut short is truncated, not read on into the bytes after the payload
    try:
        channels, flags, levels, n_hidden, width, height = _HEAD.unpack_from(data, offset)
        offset += _HEAD.size
        if (channels not in (1, 3) or flags > 31 or flags & GRID_CHANNELS and flags & LEVEL_GRIDS
                or not 1 <= levels <= 16 or not 1 <= n_hidden <= MAX_HIDDEN):
            raise fail(f"bad header: channels {channels}, flags {flags}, {levels} levels, {n_hidden} hidden layers")
        if not 1 <= width * height <= DEFAULT_MAX_PIXELS:
            raise fail(f"bad header: {width}x{height} is not 1 to {DEFAULT_MAX_PIXELS:,} pixels")
        *hidden, exponent = struct.unpack_from(f"<{n_hidden}HB", data, offset)
        offset += 2 * n_hidden + 1
        context_exponent = None
        if flags & CONTEXT:
            (context_exponent,) = struct.unpack_from("<B", data, offset)
            offset += 1
        grid_channels = 1
        if flags & GRID_CHANNELS:
            (grid_channels,) = struct.unpack_from("<B", data, offset)
            offset += 1
            if not 2 <= grid_channels <= MAX_GRID_CHANNELS:
                raise fail(f"bad header: {grid_channels} grid channels (2 to {MAX_GRID_CHANNELS} with flag 4)")
        if flags & LEVEL_GRIDS:
            grid_channels = struct.unpack_from(f"<{levels}B", data, offset)
            offset += levels
            if not all(1 <= n <= MAX_GRID_CHANNELS for n in grid_channels) or len(set(grid_channels)) == 1:
                raise fail(f"bad header: grid channels per level {list(grid_channels)} (1 to {MAX_GRID_CHANNELS}, "
                           "not all equal)")
        if not all(1 <= h <= MAX_WIDTH for h in hidden) or exponent > MAX_EXPONENT:
            raise fail(f"bad header: hidden widths {hidden} (1 to {MAX_WIDTH}), step exponent {exponent}")
        if context_exponent is not None and not 3 <= context_exponent <= MAX_CONTEXT_EXPONENT:
            raise fail(f"bad header: context step exponent {context_exponent} (3 to {MAX_CONTEXT_EXPONENT})")
        try:
            arch = LatentArchitecture(channels, width, height, levels, tuple(hidden), bool(flags & PERIODIC),
                                      bool(flags & CONTEXT), grid_channels=grid_channels,
                                      mipmaps=bool(flags & MIPMAPS))
        except ValueError as e:
            raise fail(f"bad header: {e}") from None
        weight_shapes = [s for fi, fo in arch.layer_shapes() for s in ((fi, fo), (fo,))]
        context_shapes = _context_shapes() if arch.context else []
        shapes = [*weight_shapes, *context_shapes, *arch.sizes] if arch.context else [*arch.sizes, *weight_shapes]
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
    first_context = len(weight_shapes)
    if any(top > MAX_CONTEXT_SYMBOL for _, top in groups[first_context : first_context + len(context_shapes)]):
        raise fail(f"bad header: a context weight is over {MAX_CONTEXT_SYMBOL} steps")
    if offset + 4 * n_words != end:
        raise fail(f"payload is {end - offset} bytes, not the {4 * n_words} its word count says")
    coded = sum(math.prod(shape) for shape, (_, top) in zip(shapes, groups) if top)
    if coded > MAX_SYMBOLS_PER_WORD * (n_words + 1):
        raise fail(f"bad header: {coded:,} symbols cannot come from {n_words:,} words")
    if n_words and not coded:
        raise fail("payload is corrupt: words are left over after its symbols")
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(data, "<u4", n_words, offset).astype(np.uint32))

    def decode(family, *params, n):
        try:
            return decoder.decode(family, *params) if params else decoder.decode(family, n)
        except (AssertionError, ValueError):  # constriction: words that no symbols could have made
            raise fail("payload is corrupt: its words are not a coding of these symbols") from None

    model = LatentNet(arch, batch=1)
    weights = [t for pair in zip(model.weights, model.biases) for t in pair]
    weights += [t for pair in zip(model.context_weights, model.context_biases) for t in pair]
    context = []  # the context model's weights and biases as int64 symbols

    def read_weights(coded):
        for i, (tensor, (code, top)) in enumerate(zip(weights, coded)):
            symbols = decode(_laplace(top, code), n=tensor.numel()) if top else np.zeros(tensor.numel(), np.int32)
            symbols = torch.from_numpy(symbols.astype(np.int64)).reshape(tensor.shape)
            is_context = i >= 2 * len(arch.hidden) + 2
            if is_context:  # in float64, as `context_codes` multiplies them (exactly)
                context.append(symbols[0].double())
            tensor.copy_(symbols.float() * 2.0 ** -(context_exponent if is_context else exponent))

    def read_grids(coded):
        for k, (grid, (code, top)) in enumerate(zip(model.grids, coded)):
            h, w = grid.shape[1:]
            symbols = torch.zeros(h * w, dtype=torch.int64)
            if top and not arch.context:
                symbols[:] = torch.from_numpy(decode(_laplace(top, code), n=h * w).astype(np.int64))
            elif top:
                family = constriction.stream.model.QuantizedLaplace(-top, top)
                order, fronts = decode_order(h, w)
                # Integers held in float64, as `context_codes` multiplies them (exactly); the last: every neighbour
                # beyond the edge.
                known = torch.zeros(h * w + 1, dtype=torch.float64)
                base = covered = 0  # `neighbours` holds those of order[base:covered]
                for start, stop in zip(fronts[:-1], fronts[1:]):
                    if stop > covered:  # the next run of fronts: found at once, in bounded memory
                        base, covered = start, max(stop, start + NEIGHBOUR_CHUNK)  # slicing stops at the end
                        neighbours = torch.from_numpy(causal_neighbours(order[base:covered], h, w))
                    front = order[start:stop]
                    inputs = known[neighbours[start - base : stop - base]]
                    means, scales = _context_laplace(inputs, context[0::2], context[1::2], context_exponent, code, top)
                    known[front] = torch.from_numpy(decode(family, means, scales, n=None).astype(np.float64))
                symbols = known[:-1]
            grid.copy_(symbols.reshape(1, h, w).float())
            model.grid_scales[0, k] = MIN_LOG2_SCALE + code / 16

    with torch.no_grad():
        if arch.context:
            read_weights(groups[: len(weights)])
            read_grids(groups[len(weights) :])
        else:
            read_grids(groups[: arch.grid_count])
            read_weights(groups[arch.grid_count :])
    # A range decoder reads up to two words ahead, so one extra word may pass; more do not.
    if not decoder.maybe_exhausted():
        raise fail("payload is corrupt: words are left over after its symbols")
    if value_bound(model) > MAX_VALUE:
        raise fail("its latents and weights can drive the network's values past float32's range (overflow)")
    model.exponents, model.context_exponents = [exponent], [context_exponent]
    return model.requires_grad_(False)

MAX_VALUE = 1e30  # far above any fitted model's bound (pixels are 0 to 1), far below float32's overflow


@torch.no_grad()
def value_bound(model: LatentNet, index: int = 0) -> float:
    """A bound on every value the MLP of image `index` computes (hidden units and output) at every x and t, by
    interval arithmetic in float64: interpolation and c_k(t) keep features within the largest |latent|, and each
    layer maps a bound b to max_j sum_i |W_ij| b + |b_j|. Rendering runs in float32, so a hidden unit beyond its
    range would overflow even where the last layer's weights are 0."""
    bound = max(float(g[index].abs().max()) for g in model.grids)
    largest = bound
    for w, b in zip(model.weights, model.biases):
        bound = float((w[index].double().abs().sum(0) * bound + b[index].double().abs()).max())
        largest = max(largest, bound)
    return largest
