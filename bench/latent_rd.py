"""Latent pyramids (model g) against JPEG, WebP and AVIF at equal bytes: bpp, PSNR per level, encode, decode and
render times, and each photo's BD-rate against each codec over the rates. Prints markdown tables. WebP's PSNR per
level is of its decoded image's Gaussian pyramid (what a thumbnail made by shrinking the WebP file shows), against
the original's, as g's levels are.

    python bench/latent_rd.py --photos samples/astronaut.png /usr/share/wallpapers/Kite/contents/images/2560x1440.jpg \\
        (--lams 0.01,0.003,0.001 | --bpps 0.25,0.5,1) [--steps 3000] [--size 256] [--threads 2] [--entropy context] \\
        [--prior auto|none|FILE] [--coarse-weight W] [--grid-channels G|G,G,..] [--seed S] [--fits]

Every photo is resized so that its short side is --size and centre-cropped to a square, so that all of them are
fitted together in one batch (`encode.encode`, as an encode job's actor does); times are the batch's, shared.
With --fits every fit of every image (a first fit and its warm restarts, under a rate target) is printed to stderr:
its rate weight (where a first fit ended; a restart's fixed one), bytes and full-resolution PSNR.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mrnet_core import encode as encoding  # noqa: E402
from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.encode import choose_prior, encode, refit_steps  # noqa: E402
from mrnet_core.images import read_image  # noqa: E402
from mrnet_core.modelfile import from_bytes  # noqa: E402
from mrnet_core.render import render  # noqa: E402
from pipeline.bjontegaard import bd_rate  # noqa: E402
from mrnet_core.pyramid import gaussian_pyramid  # noqa: E402
from pipeline.compare import CODECS, best_at_budget, codec_at_budget, curves, score  # noqa: E402


def square(path, size):
    image = read_image(path)[0]
    c, h, w = image.shape
    scale = size / min(h, w)
    shape = (max(size, round(h * scale)), max(size, round(w * scale)))
    image = torch.nn.functional.interpolate(image[None], size=shape, mode="area")[0]
    top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
    return image[:, top : top + size, left : left + size].expand(3, -1, -1)


def name_of(path):
    path = Path(path)
    return path.parents[2].name if "wallpapers" in str(path) else path.name


def fits(epochs, steps):
    """How many fits `epochs` steps were: a first of `steps`, then warm restarts (`encode.refit_steps`)."""
    return 1 + (epochs - steps) // refit_steps(steps)


def print_fits(images, names):
    """Wrap `encode.measure`, which measures every fit of `encode_latent`, to print each image's fit to stderr."""
    measure = encoding.measure

    def printing(model, batch, cfg, *args, **kwargs):
        records, blobs = measure(model, batch, cfg, *args, **kwargs)
        for j, (record, blob) in enumerate(zip(records, blobs)):
            name = next(n for n, image in zip(names, images) if torch.equal(image, batch[j]))
            print(f"fit: {name} rate weight {model.rate_weights[j]:.3g}: {len(blob)} bytes, "
                  f"{record.levels[-1].psnr:.2f} dB", file=sys.stderr, flush=True)
        return records, blobs

    encoding.measure = printing


def webp_levels(image, budget, levels):
    """PSNR per level, coarse to fine, of the best WebP file within `budget` bytes, its decoded image's Gaussian
    pyramid against the original's; None when no WebP file is that small."""
    best, _ = best_at_budget(image, "webp", budget)
    if best is None:
        return None
    ours, theirs = (gaussian_pyramid(x[None], levels=levels)[::-1] for x in (image, best[3]))
    return [score(t[0], o[0])[0] for t, o in zip(theirs, ours)]


def counts(text: str) -> list[int]:
    """A comma-separated list of counts (argparse reports a ValueError as an invalid value)."""
    return [int(n) for n in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="+", required=True)
    rates = parser.add_mutually_exclusive_group()
    rates.add_argument("--lams", default="0.01,0.003,0.001", help="rate weights, comma-separated")
    rates.add_argument("--bpps", help="rate targets (target_bpp), comma-separated; instead of --lams")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--levels", type=int, default=7)
    parser.add_argument("--hidden", type=int, help="the MLP's hidden width (default: the g preset's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--entropy", default="context", choices=("context", "factorised"))
    parser.add_argument("--coarse-weight", type=float, help="the config's coarse_weight (default: its default)")
    parser.add_argument("--grid-channels", type=counts, default=[1],
                        help="grids per level (the config's grid_channels): one count, or comma-separated per level, "
                             "finest-aligned as the config's per-stage lists")
    parser.add_argument("--seed", type=int, default=0, help="the config's seed: the draw every fit starts from")
    parser.add_argument("--prior", default="auto", help="where fits start: auto (the shipped start when it fits the "
                                                        "config), none (a random draw) or a prior file")
    parser.add_argument("--fits", action="store_true", help="print every fit of every image to stderr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.stack([square(p, args.size) for p in args.photos])
    names = [name_of(p) for p in args.photos]
    if args.fits:
        print_fits(images, names)
    results = []
    print(f"prior: {args.prior}\n")
    print("| photo | rate | bpp | PSNR per level, coarse to fine (dB) | JPEG | WebP | AVIF | WebP per level | "
          "levels at or above WebP's | fits | encode s per image | decode s | render 256 px s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    key, values = ("target_bpp", args.bpps) if args.bpps else ("rate_weight", args.lams)
    for value in (float(v) for v in values.split(",")):
        overrides = {key: value, "max_epochs": [args.steps], "levels": args.levels, "entropy": args.entropy,
                     "prior": args.prior, "seed": args.seed, "grid_channels": args.grid_channels,
                     **({"hidden": [args.hidden]} if args.hidden else {}),
                     **({"coarse_weight": args.coarse_weight} if args.coarse_weight is not None else {})}
        cfg = make_config("default", overrides, model="g")
        prior = choose_prior(cfg)
        start = time.perf_counter()
        records, blobs = encode(images, cfg, device="cpu", prior=prior)
        seconds = (time.perf_counter() - start) / len(records)
        for name, image, r, blob in zip(names, images, records, blobs):
            start = time.perf_counter()
            model = from_bytes(blob)[0]
            decode = time.perf_counter() - start
            start = time.perf_counter()
            render(model, 256, 256)
            draw = time.perf_counter() - start
            codecs = {c: codec_at_budget(image, c, len(blob))[f"{c}_psnr"] for c in CODECS}
            webp = webp_levels(image, len(blob), len(r.levels))
            above = "-" if webp is None else sum(lv.psnr >= p for lv, p in zip(r.levels, webp))
            results.append({"photo": name, "bpp": r.bpp, "psnr": r.levels[-1].psnr})
            show = " | ".join("-" if codecs[c] is None else f"{codecs[c]:.2f}" for c in CODECS)
            rate = f"{value:g} bpp" if args.bpps else f"lambda {value:g}"
            print(f"| {name} | {rate} | {r.bpp:.3f} | {' / '.join(f'{lv.psnr:.2f}' for lv in r.levels)} | {show} | "
                  f"{'-' if webp is None else ' / '.join(f'{p:.2f}' for p in webp)} | {above} of {len(r.levels)} | "
                  f"{fits(r.stages[0].epochs, args.steps)} | {seconds:.0f} | {decode:.2f} | {draw:.3f} |", flush=True)
    print("\n| photo | BD-rate vs JPEG | vs WebP | vs AVIF |\n|---|---|---|---|")
    for name, image in zip(names, images):
        mine = sorted((r["bpp"], r["psnr"]) for r in results if r["photo"] == name)
        ladder = curves(image, name, "bench")
        cells = []
        for codec in CODECS:
            theirs = sorted((c["bpp"], c["psnr"]) for c in ladder if c["codec"] == codec)
            value = bd_rate(theirs, mine)
            cells.append("-" if value is None else f"{value:+.1f}%")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
