"""Warm restarts of a latent pyramid at fixed rate weights: how a restart's bytes and quality follow its rate weight.
Prints a markdown table.

    python bench/latent_restart.py --photos /usr/share/wallpapers/Autumn/contents/images/1280x1024.jpg \\
        --bpps 1 [--factors 0.25,0.5,1,2,4,8] [--steps 3000] [--size 256] [--threads 1]

For each photo and rate: one first fit steered to the budget as `encode.encode_latent` steers it, then warm restarts
of that fit (`refit_steps` long, all in one batch) at the rate weight it ended at times each factor, with no target.
The first fit's row has factor "-".
"""
import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from latent_rd import name_of, square  # noqa: E402

from mrnet_core import latent  # noqa: E402
from mrnet_core.config import ConfigError, make_config  # noqa: E402
from mrnet_core.encode import latent_aim, measure, refit_steps  # noqa: E402
from mrnet_core.images import ImageError  # noqa: E402


def numbers(text: str) -> list[float]:
    """A comma-separated list of positive numbers (argparse reports a ValueError as an invalid value)."""
    values = [float(v) for v in text.split(",")]
    if not all(0 < v < float("inf") for v in values):
        raise ValueError(text)
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", required=True)
    parser.add_argument("--bpps", type=numbers, default=[1.0], help="rate targets, comma-separated")
    parser.add_argument("--factors", type=numbers, default=[0.25, 0.5, 1, 2, 4, 8],
                        help="of the first fit's ended rate weight, comma-separated")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        table(args)
    except (ConfigError, ImageError) as e:  # a photo that cannot be read, a budget too small: one line, not a traceback
        parser.error(str(e))


def table(args):
    factors = args.factors
    print("| photo | rate | factor | rate weight | bytes | of the budget | PSNR (dB) |\n|---|---|---|---|---|---|---|")
    for path in args.photos:
        image = square(path, args.size)[None]
        for bpp in args.bpps:
            cfg = make_config("default", {"target_bpp": bpp, "max_epochs": [args.steps], "prior": "none"}, model="g")
            arch = cfg.latent_architecture(*image.shape[1:])
            lr, budget = float(cfg.per_stage("lr")[-1]), math.floor(bpp * args.size * args.size / 8)
            first = latent.fit(image, arch, cfg.rate_weight, args.steps, lr, cfg.coarse_weight, border=cfg.border,
                               seed=cfg.seed, target_bits=torch.tensor([latent_aim(arch, budget)]))
            latent.quantise_weights(first, image, first.rate_weights)
            ended = first.rate_weights[0]
            weights = [ended * f for f in factors]
            batch = image.expand(len(weights), -1, -1, -1)
            restarts = latent.fit(batch, arch, torch.tensor(weights), refit_steps(args.steps), lr, cfg.coarse_weight,
                                  border=cfg.border, seed=cfg.seed, resume=first.select([0] * len(weights)))
            latent.quantise_weights(restarts, batch, restarts.rate_weights)
            rows = [("-", ended, *next(zip(*measure(first, image, cfg))))]
            rows += [(f"{f:g}", w, r, b) for f, w, r, b in zip(factors, weights, *measure(restarts, batch, cfg))]
            for factor, weight, record, blob in rows:
                print(f"| {name_of(path)} | {bpp:g} | {factor} | {weight:.3g} | {len(blob)} | "
                      f"{len(blob) / budget:.0%} | {record.levels[-1].psnr:.2f} |", flush=True)


if __name__ == "__main__":
    main()
