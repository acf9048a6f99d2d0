"""Peak memory of the driver and the Ray workers while encoding N tiny images, for several N.

    python bench/pipeline_memory.py [--n 1000 10000]

Each N runs in a fresh process (a fresh local Ray) on N synthetic 16x16 PNGs with a tiny config, sampling every
0.2 s the resident memory of the driver and of each Ray process it started (workers, raylet, GCS).
"""
import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one(n):
    import numpy as np
    import psutil
    import ray
    from PIL import Image

    from mrnet_core.config import make_config
    from pipeline.encode import run

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        me, peaks, stop = psutil.Process(), {"driver": 0, "worker": 0, "workers_total": 0}, threading.Event()

        def sample():
            while not stop.is_set():
                peaks["driver"] = max(peaks["driver"], me.memory_info().rss)
                rss = []
                for p in me.children(recursive=True):
                    try:
                        rss.append((p.memory_info().rss, "ray::" in " ".join(p.cmdline())))
                    except psutil.Error:
                        pass
                workers = [r for r, is_worker in rss if is_worker]
                peaks["worker"] = max([peaks["worker"], *workers])
                peaks["workers_total"] = max(peaks["workers_total"], sum(r for r, _ in rss))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        cfg = make_config("fast", {"levels": 2, "max_epochs": [10, 10]})
        summary = run(str(folder), str(Path(tmp) / "out"), cfg, batch_size=64, log=lambda line: None)
        stop.set()
        sampler.join()
        ray.shutdown()
    mib = {k: round(v / 2**20) for k, v in peaks.items()}
    print(json.dumps({"n": n, "done": summary["done"], "seconds": summary["seconds"], **mib}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one)
    print("| images | done | seconds | driver peak RSS (MiB) | largest Ray worker peak (MiB) "
          "| all Ray processes (MiB) |")
    print("|---|---|---|---|---|---|")
    for n in a.n:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {n} | failed: {out.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {r['n']} | {r['done']} | {r['seconds']} | {r['driver']} | {r['worker']} | {r['workers_total']} |",
              flush=True)


if __name__ == "__main__":
    main()
