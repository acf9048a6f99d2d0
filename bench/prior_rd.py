"""Encoding from a collection prior: rate-distortion against JPEG, WebP and AVIF at equal bytes, encode time, and
the ablation (no prior / prior init, absolute weights / prior init, residuals). Prints markdown tables.

    python bench/prior_rd.py --prior mrnet_core/priors/default.mrprior --rates 0.25,0.5,1 \\
        --photos samples /usr/share/wallpapers/{ColdRipple,Kite,Path,Volna}/contents/images/2560x1440.jpg \\
        [--ablation 0.5] [--compact 0.5 --compact-photos 2] [--json out.jsonl]

Every photo is resized to --size on its long side, as `mrnet encode --size` does. `--compact R` also encodes the
first --compact-photos photos with today's compact preset (no prior) at rate R in the same process, for the time
and quality comparison on the same machine.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mrnet_core import prior as priors  # noqa: E402
from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.encode import encode, measure  # noqa: E402
from mrnet_core.images import read_image, resize_long_side  # noqa: E402
from mrnet_core.network import MRNet, Architecture  # noqa: E402
from mrnet_core.quantize import finetune  # noqa: E402
from pipeline.bjontegaard import bd_rate  # noqa: E402
from pipeline.compare import CODECS, codec_at_budget, curves  # noqa: E402


def photos(paths, size):
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg")) if p.is_dir() else [p]
        for f in files:
            image = resize_long_side(read_image(f)[0], size)
            name = f.parent.parent.parent.name if "wallpapers" in str(f) else f.name
            out.append((name, image))
    return out


def codecs_at(image, nbytes):
    figures = {}
    for codec in CODECS:
        c = codec_at_budget(image, codec, nbytes)
        figures[codec] = c[f"{codec}_psnr"]
    return figures


def ablation(image, prior, cfg, record):
    """Full-resolution PSNR at the architecture and budget `record` used: no prior (random draw), prior init with
    absolute weights, and prior init with residuals (the record itself)."""
    arch = Architecture.from_dict(json.loads(record.architecture))
    rung_cfg = replace(cfg, first=tuple(s.first for s in arch.stages), hidden=tuple(s.hidden[0] for s in arch.stages),
                       target_bpp=0.0, weight_bits=8)
    budget = math.floor(cfg.target_bpp * image.shape[1] * image.shape[2] / 8)
    fit = prior.fit
    out = {}
    for name, model in (("none", MRNet(arch)), ("init", prior.model(arch))):
        model.requires_grad_(False)
        finetune(model, image[None], 8, fit["epochs"], fit["lr"], fit["batch_pixels"], cfg.levels, cfg.border, 0)
        records, _ = measure(model, image[None], rung_cfg, budget=budget, finer=True)  # stored as the prior's
        out[name] = records[0].levels[-1].psnr
    out["residual"] = record.levels[-1].psnr
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prior", default=str(priors.DEFAULT_PATH))
    parser.add_argument("--photos", nargs="+", default=[str(ROOT / "samples")])
    parser.add_argument("--rates", default="0.25,0.5,1")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ablation", type=float, help="also the ablation at this rate")
    parser.add_argument("--ablation-photos", type=int, default=1000, help="on the first N photos only")
    parser.add_argument("--compact", type=float, help="also today's compact preset at this rate")
    parser.add_argument("--compact-photos", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="append one JSON line per result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prior = priors.load(args.prior)
    rates = [float(r) for r in args.rates.split(",")]
    images = photos(args.photos, args.size)
    base = make_config("compact", {"prior": "none"})
    results = []

    def emit(row):
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    for n, (name, image) in enumerate(images):
        for rate in rates:
            cfg = replace(base, target_bpp=rate)
            start = time.perf_counter()
            records, blobs = encode(image[None], cfg, prior=prior)
            seconds = time.perf_counter() - start
            r = records[0]
            row = {"photo": name, "rate": rate, "variant": "prior", "bpp": r.bpp, "seconds": round(seconds, 1),
                   "psnr_levels": [lv.psnr for lv in r.levels], "psnr": r.levels[-1].psnr,
                   "params": r.params, "weight_bits": r.weight_bits, "coarser": r.rate.coarser,
                   **codecs_at(image, len(blobs[0]))}
            row["codec_curves"] = {c: [(p["bpp"], p["psnr"]) for p in curves(image, "", "") if p["codec"] == c]
                                   for c in CODECS}
            if args.ablation == rate and n < args.ablation_photos:
                row["ablation"] = ablation(image, prior, cfg, r)
            emit(row)
    for name, image in images[: args.compact_photos if args.compact else 0]:
        cfg = replace(base, target_bpp=args.compact)
        start = time.perf_counter()
        records, blobs = encode(image[None], cfg)
        r = records[0]
        emit({"photo": name, "rate": args.compact, "variant": "compact", "bpp": r.bpp,
              "seconds": round(time.perf_counter() - start, 1), "psnr_levels": [lv.psnr for lv in r.levels],
              "psnr": r.levels[-1].psnr, "params": r.params, **codecs_at(image, len(blobs[0]))})
    report(results, rates)


def report(results, rates):
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    print("| photo | rate | bpp | PSNR per level (coarse to fine) | JPEG | WebP | AVIF | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["variant"] == "prior":
            print(f"| {r['photo']} | {r['rate']} | {r['bpp']:.3f} | {' / '.join(fmt(p) for p in r['psnr_levels'])} | "
                  f"{fmt(r['jpeg'])} | {fmt(r['webp'])} | {fmt(r['avif'])} | {r['seconds']} |")
    print("\n| rate | photos | mean PSNR | JPEG | WebP | AVIF | ≥ JPEG | ≥ WebP | mean s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        rows = [r for r in results if r["variant"] == "prior" and r["rate"] == rate]
        mean = lambda k: np.mean([r[k] for r in rows if r[k] is not None])  # noqa: E731
        wins = {c: sum(r[c] is None or r["psnr"] >= r[c] for r in rows) for c in ("jpeg", "webp")}
        print(f"| {rate} | {len(rows)} | {mean('psnr'):.2f} | {mean('jpeg'):.2f} | {mean('webp'):.2f} | "
              f"{mean('avif'):.2f} | {wins['jpeg']} of {len(rows)} | {wins['webp']} of {len(rows)} | "
              f"{mean('seconds'):.1f} |")
    print("\n| photo | BD-rate vs JPEG | vs WebP | vs AVIF |")
    print("|---|---|---|---|")
    for photo in dict.fromkeys(r["photo"] for r in results):
        rows = sorted((r for r in results if r["photo"] == photo and r["variant"] == "prior"), key=lambda r: r["bpp"])
        curve = [(r["bpp"], r["psnr"]) for r in rows]
        bd = {c: bd_rate(rows[0]["codec_curves"][c], curve) for c in CODECS}
        print(f"| {photo} | " + " | ".join("–" if v is None else f"{v:+.1f}%" for v in bd.values()) + " |")
    ablated = [r for r in results if "ablation" in r]
    if ablated:
        print("\n| photo | no prior | prior init, absolute | prior init, residuals |")
        print("|---|---|---|---|")
        for r in ablated:
            a = r["ablation"]
            print(f"| {r['photo']} | {a['none']:.2f} | {a['init']:.2f} | {a['residual']:.2f} |")
        print(f"| mean | {np.mean([r['ablation']['none'] for r in ablated]):.2f} | "
              f"{np.mean([r['ablation']['init'] for r in ablated]):.2f} | "
              f"{np.mean([r['ablation']['residual'] for r in ablated]):.2f} |")
    compact = [r for r in results if r["variant"] == "compact"]
    if compact:
        print("\n| photo | rate | compact PSNR | compact s | prior PSNR | prior s | JPEG |")
        print("|---|---|---|---|---|---|---|")
        for c in compact:
            p = next((r for r in results if r["variant"] == "prior" and r["photo"] == c["photo"]
                      and r["rate"] == c["rate"]), None)
            print(f"| {c['photo']} | {c['rate']} | {c['psnr']:.2f} | {c['seconds']} | "
                  f"{fmt(p and p['psnr'])} | {p and p['seconds']} | {fmt(c['jpeg'])} |")


if __name__ == "__main__":
    main()
