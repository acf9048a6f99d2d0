"""Encode a batch of same-sized images: fit, then measure every level against the original's pyramid."""
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from . import device as devices
from . import latent
from . import prior as priors
from .config import ConfigError, FitConfig
from .fit import fit
from .memory import encode_memory_bytes, max_batch
from .metrics import psnr, seam, ssim
from .modelfile import ImageMeta, from_bytes, stored_weight_bits, to_bytes
from .pyramid import gaussian_pyramid
from .quantize import BATCH_PIXELS, finetune
from .network import Architecture, MRNet
from .prior import Prior
from .rate import RateChoice, encode_at_rate, prior_rungs, within_budget
from .render import render


LATENT_RATE_TRIES = 4  # fits of a latent pyramid at most: one, then restarts (`fit_again`)
# A latent pyramid fitted again is a warm restart of its last fit (`latent.fit`'s resume) this share of its steps
# long: better than fitting it anew, in a quarter of the time (docs/performance.md, "warm restarts").
LATENT_REFIT_SHARE = 0.25
LATENT_RATE_AIM = 0.97  # of its budget a latent pyramid's fit aims at: the estimate is within a few percent
# A latent pyramid's file under this share of its budget is fitted again, aiming higher. The rate its fit is steered
# to falls once rounding takes over (by up to a third, docs/performance.md), too late for the steering to answer.
LATENT_RATE_FILL = 0.9
# ... unless its fit's rate weight fell below this share of where it started: the fit had no use for more bits.
LATENT_RATE_SATURATED = 0.02
# On a CPU a latent pyramid's batch runs fastest per image up to about this many pixels (six 256 px images, with its
# MLP 16 wide): beyond, its activations fall out of cache and each image-step costs up to 1.8 times as much
# (bench/latent_step.py, docs/performance.md). Larger batches are split (`encode_in_batches`); a GPU takes what fits
# its memory.
LATENT_CPU_BATCH_PIXELS = 6 * 256 * 256


@dataclass(frozen=True)
class LevelQuality:
    """One level of detail of a stored model against the original's Gaussian pyramid level (`level_metrics`)."""
    width: int
    height: int
    psnr: float
    ssim: float
    seam: float


@dataclass(frozen=True)
class StageFit:
    """One stage's share of a batched fit: its parameters, the epochs this image got, and seconds per image."""
    params: int
    epochs: int
    seconds: float


@dataclass(frozen=True)
class Encoding:
    """One image's encode, beside its model file: sizes, and every level's quality (coarse to fine) measured on the
    stored model. `coarser` is how many codes coarser (negative: finer) its steps were stored to fit a budget;
    `rate` is set by rate control (`rate.encode_at_rate`); the times are the batch's, shared evenly."""
    width: int
    height: int
    channels: int
    model: str
    architecture: str  # `Architecture.to_json()`
    params: int
    prior_id: str | None
    weight_bits: int  # of the stored weights; 0 for a latent pyramid, whose values are integers on their own steps
    model_bytes: int
    raw_bytes: int
    bpp: float
    levels: tuple[LevelQuality, ...]
    coarser: int | None = None
    rate: "RateChoice | None" = None
    fit_seconds: float = 0.0
    batch: int = 1
    stages: tuple[StageFit, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


class FitDiverged(ValueError):
    """A fit that ended with weights that are not finite numbers: no model of it may be stored."""


def check_finite(model: MRNet) -> None:
    """FitDiverged unless every weight of `model` is a finite number."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FitDiverged("the fit diverged (weights that are not finite numbers); try a smaller lr")


@torch.no_grad()
def level_metrics(model: MRNet, images: torch.Tensor, cfg: FitConfig) -> list[list[LevelQuality]]:
    """Per image of [B, C, H, W], coarse to fine: the quality of level k (t = k + 1) against Gaussian level k (the
    finest level against the original pixels themselves); seam is `metrics.seam` of the render."""
    gaussians = gaussian_pyramid(images.to(next(model.parameters()).device), cfg.levels, border=cfg.border)[::-1]
    rows = [[] for _ in range(images.shape[0])]
    for k, target in enumerate(gaussians):
        h, w = target.shape[-2:]
        out = render(model, w, h, t=k + 1).clamp(0, 1)
        figures = zip(psnr(out, target).tolist(), ssim(out, target).tolist(), seam(out).tolist())
        for row, (p, s, m) in zip(rows, figures):
            row.append(LevelQuality(w, h, round(p, 3), round(s, 4), round(m, 3)))
    return rows


def encode(images: torch.Tensor, cfg: FitConfig, device: str | torch.device | None = None,
           progress: Callable[[int, int, torch.Tensor], None] | None = None, budget: int | None = None,
           prior: Prior | None = None) -> tuple[list[Encoding], list[bytes]]:
    """Fit one MR-Net per image of [B, C, H, W]: (records, model files as bytes), one of each per image.

    Weights of 8 bits or fewer are fine-tuned through the quantiser after the fit (`cfg.qat_epochs`); a rate target
    (`cfg.target_bpp`, `cfg.target_psnr`) sizes each image's model instead (`rate.encode_at_rate`), and `budget`
    (bytes) coarsens each quantised model's steps until its file fits (`rate.within_budget`).
    With a `prior` (`prior.Prior`) each image starts from its architecture's learned weights and is fitted by the
    joint phase alone, for the prior's own budget (`prior.fit`), and its weights are stored as residuals from it.
    `model_bytes` is the real size of the stored model file, and the levels' quality is that of the stored model;
    times are the batch's wall time shared evenly among its images (`batch` says how many were fitted together).
    """
    if cfg.model == "g":
        return encode_latent(images, cfg, device, progress, prior)
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
    b = len(records)
    records = [replace(r, fit_seconds=round(seconds / b, 3), batch=b,
                       stages=tuple(StageFit(s.params, s.epochs[i], round(s.seconds / b, 3)) for s in reports))
               for i, r in enumerate(records)]
    return records, blobs


def encode_latent(images: torch.Tensor, cfg: FitConfig, device=None,
                  progress: Callable[[int, int, torch.Tensor], None] | None = None, prior: Prior | None = None
                  ) -> tuple[list[Encoding], list[bytes]]:
    """`encode` for latent pyramids (cfg.model "g", `latent.py`): fit the batch, quantise each image's MLP, store.
    With a `prior` holding a start for this architecture (`prior.Prior.latent_start`) the MLP, context model and
    grid scales start from it rather than from a random draw; the files do not need it to decode.

    With cfg.target_bpp each image's rate weight is steered while it is fitted so that its file comes to the budget
    (`latent.fit`'s target), aiming a little under. Every image is fitted again at least once (a restart gains
    1.4-1.6 dB at about the same bytes, docs/performance.md), and again while a fit's file comes out over the budget
    or the file it keeps is under LATENT_RATE_FILL of it (`fit_again`), up to LATENT_RATE_TRIES fits, with its
    latents aimed anew: by what they came to against their aim, so that the rest of the file stays where it was. A
    refit is a warm restart of the last fit (from its stored, quantised weights; its rate weight from
    `restart_rate_weights`), `refit_steps` long. Each image keeps its best file within the budget (the highest
    PSNR), or its last when none is. Records say the rate weight reached, whether the file fits, and the steps of
    every fit (`epochs`)."""
    start = time.perf_counter()
    images = images.to(devices.resolve(device))
    b, c, h, w = images.shape
    arch = cfg.latent_architecture(c, h, w)
    initial = None if prior is None else prior.latent_start(arch)
    if prior is not None and initial is None:
        raise ValueError(f"prior {prior.prior_id} has no start for this latent pyramid ({arch.to_json()})")
    steps, lr = int(cfg.per_stage("max_epochs")[-1]), float(cfg.per_stage("lr")[-1])
    budget = math.floor(cfg.target_bpp * h * w / 8) if cfg.target_bpp else None
    if budget is not None:
        aims = torch.full((b,), latent_aim(arch, budget), device=images.device)
    records, blobs, fitted = [None] * b, [None] * b, [0] * b
    todo, again, last = list(range(b)), [], None  # last: the fits that refits restart from
    floors = torch.zeros(b)  # per image: its next restart's least rate weight (`restart_rate_weights`)
    for _ in range(1 if budget is None else LATENT_RATE_TRIES):
        batch = images[todo]
        length = steps if last is None else refit_steps(steps)
        lam = (cfg.rate_weight if last is None
               else restart_rate_weights(last.rate_weights, floors[todo], cfg.rate_weight))
        model = latent.fit(batch, arch, lam, length, lr, cfg.coarse_weight, border=cfg.border, seed=cfg.seed,
                           progress=None if progress is None else lambda step, loss: progress(0, step, loss),
                           target_bits=None if budget is None else aims[todo], start=initial if last is None else None,
                           resume=last, horizon=steps)
        latent.quantise_weights(model, batch, model.rate_weights)
        try:
            check_finite(model)
        except FitDiverged as e:
            raise FitDiverged(f"{e}, or --prior none rather than prior {prior.prior_id}") if prior else e
        spent = latent.latent_bits(model, list(model.grids)).tolist() if budget else None  # estimated bits, [B]
        for j, (i, record, blob) in enumerate(zip(todo, *measure(model, batch, cfg))):
            record = replace(record, prior_id=None if prior is None else prior.prior_id)
            fitted[i] += length
            if budget is None:
                records[i], blobs[i] = record, blob
                continue
            within = len(blob) <= budget
            quality = record.levels[-1].psnr  # dB at full resolution
            floors[i] = balanced_rate_weight(quality, cfg.target_bpp) if not within and math.isfinite(quality) else 0.0
            record = replace(record, rate=RateChoice(1.0, None, cfg.target_bpp, None, within,
                                                     round(model.rate_weights[j], 6)))
            kept = records[i]
            if kept is None or not kept.rate.met or (within and quality > kept.levels[-1].psnr):
                records[i], blobs[i] = record, blob
            # Aim again so that the latents, which came to a share of what they aimed at, leave the rest of the
            # file room to come to LATENT_RATE_AIM of the budget; by at most 4x either way (latents all 0 say little).
            latents = max(spent[j] / 8, 1.0)  # bytes
            aims[i] *= min(max((LATENT_RATE_AIM * budget - (len(blob) - latents)) / latents, 0.25), 4.0)
            if fit_again(first=last is None, fit_bytes=len(blob), kept_bytes=len(blobs[i]), budget=budget,
                         rate_weight=model.rate_weights[j], start_weight=cfg.rate_weight):
                again.append(i)  # restarted from this fit, aimed as above
        if not again:
            break
        last = model.select([todo.index(i) for i in again])
        todo, again = again, []
    seconds = time.perf_counter() - start
    return [replace(r, fit_seconds=round(seconds / b, 3), batch=b, stages=(StageFit(arch.params(), n, 0.0),))
            for r, n in zip(records, fitted)], blobs  # the steps each image got, over all its fits


def fit_again(first: bool, fit_bytes: int, kept_bytes: int, budget: int, rate_weight: float,
              start_weight: float) -> bool:
    """Whether a latent pyramid is fitted again (a warm restart of this fit) after a fit whose file has `fit_bytes`,
    when the file it keeps has `kept_bytes` (its best within the budget so far, or its last when none is within).
    Always after its first fit. After a restart: when this fit's file is over the budget, even while an earlier file
    within it is kept (at 1 bpp restarts overshoot, and the next ones keep most of their gain: docs/performance.md,
    "a restart over its budget"); or when the kept file is under LATENT_RATE_FILL of the budget and the fit had use
    for more bits (its rate weight ended at LATENT_RATE_SATURATED of `start_weight`, cfg.rate_weight, or above)."""
    hungry = kept_bytes < LATENT_RATE_FILL * budget and rate_weight >= LATENT_RATE_SATURATED * start_weight
    return first or fit_bytes > budget or hungry


def restart_rate_weights(ended: list[float], floors: torch.Tensor, rate_weight: float) -> torch.Tensor:
    """The rate weights warm restarts start from: where their last fits ended, but not under the saturation test's
    line (a file over its budget should not have to climb back from near 0 in a quarter of the steps), nor under
    `floors`: after a fit over the budget, its `balanced_rate_weight` (steered up from far below it, restarts at 1
    bpp came out over again and again: docs/performance.md, "a restart over its budget"); else 0."""
    return torch.tensor(ended).clamp_min(LATENT_RATE_SATURATED * rate_weight).maximum(floors)


def balanced_rate_weight(psnr: float, bpp: float) -> float:
    """The rate weight at which one more bit per pixel saves as much squared error (of [0, 1] values, as `latent.fit`
    weighs it) as it costs, for an image fitted to `psnr` dB at `bpp` whose rate-distortion curve gains 3 dB per
    doubling of the rate (as `g`'s do from 0.5 to 1 bpp, docs/performance.md): there the squared error e falls as
    1 / bpp, so -de/dbpp = e / bpp."""
    return 10 ** (-psnr / 10) / bpp


def refit_steps(steps: int) -> int:
    """The steps of a latent pyramid's refit (a warm restart) after a first fit of `steps`."""
    return max(1, round(LATENT_REFIT_SHARE * steps))


def latent_aim(arch: latent.LatentArchitecture, budget: int) -> float:
    """The bits a latent pyramid's fit aims its latents at (`latent.fit`'s target) for a file of `budget` bytes: the
    budget less an estimate of the rest of the file, times LATENT_RATE_AIM. ConfigError when that leaves too little."""
    weights = arch.params() - sum(gh * gw for gh, gw in arch.sizes)
    # Fitted weights cost about 7 bits each; the header and group table 48 bytes, and 5 more per grid past one a level.
    fixed = 7 * weights // 8 + 48 + 5 * (arch.grid_count - arch.levels)
    if budget < fixed + 64:
        raise ConfigError(f"target_bpp: {budget} bytes for a {arch.width}x{arch.height} image leave too little for "
                          f"its latents beside the network's weights (about {fixed} bytes); raise target_bpp")
    return 8.0 * (budget - fixed) * LATENT_RATE_AIM


def fit_from_prior(images: torch.Tensor, cfg: FitConfig, prior: Prior, device: str | torch.device | None) -> MRNet:
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


def choose_prior(cfg: FitConfig, channels: int = 3) -> Prior | None:
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
    if cfg.model == "g":  # a start for the config's levels, widths and entropy model (any image size)
        hidden = cfg.latent_hidden()
        grids = cfg.per_stage("grid_channels")
        shape = (cfg.levels, hidden, cfg.entropy == "context", sum(grids))
        problem = None if chosen.has_latent_start(*shape) else (
            f"prior {chosen.prior_id} has no start for latent pyramids of {cfg.levels} levels, hidden widths "
            f"{list(hidden)}, grids per level {grids} and the {cfg.entropy} entropy model")
    elif rate_controlled:
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


def prior_problem(cfg: FitConfig, arch: Architecture | None, prior: Prior) -> str | None:
    """Why images of `cfg` cannot be encoded from `prior` at architecture `arch`, or None."""
    if cfg.weight_bits > 8:
        return f"a prior codes quantised weights: weight_bits must be 8 or fewer, not {cfg.weight_bits}"
    if cfg.periodic:
        return "a prior's rungs are not periodic"
    if arch is not None and prior.rung(arch) is None:
        return f"prior {prior.prior_id} has no rung of this architecture ({arch.to_json()})"
    return None


def measure(model: MRNet, images: torch.Tensor, cfg: FitConfig, bits: int | None = None, budget: int | None = None,
            prior: Prior | None = None, finer: bool | None = None) -> tuple[list[Encoding], list[bytes]]:
    """(records, model files) of a fitted batched model stored at `bits` (default cfg.weight_bits): sizes, and
    every level's quality measured on the stored model, not the trained one (`model` itself is left as it is).
    With a `budget` (bytes; quantised weights only) records say how much coarser the steps had to be
    (negative: finer, which an encode from a `prior` does, or any with `finer`; see `rate.within_budget`)."""
    bits = bits or cfg.weight_bits  # 32 for a latent pyramid (its config allows no other): stored as fitted
    b, c, h, w = images.shape
    meta = ImageMeta(w, h, c, cfg.levels, cfg.border)
    if budget:
        finer = prior is not None if finer is None else finer
        blobs, coarser = zip(*(within_budget(model, meta, bits, i, budget, prior, finer)
                               for i in range(b)))
    else:
        blobs, coarser = [to_bytes(model, meta, bits, index=i, prior=prior) for i in range(b)], None
    stored_bits = [0 if cfg.model == "g" else bits] * b  # 0: no weight width (see `Encoding.weight_bits`)
    if bits != 32:
        model = copy.deepcopy(model)  # measured as stored; the caller's model stays as trained
        with torch.no_grad():
            for i, blob in enumerate(blobs):
                stored = from_bytes(blob, prior=prior)[0]
                stored_bits[i] = stored_weight_bits(blob)
                for p, q in zip(model.parameters(), stored.parameters()):
                    p[i].copy_(q[0])
    levels = level_metrics(model, images, cfg)
    coarser = coarser or [None] * b
    records = [Encoding(w, h, c, cfg.model, model.arch.to_json(), model.arch.params(),
                        None if prior is None else prior.prior_id, stored_bits[i], len(blob), w * h * c,
                        round(8 * len(blob) / (w * h), 4), tuple(levels[i]), coarser[i])
               for i, blob in enumerate(blobs)]
    return records, list(blobs)


@dataclass(frozen=True)
class Failure:
    """Why one image of `encode_in_batches` has no model. `retry`: the cause was passing (out of memory), so a
    later run should try it again rather than record it as failed."""
    kind: str
    message: str
    retry: bool = False


def encode_in_batches(images: torch.Tensor, cfg: FitConfig, device: str | torch.device | None = None,
                      memory_bytes: int | None = None,
                      progress: Callable[[int, int, torch.Tensor], None] | None = None,
                      encode_fn: Callable[..., tuple[list[Encoding], list[bytes]]] = encode
                      ) -> list[tuple[Encoding, bytes] | Failure]:
    """Encode images [B, C, H, W] in batches that fit the device: per image, (record, model file) or a `Failure`.

    Batches are sized by the memory model (`memory.max_batch`) against `memory_bytes` (default: what the device
    offers now), latent pyramids on a CPU to at most LATENT_CPU_BATCH_PIXELS, and split as evenly as that allows. A
    batch that still runs out of memory is split in halves, down to single images; one that fails otherwise is
    retried image by image, so one bad image fails alone. Device faults other than out of memory propagate: the
    device is unusable, and the caller must end the process. `encode_fn` is `encode`'s signature.
    """
    b, c, h, w = images.shape
    if not b:
        return []
    memory_bytes = devices.available_memory(device) if memory_bytes is None else memory_bytes
    try:
        limit = max_batch(cfg, c, h, w, memory_bytes)
    except latent.TooLarge as e:  # over a latent pyramid's limits
        return [Failure("too_large", str(e))] * b
    except ValueError as e:  # the images are too small for the levels asked for
        return [Failure("too_small", str(e))] * b
    if limit == 0:
        need = encode_memory_bytes(cfg, c, h, w)
        failure = Failure("too_large", f"a {w}x{h} image needs about {need / 2**30:.2f} GiB to encode with this "
                                       f"config; the device offers {memory_bytes / 2**30:.2f} GiB")
        return [failure] * b
    if cfg.model == "g" and devices.resolve(device).type == "cpu":  # a wider MLP (or more grids) fills the cache sooner
        pixels = LATENT_CPU_BATCH_PIXELS * 16 // max(16, sum(cfg.per_stage("grid_channels")), *cfg.latent_hidden())
        limit = min(limit, max(1, pixels // (h * w)))
    results = [None] * b
    # As even as the limit allows: a batch of 7 at a limit of 6 runs as 4 and 3, not 6 and a slow 1.
    pending = [index.tolist() for index in torch.arange(b).tensor_split(-(-b // limit))]
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
