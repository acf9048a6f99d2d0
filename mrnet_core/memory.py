"""How many bytes encoding a batch takes, so that callers can size batches to a device before it runs out.

`encode_memory_bytes` bounds the peak of `encode.encode` (fit, quantisation-aware fine-tuning, and measuring every
level of the stored model) from the tensors each phase holds at once. It counts float32 elements and is checked
against the allocator's measured peak for S-, L- and M-Nets at two sizes (tests/test_memory.py), so it errs high.
"""
from .config import FitConfig
from .pyramid import level_sizes
from .quantize import BATCH_PIXELS
from .rate import MIN_SCALE, largest_scale, scaled
from .render import CHUNK as RENDER_CHUNK

FLOAT = 4  # bytes


def _widths(arch, i):
    return [arch.stages[i].first, *arch.stages[i].hidden]


def _basis(arch, i):
    """Width of the features stage i reads from stage i - 1 (M-Net only)."""
    return arch.stages[i - 1].hidden[-1] if arch.model == "m" and i > 0 else 0


def _stage_params(arch):
    return [arch.stage_params(i) for i in range(len(arch.stages))]


def _fit(arch, cfg: FitConfig, pixels):
    """Per-image elements of `fit.fit`'s peak; pixels per level, coarse to fine."""
    c = arch.channels
    pyramid = 2 * c * sum(pixels)  # the Gaussian pyramid, and the Laplacian bands or the reversed list's copies
    peak = 0
    for i, n in enumerate(pixels):
        step = cfg.batch_pixels if 0 < cfg.batch_pixels < n else n
        basis, widths = _basis(arch, i), _widths(arch, i)
        # The level's residual target and the frozen stages' features stay for the whole stage. While the frozen
        # stages run over the level, the widest of their layers holds its input, z, omega z and sin at once.
        cached = n * (2 * c + basis)
        frozen = n * (i * c + 4 * max((max(_widths(arch, j)) for j in range(i)), default=0))
        # One Adam step: z and its slope per layer, a gradient buffer per layer, the sampled targets and basis.
        step_elements = step * (3 * sum(widths) + 2 * basis + 5 * c)
        adam = 8 * arch.stage_params(i)  # weights, gradients, two moments, and the update's temporaries
        peak = max(peak, cached + max(frozen, step_elements) + adam)
    return pyramid + peak


def _finetune(arch, cfg: FitConfig, pixels):
    """Per-image elements of `quantize.finetune`: every level's autograd graph over its sampled pixels at once."""
    if cfg.weight_bits > 8 or cfg.qat_epochs <= 0:
        return 0
    c, batch_pixels = arch.channels, cfg.batch_pixels or BATCH_PIXELS
    graph = 0
    for k, n in enumerate(pixels):
        sampled = min(n, batch_pixels)
        # Stages 0..k run at level k: each layer keeps z, omega z and sin for the backward pass, and the backward
        # pass holds a gradient as large as any of them.
        graph += sampled * sum(4 * sum(_widths(arch, j)) + 2 * _basis(arch, j) + 2 * c for j in range(k + 1))
    targets = 3 * c * sum(pixels)  # the pyramid, its [N, C] copies, and the sampled targets
    params = 14 * sum(_stage_params(arch))  # weights, fake-quantised copies and their temporaries, Adam's state
    return graph + targets + params


def _measure(arch, pixels, batch):
    """Elements of measuring every level of the stored model (`encode.level_metrics`) for the whole batch."""
    c, n = arch.channels, pixels[-1]
    # The level's render (its chunks, their concatenation, the clamped copy) and SSIM's filtered images.
    images = batch * (24 * c * n + c * sum(pixels))
    # One render chunk (pixels x images): every stage's output, and the widest layer's input, z and sin.
    widest = max(max(_widths(arch, j)) + _basis(arch, j) for j in range(len(arch.stages)))
    return images + min(n * batch, RENDER_CHUNK) * (len(arch.stages) * c + 4 * widest + 3 * c)


def _rate_controlled(cfg: FitConfig, channels, height, width):
    """cfg with the widest layers rate control can choose for it: the bpp cap's, or the config's own."""
    if not (cfg.target_bpp or cfg.target_psnr):
        return cfg
    scale = 1.0
    if cfg.target_bpp:
        budget = int(cfg.target_bpp * height * width / 8)
        try:
            scale = largest_scale(cfg, channels, height, width, min(cfg.weight_bits, 8), budget)
        except ValueError:  # no model fits the budget; encode will say so
            scale = MIN_SCALE
    return scaled(cfg, scale)


def _latent(cfg: FitConfig, channels, height, width, batch):
    """Elements of `encode.encode_latent`'s peak: one step of `latent.fit` holds, for every level's pixels, each
    grid's interpolation, the MLP's activations and their gradients, and per image the latents with Adam's state;
    measuring then holds what `_measure` counts for an MR-Net (the renders and SSIM's filtered images)."""
    arch = cfg.latent_architecture(channels, height, width)
    pixels = [h * w for h, w in arch.level_shapes]  # per level
    latents = sum(h * w for h, w in arch.sizes)
    context = 16 if arch.context else 0  # per latent: the context model's inputs, hidden units, outputs (13 measured)
    per_pixel = 10 * arch.grid_count + 3 * sum(arch.hidden) + 4 * channels
    state = 6 * arch.params()  # values, gradients, Adam's two moments, the noisy copies and their rounding
    fit = batch * (sum(pixels) * per_pixel + context * latents + state)
    measure = batch * (24 * channels * pixels[-1] + channels * sum(pixels) + 6 * arch.params())
    return max(fit, measure) + 2 * sum(pixels)


def encode_memory_bytes(cfg: FitConfig, channels: int, height: int, width: int, batch: int = 1) -> int:
    """A bound on the peak bytes of `encode.encode` on `batch` images of height x width."""
    if cfg.model == "g":
        return FLOAT * (batch * channels * height * width + _latent(cfg, channels, height, width, batch))
    cfg = _rate_controlled(cfg, channels, height, width)
    arch = cfg.architecture(channels)
    pixels = [h * w for h, w in level_sizes(height, width, levels=cfg.levels)][::-1]
    inputs = batch * channels * pixels[-1]
    phases = (batch * _fit(arch, cfg, pixels), batch * _finetune(arch, cfg, pixels), _measure(arch, pixels, batch))
    coords = 2 * sum(pixels)  # every level's coordinates
    return FLOAT * (inputs + max(phases) + coords)


def max_batch(cfg: FitConfig, channels: int, height: int, width: int, memory_bytes: int,
              limit: int = 1 << 16) -> int:
    """The most images of one size (up to `limit`) that `encode.encode` takes within `memory_bytes`; 0 if none."""
    cfg = _rate_controlled(cfg, channels, height, width)
    lo, hi = 0, limit  # the answer lies in [lo, hi]; the bound grows with the batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if encode_memory_bytes(cfg, channels, height, width, mid) <= memory_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo
