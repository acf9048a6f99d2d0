"""Fuzzing model files through `mrnet render`: truncations, byte flips and header field edits of valid .mrnet files.

Makes two valid model files (float32 and 6-bit quantised weights, a 3-stage M-Net of a 64x48 RGB image), then
well over a thousand mutations of them, and runs each through `pipeline.cli.main(["render", FILE, "--out", PNG])`,
the function the `mrnet render` command calls, in a forked child with a per-case timeout (so a hang or a crash is
seen, not suffered). Each case is one of:

    clean error      exit status 1 (unusable input) and one line `error: FILE: reason` on stderr
    unclear error    a non-zero exit whose message is not that one line
    traceback        an exception escaped the command
    hang             still running after --timeout seconds
    crash            the child died without a result (a signal, the memory cap)
    identical        rendered, pixel for pixel the image of the unmutated file
    differing        rendered something else without an error

Damaged files (every family but `forged ...`) must give clean errors, or identical renders where the damage
changed nothing. Forged files have their checksum recomputed after the damage, as someone who knows the format
would: the checksum cannot catch them, so they must be refused by the header bounds and the structural checks
or be a valid (different) model, which is rendered at the original's size (`--size 64x48`: a forged but legal
size up to the pixel limit would otherwise render for minutes, which is the cost of a real model that size).
Special files (empty, /dev/zero, a FIFO, a directory) go through the same path.

    PYTHONPATH=. python bench/fuzz_modelfile.py [--seed 0] [--scale 1] [--timeout 20]

Prints one row per mutation family and the totals; exits 1 when any case is a traceback, a hang, a crash, an
unclear error or (damaged families) a differing render.
"""
import argparse
import contextlib
import io
import math
import multiprocessing
import os
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.network import MRNet
from pipeline.cli import main as mrnet

WIDTH, HEIGHT = 64, 48
OUTCOMES = ("clean error", "unclear error", "traceback", "hang", "crash", "identical", "differing")
MEMORY_HEADROOM = 3 << 30  # a child may map this much more than the parent before allocations fail
# Values a hostile edit puts in each header field, by its struct format: bounds and just past them, zero, huge.
HOSTILE_VALUES = {
    "B": [0, 1, 2, 4, 17, 100, 255],
    "H": [0, 1, modelfile.MAX_LAYER_WIDTH, modelfile.MAX_LAYER_WIDTH + 1, 65535],
    "I": [0, 1, 4096, 13000, 65535, 2**31, 2**32 - 1],
    "f": [0.0, -0.0, -30.0, math.nan, math.inf, -math.inf, 1e-30, modelfile.MAX_OMEGA, 1e6, 1e30],
}


def valid_files():
    """{name: bytes} of the two unmutated model files."""
    arch = make_config("fast", {"levels": 3}).architecture(3)
    model = MRNet(arch, batch=1, seed=7)
    meta = modelfile.ImageMeta(WIDTH, HEIGHT, 3, 3)
    return {"float32": modelfile.to_bytes(model, meta), "6-bit": modelfile.to_bytes(model, meta, 6)}


def header_end(data):
    """Where the payload starts (the header is parsed from a valid file)."""
    n_stages = data[modelfile._FIELDS["stages"][1]]
    offset = modelfile._FIELDS["first"][1]
    for _ in range(n_stages):
        n_hidden = data[offset + 2]
        offset += modelfile._STAGE.size + 2 * n_hidden
    return offset + 1


def reseal(data):
    return modelfile._seal(data[: -modelfile._CHECKSUM.size]) if len(data) > modelfile._CHECKSUM.size else data


def edit(data, name, value):
    fmt, offset = modelfile._FIELDS[name]
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def flip(data, rng, lo, hi, count=1):
    out = bytearray(data)
    for _ in range(count):
        out[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
    return bytes(out)


def mutations(files, rng, scale):
    """(family, description, bytes, forged) for every case."""
    for kind, data in files.items():
        head, end = header_end(data), len(data) - modelfile._CHECKSUM.size
        lengths = sorted({0, 1, 8, 11, 12, head - 1, head, head + 1, end - 1, end, len(data) - 1}
                         | {rng.randrange(len(data)) for _ in range(90 * scale)})
        for n in lengths:
            yield "truncation", f"{kind} cut to {n} bytes", data[:n], False
        yield "truncation", f"{kind} with 4 bytes appended", data + b"\0\0\0\0", False
        for i in range(150 * scale):
            yield "header byte flip", f"{kind} #{i}", flip(data, rng, 0, head), False
        for i in range(150 * scale):
            yield "payload byte flip", f"{kind} #{i}", flip(data, rng, head, end), False
        for i in range(4 * scale):
            yield "checksum byte flip", f"{kind} #{i}", flip(data, rng, end, len(data)), False
        for i in range(50 * scale):
            yield "2-8 byte flips", f"{kind} #{i}", flip(data, rng, 0, len(data), rng.randint(2, 8)), False
        for name, (fmt, _) in modelfile._FIELDS.items():
            for value in HOSTILE_VALUES[fmt]:
                yield "header field edit", f"{kind} {name} = {value}", edit(data, name, value), False
                yield "forged field edit", f"{kind} {name} = {value}", reseal(edit(data, name, value)), True
        for i in range(50 * scale):
            yield "forged byte flip", f"{kind} #{i}", reseal(flip(data, rng, 0, end)), True


def run_render(path, out, size, connection):
    """In the forked child: `mrnet render` on path; sends (exit status, stderr, traceback or None)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + MEMORY_HEADROOM, hard))
    stderr, status, trace = io.StringIO(), None, None
    argv = ["render", str(path), "--out", str(out)] + (["--size", size] if size else [])
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = mrnet(argv)
        except SystemExit as e:  # argument errors exit this way, as they do in the command
            status = e.code if isinstance(e.code, int) else 2
        except BaseException:  # what would reach the user as a traceback
            trace = traceback.format_exc()
    connection.send((status, stderr.getvalue(), trace))
    connection.close()


def render_case(path, out, size, timeout):
    """(status, stderr, traceback) of one case, or the outcome 'hang' / 'crash' as a string."""
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=run_render, args=(path, out, size, sender))
    child.start()
    sender.close()
    ready = receiver.poll(timeout)
    result = receiver.recv() if ready else None
    child.join(1 if ready else 0)
    if child.is_alive():
        child.kill()
        child.join()
    receiver.close()
    if result is None:
        return "hang" if not ready else "crash"
    return result


def classify(result, path, out, reference):
    if isinstance(result, str):
        return result
    status, stderr, trace = result
    if trace:
        return "traceback"
    if status:
        lines = stderr.splitlines()
        clean = len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and status == 1
        return "clean error" if clean else "unclear error"
    with Image.open(out) as im:
        same = np.array_equal(np.asarray(im), reference)
    return "identical" if same else "differing"


def special_cases(folder):
    """(family, description, path) of files that are not model files at all."""
    empty = folder / "empty.mrnet"
    empty.write_bytes(b"")
    fifo = folder / "fifo.mrnet"
    os.mkfifo(fifo)
    yield "special file", "empty file", empty
    yield "special file", "/dev/zero", Path("/dev/zero")
    yield "special file", "FIFO", fifo
    yield "special file", "directory", folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=1, help="multiplies the random cases of each family")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    parser.add_argument("--show", type=int, default=3, help="examples printed per bad outcome")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the children are forked: no OpenMP pool may be running in the parent
    rng = random.Random(args.seed)
    files = valid_files()
    folder = Path(tempfile.mkdtemp(prefix="fuzz_modelfile."))
    references = {}
    for kind, data in files.items():
        path, out = folder / f"{kind}.mrnet", folder / f"{kind}.png"
        path.write_bytes(data)
        status, stderr, trace = render_case(path, out, None, args.timeout)
        assert status == 0 and not trace, (stderr, trace)
        with Image.open(out) as im:
            references[kind] = np.asarray(im)

    counts, examples, start = {}, {}, time.perf_counter()
    cases = [(family, what, data, forged) for family, what, data, forged in mutations(files, rng, args.scale)]
    cases += [(family, what, path, False) for family, what, path in special_cases(folder)]
    for i, (family, what, data, forged) in enumerate(cases):
        kind = "6-bit" if what.startswith("6-bit") else "float32"
        if isinstance(data, Path):
            path = data
        else:
            path = folder / "case.mrnet"
            path.write_bytes(data)
        out = folder / "case.png"
        out.unlink(missing_ok=True)
        result = render_case(path, out, f"{WIDTH}x{HEIGHT}" if forged else None, args.timeout)
        outcome = classify(result, path, out, references[kind])
        counts.setdefault(family, dict.fromkeys(OUTCOMES, 0))[outcome] += 1
        if outcome not in ("clean error", "identical") and not (forged and outcome == "differing"):
            detail = result[2] or result[1] if isinstance(result, tuple) else ""
            examples.setdefault(outcome, []).append(f"{family}: {what}: {detail.strip().splitlines()[-1:] or ''}")
        if (i + 1) % 200 == 0:
            print(f"{i + 1}/{len(cases)} cases, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    print(f"{len(cases)} cases in {time.perf_counter() - start:.0f} s (seed {args.seed}, timeout {args.timeout:g} s)\n")
    print("| family | cases | " + " | ".join(OUTCOMES) + " |")
    print("|---|---:|" + "---:|" * len(OUTCOMES))
    totals = dict.fromkeys(OUTCOMES, 0)
    for family, row in counts.items():
        print(f"| {family} | {sum(row.values())} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
        for o in OUTCOMES:
            totals[o] += row[o]
    print(f"| **all** | {sum(totals.values())} | " + " | ".join(str(totals[o]) for o in OUTCOMES) + " |")
    for outcome, lines in examples.items():
        print(f"\n{outcome}: {len(lines)}")
        for line in lines[: args.show]:
            print("   ", line)
    damaged_differing = sum(row["differing"] for family, row in counts.items() if not family.startswith("forged"))
    bad = sum(totals[o] for o in ("unclear error", "traceback", "hang", "crash")) + damaged_differing
    print(f"\nforged files that rendered as valid different models: "
          f"{sum(row['differing'] for family, row in counts.items() if family.startswith('forged'))}; "
          f"damaged files that rendered differently: {damaged_differing}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
