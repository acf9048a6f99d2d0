"""The `.mrnet` model file: one image's MR-Net, compact and pickle-free.

Layout (all numbers little-endian):

    magic     8 bytes  b"\\x89MRNET\\r\\n"
    version   uint32   3
    header    model (ASCII s/l/m/f), channels, in_features, flags (1: periodic, 2: wrap border) as four uint8;
              omega_hidden float32; width, height uint32; stage count uint8; per stage: first-layer width
              uint16, hidden-layer count uint8, omega_0 float32, hidden widths uint16 each; weight bits uint8
    payload   the weights, stage by stage, layer by layer, weight [fan_in, fan_out] then bias [fan_out] (the order
              of `Architecture.layer_shapes`):
              bits 32 or 16: raw float32 or float16 arrays;
              bits 2 to 8 (first-layer weights and biases: `quantize.FINE_BITS`): for every tensor its step
              codes (uint8: one per output column where `quantize.column_steps`, else one), then for every
              tensor the spread of its symbols (a uint8 code), then the word
              count (uint32) and the symbols of all tensors, range-coded (uint32 words) under a zero-mean
              quantised Gaussian per tensor, or a uniform model where that is cheaper (spread code 0).
              Decoding is exact: the symbols come back bit for bit.

The level sizes are not stored: they follow from the width, height and stage count (`pyramid.level_sizes`).
Reading checks every field and the payload's exact size before decoding, so a corrupt or hostile file is
rejected with a clear error, and nothing in it is ever executed.

Entropy coding is `constriction`'s range coder (maintained, Rust, with numpy in and out): the symbols of a
tensor are close to a Gaussian, and coding them under that model costs within 0.2 bit of
their empirical entropy with one byte of side information per tensor (measured in docs/performance.md).
"""
import math
import os
import struct
from pathlib import Path

import constriction
import numpy as np
import torch

from .network import MODELS, Architecture, MRNet, StageSpec, snap_periodic
from .pyramid import level_sizes
from .quantize import code_to_value, column_steps, dequantise, max_symbol, quantise, tensor_bits, value_to_code

MAGIC = b"\x89MRNET\r\n"
VERSION = 3
BITS = (32, 16, 8, 7, 6, 5, 4, 3, 2)
MAX_PARAMS = 50_000_000  # 200 MB of float32: far beyond any MR-Net, small enough to refuse hostile headers
MIN_SPREAD = 0.25  # the Gaussian's standard deviation, in steps, never goes below this
_HEAD = struct.Struct("<4BfIIB")
_STAGE = struct.Struct("<HBf")


class ModelFileError(ValueError):
    """A model file that cannot be read: the message says which and why."""


def _tensors(model):
    """(tensor, is_weight, layer) in payload order."""
    for stage in model.stages:
        for j, (w, b) in enumerate(zip(stage.weights, stage.biases)):
            yield w, True, j
            yield b, False, j


def _shapes(arch):
    for i in range(len(arch.stages)):
        for j, (fan_in, fan_out) in enumerate(arch.layer_shapes(i)):
            yield (fan_in, fan_out), True, j
            yield (fan_out,), False, j


def _coder(bits, spread_code):
    """(encode, decode) of one tensor's symbols with constriction, under the entropy model `spread_code` names.

    Code 0 is a uniform model (never worse than fixed-width symbols, for weights spread evenly over their range);
    any other code is a zero-mean quantised Gaussian of that standard deviation.
    """
    top = max_symbol(bits)
    if spread_code == 0:
        uniform = constriction.stream.model.Uniform(2 * top + 1)  # over 0 .. 2 top: symbols shift by top
        return (lambda coder, s: coder.encode(s + top, uniform)), (lambda coder, n: coder.decode(uniform, n) - top)
    gaussian = constriction.stream.model.QuantizedGaussian(-top, top)
    spread = max(float(code_to_value(torch.tensor(spread_code, dtype=torch.uint8))), MIN_SPREAD)
    return ((lambda coder, s: coder.encode(s, gaussian, np.zeros(len(s)), np.full(len(s), spread))),
            (lambda coder, n: coder.decode(gaussian, np.zeros(n), np.full(n, spread))))


def _spread_code(symbols, bits):
    """The cheaper entropy model for these symbols: 0 (uniform) or the code of their standard deviation."""
    gaussian = int(value_to_code(torch.tensor(max(float(symbols.std()), MIN_SPREAD))))
    costs = {}
    for code in (0, gaussian):
        trial = constriction.stream.queue.RangeEncoder()
        _coder(bits, code)[0](trial, symbols)
        costs[code] = trial.num_bits()
    return min(costs, key=costs.get)


def _header(arch, meta, bits):
    flags = int(arch.periodic) | 2 * (meta.get("border", "reflect") == "wrap")
    out = [MAGIC, struct.pack("<I", VERSION), _HEAD.pack(ord(arch.model), arch.channels, arch.in_features, flags,
                                                        arch.omega_hidden, meta["width"], meta["height"], len(arch.stages))]
    for s in arch.stages:
        out.append(_STAGE.pack(s.first, len(s.hidden), s.omega_0) + struct.pack(f"<{len(s.hidden)}H", *s.hidden))
    out.append(struct.pack("<B", bits))
    return b"".join(out)


def _meta(arch, width, height, border):
    sizes = level_sizes(height, width, levels=len(arch.stages))[::-1]
    return {"width": width, "height": height, "channels": arch.channels, "border": border,
            "levels": [list(s) for s in sizes]}


def to_bytes(model: MRNet, meta: dict, bits=32, index=0, coarser=0):
    """Serialise image `index` of a (batched) MRNet with weights at `bits` (32, 16, or 2 to 8: quantised).

    `coarser` (quantised only) raises the steps of the tensors at `bits` by that many codes (`quantize.quantise`).
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, not {bits!r}")
    arch = model.arch
    if bits <= 8 and arch.periodic:
        raise ValueError("periodic models keep float weights (bits 32 or 16): their frequencies must stay integers")
    expected = _meta(arch, meta["width"], meta["height"], meta.get("border", "reflect"))
    if [list(s) for s in meta["levels"]] != expected["levels"]:
        raise ValueError(f"meta levels {meta['levels']} do not follow from the size and stage count")
    parts = [_header(arch, meta, bits)]
    tensors = [(t[index : index + 1], tensor_bits(bits, j, is_weight)) for t, is_weight, j in _tensors(model)]
    if bits > 8:
        dtype = "<f4" if bits == 32 else "<f2"
        parts += [t[0].detach().cpu().numpy().astype(dtype).tobytes() for t, _ in tensors]
        return b"".join(parts)
    codes, symbols = zip(*(quantise(t, b, coarser if b == bits else 0) for t, b in tensors))
    symbols = [s.cpu().numpy().ravel().astype(np.int32) for s in symbols]
    spreads = [_spread_code(s, b) for s, (_, b) in zip(symbols, tensors)]
    encoder = constriction.stream.queue.RangeEncoder()
    for s, spread, (_, b) in zip(symbols, spreads, tensors):
        _coder(b, spread)[0](encoder, s)
    words = encoder.get_compressed()
    parts += [c.cpu().numpy().astype(np.uint8).tobytes() for c in codes]
    parts += [bytes(spreads)]
    parts += [struct.pack("<I", len(words)), words.astype("<u4").tobytes()]
    return b"".join(parts)


def _read_header(data, fail):
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise fail("not an .mrnet model file (bad magic bytes)")
    (version,) = struct.unpack_from("<I", data, len(MAGIC))
    if version != VERSION:
        raise fail(f"model file version {version} is not supported (this reader knows version {VERSION})")
    offset = len(MAGIC) + 4
    try:
        model, channels, in_features, flags, omega_hidden, width, height, n = _HEAD.unpack_from(data, offset)
        offset += _HEAD.size
        stages = []
        for _ in range(n):
            first, n_hidden, omega_0 = _STAGE.unpack_from(data, offset)
            hidden = struct.unpack_from(f"<{n_hidden}H", data, offset + _STAGE.size)
            offset += _STAGE.size + 2 * n_hidden
            stages.append(StageSpec(first, tuple(hidden), omega_0))
        (bits,) = struct.unpack_from("<B", data, offset)
        offset += 1
    except struct.error:
        raise fail("header runs past the end of the file (truncated?)") from None
    if chr(model) not in MODELS or bits not in BITS or not (math.isfinite(omega_hidden) and width and height):
        raise fail(f"bad header: model {model}, bits {bits}, omega_hidden {omega_hidden}, size {width}x{height}")
    try:
        arch = Architecture(chr(model), channels, tuple(stages), omega_hidden, in_features, bool(flags & 1))
    except ValueError as e:
        raise fail(f"bad header: {e}") from None
    if not all(math.isfinite(s.omega_0) for s in stages):
        raise fail("bad header: omega_0 is not finite")
    if arch.params() > MAX_PARAMS:
        raise fail(f"bad header: {arch.params():,} parameters is more than any MR-Net this reader accepts")
    if bits <= 8 and arch.periodic:
        raise fail("bad header: periodic models are stored with float weights")
    return arch, _meta(arch, width, height, "wrap" if flags & 2 else "reflect"), bits, offset


def _decode(payload, arch, bits, fail):
    """The weights as float32 arrays, in payload order."""
    shapes = list(_shapes(arch))
    if bits > 8:
        itemsize = 4 if bits == 32 else 2
        if len(payload) != arch.params() * itemsize:
            raise fail(f"payload is {len(payload)} bytes but the architecture needs {arch.params() * itemsize} "
                       "(truncated or corrupt)")
        values = np.frombuffer(payload, "<f4" if bits == 32 else "<f2").astype(np.float32)
        sizes = np.cumsum([math.prod(s) for s, _, _ in shapes])[:-1]
        return [v.reshape(s) for v, (s, _, _) in zip(np.split(values, sizes), shapes)]
    n_codes = sum(s[-1] if column_steps(s) else 1 for s, _, _ in shapes)
    head = n_codes + len(shapes) + 4
    if len(payload) < head:
        raise fail(f"payload is {len(payload)} bytes, shorter than its {head} bytes of steps (truncated)")
    (n_words,) = struct.unpack_from("<I", payload, n_codes + len(shapes))
    if len(payload) != head + 4 * n_words:
        raise fail(f"payload is {len(payload)} bytes but says {head + 4 * n_words} (truncated or corrupt)")
    codes = torch.from_numpy(np.frombuffer(payload, np.uint8, n_codes).copy())
    spreads = np.frombuffer(payload, np.uint8, len(shapes), n_codes)
    decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, "<u4", n_words, head).astype(np.uint32))
    values, at = [], 0
    for (shape, is_weight, j), spread in zip(shapes, spreads.tolist()):
        n = math.prod(shape)
        try:
            symbols = _coder(tensor_bits(bits, j, is_weight), int(spread))[1](decoder, n)
        except (AssertionError, ValueError) as e:
            raise fail(f"weights do not decode: {e}") from None
        k = shape[-1] if column_steps(shape) else 1
        steps = codes[at : at + k].view(1, k) if column_steps(shape) else codes[at : at + 1]
        values.append(dequantise(steps, torch.from_numpy(symbols.reshape(1, *shape)))[0].numpy())
        at += k
    return values


def from_bytes(data: bytes, name="<bytes>"):
    """Parse a model: (MRNet with batch 1, meta). Raises ModelFileError naming `name` and the problem."""
    def fail(reason):
        return ModelFileError(f"{name}: {reason}")

    arch, meta, bits, offset = _read_header(data, fail)
    values = _decode(memoryview(data)[offset:], arch, bits, fail)
    if not all(np.isfinite(v).all() for v in values):
        raise fail("weights contain NaN or infinity")
    model = MRNet(arch, batch=1)
    with torch.no_grad():
        for (t, _, _), v in zip(_tensors(model), values):
            t[0].copy_(torch.from_numpy(v))
    model.requires_grad_(False)
    return (snap_periodic(model) if arch.periodic else model), meta


def save(path, model, meta, bits=32, index=0):
    """Write a model file atomically (write, then rename). Returns the number of bytes written."""
    path = Path(path)
    data = to_bytes(model, meta, bits, index)
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
