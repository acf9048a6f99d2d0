"""The `.mrnet` model file: one image's MR-Net, pickle-free.

Layout (all integers little-endian):

    magic    8 bytes  b"\\x89MRNET\\r\\n"
    version  uint32   1
    length   uint32   byte length of the header
    header   JSON (UTF-8): {"architecture": {...}, "dtype": "float32" | "float16" | "int8", "meta": {...}}
    payload  the weights, stage by stage, layer by layer, weight [fan_in, fan_out] then bias [fan_out] (the
             order of `Architecture.layer_shapes`): raw little-endian arrays of `dtype`; for int8, each
             tensor is its float32 scales (one per output column of a weight, one for a bias) followed by
             its int8 values, and a value is int8 x scale

`meta` holds what rendering and metrics need besides the weights: the image's width, height and channels and
the level sizes coarse to fine. Reading checks every field and the payload's exact size before allocating
anything, so a corrupt or hostile file is rejected with a clear error, and nothing in it is ever executed.
"""
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .network import Architecture, MRNet, snap_periodic

MAGIC = b"\x89MRNET\r\n"
VERSION = 1
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
MAX_HEADER = 1 << 20


class ModelFileError(ValueError):
    """A model file that cannot be read: the message says which and why."""


def _tensor_order(model):
    for stage in model.stages:
        for w, b in zip(stage.weights, stage.biases):
            yield w
            yield b


def _shapes(arch):
    """Shapes of the stored tensors, in payload order."""
    for i in range(len(arch.stages)):
        for fan_in, fan_out in arch.layer_shapes(i):
            yield (fan_in, fan_out)
            yield (fan_out,)


def _payload_size(arch, dtype):
    if dtype == "int8":  # scales per output column of a weight, one for a bias, then a byte per value
        return sum(4 * (s[-1] if len(s) == 2 else 1) + math.prod(s) for s in _shapes(arch))
    return arch.params() * DTYPES[dtype].itemsize


def _quantise(a):
    """float32 [fan_in, fan_out] or [n] -> (float32 scales, int8 values) with symmetric per-column scales."""
    peak = np.abs(a).max(axis=0) if a.ndim == 2 else np.abs(a).max(keepdims=True)
    scales = (np.maximum(peak, 1e-12) / 127).astype("<f4")
    return scales, np.clip(np.rint(a / scales), -127, 127).astype("i1")


def to_bytes(model: MRNet, meta: dict, dtype="float32", index=0):
    """Serialise image `index` of a (batched) MRNet."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    header = json.dumps({"architecture": model.arch.to_dict(), "dtype": dtype, "meta": meta}).encode()
    arrays = []
    for t in _tensor_order(model):
        a = t[index].detach().cpu().numpy().astype("<f4")
        arrays += [x.tobytes() for x in _quantise(a)] if dtype == "int8" else [a.astype(DTYPES[dtype]).tobytes()]
    return b"".join([MAGIC, struct.pack("<II", VERSION, len(header)), header, *arrays])


def _decode(payload, arch, dtype):
    """The weights as one float32 array, in payload order."""
    if dtype != "int8":
        return np.frombuffer(payload, dtype=DTYPES[dtype]).astype(np.float32)
    values, offset = [], 0
    for shape in _shapes(arch):
        n_scales = shape[-1] if len(shape) == 2 else 1
        scales = np.frombuffer(payload, "<f4", n_scales, offset)
        offset += 4 * n_scales
        q = np.frombuffer(payload, "i1", math.prod(shape), offset).reshape(shape)
        offset += q.size
        values.append((q * scales).astype(np.float32).ravel())
    return np.concatenate(values)


def from_bytes(data: bytes, name="<bytes>"):
    """Parse a model: (MRNet with batch 1, meta). Raises ModelFileError naming `name` and the problem."""
    def fail(reason):
        return ModelFileError(f"{name}: {reason}")

    if len(data) < len(MAGIC) + 8 or not data.startswith(MAGIC):
        raise fail("not an .mrnet model file (bad magic bytes)")
    version, length = struct.unpack_from("<II", data, len(MAGIC))
    if version != VERSION:
        raise fail(f"model file version {version} is not supported (this reader knows version {VERSION})")
    start = len(MAGIC) + 8
    if length > MAX_HEADER or start + length > len(data):
        raise fail(f"header length {length} runs past the end of the file (truncated?)")
    try:
        header = json.loads(data[start : start + length].decode())
        arch = Architecture.from_dict(header["architecture"])
        dtype = header["dtype"]
        if dtype not in DTYPES:
            raise KeyError(f"unknown dtype {dtype!r}")
        meta = header["meta"]
        if not isinstance(meta, dict):
            raise TypeError("meta is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise fail(f"bad header: {type(e).__name__}: {e}") from None
    payload = memoryview(data)[start + length :]
    expected = _payload_size(arch, dtype)
    if len(payload) != expected:
        raise fail(f"payload is {len(payload)} bytes but the architecture needs {expected} (truncated or corrupt)")
    values = _decode(payload, arch, dtype)
    if not np.isfinite(values).all():
        raise fail("weights contain NaN or infinity")
    model = MRNet(arch, batch=1)
    offset = 0
    with torch.no_grad():
        for t in _tensor_order(model):
            n = t[0].numel()
            t[0].copy_(torch.from_numpy(values[offset : offset + n].reshape(t.shape[1:])))
            offset += n
    model.requires_grad_(False)
    return (snap_periodic(model) if arch.periodic else model), meta


def save(path, model, meta, dtype="float32", index=0):
    """Write a model file atomically (write, then rename). Returns the number of bytes written."""
    path = Path(path)
    data = to_bytes(model, meta, dtype, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def load(path):
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    return from_bytes(data, str(path))
