"""The final stage (`mrnet render-collection`): images/s with 1 and 2 workers, and the driver's memory.

    python bench/final_stage.py [--distinct 50] [--n 1000] [--workers 1 2] [--memory 1000 10000]

Encodings: --distinct synthetic 32 x 32 images fitted by the real `mrnet encode` pipeline (fast preset, 2 levels,
20 + 10 epochs), whose rows are then replicated to N rows with distinct image_ids (sha256 of the image_id and
the copy number), each copy naming its original's file. Every copy is rendered and compared in full
(thumbnails, PSNR/SSIM, the codecs' budget search), so a copy costs what a distinct image of its size costs.

Speed: N rows, nothing compared yet, in a fresh process with a fresh local Ray of `workers` CPUs (ray.init
excluded; the report, contact sheet and Ray Data's start-up included).

Driver memory: N rows of which all but the last 100 are already compared (their comparison rows and thumbnails
replicated from the distinct images'), so the driver does all its per-image work (the skip keys, a summary per
batch of 8 rows, the report over N rows) while the workers compare only 100 images. Peak RSS of the driver
process (ru_maxrss), and its growth over the RSS just before the stage.
"""
import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from mrnet_core.config import make_config  # noqa: E402
from pipeline import store  # noqa: E402
from pipeline.collection import render_collection  # noqa: E402
from pipeline.compare import CURVES, IMAGES  # noqa: E402
from bench.pipeline_throughput import make_images  # noqa: E402
from pipeline.encode import run  # noqa: E402

SIZE = 32
LEFT_TO_DO = 100  # images the memory runs really compare


def copy_id(image_id, i):
    return hashlib.sha256(f"{image_id}:{i}".encode()).hexdigest()


def write_rows(out, folder, rows, schema, per_part):
    for i in range(0, len(rows), per_part):
        store.write_part(out, folder, f"part-{i // per_part:06d}.parquet", rows[i:i + per_part], schema)


def replicate(seed, out, n, compared):
    """OUT with n encodings rows copied from the seed job's, the first `compared` of them already compared."""
    base = store.read_table(seed, "encodings").to_pylist()
    images = {r["image_id"]: r for r in store.read_table(seed, "comparison/images", schema=IMAGES).to_pylist()}
    curves = {}
    for c in store.read_table(seed, "comparison/curves", schema=CURVES).to_pylist():
        curves.setdefault(c["image_id"], []).append(c)
    os.makedirs(out)
    shutil.copy(os.path.join(seed, "manifest.json"), os.path.join(out, "manifest.json"))
    rows = [{**base[i % len(base)], "image_id": copy_id(base[i % len(base)]["image_id"], i)} for i in range(n)]
    write_rows(out, "encodings", rows, store.ENCODINGS, 100)
    done, points = [], []
    for i, row in enumerate(rows[:compared]):
        source = base[i % len(base)]["image_id"]
        done.append({**images[source], "image_id": row["image_id"]})
        points += [{**c, "image_id": row["image_id"]} for c in curves.get(source, [])]
        os.makedirs(os.path.join(out, "thumbnails"), exist_ok=True)
        os.symlink(os.path.join(seed, "thumbnails", source), os.path.join(out, "thumbnails", row["image_id"]))
    write_rows(out, "comparison/images", done, IMAGES, 8)  # parts of 8 rows, as the stage writes them
    write_rows(out, "comparison/curves", points, CURVES, 8 * 18)


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(out, workers):
    """In a fresh process: the stage over OUT on a fresh local Ray; JSON on stdout."""
    ray.init(address="local", num_cpus=workers, num_gpus=0, include_dashboard=False, log_to_driver=False)
    before = rss_mib()
    start = time.perf_counter()
    summary = render_collection(out, workers=workers, log=lambda line: None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ray.shutdown()
    print(json.dumps({**summary, "wall": seconds, "rss_before": before, "rss_peak": peak}))


def child(out, workers):
    proc = subprocess.run([sys.executable, __file__, "--one", out, "--workers", str(workers)], capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"bench run over {out} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distinct", type=int, default=50)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--memory", type=int, nargs="*", default=[1000, 10000])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one, a.workers[0])
    with tempfile.TemporaryDirectory() as tmp:
        images, seed = Path(tmp) / "images", os.path.join(tmp, "seed")
        images.mkdir()
        make_images(images, a.distinct, SIZE)
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
        cfg = make_config("fast", {"levels": 2, "max_epochs": [20, 10]})
        assert run(str(images), seed, cfg, size=SIZE, actors=1, log=lambda line: None)["done"] == a.distinct
        render_collection(seed, workers=2, log=lambda line: None)
        ray.shutdown()

        print(f"{a.n} rows ({a.distinct} distinct {SIZE} x {SIZE} images), fast preset, 2 levels; "
              f"{os.cpu_count()} CPU core(s) on this machine")
        print("| workers | seconds | images/s | driver peak RSS (MiB) |\n|---|---|---|---|")
        for w in a.workers:
            out = os.path.join(tmp, f"speed-{w}")
            replicate(seed, out, a.n, 0)
            r = child(out, w)
            assert r["rendered"] == r["compared"] == a.n, r
            print(f"| {w} | {r['wall']:.1f} | {a.n / r['wall']:.2f} | {r['rss_peak']:.0f} |", flush=True)

        print(f"\ndriver memory, 2 workers, all but the last {LEFT_TO_DO} rows already compared:")
        print("| rows | seconds | driver RSS before the stage (MiB) | driver peak RSS (MiB) | growth (MiB) |\n"
              "|---|---|---|---|---|")
        for n in a.memory:
            out = os.path.join(tmp, f"memory-{n}")
            replicate(seed, out, n, n - LEFT_TO_DO)
            r = child(out, 2)
            assert r["rendered"] == LEFT_TO_DO and r["compared"] == n, r
            print(f"| {n:,} | {r['wall']:.1f} | {r['rss_before']:.0f} | {r['rss_peak']:.0f} | "
                  f"{r['rss_peak'] - r['rss_before']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
