"""Collection priors: learned MR-Net initialisations, one per architecture of a ladder of widths, and a learned
start for latent pyramids (model g: its MLP, context model and grid scales; `latent.learn_start`).

An image encoded from a prior starts from its architecture's learned weights, is fitted for a short joint phase
(every stage, every level, through the quantiser), and stores its weights as quantised residuals from the prior
(`quantize.quantise(..., base=)`), which are smaller and entropy-code better than absolute weights. Rate control
picks the rung of the ladder (`rung_for`); training is `learn` (first-order, Reptile-like: see its docstring).
A latent pyramid only starts from a prior: its file stores its own weights, whole, and decodes without the prior.

The `.mrprior` file, pickle-free (all numbers little-endian):

    magic     8 bytes  b"\\x89MRPRI\\r\\n"
    version   uint32   1, or 2 with a latent pyramid's start
    header    uint32 length, then that many bytes of UTF-8 JSON: {"architectures": [Architecture.to_dict(), ...],
              "fit": {...how images are fitted from it...}, "training": {...}, "bytes_per_param": [...]}, and in
              version 2 "latent": {"levels": N, "hidden": [widths], "context": bool} (architectures may be empty)
    payload   per architecture, float32 weights in model-file order (`modelfile._tensors`); then, in version 2, the
              latent start's float32 tensors in `latent.start_shapes` order
    checksum  uint32   CRC-32 of every byte before it

A prior is identified by its content: `prior_id` is the first 16 hex digits of the SHA-256 of the whole file, and a
model file made from it records those 8 bytes, so decoding with another prior is refused, never a wrong image.
Reading checks the size before reading, then the magic, version, checksum, header length and every architecture
against the model file's bounds, and the payload's exact size, before anything is allocated.
"""
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import latent
from .latent import LatentArchitecture
from .network import Architecture, MRNet

MAGIC = b"\x89MRPRI\r\n"
VERSION = 1
LATENT_VERSION = 2  # a prior with a latent pyramid's start; version 1 files are read as before
MAX_HEADER_BYTES = 1 << 16
MAX_RUNGS = 64
MAX_PRIOR_PARAMS = 1 << 24  # all rungs together: 64 MiB of float32
MAX_FILE_BYTES = len(MAGIC) + 8 + MAX_HEADER_BYTES + 4 * MAX_PRIOR_PARAMS + 4
ID_BYTES = 8
MAX_LATENT_START = 64.0  # a latent start's weights, biases and log2 scales are of order 1 (the one trained for
# docs/performance.md is within 2.6): a fit started far beyond that diverges
DEFAULT_PATH = Path(__file__).with_name("priors") / "default.mrprior"
# Luma weights: a grey image's output layer starts from this mix of the RGB prior's output columns.
LUMA = (0.299, 0.587, 0.114)


class PriorError(ValueError):
    """A prior file that cannot be used: the message names the file and the reason."""


@dataclass
class Prior:
    architectures: list  # Architecture per rung (RGB), fewest parameters first
    weights: list  # per rung: float32 tensors in model-file order, each of one model's shape (no batch dimension)
    fit: dict = field(default_factory=dict)  # how an image is fitted from it: epochs, lr, batch_pixels, bits
    training: dict = field(default_factory=dict)  # what it was trained on, and how
    bytes_per_param: list = field(default_factory=list)  # per rung: measured stored bytes per parameter
    data: bytes = b""  # the file's bytes, once written or read
    latent: dict | None = None  # a latent pyramid's start: {"levels", "hidden", "context"} (RGB), or None
    latent_weights: list = field(default_factory=list)  # its tensors, in `latent.start_shapes` order

    @property
    def prior_id(self) -> str:
        return prior_id(self.data or to_bytes(self))

    def rung(self, arch: Architecture) -> int | None:
        """Index of the rung of this architecture (by its RGB shape and stage count), or None."""
        rgb = _rgb(arch)
        return next((k for k, a in enumerate(self.architectures) if a == rgb), None)

    def model(self, arch: Architecture, batch: int = 1) -> MRNet:
        """An MRNet of `arch` (RGB or grey) holding this prior's initial weights, for `batch` images."""
        k = self.rung(arch)
        if k is None:
            raise PriorError(f"prior {self.prior_id} has no rung for architecture {arch.to_json()}")
        model = MRNet(arch, batch=batch)
        with torch.no_grad():
            for t, w in zip(_parameters(model), self.initial(arch)):
                t.copy_(w.expand_as(t))
        model.requires_grad_(False)
        return model

    def initial(self, arch: Architecture) -> list[torch.Tensor]:
        """The rung's weights for `arch`: the RGB weights, or for grey, output layers mixed to one channel."""
        weights = self.weights[self.rung(arch)]
        if arch.channels == 3:
            return weights
        out = list(weights)
        per_stage = [2 * len(arch.layer_shapes(i)) for i in range(len(arch.stages))]
        for end in np.cumsum(per_stage).tolist():  # just past each stage's output layer: its weight, then its bias
            out[end - 2], out[end - 1] = _grey(out[end - 2], out[end - 1])
        return out

    def has_latent_start(self, levels: int, hidden: tuple, context: bool, grids: int) -> bool:
        """Whether this prior holds a start for latent pyramids of this shape, `grids` grids in all (a start has one
        grid per level)."""
        shape = (levels, tuple(hidden), context)
        return self.latent is not None and grids == levels and (
            self.latent["levels"], tuple(self.latent["hidden"]), self.latent["context"]) == shape

    def latent_start(self, arch: LatentArchitecture) -> list[torch.Tensor] | None:
        """The start for latent pyramids of `arch` (RGB, or grey: output layer mixed to one channel), or None when
        this prior has none of its levels, hidden widths and entropy model (a start has one grid per level)."""
        if not self.has_latent_start(arch.levels, arch.hidden, arch.context, arch.grid_count):
            return None
        if arch.channels == 3:
            return self.latent_weights
        out = list(self.latent_weights)
        last = 2 * len(arch.hidden)  # the output layer's weight, then its bias
        out[last], out[last + 1] = _grey(out[last], out[last + 1])
        return out


def _grey(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RGB output layer (weight [fan_in, 3], bias [3]) mixed by LUMA into one grey channel."""
    luma = torch.tensor(LUMA)
    return (weight * luma).sum(1, keepdim=True), (bias * luma).sum().view(1)


def _rgb(arch):
    return Architecture(arch.model, 3, arch.stages, arch.omega_hidden, arch.in_features, arch.periodic)


def _parameters(model):
    """A batched MRNet's weights and biases in model-file order (weight, bias, layer by layer, stage by stage)."""
    for stage in model.stages:
        for w, b in zip(stage.weights, stage.biases):
            yield w
            yield b


def base_of(model: MRNet, prior: Prior) -> dict[str, torch.Tensor]:
    """{parameter name: [1, ...] tensor} of the prior's weights for `model`'s architecture, to quantise against."""
    names = {id(p): n for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    return {names[id(p)]: w.unsqueeze(0).to(device) for p, w in zip(_parameters(model), prior.initial(model.arch))}


def from_model(model: MRNet, fit: dict | None = None, training: dict | None = None,
               bytes_per_param: list | None = None) -> Prior:
    """A one-rung prior from image 0 of `model` (used by training to assemble a ladder)."""
    return Prior([model.arch], [[t[0].detach().cpu().float().clone() for t in _parameters(model)]],
                 fit or {}, training or {}, bytes_per_param or [])


def merge(priors: list[Prior]) -> Prior:
    """One prior holding every rung of `priors` (one-rung priors from `from_model`), fewest parameters first."""
    rungs = sorted(((a, w, b) for p in priors for a, w, b in
                    zip(p.architectures, p.weights, p.bytes_per_param or [None] * len(p.architectures))),
                   key=lambda r: r[0].params())
    first = priors[0]
    return Prior([a for a, _, _ in rungs], [w for _, w, _ in rungs], dict(first.fit), dict(first.training),
                 [b for _, _, b in rungs] if all(b is not None for _, _, b in rungs) else [])


def prior_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[: 2 * ID_BYTES]


def to_bytes(prior: Prior) -> bytes:
    fields = {"architectures": [a.to_dict() for a in prior.architectures], "fit": prior.fit,
              "training": prior.training, "bytes_per_param": prior.bytes_per_param}
    if prior.latent is not None:
        fields["latent"] = prior.latent
    header = json.dumps(fields, sort_keys=True).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"prior header of {len(header)} bytes is over {MAX_HEADER_BYTES}")
    tensors = [w for ws in prior.weights for w in ws] + list(prior.latent_weights)
    payload = b"".join(w.detach().cpu().numpy().astype("<f4").tobytes() for w in tensors)
    version = VERSION if prior.latent is None else LATENT_VERSION
    body = MAGIC + struct.pack("<II", version, len(header)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _architecture(d, fail, k):
    from .modelfile import _bounds_problem  # the model file's bounds hold for every rung

    try:
        arch = Architecture.from_dict(d)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise fail(f"rung {k}: not an architecture ({e})") from None
    problem = _bounds_problem(arch.model, arch.channels, arch.in_features, 0, arch.omega_hidden, 1, 1,
                              arch.stages, 8)
    if problem or arch.channels != 3 or arch.periodic:
        raise fail(f"rung {k}: {problem or 'a prior holds RGB, non-periodic architectures'}")
    return arch


def from_bytes(data: bytes, name: str = "<bytes>") -> Prior:
    """A Prior from a file's bytes; PriorError naming `name` and the problem."""
    def fail(reason):
        return PriorError(f"{name}: {reason}")

    if len(data) > MAX_FILE_BYTES:
        raise fail(f"{len(data):,} bytes is more than any prior holds ({MAX_FILE_BYTES:,})")
    if len(data) < len(MAGIC) + 12 or bytes(data[: len(MAGIC)]) != MAGIC:
        raise fail("not an .mrprior file (bad magic bytes)")
    version, length = struct.unpack_from("<II", data, len(MAGIC))
    if version not in (VERSION, LATENT_VERSION):
        raise fail(f"prior file version {version} is not supported (this reader knows versions {VERSION} and "
                   f"{LATENT_VERSION})")
    end = len(data) - 4
    if zlib.crc32(memoryview(data)[:end]) != struct.unpack_from("<I", data, end)[0]:
        raise fail("checksum mismatch: the file is truncated or corrupt")
    start = len(MAGIC) + 8
    if length > MAX_HEADER_BYTES or start + length > end:
        raise fail(f"header length {length} is past the file's end or over {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(data[start : start + length]).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting no header needs
        raise fail(f"header is not JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict) or not isinstance(header.get("architectures"), list):
        raise fail("header has no list of architectures")
    dicts = header["architectures"]
    latent_spec = _latent_header(header.get("latent"), fail) if version == LATENT_VERSION else None
    if not (0 if latent_spec else 1) <= len(dicts) <= MAX_RUNGS:
        raise fail(f"{len(dicts)} rungs (not 1 to {MAX_RUNGS})")
    archs = [_architecture(d, fail, k) for k, d in enumerate(dicts)]
    latent_shapes = (latent.start_shapes(latent_spec["levels"], tuple(latent_spec["hidden"]), latent_spec["context"])
                     if latent_spec else [])
    total = sum(a.params() for a in archs) + sum(math.prod(s) for s in latent_shapes)
    if total > MAX_PRIOR_PARAMS or end - start - length != 4 * total:
        raise fail(f"payload is {end - start - length} bytes; its {len(archs)} rungs"
                   f"{' and latent start' if latent_spec else ''} need {4 * total} (truncated or corrupt)")
    values = np.frombuffer(data, "<f4", total, start + length).astype(np.float32)
    if not np.isfinite(values).all():
        raise fail("weights contain NaN or infinity")
    weights, at = [], 0
    for arch in archs:
        rung = []
        for i in range(len(arch.stages)):
            for fan_in, fan_out in arch.layer_shapes(i):
                for shape in ((fan_in, fan_out), (fan_out,)):
                    n = math.prod(shape)
                    rung.append(torch.from_numpy(values[at : at + n].reshape(shape).copy()))
                    at += n
        weights.append(rung)
    if latent_shapes and np.abs(values[at:]).max() > MAX_LATENT_START:
        raise fail(f"the latent start holds values beyond +-{MAX_LATENT_START:g}, which no fit starts from")
    latent_weights = []
    for s in latent_shapes:
        latent_weights.append(torch.from_numpy(values[at : at + math.prod(s)].reshape(s).copy()))
        at += math.prod(s)
    mlp_layers = len(latent_spec["hidden"]) + 1 if latent_spec else 0  # weights at 0, 2, ...: each then its bias
    if any(not latent_weights[2 * j].any() for j in range(mlp_layers)):
        raise fail("the latent start has an MLP layer of zero weights, from which a fit never learns")
    extras = {}
    for key, kind in (("fit", dict), ("training", dict), ("bytes_per_param", list)):
        value = header.get(key, kind())
        if not isinstance(value, kind):
            raise fail(f"header field {key} is not a {kind.__name__}")
        extras[key] = value
    bpp = extras["bytes_per_param"]
    if bpp and (len(bpp) != len(archs) or not all(isinstance(b, (int, float)) and 0 < b < 8 for b in bpp)):
        raise fail("bytes_per_param must hold one number in (0, 8) per rung")
    if archs:  # how the rungs are fitted; a latent start is fitted by its image's own config
        _check_fit(extras["fit"], fail)
    order = [a.params() for a in archs]
    if order != sorted(order):
        raise fail("rungs must be ordered by parameter count")
    return Prior(archs, weights, extras["fit"], extras["training"], bpp, bytes(data), latent_spec, latent_weights)


def _latent_header(d, fail):
    """A header's latent start {"levels", "hidden", "context"}, checked against the model file's bounds."""
    ok = (isinstance(d, dict) and set(d) == {"levels", "hidden", "context"}
          and isinstance(d["levels"], int) and not isinstance(d["levels"], bool) and 1 <= d["levels"] <= 16
          and isinstance(d["hidden"], list) and 1 <= len(d["hidden"]) <= latent.MAX_HIDDEN
          and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= latent.MAX_WIDTH for w in d["hidden"])
          and isinstance(d["context"], bool))
    if not ok:
        raise fail(f"header field latent must be {{levels: 1 to 16, hidden: 1 to {latent.MAX_HIDDEN} widths of 1 to "
                   f"{latent.MAX_WIDTH}, context: true or false}}, not {str(d)[:200]}")
    return {"levels": d["levels"], "hidden": list(d["hidden"]), "context": d["context"]}


FIT_BOUNDS = {"epochs": (1, 10_000), "lr": (1e-7, 1.0), "batch_pixels": (64, 1 << 20)}


def _check_fit(fit, fail):
    for key, (lo, hi) in FIT_BOUNDS.items():
        value = fit.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi):
            raise fail(f"fit.{key} must be a number from {lo:g} to {hi:g}, not {value!r}")


def save(path: Path | str, prior: Prior) -> str:
    """Write the prior file atomically; returns its id."""
    path = Path(path)
    data = to_bytes(prior)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    prior.data = data
    return prior_id(data)


def load(path: Path | str) -> Prior:
    """A Prior from a file; PriorError naming the path for anything wrong."""
    from .modelfile import ModelFileError, read_file

    try:
        data = read_file(path)  # refuses FIFOs, devices and oversized files before reading
    except ModelFileError as e:
        raise PriorError(str(e)) from None
    return from_bytes(data, str(path))


def default() -> Prior | None:
    """The prior shipped with the package, or None when it is absent."""
    return load(DEFAULT_PATH) if DEFAULT_PATH.is_file() else None


def learn(images: torch.Tensor, arch: Architecture, fit: dict, steps: int, batch: int = 8, meta_rate: float = 1.0,
          seed: int = 0, start: list[torch.Tensor] | None = None, first_step: int = 0, levels: int | None = None,
          border: str = "reflect", bits: int = 8,
          on_step: Callable[[int, list[torch.Tensor], float], None] | None = None) -> list[torch.Tensor]:
    """One rung's initialisation, learned over training images [N, 3, S, S] by first-order meta-learning.

    Reptile (Nichol et al. 2018): each outer step fits `batch` random images from the current initialisation with
    the encoder's own joint phase (`fit`: epochs, lr, batch_pixels; through the quantiser, residuals from the
    initialisation), then moves the initialisation toward the mean of the fitted weights, by `meta_rate` decaying
    linearly to a tenth of it. Reptile rather than first-order MAML because it needs only the fitted weights, no
    query-set gradient: the inner loop is the batched fitting engine unchanged, B images in one pass.
    First-layer weights (each stage's frequencies) keep their random draw: averaged, they lose the spread the
    fits rely on (issue 12's probe). `start` (weights, model-file order) and `first_step` resume a run;
    `on_step(step, weights, loss)` sees every outer step (loss: the batch's mean inner loss at the end).
    Returns the weights in model-file order.
    """
    from .quantize import finetune  # here: quantize is light, but keeps this module's import graph flat

    levels = levels or len(arch.stages)
    device = images.device
    init = MRNet(arch, seed=seed).to(device)
    init.requires_grad_(False)
    if start is not None:
        with torch.no_grad():
            for t, w in zip(_parameters(init), start):
                t.copy_(w.to(device).unsqueeze(0))
    current = from_model(init, fit)
    frequencies = {id(stage.weights[0]) for stage in init.stages}
    for step in range(first_step, steps):
        pick = torch.randint(len(images), (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        model = current.model(arch, batch=batch).to(device)
        losses = []
        finetune(model, images[pick.to(device)], bits, int(fit["epochs"]), float(fit["lr"]), int(fit["batch_pixels"]),
                 levels, border, seed + step, progress=lambda i, n, loss: losses.append(loss),
                 base=base_of(model, current))
        rate = meta_rate * (1 - 0.9 * step / max(steps - 1, 1))
        with torch.no_grad():
            for t, fitted in zip(_parameters(init), _parameters(model)):
                if id(t) not in frequencies:
                    t.add_(rate * (fitted.mean(0, keepdim=True) - t))
        current = from_model(init, fit)
        if on_step:
            on_step(step, current.weights[0], losses[-1] if losses else float("nan"))
    return current.weights[0]
