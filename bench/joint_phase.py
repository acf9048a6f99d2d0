"""The compact preset's joint phase (quantisation-aware fine-tuning of every stage on every level): operators
dispatched per step, which on a GPU are kernel launches and bound its speed, and time per step.

    python bench/joint_phase.py                              # CPU: 256 px, B = 1 and 4
    python bench/joint_phase.py --device cuda --batches 1,16,64,256 --fit --json joint.jsonl

Without --fit the encode columns count the joint phase alone.

A model of the compact preset's shapes (the widths rate control picks at --bpp) is fitted briefly, then fine-tuned
for --epochs epochs; one and two epochs run under the profiler to count the operators a step dispatches.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fit_throughput import crops, sync  # noqa: E402
from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.fit import fit  # noqa: E402
from mrnet_core.quantize import finetune  # noqa: E402
from mrnet_core.rate import largest_scale, scaled  # noqa: E402


def compact_config(size, bpp, overrides=None):
    """The compact preset at the widths rate control picks for `bpp` at size x size RGB."""
    cfg = make_config("compact", overrides)
    scale = largest_scale(cfg, 3, size, size, cfg.weight_bits, math.floor(bpp * size * size / 8))
    return scaled(cfg, scale)


def operators(model, images, cfg, epochs):
    """Operators `finetune` dispatches for `epochs`: every aten call the profiler sees, nested ones included."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        finetune(model, images, cfg.weight_bits, epochs, batch_pixels=cfg.batch_pixels, levels=cfg.levels)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def run_case(size, batch, bpp, epochs, device, full_fit):
    cfg = compact_config(size, bpp, None if full_fit else {"max_epochs": [2]})
    images = crops(size, batch).to(device)
    sync(device)
    start = time.perf_counter()
    model, _ = fit(images, cfg, device=device)
    sync(device)
    fit_seconds = time.perf_counter() - start if full_fit else None
    steps_per_epoch = math.ceil(size * size / cfg.batch_pixels)
    # The difference between two and one epoch leaves out the set-up (pyramid, optimiser) each call makes.
    ops = (operators(model, images, cfg, 2) - operators(model, images, cfg, 1)) // steps_per_epoch
    finetune(model, images, cfg.weight_bits, 1, batch_pixels=cfg.batch_pixels, levels=cfg.levels)  # warm-up
    sync(device)
    start = time.perf_counter()
    finetune(model, images, cfg.weight_bits, epochs, batch_pixels=cfg.batch_pixels, levels=cfg.levels)
    sync(device)
    per_step = (time.perf_counter() - start) / (epochs * steps_per_epoch)
    preset_steps = make_config("compact").qat_epochs * steps_per_epoch
    return {"size": size, "batch": batch, "params": model.arch.params(), "ops_per_step": ops,
            "ms_per_step": round(1000 * per_step, 2), "preset_steps": preset_steps,
            "preset_seconds": round(per_step * preset_steps, 1), "fit_seconds": fit_seconds and round(fit_seconds, 1),
            "device": str(device)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--bpp", type=float, default=0.5, help="the rate the widths are chosen for")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of fine-tuning")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fit", action="store_true",
                        help="also time the preset's own fit phase (its full epochs) before the joint phase")
    parser.add_argument("--json", help="also write the rows as JSON lines to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{'size':>5} {'B':>4} {'params':>7} {'ops/step':>8} {'ms/step':>8} {'steps':>7} {'joint s':>8} "
          f"{'fit s':>7} {'encode s/img':>12} {'img/h':>8}", flush=True)
    rows = []
    for batch in map(int, args.batches.split(",")):
        row = run_case(args.size, batch, args.bpp, args.epochs, device, args.fit)
        rows.append(row)
        # An encode is the fit, then the joint phase (measuring the stored model is small next to either).
        fit_s = f"{row['fit_seconds']:>7.1f}" if row["fit_seconds"] else f"{'-':>7}"
        per_image = ((row["fit_seconds"] or 0) + row["preset_seconds"]) / batch
        print(f"{row['size']:>5} {batch:>4} {row['params']:>7} {row['ops_per_step']:>8} {row['ms_per_step']:>8.2f} "
              f"{row['preset_steps']:>7} {row['preset_seconds']:>8.1f} {fit_s} {per_image:>12.2f} "
              f"{round(3600 / per_image):>8}", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
