"""Fit a batch of same-sized images, stage by stage, coarse to fine.

Stage i trains alone (earlier stages frozen) against level i of the pyramid, counted coarse to fine. What the
frozen stages contribute at that level's coordinates (their summed output, and for M-Net the basis features
the new stage reads) never changes while stage i trains, so it is computed once per stage. Each image has
its own loss and its own stopping point; Adam is per-element, so a batched fit equals B separate fits.
"""
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import device as devices
from .config import FitConfig
from .network import MRNet, Stage
from .pyramid import gaussian_pyramid, laplacian_from_gaussian, pixel_grid


@dataclass
class StageReport:
    params: int
    epochs: list  # per image: passes over the level's pixels before it stopped
    seconds: float
    loss: list = field(default_factory=list)  # per image: final mean squared error on the stage's target


def level_targets(images: torch.Tensor, cfg: FitConfig) -> list[torch.Tensor]:
    """Per-stage targets, coarse to fine: Gaussian levels, or Laplacian bands for Laplacian targets."""
    gaussians = gaussian_pyramid(images, levels=cfg.levels, border=cfg.border)
    levels = laplacian_from_gaussian(gaussians, cfg.border) if cfg.target == "laplacian" else gaussians
    return levels[::-1]


def _buffer(work, name, shape, like):
    """A reusable tensor from `work`: large per-step tensors are allocated once per stage rather than at every
    step, since each fresh large allocation costs page faults on a CPU."""
    t = work.get(name)
    if t is None or t.shape != shape:
        t = work[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return t  # [*shape]


def loss_and_grads(stage: Stage, x: torch.Tensor, basis: torch.Tensor | None, target: torch.Tensor,
                   weight: torch.Tensor, work: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-image mean squared error of `stage` against target [B, N, C], with gradients set on the stage's weights.

    The stage is small and fixed in shape, so its backward pass is written out by hand rather than left to
    autograd: that keeps cos(z) from the forward pass, scales by omega on the small weight matrices instead of the
    large activations, never forms gradients for the coordinates or the frozen basis, reuses its buffers across
    steps (`work`, a dict), and skips autograd's bookkeeping. `weight` [B] scales each image's loss (0 for images
    that stopped). Layer j computes z = omega_j (h W_j + b_j), h' = sin(z) or relu(z); see `network.Stage.forward`.
    A fixed first layer (`Stage.fixed_first`) gets no gradients, and the backward pass stops above it.
    """
    work = {} if work is None else work
    # Shapes: B images, P = n pixels sampled this step, C channels. Layer j's weight is [B, fan_in, fan_out] and its
    # bias [B, fan_out] (the output layer, weights[-1], has fan_out = C). Its input h is [B, P, own] with own = fan_in,
    # except M-Net's layer 1, whose h is [B, P, own] and whose other fan_in - own rows read basis [B, P, fan_in - own].
    weights, biases, omegas = stage.weights, stage.biases, stage.omegas  # len(weights) = len(omegas) + 1
    first = 1 if stage.fixed_first else 0  # the first layer that trains
    b, n = target.shape[:2]  # B, P; target: [B, P, C], weight: [B]
    # x: [B, P, 2] (in_features); inputs[j]: [B, P, own]; slopes[j]: [B, P, fan_out] (None for a fixed first layer)
    inputs, slopes, h = [], [], x  # slopes[j]: d h' / d z of layer j, cos(z) or (z > 0)
    for j, (omega, activation) in enumerate(zip(omegas, stage.activations)):
        inputs.append(h)  # [B, P, own]
        w, bias = weights[j], biases[j].unsqueeze(1)  # [B, fan_in, fan_out], [B, 1, fan_out]
        z = _buffer(work, f"z{j}", (b, n, w.shape[-1]), target)  # [B, P, fan_out]
        if j == 1 and basis is not None:
            # [B, P, own] @ [B, own, fan_out], then += [B, P, fan_in - own] @ [B, fan_in - own, fan_out]
            torch.baddbmm(bias, h, w[:, : h.shape[-1]], beta=omega, alpha=omega, out=z)
            z.baddbmm_(basis, w[:, h.shape[-1] :], alpha=omega)
        else:
            torch.baddbmm(bias, h, w, beta=omega, alpha=omega, out=z)  # [B, P, fan_in] @ [B, fan_in, fan_out]
        if activation == "sin":
            slopes.append(torch.cos(z, out=_buffer(work, f"slope{j}", z.shape, z)) if j >= first else None)
            h = z.sin_()  # [B, P, fan_out], in z's buffer
        else:
            h = z.clamp_(min=0)  # [B, P, fan_out], in z's buffer
            slopes.append(torch.sign(h, out=_buffer(work, f"slope{j}", z.shape, z)))  # 1 where z > 0, else 0
    # Output layer: h [B, P, fan_in] @ weights[-1] [B, fan_in, C] + biases[-1] [B, 1, C] -> [B, P, C]
    residual = torch.baddbmm(biases[-1].unsqueeze(1), h, weights[-1], out=_buffer(work, "out", target.shape, target))
    residual.sub_(target)  # [B, P, C]
    count = residual.shape[1] * residual.shape[2]  # P * C
    per_image = residual.square().sum(dim=(1, 2)) / count  # [B]
    g = residual.mul_(weight.view(-1, 1, 1) * (2 / count))  # d loss / d output: [B, P, C]
    weights[-1].grad = torch.bmm(h.transpose(1, 2), g)  # [B, fan_in, P] @ [B, P, C] -> [B, fan_in, C]
    biases[-1].grad = g.sum(1)  # [B, C]
    # d loss / d h, the output layer's input: [B, P, C] @ [B, C, fan_in] -> [B, P, fan_in]
    g = torch.bmm(g, weights[-1].transpose(1, 2), out=_buffer(work, f"grad{len(omegas) - 1}", h.shape, h))
    for j in reversed(range(first, len(omegas))):
        omega, w, inp = omegas[j], weights[j], inputs[j]  # w: [B, fan_in, fan_out], inp: [B, P, own]
        g = g.mul_(slopes[j])  # d loss / d z, up to the factor omega applied below on small matrices: [B, P, fan_out]
        grad = torch.bmm(inp.transpose(1, 2), g)  # [B, own, P] @ [B, P, fan_out] -> [B, own, fan_out]
        if j == 1 and basis is not None:
            # basis rows: [B, fan_in - own, P] @ [B, P, fan_out], stacked under the own rows: [B, fan_in, fan_out]
            grad = torch.cat([grad, torch.bmm(basis.transpose(1, 2), g)], dim=1)
        weights[j].grad = grad.mul_(omega)  # [B, fan_in, fan_out]
        biases[j].grad = g.sum(1).mul_(omega)  # [B, fan_out]
        if j > first:
            w_own = (w[:, : inp.shape[-1]] * omega).transpose(1, 2)  # [B, fan_out, own]
            # d loss / d h of layer j - 1 (whose fan_out is own): [B, P, fan_out] @ [B, fan_out, own] -> [B, P, own]
            g = torch.bmm(g, w_own, out=_buffer(work, f"grad{j - 1}", inp.shape, inp))
    return per_image  # [B]


class _Adam:
    """Adam over [B, ...] parameters that updates only the images still training (a [B] bool mask)."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.betas, self.eps, self.step_count = list(params), betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, lr, active):
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        for p, m, v in zip(self.params, self.m, self.v):
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = (m / c1).div_((v / c2).sqrt_().add_(self.eps))
            mask = active.view(-1, *[1] * (p.dim() - 1)).to(p.dtype)
            p.sub_(update.mul_(mask), alpha=lr)
            p.grad = None


def _learning_rate(start, final, epoch, max_epochs):
    progress = min(epoch / max(max_epochs - 1, 1), 1.0)
    return final + (start - final) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()  # gradients come from `loss_and_grads`, not autograd
def fit_stage(model: MRNet, i: int, target: torch.Tensor, cfg: FitConfig, generator: torch.Generator,
              progress: Callable[[int, int, torch.Tensor], None] | None = None) -> StageReport:
    """Train stage i of `model` on target [B, C, h, w] (the level's Gaussian image or Laplacian band)."""
    b, c, h, w = target.shape
    device = target.device
    coords = pixel_grid(h, w, device=device)
    residual = target.permute(0, 2, 3, 1).reshape(b, h * w, c)
    basis = None
    if i > 0:  # what the frozen stages contribute here never changes while stage i trains
        outputs, features = model.stage_outputs(coords, i)
        if cfg.target == "gaussian":
            residual = residual - sum(outputs)
        del outputs  # [B, N, C] each: only their sum is needed, and holding them raises the stage's peak
        basis = features if model.arch.model == "m" else None
    stage = model.stages[i]
    fixed = [stage.weights[0]] if model.arch.periodic else []  # periodic frequencies stay on the integer grid
    if stage.fixed_first:  # a Fourier embedding is fixed by design: only the layers above it train
        fixed = [stage.weights[0], stage.biases[0]]
    optimizer = _Adam(p for p in stage.parameters() if not any(p is f for f in fixed))
    max_epochs, lr_start = cfg.per_stage("max_epochs")[i], cfg.per_stage("lr")[i]
    n = h * w
    step_pixels = cfg.batch_pixels if 0 < cfg.batch_pixels < n else n
    active = torch.ones(b, dtype=torch.bool, device=device)
    epochs = torch.zeros(b, dtype=torch.long)
    best = torch.full((b,), math.inf)
    best_epoch = torch.zeros(b, dtype=torch.long)
    last_loss = torch.zeros(b)
    x, bs, work = coords.expand(b, -1, -1), None, {}
    start = time.perf_counter()
    for epoch in range(int(max_epochs)):
        lr = _learning_rate(lr_start, cfg.lr_final, epoch, max_epochs)
        order = torch.randperm(n, generator=generator).to(device) if step_pixels < n else None
        epoch_loss = torch.zeros(b, device=device)
        for first in range(0, n, step_pixels):
            if order is None:
                xs, ys, bs = x, residual, basis
            else:
                idx = order[first : first + step_pixels]
                xs = torch.index_select(coords, 0, idx).expand(b, -1, -1)
                ys = torch.index_select(residual, 1, idx, out=_buffer(work, "ys", (b, len(idx), c), residual))
                if basis is not None:
                    bs = torch.index_select(basis, 1, idx,
                                            out=_buffer(work, "bs", (b, len(idx), basis.shape[-1]), basis))
            per_image = loss_and_grads(stage, xs, bs, ys, active.to(ys.dtype), work)
            optimizer.step(lr, active)
            epoch_loss += per_image * (ys.shape[1] / n)
        epoch_loss = epoch_loss.cpu()
        was_active = active.cpu()
        epochs += was_active.long()
        last_loss = torch.where(was_active, epoch_loss, last_loss)
        improved = epoch_loss < best * (1 - cfg.stall_tol)
        best_epoch = torch.where(improved & was_active, epoch, best_epoch)
        best = torch.where(was_active, torch.minimum(best, epoch_loss), best)
        stop = epoch_loss < cfg.loss_tol
        if cfg.stall_epochs:
            stop |= (epoch - best_epoch) >= cfg.stall_epochs
        active = (was_active & ~stop).to(device)
        if progress:
            progress(i, epoch, last_loss)
        if not active.any():
            break
    seconds = time.perf_counter() - start
    return StageReport(model.arch.stage_params(i), epochs.tolist(), seconds, last_loss.tolist())


def fit(images: torch.Tensor, cfg: FitConfig, device: str | torch.device | None = None,
        progress: Callable[[int, int, torch.Tensor], None] | None = None) -> tuple[MRNet, list[StageReport]]:
    """Fit one MR-Net per image of a batch [B, C, H, W] in [0, 1]. Returns (model, stage reports)."""
    device = devices.resolve(device)
    images = images.to(device=device, dtype=torch.float32)
    model = MRNet(cfg.architecture(images.shape[1]), batch=images.shape[0], seed=cfg.seed).to(device)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    targets = level_targets(images, cfg)
    reports = [fit_stage(model, i, target, cfg, generator, progress) for i, target in enumerate(targets)]
    return model, reports
