"""The `.mrnet` model file: one image's MR-Net, compact and pickle-free.

Layout (all numbers little-endian):

    magic     8 bytes  b"\\x89MRNET\\r\\n"
    version   uint32   4, or 5 for weights coded as residuals from a collection prior (`prior.py`)
    header    model (ASCII s/l/m/f), channels, in_features, flags (1: periodic, 2: wrap border) as four uint8;
              omega_hidden float32; width, height uint32; stage count uint8; per stage: first-layer width
              uint16, hidden-layer count uint8, omega_0 float32, hidden widths uint16 each; weight bits uint8;
              version 5 only: the prior's id (`prior.ID_BYTES` bytes of its SHA-256)
    payload   the weights, stage by stage, layer by layer, weight [fan_in, fan_out] then bias [fan_out] (the order
              of `Architecture.layer_shapes`):
              bits 32 or 16: raw float32 or float16 arrays;
              bits 2 to 12 (first-layer weights and biases: `quantize.FINE_BITS`): for every tensor its step
              codes (uint8: one per output column where `quantize.column_steps`, else one), then for every
              tensor the spread of its symbols (a uint8 code), then the word
              count (uint32) and the symbols of all tensors, range-coded (uint32 words) under a zero-mean
              quantised Gaussian per tensor, or a uniform model where that is cheaper (spread code 0).
              Decoding is exact: the symbols come back bit for bit. In version 5 the symbols are residuals:
              a weight is the prior's weight plus symbol x step.
    checksum  uint32   CRC-32 (zlib's) of every byte before it: magic, version, header and payload

The level sizes are not stored: they follow from the width, height and stage count (`pyramid.level_sizes`).

Reading a file refuses anything but a regular file of at most MAX_FILE_BYTES before reading a byte (so a FIFO or
a device is an error, not a hang), then checks the magic, the version, the checksum (any truncation or flipped
byte is caught here), every header field against the bounds below, and the payload's exact size, all before
anything is allocated; nothing in a file is ever executed. The checksum guards against corruption, not against
a forger, who can recompute it: the bounds are what keep a hostile file harmless, and they apply to every file.

    channels 1 or 3; in_features 2; flags 0 to 3
    width, height  1 or more, width x height at most images.DEFAULT_MAX_PIXELS, and enough for the stage count
    stages         1 to MAX_STAGES; per stage at most MAX_HIDDEN_LAYERS hidden layers
    layer widths   1 to MAX_LAYER_WIDTH; parameters in all at most MAX_PARAMS
    omegas         finite, above 0 and at most MAX_OMEGA

Version 3 files (main's, without the checksum) are still read, under the same bounds; any other version is
refused with a message saying which versions this reader knows. `to_bytes` refuses a model outside the bounds,
so every file written can be read back.

Entropy coding is `constriction`'s range coder (maintained, Rust, with numpy in and out): the symbols of a
tensor are close to a Gaussian, and coding them under that model costs within 0.2 bit of
their empirical entropy with one byte of side information per tensor (measured in docs/performance.md).
"""
import dataclasses
import math
import os
import stat
import struct
import zlib
from pathlib import Path

import constriction
import numpy as np
import torch

from . import latent
from .images import DEFAULT_MAX_PIXELS
from .network import MODELS, Architecture, MRNet, StageSpec, snap_periodic
from .pyramid import level_sizes
from .prior import ID_BYTES, Prior
from .quantize import (FINE_BITS, code_to_value, column_steps, dequantise, max_symbol, quantise, tensor_bits,
                       value_to_code)

MAGIC = b"\x89MRNET\r\n"
VERSION = 4
PRIOR_VERSION = 5  # version 4 plus the prior's id; weights are residuals from it
LATENT_VERSION = 6  # a latent pyramid ("g"): its payload is latent.py's
UNCHECKED_VERSION = 3  # main's format: no checksum, still read (under the same bounds) so released files keep working
# 32 and 16: float weights; 12 to 2: quantised. Configs ask for 8 or fewer; rate control stores a model at 9 to 12
# when its budget has room to spare (`rate.within_budget`).
BITS = (32, 16, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2)
MAX_PARAMS = 50_000_000  # 200 MB of float32: far beyond any MR-Net, small enough to refuse hostile headers
# Header bounds, all far beyond any MR-Net this project fits (the papers' largest: 7 stages, widths 256, omega_0
# up to a few hundred), checked before anything is allocated.
MAX_STAGES = 16  # a side halves 16 times from 65,536 pixels to 1
MAX_HIDDEN_LAYERS = 16
MAX_LAYER_WIDTH = 8192
MAX_OMEGA = 1e5  # above the Nyquist band (pi x side / 2, about 2.1e4) of the largest image DEFAULT_MAX_PIXELS allows
CHANNELS = (1, 3)  # grey or RGB, as `images.decode` makes them
IN_FEATURES = 2  # (x, y)
KNOWN_FLAGS = 3  # 1: periodic, 2: wrap border
MIN_SPREAD = 0.25  # the Gaussian's standard deviation, in steps, never goes below this
_HEAD = struct.Struct("<4BfIIB")
_STAGE = struct.Struct("<HBf")
_CHECKSUM = struct.Struct("<I")
# (struct format, byte offset) of the fixed header fields and of the first stage's, for tools that edit files
# (the fuzz tests and bench/fuzz_modelfile.py).
_FIELDS = dict(zip(("model", "channels", "in_features", "flags", "omega_hidden", "width", "height", "stages"),
                   zip("BBBBfIIB", (12, 13, 14, 15, 16, 20, 24, 28))))
_FIELDS.update(first=("H", 29), hidden_layers=("B", 31), omega_0=("f", 32), hidden=("H", 36))
_MAX_HEADER_BYTES = len(MAGIC) + 4 + _HEAD.size + MAX_STAGES * (_STAGE.size + 2 * MAX_HIDDEN_LAYERS) + 1
# The largest file a legal header can describe: float32 weights (the quantised payloads `to_bytes` makes are
# smaller: about 12 coded bits and at most one step byte per value), the header and the checksum. Reading refuses
# a bigger file before reading it.
MAX_FILE_BYTES = _MAX_HEADER_BYTES + 4 * MAX_PARAMS + _CHECKSUM.size


def quantised(bits: int) -> bool:
    """Whether weights of `bits` are stored as entropy-coded integers (else as float32 or float16)."""
    return bits <= FINE_BITS


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """What a model file records of its image besides the network: size, channels, level count and border mode.
    `sizes` follow from them: each level's (height, width), coarse to fine (ValueError if too small for `levels`)."""
    width: int
    height: int
    channels: int
    levels: int
    border: str = "reflect"
    sizes: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        sizes = tuple(level_sizes(self.height, self.width, levels=self.levels)[::-1])
        object.__setattr__(self, "sizes", sizes)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "channels": self.channels, "border": self.border,
                "levels": [list(s) for s in self.sizes]}


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


def _omega_problem(name, omega):
    if not (math.isfinite(omega) and 0 < omega <= MAX_OMEGA):
        return f"{name} {omega} is not a finite number in (0, {MAX_OMEGA:g}]"
    return None


def _bounds_problem(model, channels, in_features, flags, omega_hidden, width, height, stages, bits):
    """Why these header fields are outside the documented bounds (module docstring), or None when they are not.

    Shared by the reader and the writer, so a file that is written can always be read back.
    """
    if model not in MODELS:
        return f"model kind {model!r} is not one of {', '.join(sorted(MODELS))}"
    if channels not in CHANNELS:
        return f"{channels} channels (not 1 or 3)"
    if in_features != IN_FEATURES:
        return f"{in_features} input features (not {IN_FEATURES})"
    if flags & ~KNOWN_FLAGS:
        return f"unknown flags {flags:#x}"
    if bits not in BITS:
        return f"weight bits {bits} (not one of {', '.join(map(str, BITS))})"
    if not (width >= 1 and height >= 1 and width * height <= DEFAULT_MAX_PIXELS):
        return f"image size {width}x{height} is outside 1 to {DEFAULT_MAX_PIXELS:,} pixels"
    if not 1 <= len(stages) <= MAX_STAGES:
        return f"{len(stages)} stages (not 1 to {MAX_STAGES})"
    problems = [_omega_problem("omega_hidden", omega_hidden)]
    for i, s in enumerate(stages):
        if len(s.hidden) > MAX_HIDDEN_LAYERS:
            problems.append(f"stage {i} has {len(s.hidden)} hidden layers (at most {MAX_HIDDEN_LAYERS})")
        if not all(1 <= w <= MAX_LAYER_WIDTH for w in (s.first, *s.hidden)):
            problems.append(f"stage {i} layer widths {[s.first, *s.hidden]} are not 1 to {MAX_LAYER_WIDTH}")
        problems.append(_omega_problem(f"stage {i} omega_0", s.omega_0))
    return next((p for p in problems if p), None)


def _header(arch, meta: ImageMeta, bits, prior_id=None):
    flags = int(arch.periodic) | 2 * (meta.border == "wrap")
    out = [MAGIC, struct.pack("<I", VERSION if prior_id is None else PRIOR_VERSION),
           _HEAD.pack(ord(arch.model), arch.channels, arch.in_features, flags,
                      arch.omega_hidden, meta.width, meta.height, len(arch.stages))]
    for s in arch.stages:
        out.append(_STAGE.pack(s.first, len(s.hidden), s.omega_0) + struct.pack(f"<{len(s.hidden)}H", *s.hidden))
    out.append(struct.pack("<B", bits))
    if prior_id is not None:
        out.append(bytes.fromhex(prior_id))
    return b"".join(out)


def _seal(body):
    """The file: `body` (magic to payload) followed by its CRC-32."""
    return body + _CHECKSUM.pack(zlib.crc32(body))


def to_bytes(model: MRNet | latent.LatentNet, meta: ImageMeta, bits: int = 32, index: int = 0, coarser: int = 0,
             prior: Prior | None = None) -> bytes:
    """Serialise image `index` of a (batched) MRNet with weights at `bits` (32, 16, or 2 to 8: quantised).

    `coarser` (quantised only) raises the steps of the tensors at `bits` by that many codes (`quantize.quantise`).
    With a `prior` (`prior.Prior`; quantised only) the weights are stored as residuals from its weights for this
    architecture, and the file (version 5) names the prior.
    A latent pyramid (`latent.LatentNet`, quantised by its fit) is stored as it is (version 6): `bits`, `coarser`
    and `prior` do not apply to it.
    """
    if isinstance(model, latent.LatentNet):
        a = model.arch
        if (meta.width, meta.height, meta.channels, meta.levels) != (a.width, a.height, a.channels, a.levels):
            raise ValueError(f"meta {meta} does not fit the latent pyramid's {a.width}x{a.height}x{a.channels}, "
                             f"{a.levels} levels")
        return _seal(MAGIC + struct.pack("<I", LATENT_VERSION) + latent.to_payload(model, index))
    if prior is not None and not quantised(bits):
        raise ValueError("weights coded against a prior are quantised: bits must be 8 or fewer")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, not {bits!r}")
    arch = model.arch
    if quantised(bits) and arch.periodic:
        raise ValueError("periodic models keep float weights (bits 32 or 16): their frequencies must stay integers")
    problem = _bounds_problem(arch.model, arch.channels, arch.in_features, 0, arch.omega_hidden, meta.width,
                              meta.height, arch.stages, bits)
    if problem is None and arch.params() > MAX_PARAMS:
        problem = f"{arch.params():,} parameters (at most {MAX_PARAMS:,})"
    if problem:
        raise ValueError(f"this model is outside what a model file may hold: {problem}")
    if (meta.levels, meta.channels) != (len(arch.stages), arch.channels):
        raise ValueError(f"meta of {meta.levels} levels and {meta.channels} channels does not fit a model of "
                         f"{len(arch.stages)} stages and {arch.channels} channels")
    parts = [_header(arch, meta, bits, None if prior is None else prior.prior_id)]
    tensors = [(t[index : index + 1], tensor_bits(bits, j, is_weight)) for t, is_weight, j in _tensors(model)]
    bases = [None] * len(tensors) if prior is None else [w.unsqueeze(0) for w in prior.initial(arch)]
    if not quantised(bits):
        dtype = "<f4" if bits == 32 else "<f2"
        parts += [t[0].detach().cpu().numpy().astype(dtype).tobytes() for t, _ in tensors]
        return _seal(b"".join(parts))
    codes, symbols = zip(*(quantise(t, b, coarser if b == bits else 0, base) for (t, b), base in zip(tensors, bases)))
    symbols = [s.cpu().numpy().ravel().astype(np.int32) for s in symbols]
    spreads = [_spread_code(s, b) for s, (_, b) in zip(symbols, tensors)]
    encoder = constriction.stream.queue.RangeEncoder()
    for s, spread, (_, b) in zip(symbols, spreads, tensors):
        _coder(b, spread)[0](encoder, s)
    words = encoder.get_compressed()
    parts += [c.cpu().numpy().astype(np.uint8).tobytes() for c in codes]
    parts += [bytes(spreads)]
    parts += [struct.pack("<I", len(words)), words.astype("<u4").tobytes()]
    return _seal(b"".join(parts))


def _check_envelope(data, fail):
    """The end of the payload, once the magic, the version, the size and (version 4) the checksum are right."""
    if len(data) < len(MAGIC) + 4 or bytes(data[: len(MAGIC)]) != MAGIC:
        raise fail("not an .mrnet model file (bad magic bytes)")
    (version,) = struct.unpack_from("<I", data, len(MAGIC))
    if version not in (VERSION, PRIOR_VERSION, LATENT_VERSION, UNCHECKED_VERSION):
        raise fail(f"model file version {version} is not supported (this reader knows versions "
                   f"{UNCHECKED_VERSION} to {LATENT_VERSION})")
    if len(data) > MAX_FILE_BYTES:
        raise fail(f"{len(data):,} bytes is more than any model file holds ({MAX_FILE_BYTES:,})")
    if version == UNCHECKED_VERSION:
        return len(data)
    end = len(data) - _CHECKSUM.size
    if end < len(MAGIC) + 4:
        raise fail("too short for a checksum (truncated)")
    (stored,) = _CHECKSUM.unpack_from(data, end)
    if zlib.crc32(memoryview(data)[:end]) != stored:
        raise fail("checksum mismatch: the file is truncated or corrupt")
    return end


def _read_header(data, end, fail):
    """(architecture, meta, bits, prior id or None, payload offset) from a header that lies within data[:end] and
    within bounds."""
    (version,) = struct.unpack_from("<I", data, len(MAGIC))
    offset = len(MAGIC) + 4
    try:
        model, channels, in_features, flags, omega_hidden, width, height, n = _HEAD.unpack_from(data, offset)
        offset += _HEAD.size
        if not 1 <= n <= MAX_STAGES:  # before the loop: the count sizes it
            raise fail(f"bad header: {n} stages (not 1 to {MAX_STAGES})")
        stages = []
        for i in range(n):
            first, n_hidden, omega_0 = _STAGE.unpack_from(data, offset)
            if n_hidden > MAX_HIDDEN_LAYERS:
                raise fail(f"bad header: stage {i} has {n_hidden} hidden layers (at most {MAX_HIDDEN_LAYERS})")
            hidden = struct.unpack_from(f"<{n_hidden}H", data, offset + _STAGE.size)
            offset += _STAGE.size + 2 * n_hidden
            stages.append(StageSpec(first, tuple(hidden), omega_0))
        (bits,) = struct.unpack_from("<B", data, offset)
        offset += 1
        prior_id = None
        if version == PRIOR_VERSION:
            prior_id = bytes(data[offset : offset + ID_BYTES]).hex()
            offset += ID_BYTES
    except struct.error:
        raise fail("header runs past the end of the file (truncated?)") from None
    if offset > end:
        raise fail("header runs past the end of the file (truncated?)")
    problem = _bounds_problem(chr(model), channels, in_features, flags, omega_hidden, width, height, stages, bits)
    if problem:
        raise fail(f"bad header: {problem}")
    try:
        arch = Architecture(chr(model), channels, tuple(stages), omega_hidden, in_features, bool(flags & 1))
    except ValueError as e:
        raise fail(f"bad header: {e}") from None
    if arch.params() > MAX_PARAMS:
        raise fail(f"bad header: {arch.params():,} parameters is more than any MR-Net this reader accepts")
    if quantised(bits) and arch.periodic:
        raise fail("bad header: periodic models are stored with float weights")
    if prior_id is not None and not quantised(bits):
        raise fail("bad header: weights coded against a prior are quantised")
    try:
        meta = ImageMeta(width, height, arch.channels, len(arch.stages), "wrap" if flags & 2 else "reflect")
    except ValueError as e:  # too small for its stage count
        raise fail(f"bad header: {e}") from None
    return arch, meta, bits, prior_id, offset


def _decode(payload, arch, bits, fail, bases=None):
    """The weights as float32 arrays, in payload order; quantised ones added to `bases` (a prior's) if given."""
    shapes = list(_shapes(arch))
    if not quantised(bits):
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
    bases = bases or [None] * len(shapes)
    for (shape, is_weight, j), spread, base in zip(shapes, spreads.tolist(), bases):
        n = math.prod(shape)
        try:
            symbols = _coder(tensor_bits(bits, j, is_weight), int(spread))[1](decoder, n)
        except (AssertionError, ValueError) as e:
            raise fail(f"weights do not decode: {e}") from None
        k = shape[-1] if column_steps(shape) else 1
        steps = codes[at : at + k].view(1, k) if column_steps(shape) else codes[at : at + 1]
        base = None if base is None else base.unsqueeze(0)
        values.append(dequantise(steps, torch.from_numpy(symbols.reshape(1, *shape)), base)[0].numpy())
        at += k
    return values


def stored_weight_bits(data: bytes) -> int:
    """The weight bits a (valid) model file stores."""
    end = _check_envelope(data, lambda reason: ModelFileError(f"<bytes>: {reason}"))
    if _version(data) == LATENT_VERSION:
        raise ModelFileError("<bytes>: a latent pyramid stores its latents and weights as integers, not at bits")
    return _read_header(data, end, lambda reason: ModelFileError(f"<bytes>: {reason}"))[2]


def required_prior(data: bytes) -> str | None:
    """The id of the prior a model file's weights are coded against, or None; ModelFileError if it is no model."""
    def fail(reason):
        return ModelFileError(f"<bytes>: {reason}")

    end = _check_envelope(data, fail)
    return None if _version(data) == LATENT_VERSION else _read_header(data, end, fail)[3]


def _version(data):
    return struct.unpack_from("<I", data, len(MAGIC))[0]


def from_bytes(data: bytes, name: str = "<bytes>",
               prior: Prior | None = None) -> tuple[MRNet | latent.LatentNet, ImageMeta]:
    """Parse a model: (MRNet, or LatentNet for version 6, with batch 1; meta). Raises ModelFileError naming `name`
    and the problem.

    A file coded against a prior (version 5) needs that `prior` (`prior.Prior`): a missing or different one is an
    error naming both ids, never a wrong image."""
    def fail(reason):
        return ModelFileError(f"{name}: {reason}")

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail(f"no model bytes (got {type(data).__name__})")
    end = _check_envelope(data, fail)
    if _version(data) == LATENT_VERSION:
        model = latent.from_payload(data, len(MAGIC) + 4, end, fail)
        a = model.arch
        return model, ImageMeta(a.width, a.height, a.channels, a.levels, "wrap" if a.periodic else "reflect")
    arch, meta, bits, needed, offset = _read_header(data, end, fail)
    bases = None
    if needed is not None:
        if prior is None:
            raise fail(f"its weights are coded against prior {needed}, and no prior was given (--prior FILE)")
        if prior.prior_id != needed:
            raise fail(f"its weights are coded against prior {needed}, not the given prior {prior.prior_id}")
        if prior.rung(arch) is None:
            raise fail(f"prior {needed} has no rung for its architecture")
        bases = prior.initial(arch)
    values = _decode(memoryview(data)[offset:end], arch, bits, fail, bases)
    if not all(np.isfinite(v).all() for v in values):
        raise fail("weights contain NaN or infinity")
    # Built without periodic first layers: the file's weights replace the initial draw, and drawing periodic
    # frequencies costs time and memory that grow with omega_0 squared.
    model = MRNet(dataclasses.replace(arch, periodic=False), batch=1)
    model.arch = arch
    with torch.no_grad():
        for (t, _, _), v in zip(_tensors(model), values):
            t[0].copy_(torch.from_numpy(v))
    model.requires_grad_(False)
    return (snap_periodic(model) if arch.periodic else model), meta


def save(path: Path | str, model: MRNet, meta: ImageMeta, bits: int = 32, index: int = 0) -> int:
    """Write a model file atomically (write, then rename). Returns the number of bytes written."""
    path = Path(path)
    data = to_bytes(model, meta, bits, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _refuse_unless_small_regular(path, info):
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(info.st_mode)), "not a regular file")
        raise ModelFileError(f"{path}: is {kind}, not a model file")
    if info.st_size > MAX_FILE_BYTES:
        raise ModelFileError(f"{path}: {info.st_size:,} bytes is more than any model file holds ({MAX_FILE_BYTES:,})")


def read_file(path: Path | str) -> bytes:
    """A model file's bytes. Anything but a regular file of at most MAX_FILE_BYTES is refused before it is read
    (a FIFO would block, a device could be endless)."""
    try:
        _refuse_unless_small_regular(path, os.stat(path))
        # Non-blocking, so that a file swapped for a FIFO after the stat above cannot block the open; fstat then
        # checks what was really opened.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            _refuse_unless_small_regular(path, os.fstat(f.fileno()))
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:  # it grew after the check
        raise ModelFileError(f"{path}: more than any model file holds ({MAX_FILE_BYTES:,} bytes)")
    return data


def load(path: Path | str) -> tuple[MRNet, ImageMeta]:
    """(MRNet with batch 1, meta) from a model file; ModelFileError naming the path for anything wrong."""
    return from_bytes(read_file(path), str(path))
