"""Rate control: size each image's MR-Net to a target of stored bits per pixel, or of full-resolution PSNR.

The knob is a width scale applied to every layer of every stage (the stage count is the number of levels of
detail the user asked for, so it is kept). A model's stored size is predicted closely before fitting: weights
are quantised per column and entropy-coded, so a random model of the same architecture stores in nearly the
same bytes as a fitted one. What is fitted is then measured; a model that still comes out over the budget is
fitted again one bit lower until it fits.
"""
import math
from dataclasses import replace

import torch

from .config import ConfigError, FitConfig
from .modelfile import to_bytes
from .network import MRNet
from .pyramid import level_sizes

MIN_SCALE, MAX_SCALE = 1 / 64, 4.0
PSNR_RUNGS = 9  # width scales tried for a PSNR target, spaced evenly in log between MIN_SCALE and the cap


def scaled(cfg: FitConfig, scale):
    """cfg with every stage's widths multiplied by `scale` (at least 2 wide), and no rate targets."""
    widths = {k: tuple(max(2, round(v * scale)) for v in cfg.per_stage(k)) for k in ("first", "hidden")}
    return replace(cfg, **widths, target_bpp=0.0, target_psnr=0.0)


def predicted_bytes(cfg: FitConfig, channels, height, width, bits):
    """The stored size of a model of cfg's architecture, measured on a freshly initialised one."""
    meta = {"width": width, "height": height, "border": cfg.border,
            "levels": [list(s) for s in level_sizes(height, width, levels=cfg.levels)[::-1]]}
    return len(to_bytes(MRNet(cfg.architecture(channels), seed=cfg.seed), meta, bits))


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

    `encode_fixed(images, cfg)` encodes at one fixed config (passed in so this module does not import encode).
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
        """Encode images[index] at `scale`; any that come out over the budget are fitted again one bit lower."""
        records, blobs = encode_fixed(images[index], scaled(base, scale))
        for i, (r, blob) in enumerate(zip(records, blobs)):
            lower = bits
            while budget and len(blob) > budget and lower > 2:
                lower -= 1
                (r,), (blob,) = encode_fixed(images[index[i : i + 1]], replace(scaled(base, scale), weight_bits=lower))
            if budget and len(blob) > budget:
                raise ValueError(f"the model takes {len(blob)} bytes even at 2 bits, over the budget of {budget}")
            records[i], blobs[i] = r, blob
            r["rate"] = {"scale": round(scale, 4), "target_bpp": cfg.target_bpp or None,
                         "target_psnr": cfg.target_psnr or None,
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
