"""Job settings: config files with a [job] table, and the command-line flags that override them.

Kept apart from `encode` (which loads Ray) so that `mrnet fit` and grid files can use it without Ray.
"""
import math

from mrnet_core.config import Bound, ConfigError, check_number, load_file, make_config
from mrnet_core.images import DEFAULT_MAX_PIXELS

# Fit keys that also have flags, on both `fit` and `encode`: compact weights and rate control.
FIT_FLAGS = [("--weight-bits", int, "store weights at 32, 16 (float) or 2-8 bits (quantised, entropy-coded) "
                                    "(default: the preset's: 8 for compact, else 32)"),
             ("--target-bpp", float, "size each model to at most this many stored bits per pixel (default: off)"),
             ("--target-psnr", float, "the smallest model reaching this full-resolution PSNR in dB (default: off)"),
             ("--prior", str, "where each image starts: auto (default: the shipped prior for quantised encodes), "
                              "none, default, or a .mrprior file from `mrnet prior train`")]


def fit_overrides(args, overrides):
    """overrides updated with the fit keys given as flags."""
    for flag, _, _ in FIT_FLAGS + [("--levels", 0, 0), ("--seed", 0, 0)]:
        key = flag[2:].replace("-", "_")
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    return overrides


# Bounds of the [job] table's numbers and of the flags that set them.
MAX_SIZE = math.isqrt(DEFAULT_MAX_PIXELS)  # a square image with this long side is within the pixel limit
MAX_BATCH_SIZE = 1024
MAX_ACTORS = 1024
MAX_GPUS_PER_ACTOR = 16.0
MAX_CPUS_PER_ACTOR = 1024.0
MAX_TRACKING_DEADLINE = 3600.0

JOB_KEYS = {"preset": str, "size": Bound(int, 1, MAX_SIZE), "max_pixels": Bound(int, 1, DEFAULT_MAX_PIXELS),
            "batch_size": Bound(int, 1, MAX_BATCH_SIZE), "actors": Bound(int, 1, MAX_ACTORS),
            "num_gpus": Bound(float, 0, MAX_GPUS_PER_ACTOR),
            "num_cpus": Bound(float, 0, MAX_CPUS_PER_ACTOR, above_low=True),
            "tracking_deadline": Bound(float, 0, MAX_TRACKING_DEADLINE),  # seconds for all of a job's MLflow calls
            "wait": bool}  # wait for another job's lease on OUT rather than stop


def read_config_file(path):
    """(fit overrides, job settings) from a TOML/JSON file with fit keys and an optional [job] table."""
    fit, tables = load_file(path)
    job = tables.pop("job", {})
    if tables:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(tables)}; use [fit] and [job]")
    return fit, check_job(job)


def check_job(job):
    """The [job] table with each key known, each number within its bound; ConfigError otherwise."""
    checked = {}
    for k, v in job.items():
        if k not in JOB_KEYS:
            raise ConfigError(f"job.{k}: unknown job key; known keys: {', '.join(JOB_KEYS)}")
        if JOB_KEYS[k] in (str, bool):
            if not isinstance(v, JOB_KEYS[k]):
                kind = "string" if JOB_KEYS[k] is str else "boolean (true or false)"
                raise ConfigError(f"{k}: must be a {kind}, not a {type(v).__name__}")
            checked[k] = v
        else:
            checked[k] = check_number(k, v, JOB_KEYS[k])
    return checked


def resolve(args):
    """(FitConfig, job settings) from --config, --preset and the flags; ConfigError before any work starts."""
    fit, job = read_config_file(args.config) if args.config else ({}, {})
    for k in JOB_KEYS:
        if getattr(args, k, None) is not None:
            job[k] = getattr(args, k)
    job = check_job({"preset": "default", **job})
    fit = fit_overrides(args, fit)
    return make_config(job["preset"], fit, model=getattr(args, "model", None)), job
