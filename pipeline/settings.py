"""Job settings: config files with a [job] table, and the command-line flags that override them.

Kept apart from `encode` (which loads Ray) so that `mrnet fit` and grid files can use it without Ray.
"""
from mrnet_core.config import ConfigError, load_file, make_config

# Fit keys that also have flags, on both `fit` and `encode`: compact weights and rate control.
FIT_FLAGS = [("--weight-bits", int, "store weights at 32, 16 (float) or 2-8 bits (quantised, entropy-coded)"),
             ("--target-bpp", float, "size each model to at most this many stored bits per pixel"),
             ("--target-psnr", float, "the smallest model reaching this full-resolution PSNR (dB)")]


def fit_overrides(args, overrides):
    """overrides updated with the fit keys given as flags."""
    for flag, _, _ in FIT_FLAGS + [("--levels", 0, 0), ("--seed", 0, 0)]:
        key = flag[2:].replace("-", "_")
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    return overrides


JOB_KEYS = {"preset": str, "size": int, "max_pixels": int, "batch_size": int, "actors": int, "num_gpus": float,
            "num_cpus": float}


def read_config_file(path):
    """(fit overrides, job settings) from a TOML/JSON file with fit keys and an optional [job] table."""
    fit, tables = load_file(path)
    job = tables.pop("job", {})
    if tables:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(tables)}; use [fit] and [job]")
    return fit, check_job(job)


def check_job(job):
    """The [job] table, each key known and of the right type; ConfigError otherwise."""
    for k, v in job.items():
        if k not in JOB_KEYS:
            raise ConfigError(f"job.{k}: unknown job key; known keys: {', '.join(JOB_KEYS)}")
        if not isinstance(v, JOB_KEYS[k]) and not (JOB_KEYS[k] is float and isinstance(v, int)) or \
                isinstance(v, bool):
            raise ConfigError(f"job.{k}: must be {JOB_KEYS[k].__name__}, not {v!r}")
    return job


def resolve(args):
    """(FitConfig, job settings) from --config, --preset and the flags; ConfigError before any work starts."""
    fit, job = read_config_file(args.config) if args.config else ({}, {})
    for k in JOB_KEYS:
        if getattr(args, k, None) is not None:
            job[k] = getattr(args, k)
    fit = fit_overrides(args, fit)
    cfg = make_config(job.pop("preset", "default"), fit, model=getattr(args, "model", None))
    for k in ("size", "max_pixels", "batch_size", "actors", "num_cpus"):
        if job.get(k) is not None and job[k] <= 0:
            raise ConfigError(f"{k}: must be positive, not {job[k]}")
    if job.get("num_gpus", 0) < 0:
        raise ConfigError(f"num_gpus: must be 0 or more, not {job['num_gpus']}")
    return cfg, job
