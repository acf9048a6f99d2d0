"""`mrnet prior train INPUT --out DIR`: learn a collection prior, one initialisation per rung of a width ladder.

    images (listed like encode's INPUT; bad ones reported and skipped) -> random square crops at random scales,
    resized to --size (driver) -> one Ray actor per rung (a GPU each when the cluster has them) runs
    `prior.learn` a few outer steps per call; the driver checkpoints each rung to DIR/rungs/<k>.mrprior ->
    each rung is scored on crops of held-out images: fitted from the prior and from a random draw by the same
    joint phase -> DIR/prior.mrprior (the rungs merged), DIR/training.json, and one MLflow run with the curves.

Resumable: a rerun continues each rung from its checkpoint when the settings are the same, and starts it afresh
(saying so) when they are not.

With --model g it learns a start for latent pyramids instead (`latent.learn_start`): the training crops are fitted
together, with one MLP and context model for all, on one Ray worker; DIR/prior.mrprior holds that start. That one fit
is not checkpointed: a killed run starts again.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from mrnet_core import latent
from mrnet_core import prior as priors
from mrnet_core.config import ConfigError, make_config
from mrnet_core.images import ImageError, decode, to_pil
from mrnet_core.metrics import psnr
from mrnet_core.modelfile import ImageMeta, to_bytes
from mrnet_core.network import MRNet
from mrnet_core.quantize import finetune, quantised_parameters
from mrnet_core.rate import scaled
from mrnet_core.render import render

from . import store, track
from .console import Progress, init_ray
from .sources import has_scheme, list_images, read_bytes

LATENT_RATES = (0.01, 0.003, 0.001)  # a latent start's training crops are fitted at these rate weights, in turn
LATENT_MAX_PIXELS = 64 * 256 * 256  # of a latent start's crops, all fitted in one batch: about 50 MB per 256 px crop
# Flags of the M-Net ladder's training, which `--model g` refuses rather than ignores.
LADDER_FLAGS = ("scales", "batch", "epochs", "inner_epochs", "batch_pixels", "meta_rate", "holdout")
CHECKPOINT_EVERY = 5  # outer steps per actor call, and so between checkpoints
SCORE_CROPS = 6  # held-out crops each rung is scored on: each is fitted twice at the encoder's full budget
MAX_CROPS = 4096
MAX_STEPS = 100_000


def crops_of(image, count, size, rng):
    """`count` random square crops of [C, H, W] (side from `size` up to the short side), resized to size x size,
    as uint8 RGB arrays: photos seen at many scales, as images of every size are seen once resized."""
    pil = to_pil(image).convert("RGB")
    w, h = pil.size
    if min(w, h) < size:  # too small to crop at this size: the whole image, enlarged
        pil = pil.resize((max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))),
                         Image.LANCZOS)
        w, h = pil.size
    out = []
    for _ in range(count):
        side = int(rng.integers(size, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(np.asarray(pil.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)))
    return out


def training_crops(source, size, per_image, holdout, seed, log, limit=MAX_CROPS):
    """(training crops, held-out crops) as float tensors [N, 3, size, size], `limit` crops at most; every `holdout`-th
    image (at least one when there are two or more) gives held-out crops only."""
    rng = np.random.default_rng(seed)
    train, held, used = [], [], 0
    for uri in list_images(source):
        try:
            image, _ = decode(read_bytes(uri), uri)
        except (OSError, ImageError) as e:
            log(f"prior train: skipped {e}")
            continue
        used += 1
        (held if holdout and used % holdout == 0 else train).extend(crops_of(image, per_image, size, rng))
        if len(train) + len(held) >= limit:
            log(f"prior train: {limit} crops reached; the remaining images are not used")
            break
    if not train:
        raise ConfigError(f"{source}: no usable training images")

    def tensor(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255) if arrays else None

    return tensor(train), tensor(held), used


class RungTrainer:
    """An actor that holds one rung's training state and runs `prior.learn` a few outer steps per call."""

    def __init__(self, crops, arch, settings, start, first_step, threads):
        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() and _granted_gpu() else "cpu"
        self.crops = torch.from_numpy(np.array(crops)).to(self.device)  # a copy: Ray hands out read-only arrays
        self.arch, self.settings = arch, settings
        self.weights, self.step = start, first_step

    def run(self, until):
        """Outer steps up to `until`: (weights as arrays, [(step, loss)])."""
        s, history = self.settings, []
        inner = {**s["fit"], "epochs": s["inner_epochs"]}
        self.weights = priors.learn(self.crops, self.arch, inner, until, s["batch"], s["meta_rate"], s["seed"],
                                    self.weights, self.step, bits=s["bits"],
                                    on_step=lambda step, w, loss: history.append((step, loss)))
        self.step = until
        return [w.cpu().numpy() for w in self.weights], history


def _granted_gpu():
    import ray
    return bool(ray.get_gpu_ids())


def rung_settings(args, cfg):
    return {"size": args.size, "steps": args.steps, "batch": args.batch, "meta_rate": args.meta_rate,
            "seed": args.seed, "bits": cfg.weight_bits, "inner_epochs": args.inner_epochs,
            "fit": {"epochs": args.epochs, "lr": args.lr, "batch_pixels": args.batch_pixels}}


def ladder(cfg, scales):
    return [scaled(cfg, s).architecture(3) for s in scales]


def load_checkpoint(path, arch, settings, log):
    """(weights, next step, history) of a rung's checkpoint if it was made with these settings, else a fresh
    start."""
    if not os.path.exists(path):
        return None, 0, []
    try:
        saved = priors.load(path)
    except priors.PriorError as e:
        log(f"prior train: {e}; that rung starts afresh")
        return None, 0, []
    t = saved.training
    if saved.architectures != [arch] or t.get("settings") != settings:
        log(f"prior train: {path} was made with other settings; that rung starts afresh")
        return None, 0, []
    return saved.weights[0], int(t.get("step", 0)), [tuple(h) for h in t.get("history", [])]


def score(prior, arch, crops, settings):
    """Per held-out crop: (PSNR from the prior, PSNR from a random draw, bytes per parameter stored from the prior),
    both fitted by the prior's joint phase and stored at its bits, the prior's as residuals."""
    fit, bits = settings["fit"], settings["bits"]
    levels = len(arch.stages)
    size = crops.shape[-1]
    meta = ImageMeta(size, size, arch.channels, levels)
    results = {}
    for name, model in (("prior", prior.model(arch, batch=len(crops))), ("random", MRNet(arch, len(crops)))):
        model.requires_grad_(False)
        base = priors.base_of(model, prior) if name == "prior" else None
        finetune(model, crops, bits, fit["epochs"], fit["lr"], fit["batch_pixels"], levels, "reflect",
                 settings["seed"], base=base)
        with torch.no_grad():
            stored = quantised_parameters(model, bits, fake=False, base=base)
            for n, p in model.named_parameters():
                p.copy_(stored[n])
            results[name] = psnr(render(model, size, size).clamp(0, 1), crops).tolist()
        if name == "prior":
            sizes = [len(to_bytes(model, meta, bits, i, prior=prior)) for i in range(len(crops))]
    return results["prior"], results["random"], float(np.mean(sizes)) / arch.params()


def score_rung(arch, weights, settings, crops):
    """`score` of one rung on held-out crops, as a dict (a Ray task's result)."""
    one = priors.Prior([arch], [[torch.from_numpy(np.array(w)) for w in weights]], settings["fit"])
    with_prior, random, per_param = score(one, arch, torch.from_numpy(np.array(crops)), settings)
    return {"psnr_prior": float(np.mean(with_prior)), "psnr_random": float(np.mean(random)),
            "gain_db": float(np.mean(with_prior) - np.mean(random)),
            "wins": int(sum(a >= b for a, b in zip(with_prior, random))), "crops": len(with_prior),
            "bytes_per_param": per_param}


class LatentStartTrainer:
    """An actor that runs `latent.learn_start` (`run`) and answers, meanwhile, how far it is (`status`)."""

    def __init__(self):
        self.step, self.curve = 0, []  # the mean squared error every 10 steps

    def run(self, crops, arch, steps, lr, seed, threads):
        """The start's tensors as arrays, and the curve."""
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() and _granted_gpu() else "cpu"
        images = torch.from_numpy(np.array(crops)).to(device)
        lams = [LATENT_RATES[i % len(LATENT_RATES)] for i in range(len(images))]

        def progress(step, error):
            self.step = step + 1
            if step % 10 == 0:
                self.curve.append((step, float(error.mean())))

        start = latent.learn_start(images, arch, lams, steps, lr, seed, progress)
        return [t.numpy() for t in start], self.curve

    def status(self):
        return self.step, self.curve[-1][1] if self.curve else float("nan")


def cmd_latent_train(args, arch, out, log):
    """`prior train --model g`: a prior holding one start for latent pyramids of `arch` (the g preset's shape)."""
    import ray

    start = time.perf_counter()
    train, _, used = training_crops(args.input, args.size, args.crops, 0, args.seed, log,
                                    limit=max(1, LATENT_MAX_PIXELS // args.size**2))
    log(f"prior train: {used} image(s), {len(train)} training crops of {args.size} px; one start for latent "
        f"pyramids ({arch.levels} levels, hidden {list(arch.hidden)}), {args.steps} steps on one worker")
    if not ray.is_initialized():
        init_ray(args.ray_address)
    gpus = ray.cluster_resources().get("GPU", 0)
    threads = 1 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)))
    tracker = track.start(out, args.experiment, log, command="prior train")
    trainer = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_concurrency=2)(LatentStartTrainer).remote()
    done = trainer.run.remote(train.numpy(), arch, args.steps, args.lr, args.seed, threads)
    progress = Progress("prior train", args.steps, unit="steps")
    while not ray.wait([done], timeout=2.0)[0]:
        step, error = ray.get(trainer.status.remote())
        progress.update(step, f"mean squared error {error:.5f}")
    tensors, curve = ray.get(done)
    progress.update(args.steps)
    progress.close()
    settings = {"model": "g", "size": args.size, "steps": args.steps, "lr": args.lr, "seed": args.seed,
                "crops": args.crops, "rate_weights": list(LATENT_RATES)}
    trained = priors.Prior([], [], {}, {"settings": settings, "images": used, "crops": len(train),
                                        "seconds": round(time.perf_counter() - start, 1)},
                           latent={"levels": arch.levels, "hidden": list(arch.hidden), "context": arch.context},
                           latent_weights=[torch.from_numpy(np.array(t)) for t in tensors])
    prior_id = priors.save(os.path.join(out, "prior.mrprior"), trained)
    store.write_json(out, "training.json", {"prior_id": prior_id, **trained.training, "history": curve})
    log_run(tracker, out, trained, {"latent": curve}, log)
    print(json.dumps({"prior_id": prior_id, "path": os.path.join(out, "prior.mrprior"), "bytes": len(trained.data),
                      "seconds": trained.training["seconds"], "mlflow": track.report(tracker)}))
    return 0


def cmd_prior_train(args):
    import ray

    if has_scheme(args.out):
        raise ConfigError(f"--out: prior train writes a local folder, not {args.out!r}")
    steps, lr = (800, 1e-2) if args.model == "g" else (80, 3e-3)
    args.steps = steps if args.steps is None else args.steps
    args.lr = lr if args.lr is None else args.lr
    for name, value, lo, hi in (("--steps", args.steps, 1, MAX_STEPS), ("--batch", args.batch, 1, 1024),
                                ("--crops", args.crops, 1, MAX_CROPS), ("--size", args.size, 16, 1024),
                                ("--epochs", args.epochs, 1, 10_000), ("--inner-epochs", args.inner_epochs, 1, 10_000),
                                ("--batch-pixels", args.batch_pixels, 64, 1 << 20)):
        if not lo <= value <= hi:
            raise ConfigError(f"{name}: must be an integer from {lo} to {hi}, not {value}")
    if not (0 < args.meta_rate <= 1 and 0 < args.lr <= 1):
        raise ConfigError("--meta-rate and --lr: must be in (0, 1]")
    try:
        scales = sorted({float(s) for s in args.scales.split(",")})
    except ValueError:
        raise ConfigError(f"--scales: must be numbers separated by commas, not {args.scales!r}") from None
    if not scales or not all(1 / 64 <= s <= 4 for s in scales) or len(scales) > priors.MAX_RUNGS:
        raise ConfigError(f"--scales: 1 to {priors.MAX_RUNGS} width scales from 1/64 to 4, not {args.scales!r}")
    out = os.path.abspath(args.out)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.model == "g":
        given = [f"--{k.replace('_', '-')}" for k in LADDER_FLAGS if getattr(args, k) != args.ladder_defaults[k]]
        if given:
            raise ConfigError(f"{', '.join(given)}: train the M-Net ladder (--model m), not a latent start")
        try:
            arch = make_config("default", {}, model="g").latent_architecture(3, args.size, args.size)
        except ValueError as e:
            raise ConfigError(f"--size: {e}") from None
        os.makedirs(out, exist_ok=True)
        return cmd_latent_train(args, arch, out, log)
    cfg = make_config("compact", {"prior": "none"})
    settings = rung_settings(args, cfg)
    os.makedirs(os.path.join(out, "rungs"), exist_ok=True)
    start = time.perf_counter()
    train, held, used = training_crops(args.input, args.size, args.crops, args.holdout, args.seed, log)
    log(f"prior train: {used} image(s): {len(train)} training crops, {0 if held is None else len(held)} held out; "
        f"{len(scales)} rung(s), {args.steps} outer steps each")
    if not ray.is_initialized():
        init_ray(args.ray_address)
    gpus = ray.cluster_resources().get("GPU", 0)
    threads = 1 if gpus else max(1, int(ray.cluster_resources().get("CPU", 1) // len(scales)))
    trainer = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(RungTrainer)
    crops_ref = ray.put(train.numpy())
    tracker = track.start(out, args.experiment, log, command="prior train")
    archs, rungs, histories = ladder(cfg, scales), {}, {}
    for k, arch in enumerate(archs):
        path = os.path.join(out, "rungs", f"{k}.mrprior")
        weights, step, history = load_checkpoint(path, arch, settings, log)
        if step:
            log(f"prior train: rung {k} resumes at step {step}")
        rungs[k] = (trainer.remote(crops_ref, arch, settings, weights, step, threads), step, path)
        histories[k] = history
    pending = {k: r[0].run.remote(min(r[1] + CHECKPOINT_EVERY, args.steps)) for k, r in rungs.items()
               if r[1] < args.steps}
    finished = {k: priors.load(r[2]).weights[0] for k, r in rungs.items() if r[1] >= args.steps}
    # Each rung is scored as soon as it is trained, on a CPU (or GPU) of its own, while others still train.
    scorer = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(score_rung)
    held_ref = None if held is None else ray.put(held[:: max(1, len(held) // SCORE_CROPS)][:SCORE_CROPS].numpy())
    scoring = {}

    def rung_done(k, weights):
        finished[k] = weights
        ray.kill(rungs[k][0])  # its CPU or GPU goes to a rung still waiting for one
        if held_ref is not None:
            scoring[k] = scorer.remote(archs[k], [w.numpy() for w in weights], settings, held_ref)

    for k in list(finished):
        rung_done(k, finished[k])
    resumed = sum(r[1] for r in rungs.values())  # steps done by an earlier run: not in this run's rate and ETA
    progress = Progress("prior train", args.steps * len(rungs) - resumed, unit="steps")
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=1)
        k = next(k for k, ref in pending.items() if ref == ready[0])
        arrays, history = ray.get(ready[0])
        actor, step, path = rungs[k]
        step = min(step + CHECKPOINT_EVERY, args.steps)
        histories[k] += history
        weights = [torch.from_numpy(np.array(a)) for a in arrays]
        checkpoint = priors.Prior([archs[k]], [weights], settings["fit"],
                                  {"settings": settings, "step": step, "history": histories[k]})
        priors.save(path, checkpoint)
        rungs[k] = (actor, step, path)
        progress.update(sum(min(r[1], args.steps) for r in rungs.values()) - resumed,
                        f"rung {k} at step {step}/{args.steps}, inner loss {history[-1][1]:.5f}")
        if step < args.steps:
            pending[k] = actor.run.remote(min(step + CHECKPOINT_EVERY, args.steps))
        else:
            del pending[k]
            rung_done(k, weights)
    progress.close()
    trained = priors.Prior(archs, [finished[k] for k in range(len(archs))], settings["fit"])
    scores = [None if ref is None else ray.get(ref) for ref in (scoring.get(k) for k in range(len(archs)))]
    for k, (arch, s) in enumerate(zip(archs, scores)):
        if s is None:
            continue
        log(f"prior train: rung {k} ({arch.params()} parameters): held out {s['psnr_prior']:.2f} dB from the prior, "
            f"{s['psnr_random']:.2f} from a random draw ({s['gain_db']:+.2f} dB, {s['wins']}/{s['crops']} crops), "
            f"{8 * s['bytes_per_param']:.2f} bits per parameter")
        if s["gain_db"] <= 0:
            log(f"prior train: warning: rung {k} loses to a random draw at this fitting budget")
    trained.bytes_per_param = [s["bytes_per_param"] for s in scores] if all(scores) else []
    trained.training = {"settings": settings, "scales": scales, "images": used, "crops": len(train),
                        "scores": scores, "seconds": round(time.perf_counter() - start, 1)}
    prior_id = priors.save(os.path.join(out, "prior.mrprior"), trained)
    store.write_json(out, "training.json", {"prior_id": prior_id, **trained.training,
                                             "history": {str(k): v for k, v in histories.items()}})
    log_run(tracker, out, trained, histories, log)
    print(json.dumps({"prior_id": prior_id, "path": os.path.join(out, "prior.mrprior"),
                      "bytes": len(trained.data), "rungs": len(archs), "scores": scores,
                      "seconds": trained.training["seconds"], "mlflow": track.report(tracker)}))
    return 0


def log_run(tracker, out, trained, histories, log):
    """The training run: settings as params, each rung's inner-loss curve and held-out scores as metrics."""
    if tracker["run_id"] is None:
        log(f"mlflow: not recorded: {tracker['error']}")
        return

    def log_all():
        from mlflow.entities import Metric, Param
        client, now = track.client_for(out), int(time.time() * 1000)
        metrics = [Metric(f"rung_{k}/inner_loss" if isinstance(k, int) else f"{k}/mse", float(loss), now, int(step))
                   for k, h in histories.items() for step, loss in h if math.isfinite(loss)]
        for k, s in enumerate(trained.training.get("scores", [])):
            for key in ("gain_db", "psnr_prior", "psnr_random", "bytes_per_param"):
                if s:
                    metrics.append(Metric(f"rung_{k}/{key}", s[key], now, 0))
        metrics.append(Metric("prior_bytes", len(trained.data), now, 0))
        params = {f"train.{k}": json.dumps(v) for k, v in trained.training["settings"].items()}
        params.update(prior_id=trained.prior_id, scales=json.dumps(trained.training.get("scales")))
        for first in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            client.log_batch(tracker["run_id"], metrics=metrics[first:first + 1000],
                             params=[Param(k, v[:6000]) for k, v in params.items()] if first == 0 else [])
        client.set_terminated(tracker["run_id"], "FINISHED")

    _, error = track.retried("log run", log_all, log, tracker)
    if error:
        log(f"mlflow: run {tracker['run_id']} incomplete: {error}")


def add_parser(sub):
    p = sub.add_parser("prior", help="collection priors: learned starts for compact encodes and latent pyramids")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="learn a prior over a collection of photos (resumable)")
    t.add_argument("input", metavar="INPUT", help="folder, glob, or .txt file of URIs of training images")
    t.add_argument("--out", required=True, help="output folder: prior.mrprior, training.json, rungs/")
    t.add_argument("--model", choices=("m", "g"), default="m",
                   help="m: a ladder of M-Net initialisations (default); g: a start for latent pyramids, learned by "
                        "fitting the crops together with one MLP and context model")
    t.add_argument("--size", type=int, default=256, help="training crops' side in pixels (default 256)")
    t.add_argument("--scales", default="0.5,0.59,0.71,0.84,1,1.19,1.41",
                   help="the ladder: width scales of the compact preset's widths (default: 0.5 to 1.41, 2^(1/4) "
                        "apart; about 0.18 to 1.4 bpp at 256 px)")
    t.add_argument("--steps", type=int, help="outer (meta) steps per rung (default 80); with --model g, the fit's "
                                             "steps (default 800)")
    t.add_argument("--batch", type=int, default=8, help="images per outer step (default 8)")
    t.add_argument("--crops", type=int, default=64, help="random crops per training image (default 64)")
    t.add_argument("--epochs", type=int, default=40, help="joint-phase epochs an image gets when encoded from the "
                                                          "prior, and when scored (default 40)")
    t.add_argument("--inner-epochs", type=int, default=2, help="joint-phase epochs of each training fit (default 2)")
    t.add_argument("--lr", type=float, help="joint-phase learning rate (default 3e-3); with --model g, the fit's "
                                            "(default 1e-2)")
    t.add_argument("--batch-pixels", type=int, default=2048, help="pixels per level per step (default 2048)")
    t.add_argument("--meta-rate", type=float, default=0.1, help="Reptile's outer step, decaying to a tenth "
                                                                "(default 0.1)")
    t.add_argument("--holdout", type=int, default=5, help="every Nth image is held out for scoring (default 5)")
    t.add_argument("--seed", type=int, default=0, help="seed of the crops, order and initial draws (default 0)")
    t.add_argument("--ray-address", help="join this Ray cluster (default: a local one)")
    t.add_argument("--experiment", help="MLflow experiment (default: mrnet-<OUT's folder name>)")
    t.add_argument("-v", "--verbose", action="store_true", help="show Ray's and MLflow's own logs")
    t.set_defaults(run=cmd_prior_train, ladder_defaults={k: t.get_default(k) for k in LADDER_FLAGS})
    return p
