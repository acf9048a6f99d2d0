"""The memory model against the measured peak of an encode (fit, joint phase, measuring), on the CPU allocator.

    python bench/memory_model.py                                   # default widths, 64 and 128 px, B = 1 and 3
    python bench/memory_model.py --presets default --sizes 256 --batches 1,2

Each case runs `encode.encode` with 2 epochs a stage and 1 of fine-tuning (the peak does not depend on how many)
under the profiler, whose allocator trace gives the most bytes live at once; the estimate is
`memory.encode_memory_bytes` less the input images, which were allocated before.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mrnet_core.config import make_config  # noqa: E402
from mrnet_core.encode import encode  # noqa: E402
from mrnet_core.memory import FLOAT, encode_memory_bytes  # noqa: E402


def peak_allocated_bytes(fn):
    """The most bytes of tensors live at once while `fn` runs, beyond those allocated before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="default,fast,compact")
    parser.add_argument("--models", default="sml")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--batches", default="1,3")
    args = parser.parse_args()
    print(f"{'preset':>8} {'model':>5} {'size':>5} {'B':>3} {'measured MB':>12} {'estimate MB':>12} {'ratio':>6}",
          flush=True)
    for preset in args.presets.split(","):
        for model in args.models:
            for size in map(int, args.sizes.split(",")):
                for batch in map(int, args.batches.split(",")):
                    overrides = {"max_epochs": [2], "qat_epochs": 1, "weight_bits": 8}
                    cfg = make_config(preset, overrides, model=model)
                    images = torch.rand(batch, 3, size, size)
                    measured = peak_allocated_bytes(lambda: encode(images, cfg, device="cpu"))
                    estimate = encode_memory_bytes(cfg, 3, size, size, batch) - FLOAT * images.numel()
                    print(f"{preset:>8} {model:>5} {size:>5} {batch:>3} {measured / 1e6:>12.1f} "
                          f"{estimate / 1e6:>12.1f} {estimate / measured:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
