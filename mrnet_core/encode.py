"""Encode a batch of same-sized images: fit, then measure every level against the original's pyramid."""
import time
from dataclasses import dataclass, replace

import torch

from . import device as devices
from . import prior as priors
from .config import ConfigError, FitConfig
from .fit import fit
from .memory import encode_memory_bytes, max_batch
from .metrics import psnr, seam, ssim
from .modelfile import from_bytes, stored_weight_bits, to_bytes
from .pyramid import gaussian_pyramid, level_sizes
from .quantize import BATCH_PIXELS, finetune
from .rate import encode_at_rate, prior_rungs, within_budget
from .render import render


class FitDiverged(ValueError):
    """A fit that ended with weights that are not finite numbers: no model of it may be stored."""


def check_finite(model):
    """FitDiverged unless every weight of `model` is a finite number."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FitDiverged("the fit diverged (weights that are not finite numbers); try a smaller lr")


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


def encode(images, cfg: FitConfig, device=None, progress=None, budget=None, prior=None):
    """Fit one MR-Net per image of [B, C, H, W]: (records, model files as bytes), one of each per image.

    Weights of 8 bits or fewer are fine-tuned through the quantiser after the fit (`cfg.qat_epochs`); a rate target
    (`cfg.target_bpp`, `cfg.target_psnr`) sizes each image's model instead (`rate.encode_at_rate`), and `budget`
    (bytes) coarsens each quantised model's steps until its file fits (`rate.within_budget`).
    With a `prior` (`prior.Prior`) each image starts from its architecture's learned weights and is fitted by the
    joint phase alone, for the prior's own budget (`prior.fit`), and its weights are stored as residuals from it.
    `model_bytes` is the real size of the stored model file, and the levels' quality is that of the stored model;
    times are the batch's wall time shared evenly among its images (`batch` says how many were fitted together).
    """
    if cfg.target_bpp or cfg.target_psnr:
        return encode_at_rate(images, cfg, lambda im, c, budget: encode(im, c, device, progress, budget, prior),
                              prior)
    start = time.perf_counter()
    if prior is None:
        model, reports = fit(images, cfg, device=device, progress=progress)
        check_finite(model)
        if cfg.weight_bits <= 8:
            finetune(model, images, cfg.weight_bits, cfg.qat_epochs, cfg.qat_lr, cfg.batch_pixels or BATCH_PIXELS,
                     cfg.levels, cfg.border, cfg.seed)
    else:
        model = fit_from_prior(images, cfg, prior, devices.resolve(device))
        reports = []
    check_finite(model)
    seconds = time.perf_counter() - start
    records, blobs = measure(model, images, cfg, budget=budget, prior=prior)
    for i, r in enumerate(records):
        r.update(fit_seconds=round(seconds / len(records), 3), batch=len(records),
                 stages=[{"params": s.params, "epochs": s.epochs[i], "seconds": round(s.seconds / len(records), 3)}
                         for s in reports])
    return records, blobs


def fit_from_prior(images, cfg: FitConfig, prior, device):
    """A batched MR-Net of cfg's architecture started from `prior`'s rung for it and fitted by its joint phase."""
    arch = cfg.architecture(images.shape[1])
    problem = prior_problem(cfg, arch, prior)
    if problem:
        raise ValueError(problem)
    model = prior.model(arch, batch=images.shape[0]).to(device)
    fit_cfg = prior.fit
    finetune(model, images, cfg.weight_bits, int(fit_cfg["epochs"]), float(fit_cfg["lr"]),
             int(fit_cfg["batch_pixels"]), cfg.levels, cfg.border, cfg.seed, base=priors.base_of(model, prior))
    return model


def choose_prior(cfg: FitConfig, channels=3):
    """The `prior.Prior` images of `cfg` are encoded from, or None; ConfigError (one line) for a bad one.

    cfg.prior: "none"; "default" (the prior shipped with the package); a path to a prior file; or "auto", which is
    the default prior for quantised encodes (weight_bits 8 or fewer, or a rate target) when it has rungs for cfg's
    family, and none otherwise."""
    name = cfg.prior
    if name == "none":
        return None
    if name in ("auto", "default"):
        try:
            chosen = priors.default()
        except priors.PriorError as e:
            raise ConfigError(f"prior: the default prior is damaged: {e}") from None
        if chosen is None:
            if name == "default":
                raise ConfigError(f"prior: no default prior is installed ({priors.DEFAULT_PATH})")
            return None
    else:
        try:
            chosen = priors.load(name)
        except priors.PriorError as e:
            raise ConfigError(f"prior: {e}") from None
    rate_controlled = bool(cfg.target_bpp or cfg.target_psnr)
    if rate_controlled:
        bits_cfg = replace(cfg, weight_bits=min(cfg.weight_bits, 8))
        problem = None if prior_rungs(bits_cfg, chosen) else (
            f"prior {chosen.prior_id} has no rung for this config's model, levels and band limits")
        problem = problem or prior_problem(bits_cfg, None, chosen)
    else:
        problem = prior_problem(cfg, cfg.architecture(channels), chosen)
    if problem is None:
        return chosen
    if name == "auto":
        return None
    raise ConfigError(f"prior: {problem}")


def prior_problem(cfg: FitConfig, arch, prior):
    """Why images of `cfg` cannot be encoded from `prior` at architecture `arch`, or None."""
    if cfg.weight_bits > 8:
        return f"a prior codes quantised weights: weight_bits must be 8 or fewer, not {cfg.weight_bits}"
    if cfg.periodic:
        return "a prior's rungs are not periodic"
    if arch is not None and prior.rung(arch) is None:
        return f"prior {prior.prior_id} has no rung of this architecture ({arch.to_json()})"
    return None


def measure(model, images, cfg: FitConfig, bits=None, budget=None, prior=None, finer=None):
    """(records, model files) of a fitted batched model stored at `bits` (default cfg.weight_bits): sizes, and
    every level's quality measured on the stored model, not the trained one. `model` ends up holding the stored
    weights. With a `budget` (bytes; quantised weights only) records say how much coarser the steps had to be
    (negative: finer, which an encode from a `prior` does, or any with `finer`; see `rate.within_budget`)."""
    bits = bits or cfg.weight_bits
    b, c, h, w = images.shape
    meta = {"width": w, "height": h, "channels": c, "border": cfg.border,
            "levels": [list(size) for size in level_sizes(h, w, levels=cfg.levels)[::-1]]}
    if budget:
        finer = prior is not None if finer is None else finer
        blobs, coarser = zip(*(within_budget(model, meta, bits, i, budget, prior, finer)
                               for i in range(b)))
    else:
        blobs, coarser = [to_bytes(model, meta, bits, index=i, prior=prior) for i in range(b)], None
    stored_bits = [bits] * b
    if bits != 32:
        with torch.no_grad():
            for i, blob in enumerate(blobs):
                stored = from_bytes(blob, prior=prior)[0]
                stored_bits[i] = stored_weight_bits(blob)
                for p, q in zip(model.parameters(), stored.parameters()):
                    p[i].copy_(q[0])
    levels = level_metrics(model, images, cfg)
    records = [{"width": w, "height": h, "channels": c, "model": cfg.model, "architecture": model.arch.to_json(),
                "params": model.arch.params(), "prior_id": None if prior is None else prior.prior_id,
                "weight_bits": stored_bits[i], "model_bytes": len(blob), "raw_bytes": w * h * c,
                "bpp": round(8 * len(blob) / (w * h), 4), "levels": levels[i]} for i, blob in enumerate(blobs)]
    for r, k in zip(records, coarser or ()):
        r["coarser"] = k
    return records, blobs


@dataclass(frozen=True)
class Failure:
    """Why one image of `encode_in_batches` has no model. `retry`: the cause was passing (out of memory), so a
    later run should try it again rather than record it as failed."""
    kind: str
    message: str
    retry: bool = False


def encode_in_batches(images, cfg: FitConfig, device=None, memory_bytes=None, progress=None, encode_fn=encode):
    """Encode images [B, C, H, W] in batches that fit the device: per image, (record, model file) or a `Failure`.

    Batches are sized by the memory model (`memory.max_batch`) against `memory_bytes` (default: what the device
    offers now). A batch that still runs out of memory is split in halves, down to single images; one that fails
    otherwise is retried image by image, so one bad image fails alone. Device faults other than out of memory
    propagate: the device is unusable, and the caller must end the process. `encode_fn` is `encode`'s signature.
    """
    b, c, h, w = images.shape
    memory_bytes = devices.available_memory(device) if memory_bytes is None else memory_bytes
    try:
        limit = max_batch(cfg, c, h, w, memory_bytes)
    except ValueError as e:  # the images are too small for the levels asked for
        return [Failure("too_small", str(e))] * b
    if limit == 0:
        need = encode_memory_bytes(cfg, c, h, w)
        failure = Failure("too_large", f"a {w}x{h} image needs about {need / 2**30:.2f} GiB to encode with this "
                                       f"config; the device offers {memory_bytes / 2**30:.2f} GiB")
        return [failure] * b
    results = [None] * b
    pending = [list(range(i, min(i + limit, b))) for i in range(0, b, limit)]
    while pending:
        index = pending.pop(0)
        try:
            records, blobs = encode_fn(images[index], cfg, device, progress)
        except Exception as e:  # noqa: BLE001 (every error is classified below)
            if devices.is_device_fault(e):
                raise
            # Keep words, not the exception: its traceback holds the failed attempt's tensors.
            out_of_memory, kind = devices.is_out_of_memory(e), type(e).__name__
            message = str(e).splitlines()[0] if str(e) else ""
        else:
            for i, result in zip(index, zip(records, blobs)):
                results[i] = result
            continue
        if out_of_memory:
            devices.release(device)
        if len(index) > 1:  # halves after running out of memory; else each image alone, so a bad one fails alone
            halves = [index[: len(index) // 2], index[len(index) // 2 :]] if out_of_memory else [[i] for i in index]
            pending[:0] = halves
        elif out_of_memory:
            results[index[0]] = Failure("out_of_memory", f"out of device memory even alone ({message})", retry=True)
        else:
            results[index[0]] = Failure(kind, message)
    return results
