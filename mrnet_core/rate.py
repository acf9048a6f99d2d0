"""Rate control: size each image's MR-Net to a target of stored bits per pixel, or of full-resolution PSNR.

The coarse knob is a width scale applied to every layer of every stage (the stage count is the number of levels
of detail the user asked for, so it is kept), chosen before fitting from a predicted size: a freshly drawn model
of the candidate architecture, stored, with its payload scaled by FITTED_PAYLOAD, because fitted weights
entropy-code better than freshly drawn ones. The fine knob comes after fitting: a model file over the budget has
its quantisation steps coarsened, 2^(1/8) at a time, until it fits (`within_budget`), so no image is fitted twice.
"""
import math
from dataclasses import replace

import torch

from .config import ConfigError, FitConfig
from .modelfile import to_bytes
from .network import MRNet
from .pyramid import level_sizes

MIN_SCALE, MAX_SCALE = 1 / 64, 4.0
# A fitted model's entropy-coded payload over a fresh one's: about 0.9 in one-image trials at 0.2 bpp (the `compact`
# preset). Too low costs a few coarser steps, too high leaves bytes unused; study_compact.toml filled 93-99.8% of
# every budget, coarsening 4 of 15 models by 1 or 2 codes.
FITTED_PAYLOAD = 0.9
MAX_COARSER = 64  # steps up to 2^8 times coarser: 8 bits' worth, past which nearly every symbol is 0
PSNR_RUNGS = 9  # width scales tried for a PSNR target, spaced evenly in log between MIN_SCALE and the cap


def scaled(cfg: FitConfig, scale):
    """cfg with every stage's widths multiplied by `scale` (at least 2 wide), and no rate targets."""
    widths = {k: tuple(max(2, round(v * scale)) for v in cfg.per_stage(k)) for k in ("first", "hidden")}
    return replace(cfg, **widths, target_bpp=0.0, target_psnr=0.0)


def predicted_bytes(cfg: FitConfig, channels, height, width, bits):
    """The stored size of a fitted model of cfg's architecture: a freshly drawn one's, payload scaled."""
    meta = {"width": width, "height": height, "border": cfg.border,
            "levels": [list(s) for s in level_sizes(height, width, levels=cfg.levels)[::-1]]}
    model = MRNet(cfg.architecture(channels), seed=cfg.seed)
    fresh = len(to_bytes(model, meta, bits))
    if bits > 8:
        return fresh
    # What coarsening cannot shrink: the header, the side information and the FINE_BITS tensors; the rest is the
    # payload of the tensors at `bits`, which is what fitting makes cheaper.
    fixed = len(to_bytes(model, meta, bits, coarser=MAX_COARSER))
    return fixed + math.ceil(FITTED_PAYLOAD * (fresh - fixed))


def within_budget(model, meta, bits, index, budget):
    """(model file, coarser) of image `index` of a fitted model: steps coarsened as little as fits `budget` bytes."""
    if bits > 8:
        raise ValueError(f"a byte budget needs quantised weights (weight_bits 8 or fewer), not {bits}")
    for coarser in range(MAX_COARSER + 1):
        blob = to_bytes(model, meta, bits, index, coarser)
        if len(blob) <= budget:
            return blob, coarser
    raise ValueError(f"the model takes {len(blob)} bytes even with its weights' steps 2^{MAX_COARSER // 8} times "
                     f"coarser, over the budget of {budget}")


def largest_scale(cfg: FitConfig, channels, height, width, bits, budget):
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


def encode_at_rate(images, cfg: FitConfig, encode_fixed, device=None, progress=None):
    """(records, blobs) like `encode.encode`, each image sized to cfg.target_bpp and/or cfg.target_psnr.

    `encode_fixed(images, cfg, budget)` encodes at one fixed config, each model file fitted into `budget` bytes by
    `within_budget` (passed in so this module does not import encode).
    With a bpp target every image stays at or under it; with a PSNR target each image gets the smallest rung (of
    PSNR_RUNGS width scales up to cfg's own widths, or up to the bpp cap if there is one) whose full-resolution
    PSNR reaches it, or the largest rung when none does. Records say which: `rate` holds the scale, the targets
    and whether they were met.
    """
    b, c, h, w = images.shape
    bits = cfg.weight_bits if cfg.weight_bits <= 8 else 8
    budget = math.floor(cfg.target_bpp * h * w / 8) if cfg.target_bpp else None
    cap = largest_scale(cfg, c, h, w, bits, budget) if budget else 1.0  # a PSNR target alone: up to cfg's widths
    base = replace(cfg, weight_bits=bits)

    def attempt(index, scale):
        """Encode images[index] at `scale`, each model file within the budget."""
        records, blobs = encode_fixed(images[index], scaled(base, scale), budget)
        for r, blob in zip(records, blobs):
            r["rate"] = {"scale": round(scale, 4), "coarser": r.pop("coarser", None),
                         "target_bpp": cfg.target_bpp or None, "target_psnr": cfg.target_psnr or None,
                         "met": (not budget or len(blob) <= budget) and
                                (not cfg.target_psnr or r["levels"][-1]["psnr"] >= cfg.target_psnr)}
        return records, blobs

    if not cfg.target_psnr:
        return attempt(torch.arange(b), cap)
    scales = [math.exp(math.log(MIN_SCALE) + (math.log(cap) - math.log(MIN_SCALE)) * k / (PSNR_RUNGS - 1))
              for k in range(PSNR_RUNGS)]
    best = [None] * b  # per image: (record, blob) of the smallest rung that met the target so far

    def search(index, lo, hi):
        """Each image of `index` has its answer among rungs lo..hi; the top rung stands in when none meets."""
        if lo > hi or len(index) == 0:
            return
        mid = (lo + hi) // 2
        records, blobs = attempt(index, scales[mid])
        met = torch.tensor([r["rate"]["met"] for r in records])
        for i, j in enumerate(index.tolist()):
            if met[i] or mid == len(scales) - 1:
                best[j] = (records[i], blobs[i])
        search(index[met], lo, mid - 1)
        search(index[~met], mid + 1, hi)

    search(torch.arange(b), 0, len(scales) - 1)
    return [r for r, _ in best], [blob for _, blob in best]
