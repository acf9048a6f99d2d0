"""The `.mrnet` model file: one image's MR-Net, pickle-free.

Layout (all integers little-endian):

    magic    8 bytes  b"\\x89MRNET\\r\\n"
    version  uint32   1
    length   uint32   byte length of the header
    header   JSON (UTF-8): {"architecture": {...}, "dtype": "float32" | "float16", "meta": {...}}
    payload  the weights as raw little-endian arrays of `dtype`, stage by stage, layer by layer, weight
             [fan_in, fan_out] then bias [fan_out] (the order of `Architecture.layer_shapes`)

`meta` holds what rendering and metrics need besides the weights: the image's width, height and channels and
the level sizes coarse to fine. Reading checks every field and the payload's exact size before allocating
anything, so a corrupt or hostile file is rejected with a clear error, and nothing in it is ever executed.
"""
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .network import Architecture, MRNet, snap_periodic

MAGIC = b"\x89MRNET\r\n"
VERSION = 1
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MAX_HEADER = 1 << 20


class ModelFileError(ValueError):
    """A model file that cannot be read: the message says which and why."""


def _tensor_order(model):
    for stage in model.stages:
        for w, b in zip(stage.weights, stage.biases):
            yield w
            yield b


def to_bytes(model: MRNet, meta: dict, dtype="float32", index=0):
    """Serialise image `index` of a (batched) MRNet."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    header = json.dumps({"architecture": model.arch.to_dict(), "dtype": dtype, "meta": meta}).encode()
    arrays = [t[index].detach().cpu().numpy().astype(DTYPES[dtype]).tobytes() for t in _tensor_order(model)]
    return b"".join([MAGIC, struct.pack("<II", VERSION, len(header)), header, *arrays])


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
        dtype = DTYPES[header["dtype"]]
        meta = header["meta"]
        if not isinstance(meta, dict):
            raise TypeError("meta is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise fail(f"bad header: {type(e).__name__}: {e}") from None
    payload = memoryview(data)[start + length :]
    expected = arch.params() * dtype.itemsize
    if len(payload) != expected:
        raise fail(f"payload is {len(payload)} bytes but the architecture needs {expected} (truncated or corrupt)")
    values = np.frombuffer(payload, dtype=dtype).astype(np.float32)
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
