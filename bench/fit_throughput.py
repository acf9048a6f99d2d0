"""Fitting throughput: images/s, useful GFLOP/s against the machine's matmul peak, PSNR and peak memory.

    python bench/fit_throughput.py                      # CPU-sized default cases
    python bench/fit_throughput.py --sizes 256 --batches 1,16,64 --json rows.jsonl

Each case fits B crops of the bundled photos at one size with one config, in a fresh subprocess so that its
peak memory is its own. Useful work is 6 x trained parameters x pixel-samples (forward and backward of the
trained stage only), summed over stages and images; it is compared with the dense fp32 matmul rate measured on
the same device (and TF32 and bf16 on a GPU).
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mrnet_core.config import load_file, make_config  # noqa: E402
from mrnet_core.device import use_full_precision  # noqa: E402
from mrnet_core.encode import level_metrics  # noqa: E402
from mrnet_core.fit import fit  # noqa: E402
from mrnet_core.images import read_image, resize_long_side  # noqa: E402
from mrnet_core.memory import encode_memory_bytes  # noqa: E402

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]


def crops(size, count):
    """`count` RGB crops of size x size from the bundled photos (resized and shifted so that they differ)."""
    images = []
    for i in range(count):
        photo, _ = read_image(ROOT / "samples" / PHOTOS[i % len(PHOTOS)])
        scale = size * (1 + (i // len(PHOTOS)) % 3 * 0.25)
        photo = resize_long_side(photo, round(scale * max(photo.shape[1:]) / min(photo.shape[1:])))
        dy = (i * 7) % (photo.shape[1] - size + 1)
        dx = (i * 13) % (photo.shape[2] - size + 1)
        images.append(photo[:, dy : dy + size, dx : dx + size])
    return torch.stack(images)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def set_tf32(on):
    """TF32 for CUDA matrix products (a benchmark's choice; mrnet itself keeps IEEE fp32, see device.py)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"


def matmul_peak(device, dtype=torch.float32):
    """Dense matmul GFLOP/s on this device: the best of several square products."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b
        sync(device)
        start, reps = time.perf_counter(), 20 if device.type == "cuda" else 5
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def run_case(size, batch, overrides, device):
    cfg = make_config("default", overrides)
    images = crops(size, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fit(images[:1], make_config("default", {**overrides, "max_epochs": 1}), device=device)  # warm-up
    sync(device)
    start = time.perf_counter()
    model, reports = fit(images, cfg, device=device)
    sync(device)
    seconds = time.perf_counter() - start
    levels = level_metrics(model, images, cfg)
    sizes = [(lv["height"], lv["width"]) for lv in levels[0]]
    samples = sum(h * w * sum(r.epochs) for (h, w), r in zip(sizes, reports))
    useful = sum(6 * r.params * h * w * sum(r.epochs) for (h, w), r in zip(sizes, reports))
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    psnr = [row[-1]["psnr"] for row in levels]
    # This machine's matmul rate drifts (shared host, clocks): the case is compared with the peak measured
    # in the same process right after it.
    peak = matmul_peak(device)
    tf32_peak = None
    if device.type == "cuda":
        was = torch.backends.cuda.matmul.fp32_precision
        set_tf32(True)
        tf32_peak = matmul_peak(device)
        torch.backends.cuda.matmul.fp32_precision = was
    return {
        "size": size, "batch": batch, "model": cfg.model, "params": model.arch.params(), "seconds": round(seconds, 2),
        "images_per_s": round(batch / seconds, 3), "samples_per_s": round(samples / seconds),
        "useful_gflops": round(useful / seconds / 1e9, 1), "psnr_mean": round(sum(psnr) / len(psnr), 2),
        "psnr_min": round(min(psnr), 2), "peak_mib": round(peak_mem), "device": str(device),
        "fp32_peak_gflops": round(peak, 1), "peak_ratio": round(useful / seconds / 1e9 / peak, 3),
        "tf32_peak_gflops": tf32_peak and round(tf32_peak, 1),
        "tf32_ratio": tf32_peak and round(useful / seconds / 1e9 / tf32_peak, 3),
        "images_per_hour": round(3600 * batch / seconds),
        "estimate_mib": round(encode_memory_bytes(cfg, 3, size, size, batch) / 2**20),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="skip cases with more than this many pixels per batch (default: 16 x 128^2 on CPU)")
    parser.add_argument("--config", help="TOML/JSON overrides of the default preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows as JSON lines to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # size,batch: run one case in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = load_file(args.config)[0] if args.config else {}
    tf32 = bool(overrides.pop("tf32", False))  # a benchmark switch, not a fit key: TF32 matmuls on CUDA
    use_full_precision()  # as mrnet runs: IEEE fp32 matrix products and cuDNN convolutions
    if device.type == "cuda":
        set_tf32(tf32)

    if args.case:
        size, batch = map(int, args.case.split(","))
        print(json.dumps(run_case(size, batch, overrides, device)))
        return

    peaks = {"fp32": matmul_peak(device)}
    if device.type == "cuda":
        set_tf32(True)
        peaks["tf32"] = matmul_peak(device)
        set_tf32(tf32)
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    print("matmul peak GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()), flush=True)
    max_pixels = args.max_pixels or (16 * 128**2 if device.type == "cpu" else 1 << 40)
    header = f"{'size':>5} {'B':>3} {'model':>5} {'img/s':>8} {'img/h':>8} {'Msamples/s':>10} {'GFLOP/s':>8} " \
             f"{'fp32 peak':>9} {'ratio':>6} {'tf32 ratio':>10} {'PSNR dB':>8} {'min':>6} " \
             f"{'peak MiB':>8} {'est MiB':>8}"
    print(header, flush=True)
    rows = []
    for size in map(int, args.sizes.split(",")):
        for batch in map(int, args.batches.split(",")):
            if batch * size * size > max_pixels:
                continue
            cmd = [sys.executable, __file__, "--case", f"{size},{batch}", "--device", args.device]
            if args.config:
                cmd += ["--config", args.config]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{size:>5} {batch:>3} failed: {done.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            tf32_ratio = f"{row['tf32_ratio']:.3f}" if row["tf32_ratio"] else "-"
            print(f"{size:>5} {batch:>3} {row['model']:>5} {row['images_per_s']:>8.3f} {row['images_per_hour']:>8} "
                  f"{row['samples_per_s'] / 1e6:>10.2f} {row['useful_gflops']:>8.1f} {row['fp32_peak_gflops']:>9.0f} "
                  f"{row['peak_ratio']:>6.2f} {tf32_ratio:>10} {row['psnr_mean']:>8.2f} {row['psnr_min']:>6.2f} "
                  f"{row['peak_mib']:>8} {row['estimate_mib']:>8}", flush=True)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
