"""Rate-controlled encodes as `mrnet encode --target-bpp` runs them: images/hour on one device, bytes and quality,
and the matmul work per image against the device's matmul peak. Prints a markdown table.

    python bench/gpu_encode.py --model m --batches 64,256            # M-Nets from the shipped prior (the default)
    python bench/gpu_encode.py --model g --batches 64 --steps 3000   # latent pyramids
    python bench/gpu_encode.py --model m --batches 2 --count-flops   # matmul FLOPs per image (slower: counted)

Each case encodes B distinct --size crops of the bundled photos (`crops`) with
`encode.encode_in_batches`, as an encode job's actor does: batches sized by the memory model, IEEE fp32 matmuls
(`device.use_full_precision`), the prior `prior = "auto"` picks. The time is the whole call (fitting, rate
control's refits, quantising, coding every file, measuring every level), CUDA's start-up excluded. --count-flops
counts the matrix products' FLOPs (torch's FlopCounterMode: matmuls and convolutions, not the elementwise work);
they do not depend on the device, so they can be counted on a CPU and set beside a GPU's images/hour.
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fit_throughput import matmul_peak, sync  # noqa: E402
from mrnet_core import device as devices  # noqa: E402
from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.encode import Failure, choose_prior, encode, encode_in_batches  # noqa: E402
from mrnet_core.images import read_image, resize_long_side  # noqa: E402


def crops(size, count):
    """`count` distinct size x size RGB crops of the bundled photos: each photo read once, then crops of it at
    several scales, offsets and mirrorings."""
    photos = [read_image(p)[0].expand(3, -1, -1) for p in sorted((ROOT / "samples").iterdir())
              if p.suffix.lower() in (".png", ".jpg")]
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        short = round(size * (1 + float(torch.rand((), generator=generator))))  # 1x to 2x the crop
        photo = resize_long_side(photo, round(short * max(photo.shape[1:]) / min(photo.shape[1:])))
        dy, dx = (int(torch.randint(0, n - size + 1, (), generator=generator)) for n in photo.shape[1:])
        crop = photo[:, dy : dy + size, dx : dx + size]
        out.append(crop.flip(-1) if i % 2 else crop)
    return torch.stack(out)


def run_case(images, cfg, device, count_flops):
    prior = choose_prior(cfg)
    encode_fn = functools.partial(encode, prior=prior)
    counter = FlopCounterMode(display=False) if count_flops else None
    sync(device)
    start = time.perf_counter()
    if counter is None:
        results = encode_in_batches(images, cfg, device, encode_fn=encode_fn)
    else:
        with counter:
            results = encode_in_batches(images, cfg, device, encode_fn=encode_fn)
    sync(device)
    seconds = time.perf_counter() - start
    done = [record for record, _ in (r for r in results if not isinstance(r, Failure))]
    b, _, h, w = images.shape
    row = {"model": cfg.model, "prior": prior.prior_id if prior else None, "size": h, "images": b,
           "batches": sorted({r.batch for r in done}), "failed": b - len(done), "seconds": round(seconds, 2),
           "images_per_hour": round(len(done) / seconds * 3600), "target_bpp": cfg.target_bpp,
           "bpp_mean": round(sum(r.bpp for r in done) / max(len(done), 1), 4),
           "fill_min": round(min((r.bpp / cfg.target_bpp for r in done), default=0), 3),
           "all_within": all(r.bpp <= cfg.target_bpp for r in done),
           "psnr_mean": round(sum(r.levels[-1].psnr for r in done) / max(len(done), 1), 2), "device": str(device)}
    if counter is not None:
        row["matmul_gflop_per_image"] = round(counter.get_total_flops() / b / 1e9, 2)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m", choices=("m", "g"))
    parser.add_argument("--batches", default="64", help="images per case, comma-separated")
    parser.add_argument("--bpp", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, help="model g: fitting steps (default: the preset's)")
    parser.add_argument("--count-flops", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: 2 on a CPU, torch's own "
                        "beside a GPU)")
    parser.add_argument("--json", help="also append the rows as JSON lines to this file")
    args = parser.parse_args()
    device = devices.resolve(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    devices.use_full_precision()
    overrides = {"target_bpp": args.bpp, **({"max_epochs": [args.steps]} if args.steps else {})}
    cfg = make_config("default", overrides, model=args.model)
    peak = matmul_peak(device)
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch "
          f"{torch.__version__}: fp32 matmul peak {peak / 1e3:.1f} TFLOP/s", flush=True)
    print("| model | B | batches | s | images/hour | bpp (target) | min fill | within | PSNR dB | failed | "
          "matmul GFLOP/image | share of fp32 peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        row = run_case(crops(args.size, batch), cfg, device, args.count_flops)
        row["fp32_peak_tflops"] = round(peak / 1e3, 1)
        flops = row.get("matmul_gflop_per_image")
        if flops:
            row["share_of_fp32_peak"] = round(flops * row["images_per_hour"] / 3600 / peak, 5)
        share = row.get("share_of_fp32_peak", "–")
        print(f"| {row['model']} | {batch} | {row['batches']} | {row['seconds']} | {row['images_per_hour']:,} | "
              f"{row['bpp_mean']} ({args.bpp}) | {row['fill_min']} | {row['all_within']} | {row['psnr_mean']} | "
              f"{row['failed']} | {flops or '–'} | {share} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
