"""Encode a batch of same-sized images: fit, then measure every level against the original's pyramid."""
import time

import torch

from .config import FitConfig
from .fit import fit
from .metrics import psnr, seam, ssim
from .modelfile import from_bytes, to_bytes
from .pyramid import gaussian_pyramid, level_sizes
from .render import render


@torch.no_grad()
def level_metrics(model, images, cfg: FitConfig):
    """Per image, coarse to fine: {width, height, psnr, ssim, seam} of level k (t = k + 1) against Gaussian
    level k (the finest level against the original pixels themselves); seam is `metrics.seam` of the render.
    """
    gaussians = gaussian_pyramid(images.to(next(model.parameters()).device), cfg.levels, border=cfg.border)[::-1]
    rows = [[] for _ in range(images.shape[0])]
    for k, target in enumerate(gaussians):
        h, w = target.shape[-2:]
        out = render(model, w, h, t=k + 1).clamp(0, 1)
        figures = zip(psnr(out, target).tolist(), ssim(out, target).tolist(), seam(out).tolist())
        for row, (p, s, m) in zip(rows, figures):
            row.append({"width": w, "height": h, "psnr": round(p, 3), "ssim": round(s, 4), "seam": round(m, 3)})
    return rows


def encode(images, cfg: FitConfig, device=None, progress=None):
    """Fit one MR-Net per image of [B, C, H, W]: (records, model files as bytes), one of each per image.

    `model_bytes` is the real size of the stored model file, and the levels' quality is that of the stored model
    (after float16 or int8 storage); times are the batch's wall time shared evenly among its images (`batch` says
    how many were fitted together).
    """
    start = time.perf_counter()
    model, reports = fit(images, cfg, device=device, progress=progress)
    seconds = time.perf_counter() - start
    b, c, h, w = images.shape
    meta = {"width": w, "height": h, "channels": c, "border": cfg.border,
            "levels": [list(size) for size in level_sizes(h, w, levels=cfg.levels)[::-1]]}
    blobs = [to_bytes(model, meta, cfg.weights_dtype, index=i) for i in range(b)]
    if cfg.weights_dtype != "float32":  # measure what is stored, not what was trained
        with torch.no_grad():
            for i, blob in enumerate(blobs):
                for p, q in zip(model.parameters(), from_bytes(blob)[0].parameters()):
                    p[i].copy_(q[0])
    levels = level_metrics(model, images, cfg)
    records = []
    for i, blob in enumerate(blobs):
        records.append({
            "width": w, "height": h, "channels": c, "model": cfg.model, "params": model.arch.params(),
            "model_bytes": len(blob), "raw_bytes": w * h * c, "bpp": round(8 * len(blob) / (w * h), 4),
            "fit_seconds": round(seconds / b, 3), "batch": b,
            "levels": levels[i],
            "stages": [{"params": r.params, "epochs": r.epochs[i], "seconds": round(r.seconds / b, 3)} for r in reports],
        })
    return records, blobs
