"""Pipeline images/s against a plain `mrnet_core.encode.encode` loop over the same images, config and batches.

    python bench/pipeline_throughput.py [--n 64] [--size 64] [--batch 16] [--threads CPUS]

Both sides decode the same PNG files and fit batches of `--batch` same-sized images with `--threads` torch
threads (a local Ray of that many CPUs, one fitting actor). Ray's start-up (ray.init) is excluded; the pipeline's
own costs (listing, actor start-up, moving pixels, Parquet writes, the done-set lookups) are included.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.encode import encode  # noqa: E402
from mrnet_core.images import read_image  # noqa: E402
from pipeline import store  # noqa: E402
from pipeline.encode import run  # noqa: E402


def make_images(folder, n, size):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rng.uniform(1, 6, 3)
        a = np.stack([np.sin(6.28 * (f[c] * x + f[c - 1] * y + i)) for c in range(3)], -1) * 0.5 + 0.5
        Image.fromarray((a * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return sorted(folder.iterdir())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--levels", type=int, default=3)
    a = ap.parse_args()
    cfg = make_config(a.preset, {"levels": a.levels})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        files = make_images(folder, a.n, a.size)

        torch.set_num_threads(a.threads)
        start = time.perf_counter()
        for i in range(0, len(files), a.batch):
            images = torch.stack([read_image(f)[0] for f in files[i : i + a.batch]])
            encode(images, cfg, device="cpu")
        core = a.n / (time.perf_counter() - start)

        ray.init(num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
        # One actor reserving one CPU (the other is for reading); its torch takes all `threads` CPUs.
        summary = run(str(folder), str(Path(tmp) / "out"), cfg, batch_size=a.batch, actors=1, num_cpus=1,
                      log=lambda line: None)
        ray.shutdown()
        assert summary["done"] == a.n, summary
        pipe = summary["images_per_second"]
        # Steady state: from the first committed batch to the last, by the rows' own timestamps.
        stamps = sorted(store.read_table(str(Path(tmp) / "out"), "encodings", ["encoded_at"])
                        .column("encoded_at").to_pylist())
        steady = (a.n - a.batch) / (stamps[-1] - stamps[a.batch - 1]).total_seconds()

    print(f"{a.n} images {a.size}x{a.size}, preset {a.preset}, {a.levels} levels, batches of {a.batch}, "
          f"{a.threads} torch thread(s)")
    print("| path | images/s | relative |\n|---|---|---|")
    print(f"| plain mrnet_core.encode loop | {core:.2f} | 1.00 |")
    print(f"| mrnet encode pipeline (Ray), whole run | {pipe:.2f} | {pipe / core:.2f} |")
    print(f"| mrnet encode pipeline (Ray), after the first batch | {steady:.2f} | {steady / core:.2f} |")


if __name__ == "__main__":
    main()
