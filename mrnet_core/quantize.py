"""Weight quantisation: uniform steps, and quantisation-aware fine-tuning.

A value is stored as the integer round(w / step), |symbol| <= 2^(bits-1) - 1. Steps are themselves coded in one
byte each on a log scale (a factor 2^(1/8) apart). A weight matrix with at least COLUMN_FAN_IN inputs gets one
step per output column, where that byte is at most 1/4 bit per weight and buys precision (0.45 dB at 8 bits and
2 dB at 6 bits, at full resolution, on a 21K-parameter model); smaller matrices and bias vectors get one step,
since in the small models of low rates a byte per column would be 7% of the file for 0.014 dB
(docs/performance.md). Which is which follows from the shapes, so nothing more is stored. Everything here works
on batched weights [B, ...] so a whole batch of models is quantised, and fine-tuned, at once.
"""
import math
from collections.abc import Callable

import torch
from torch.func import functional_call

from .network import MRNet
from .pyramid import gaussian_pyramid, pixel_grid

BATCH_PIXELS = 4096  # pixels per level in each fine-tuning step, unless the config says otherwise
STEPS_PER_OCTAVE = 8
STEP_OFFSET = 24  # code 0 is a step of 2^-24; code 255 is 2^7.9


def max_symbol(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def code_to_value(code: torch.Tensor) -> torch.Tensor:
    """A one-byte log code (uint8 tensor) as the float32 value it stands for."""
    return torch.exp2(code.double() / STEPS_PER_OCTAVE - STEP_OFFSET).float()


def value_to_code(value: torch.Tensor) -> torch.Tensor:
    """The smallest code whose value is at least `value` (so that a column's peak stays within its range)."""
    code = torch.ceil((torch.log2(value.double().clamp_min(2.0**-STEP_OFFSET)) + STEP_OFFSET) * STEPS_PER_OCTAVE)
    return code.clamp(0, 255).to(torch.uint8)


COLUMN_FAN_IN = 32


def column_steps(shape: tuple[int, ...]) -> bool:
    """Whether one model's tensor of `shape` ([fan_in, fan_out] or [n]) gets a step per output column."""
    return len(shape) == 2 and shape[0] >= COLUMN_FAN_IN


def quantise(w: torch.Tensor, bits: int, coarser: int = 0,
             base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(step codes, symbols) of a batch of tensors [B, ...]: codes [B, fan_out] (`column_steps`) or [B].

    A step is the smallest code that keeps its peak in range, raised by `coarser` codes (each a factor 2^(1/8)):
    rate control's last, fine knob, which trades a little precision for bytes without fitting again.
    With a `base` (a prior's weights, broadcast over the batch) the residual w - base is what is quantised, on the
    steps the weights themselves would get (`_peak`): the same precision, in symbols near 0 that cost few bits.
    """
    w = w.detach().float()
    peak = _peak(w, base)
    if base is not None:
        w = w - base.to(w.device)
    codes = (value_to_code(peak / max_symbol(bits)).int() + coarser).clamp(0, 255).to(torch.uint8)
    symbols = torch.round(w / _broadcast(code_to_value(codes), w)).clamp_(-max_symbol(bits), max_symbol(bits))
    return codes, symbols.to(torch.int32)


def _peak(w, base=None):
    """The largest magnitude per step ([B, fan_out] or [B]) of a batch of tensors: of w, or with a `base` of w and
    of w - base, whichever is larger, so residual symbols stay in range."""
    def peak(t):
        return t.abs().amax(dim=1) if column_steps(t.shape[1:]) else t.abs().flatten(1).amax(dim=1)

    return peak(w) if base is None else torch.maximum(peak(w), peak(w - base.to(w.device)))


def _broadcast(step, like):
    """Steps [B, fan_out] or [B] shaped to broadcast over a batch of tensors like `like`."""
    step = step.to(like.device)
    return step.unsqueeze(1) if step.dim() == 2 else step.view(-1, *[1] * (like.dim() - 1))


def dequantise(codes: torch.Tensor, symbols: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    values = symbols.float() * _broadcast(code_to_value(codes), symbols)
    return values if base is None else values + base.to(values.device)


def fake_quantise(w: torch.Tensor, bits: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """w rounded onto its quantisation grid in the forward pass, identity in the backward (straight-through).

    The same values as dequantise(*quantise(w, bits, base=base), base) in fewer operations (it runs on every tensor
    at every step of fine-tuning): the steps are computed once, and the symbols stay floats (integers, exact in
    float32)."""
    peak = _peak(w.detach(), base)
    d = w.detach() if base is None else w.detach() - base
    step = _broadcast(code_to_value(value_to_code(peak / max_symbol(bits))), d)
    q = torch.round(d / step).clamp_(-max_symbol(bits), max_symbol(bits)).mul_(step)
    return w + (q - d)


FINE_BITS = 12


def tensor_bits(bits: int, layer: int, is_weight: bool) -> int:
    """The bits of one tensor: first-layer weights and all biases get FINE_BITS.

    Both are multiplied by omega (30 or so) inside a sine, so a step there is a large phase error: at 6 bits, rounding
    just the biases of a fitted model costs 5 dB, and they are a few percent of the parameters.
    """
    return FINE_BITS if (layer == 0 or not is_weight) else bits


def quantised_parameters(model: MRNet, bits: int, fake: bool = True, coarser: int = 0,
                         base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{name: quantised tensor} for every weight and bias of a batched MRNet (fake: with straight-through grads).

    `coarser` raises the steps of the tensors at `bits` (not the FINE_BITS ones; see `quantise`). `base` ({name:
    [1, ...] tensor}, `prior.base_of`) quantises residuals from a prior instead of the weights themselves."""
    out = {}
    for name, p in model.named_parameters():
        is_weight, layer = ".weights." in name, int(name.rsplit(".", 1)[1])
        b, origin = tensor_bits(bits, layer, is_weight), None if base is None else base[name]
        out[name] = (fake_quantise(p, b, origin) if fake else
                     dequantise(*quantise(p, b, coarser if b == bits else 0, origin), origin))
    return out


def level_outputs(model: MRNet, weights: dict[str, torch.Tensor], x: torch.Tensor, starts: list[int]) -> torch.Tensor:
    """f(x, k + 1) on every level k's rows of x [B, P, 2], for a batched MRNet holding `weights` ({name: tensor}).

    Level k's rows are x[:, starts[k] : starts[k + 1]]. Stage i is evaluated once, on the rows of levels i.., since
    c_i(k + 1) is 1 for i <= k and 0 above: the same values as `model(x_k, k + 1)` level by level, in fewer and
    larger operations."""
    out, basis = None, None
    for i, stage in enumerate(model.stages):
        params = {name: weights[f"stages.{i}.{name}"] for name, _ in stage.named_parameters()}
        if basis is not None:  # stage i - 1's features on levels i - 1.., of which stage i reads levels i..
            basis = basis[:, starts[i] - starts[i - 1] :]
        g, h = functional_call(stage, params, (x[:, starts[i] :], basis))
        out = g if out is None else out + torch.nn.functional.pad(g, (0, 0, starts[i], 0))
        basis = h if model.arch.model == "m" else None
    return out


def finetune(model: MRNet, images: torch.Tensor, bits: int, epochs: int, lr: float = 3e-4,
             batch_pixels: int = BATCH_PIXELS, levels: int | None = None, border: str = "reflect", seed: int = 0,
             progress: Callable[[int, int, float], None] | None = None,
             base: dict[str, torch.Tensor] | None = None) -> MRNet:
    """Quantisation-aware fine-tuning of a fitted batched MR-Net on images [B, C, H, W], in place.

    Every stage trains at once, through the quantiser, on every level: the loss is the sum over levels k of the
    mean squared error of f(x, k + 1) against Gaussian level k, so a coarse stage's rounding is repaired where
    all the finer levels see it. An epoch is one pass over the finest level's pixels in steps of `batch_pixels`
    random pixels per level. Losses are summed over images, and Adam is per-element, so each image trains as if
    alone. The model is left holding float weights that quantise well; store them at the same `bits` (and against
    the same `base`, when the weights are coded as residuals from a prior: see `quantised_parameters`).

    A step evaluates each stage once, on the sampled pixels of all the levels it contributes to (k >= i), rather
    than once per level: the same loss in fewer, larger operations, since on a GPU their count bounds the speed.
    """
    if epochs <= 0:
        return model
    device = next(model.parameters()).device
    levels = levels or len(model.stages)
    pyramid = gaussian_pyramid(images.to(device, torch.float32), levels, border=border)[::-1]
    b, c = images.shape[:2]
    sizes = [g.shape[-2] * g.shape[-1] for g in pyramid]
    # Every level's pixels in one table, coarse to fine; a step samples each level's share of it.
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    coords = torch.cat([pixel_grid(*g.shape[-2:], device=device) for g in pyramid])
    targets = torch.cat([g.permute(0, 2, 3, 1).reshape(b, -1, c) for g in pyramid], dim=1)
    sampled = [min(n, batch_pixels) for n in sizes]
    starts = [sum(sampled[:k]) for k in range(len(sampled))]  # where level k's samples begin in a step's batch
    # Each level's squared errors count 1 / (its samples x channels): the mean per level, summed over levels.
    weight = torch.cat([torch.full((n,), 1 / (n * c), device=device) for n in sampled])
    shift = torch.repeat_interleave(torch.tensor(offsets), torch.tensor(sampled))  # sample -> row of the table
    steps = max(1, epochs * math.ceil(sizes[-1] / batch_pixels))
    model.requires_grad_(True)
    for stage in model.stages:
        if stage.fixed_first:  # a Fourier embedding stays as drawn, as in the fit
            stage.weights[0].requires_grad_(False)
            stage.biases[0].requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trained, lr=lr, foreach=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 30)
    generator = torch.Generator().manual_seed(seed + 2)
    for step in range(steps):
        index = torch.cat([torch.randint(n, (batch_pixels,), generator=generator) if n > batch_pixels
                           else torch.arange(n) for n in sizes])
        index = (index + shift).to(device)
        x, y = coords[index].expand(b, -1, -1), targets[:, index]
        out = level_outputs(model, quantised_parameters(model, bits, base=base), x, starts)
        loss = ((out - y).square().sum(-1) * weight).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress and ((step + 1) % 50 == 0 or step + 1 == steps):
            progress(step + 1, steps, loss.item() / b)
    model.requires_grad_(False)
    return model
