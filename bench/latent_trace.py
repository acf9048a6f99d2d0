"""Latent pyramids (model g): how one fit unfolds. Every --every steps: the rate weight, the bits per pixel of the
rounded latents against the bits rate control aims at, and the PSNR of every level with rounded latents. Prints one
markdown table per photo. Photos are prepared as bench/latent_rd.py does (short side --size, centre square) and fitted
in one batch, each at its own --bpps target (steered, as an encode does) or its own fixed --lams rate weight.

    python bench/latent_trace.py --photos A.jpg B.jpg (--bpps 0.25,0.5 | --lams 0.015,0.03) [--steps 3000] [--every 250]
"""
import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from latent_rd import name_of, square  # noqa: E402
from mrnet_core import latent  # noqa: E402
from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.encode import latent_aim  # noqa: E402
from mrnet_core.metrics import psnr  # noqa: E402
from mrnet_core.pyramid import gaussian_pyramid  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", required=True)
    rates = parser.add_mutually_exclusive_group(required=True)
    rates.add_argument("--bpps", help="one target_bpp per photo, comma-separated (or one for all)")
    rates.add_argument("--lams", help="one fixed rate weight per photo, comma-separated (or one for all)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if min(args.steps, args.every, args.size, args.threads) < 1:
        parser.error("--steps, --every, --size and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    images = torch.stack([square(p, args.size) for p in args.photos])
    b, c, h, w = images.shape
    values = [float(v) for v in (args.bpps or args.lams).split(",")]
    values = values * b if len(values) == 1 else values
    if len(values) != b:
        parser.error(f"{len(values)} rates for {b} photos")
    cfg = make_config("default", {"max_epochs": [args.steps]}, model="g")
    arch = cfg.latent_architecture(c, h, w)
    if args.bpps:
        lam, target = cfg.rate_weight, torch.tensor([latent_aim(arch, math.floor(v * h * w / 8)) for v in values])
    else:
        lam, target = torch.tensor(values), None
    pyramid = gaussian_pyramid(images, levels=arch.levels, border=cfg.border)[::-1]
    rows = [[] for _ in range(b)]

    def watch(step, model, rate_weights):
        if step % args.every and step != args.steps - 1:
            return
        with torch.no_grad():
            rounded = [torch.round(g) for g in model.grids]
            bits = latent.latent_bits(model, rounded)
            levels = [psnr(model.on_pixels(*t.shape[-2:], t=k + 1, latents=rounded).transpose(1, 2)
                           .reshape(t.shape), t) for k, t in enumerate(pyramid)]  # [B] each
        for i in range(b):
            aim = "-" if target is None else f"{target[i] / (h * w):.3f}"
            cells = " / ".join(f"{float(q[i]):.1f}" for q in levels)
            rows[i].append(f"| {step} | {float(rate_weights[i]):.4f} | {bits[i] / (h * w):.3f} | {aim} | {cells} |")

    latent.fit(images, arch, lam, args.steps, float(cfg.per_stage("lr")[-1]), border=cfg.border, seed=cfg.seed,
               target_bits=target, watch=watch)
    for path, value, lines in zip(args.photos, values, rows):
        print(f"\n{name_of(path)}, {'target' if args.bpps else 'rate weight'} {value:g}\n")
        print("| step | rate weight | latents' bpp | aim | PSNR per level, coarse to fine (dB) |")
        print("|---|---|---|---|---|")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
