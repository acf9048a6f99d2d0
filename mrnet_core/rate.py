"""Rate control: size each image's MR-Net to a target of stored bits per pixel, or of full-resolution PSNR.

The coarse knob is a width scale applied to every layer of every stage (the stage count is the number of levels
of detail the user asked for, so it is kept), chosen before fitting from a predicted size: a freshly drawn model
of the candidate architecture, stored, with its payload scaled by FITTED_PAYLOAD, because fitted weights
entropy-code better than freshly drawn ones. The fine knob comes after fitting: a model file over the budget has
its quantisation steps coarsened, 2^(1/8) at a time, until it fits (`within_budget`), so no image is fitted twice.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .config import ConfigError, FitConfig
from .modelfile import ImageMeta, to_bytes
from .quantize import FINE_BITS
from .network import MRNet
from .prior import Prior

if TYPE_CHECKING:  # encode imports this module
    from .encode import Encoding

MIN_SCALE, MAX_SCALE = 1 / 64, 4.0
# A fitted model's entropy-coded payload over a fresh one's: about 0.9 in one-image trials at 0.2 bpp (the `compact`
# preset). Too low costs a few coarser steps, too high leaves bytes unused; study_compact.toml filled 93-99.8% of
# every budget, coarsening 4 of 15 models by 1 or 2 codes.
FITTED_PAYLOAD = 0.9
MAX_COARSER = 64  # steps up to 2^8 times coarser: 8 bits' worth, past which nearly every symbol is 0
PSNR_RUNGS = 9  # width scales tried for a PSNR target, spaced evenly in log between MIN_SCALE and the cap


@dataclass(frozen=True)
class RateChoice:
    """How rate control sized one image: the width `scale` of its rung, how many codes coarser its steps were
    stored (`rate.within_budget`), the targets, and whether they were met. A latent pyramid keeps its widths
    (scale 1) and says the rate weight its fit was steered to."""
    scale: float
    coarser: int | None
    target_bpp: float | None
    target_psnr: float | None
    met: bool
    rate_weight: float | None = None  # a latent pyramid's: where its fit's rate weight ended (`latent.fit`)


def scaled(cfg: FitConfig, scale: float) -> FitConfig:
    """cfg with every stage's widths multiplied by `scale` (at least 2 wide), and no rate targets."""
    widths = {k: tuple(max(2, round(v * scale)) for v in cfg.per_stage(k)) for k in ("first", "hidden")}
    return replace(cfg, **widths, target_bpp=0.0, target_psnr=0.0)


def predicted_bytes(cfg: FitConfig, channels: int, height: int, width: int, bits: int) -> int:
    """The stored size of a fitted model of cfg's architecture: a freshly drawn one's, payload scaled."""
    meta = ImageMeta(width, height, channels, cfg.levels, cfg.border)
    model = MRNet(cfg.architecture(channels), seed=cfg.seed)
    fresh = len(to_bytes(model, meta, bits))
    if bits > 8:
        return fresh
    # What coarsening cannot shrink: the header, the side information and the FINE_BITS tensors; the rest is the
    # payload of the tensors at `bits`, which is what fitting makes cheaper.
    fixed = len(to_bytes(model, meta, bits, coarser=MAX_COARSER))
    return fixed + math.ceil(FITTED_PAYLOAD * (fresh - fixed))


def storage_ladder(bits: int, finer: bool) -> list[tuple[int, int]]:
    """(bits, coarser) pairs from the finest storage to the coarsest, each step about 2^(1/8) coarser.

    With `finer`, storage may also be up to FINE_BITS bits: one more bit halves the step, like 8 codes finer. A
    prior's ladder of widths is discrete, so this is how an image fills the budget its rung leaves."""
    top = [(b, c) for b in range(FINE_BITS, bits, -1) for c in range(8)] if finer else []
    return top + [(bits, c) for c in range(MAX_COARSER + 1)]


def within_budget(model: MRNet, meta: ImageMeta, bits: int, index: int, budget: int, prior: Prior | None = None,
                  finer: bool = False) -> tuple[bytes, int]:
    """(model file, coarser) of image `index` of a fitted model: stored as finely as fits `budget` bytes.

    Steps are coarsened as little as fits, or with `finer` also stored at more bits than it was fitted at; the
    finest fitting storage is found by bisection (sizes fall as storage coarsens). `coarser` is the position on
    `storage_ladder`'s coarse part, negative when stored finer. Weights are residuals from `prior` if given."""
    if bits > 8:
        raise ValueError(f"a byte budget needs quantised weights (weight_bits 8 or fewer), not {bits}")
    ladder = storage_ladder(bits, finer)
    sizes = {}

    def blob(k):
        if k not in sizes:
            stored_bits, coarser = ladder[k]
            sizes[k] = to_bytes(model, meta, stored_bits, index, coarser, prior=prior)
        return sizes[k]

    lo, hi = 0, len(ladder) - 1
    if len(blob(lo)) <= budget:
        hi = lo
    if len(blob(hi)) > budget:
        raise ValueError(f"the model takes {len(blob(hi))} bytes even with its weights' steps 2^{MAX_COARSER // 8} "
                         f"times coarser, over the budget of {budget}")
    while lo < hi:  # the first k whose file fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(blob(mid)) <= budget else (mid + 1, hi)
    stored_bits, coarser = ladder[lo]
    return blob(lo), coarser - 8 * (stored_bits - bits)


def largest_scale(cfg: FitConfig, channels: int, height: int, width: int, bits: int, budget: int) -> float:
    """The largest width scale whose predicted size is within `budget` bytes (bisection on log scale)."""
    def fits(s):
        return predicted_bytes(scaled(cfg, s), channels, height, width, bits) <= budget

    if not fits(MIN_SCALE):
        smallest = predicted_bytes(scaled(cfg, MIN_SCALE), channels, height, width, bits)
        raise ConfigError(f"target_bpp: {budget} bytes for a {width}x{height} image is below the smallest MR-Net of "
                          f"this config ({smallest} bytes, {8 * smallest / (width * height):.3f} bpp)")
    lo, hi = math.log(MIN_SCALE), math.log(MAX_SCALE)
    if fits(MAX_SCALE):
        return MAX_SCALE
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(math.exp(mid)) else (lo, mid)
    return math.exp(lo)


def prior_rungs(cfg: FitConfig, prior: Prior) -> list[tuple[float, FitConfig]]:
    """[(scale, config)] of the prior's rungs that cfg's family can use (same model, levels, hidden layers and band
    limits), fewest parameters first; scale is the rung's finest first-layer width over cfg's."""
    out = []
    for arch in prior.architectures:
        stages = arch.stages
        if (arch.model != cfg.model or len(stages) != cfg.levels or arch.omega_hidden != cfg.omega_hidden
                or any(len(s.hidden) != (cfg.hidden_layers if cfg.model != "s" else 0) for s in stages)
                or [s.omega_0 for s in stages] != [float(o) for o in cfg.per_stage("omega_0")]):
            continue
        rung = replace(cfg, first=tuple(s.first for s in stages), hidden=tuple(s.hidden[0] for s in stages),
                       target_bpp=0.0, target_psnr=0.0)
        out.append((stages[-1].first / cfg.per_stage("first")[-1], rung))
    return out


def prior_predicted_bytes(cfg: FitConfig, prior: Prior, channels: int, height: int, width: int, bits: int) -> int:
    """The stored size of an image fitted from `prior` at cfg's rung: the file of the prior's weights themselves
    (header and side information; zero residuals cost almost nothing) plus the rung's measured bytes per
    parameter, or 6 bits per parameter if the prior does not say."""
    arch = cfg.architecture(channels)
    meta = ImageMeta(width, height, channels, cfg.levels, cfg.border)
    fixed = len(to_bytes(prior.model(arch), meta, bits, prior=prior))
    per_param = prior.bytes_per_param[prior.rung(arch)] if prior.bytes_per_param else 0.75
    return fixed + math.ceil(per_param * arch.params())


def encode_at_rate(images: torch.Tensor, cfg: FitConfig,
                   encode_fixed: Callable[[torch.Tensor, FitConfig, int | None], tuple[list["Encoding"], list[bytes]]],
                   prior: Prior | None = None) -> tuple[list["Encoding"], list[bytes]]:
    """(records, blobs) like `encode.encode`, each image sized to cfg.target_bpp and/or cfg.target_psnr.

    `encode_fixed(images, cfg, budget)` encodes at one fixed config, each model file fitted into `budget` bytes by
    `within_budget` (passed in so this module does not import encode).
    The widths come from a ladder of rungs: PSNR_RUNGS width scales of cfg's widths, or with a `prior` its rungs
    (`prior_rungs`). With a bpp target every image stays at or under it, at the largest rung predicted to fit;
    with a PSNR target each image gets the smallest rung (up to cfg's own widths, or up to the bpp cap if there
    is one) whose full-resolution PSNR reaches it, or the largest rung when none does. Records say which: `rate`
    holds the scale, the targets and whether they were met.
    """
    b, c, h, w = images.shape
    bits = cfg.weight_bits if cfg.weight_bits <= 8 else 8
    budget = math.floor(cfg.target_bpp * h * w / 8) if cfg.target_bpp else None
    if budget == 0:  # not "no target": every test of `budget` below would read it so
        raise ConfigError(f"target_bpp: {cfg.target_bpp:g} bpp is less than a byte for a {w}x{h} image")
    base = replace(cfg, weight_bits=bits)
    if prior is None:
        cap = largest_scale(cfg, c, h, w, bits, budget) if budget else 1.0  # a PSNR target alone: cfg's widths
        ladder = [(s, scaled(base, s)) for s in
                  (math.exp(math.log(MIN_SCALE) + (math.log(cap) - math.log(MIN_SCALE)) * k / (PSNR_RUNGS - 1))
                   for k in range(PSNR_RUNGS))]
    else:
        ladder = prior_rungs(base, prior)
        if not ladder:
            raise ConfigError(f"prior: prior {prior.prior_id} has no rung for this config's model, levels and band "
                              "limits")
        if budget:  # the largest rung predicted to fit, and those below it (the smallest when none is)
            fits = [prior_predicted_bytes(r, prior, c, h, w, bits) <= budget for _, r in ladder]
            ladder = ladder[: max(1, sum(fits))]
        elif cfg.target_psnr:  # a PSNR target alone: up to cfg's widths
            ladder = [r for r in ladder if r[0] <= 1.0 + 1e-9] or ladder[:1]

    def attempt(index, rung):
        """Encode images[index] at ladder[rung], each model file within the budget."""
        scale, rung_cfg = ladder[rung]
        records, blobs = encode_fixed(images[index], rung_cfg, budget)
        records = [replace(r, coarser=None, rate=RateChoice(
                       round(scale, 4), r.coarser, cfg.target_bpp or None, cfg.target_psnr or None,
                       (not budget or len(blob) <= budget) and
                       (not cfg.target_psnr or r.levels[-1].psnr >= cfg.target_psnr)))
                   for r, blob in zip(records, blobs)]
        return records, blobs

    if not cfg.target_psnr:
        return attempt(torch.arange(b), len(ladder) - 1)
    best = [None] * b  # per image: (record, blob) of the smallest rung that met the target so far

    def search(index, lo, hi):
        """Each image of `index` has its answer among rungs lo..hi; the top rung stands in when none meets."""
        if lo > hi or len(index) == 0:
            return
        mid = (lo + hi) // 2
        records, blobs = attempt(index, mid)
        met = torch.tensor([r.rate.met for r in records])
        for i, j in enumerate(index.tolist()):
            if met[i] or mid == len(ladder) - 1:
                best[j] = (records[i], blobs[i])
        search(index[met], lo, mid - 1)
        search(index[~met], mid + 1, hi)

    search(torch.arange(b), 0, len(ladder) - 1)
    return [r for r, _ in best], [blob for _, blob in best]
