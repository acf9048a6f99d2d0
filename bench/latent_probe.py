"""Probe for issue 16 (latent pyramids): a Cool-chic-like latent pyramid read by one small synthesis MLP, with the
MR-Net's level of detail. Grid k (k = 0 finest) has one channel at 1/2^k of the image side; every grid is upsampled
to the pixels evaluated and the synthesis reads them all at once. Level of detail: at level j the grids finer than
j are switched off (weighted by c(t) as MR-Net stages are) and the output is scored against level j of the Gaussian
pyramid, so one file renders every level. Latents are trained through uniform noise, then straight-through
rounding; their rate is the exact bin probability of a Laplace whose mean and scale come from a small causal
context model over already decoded latents (or, with --factorised, one zero-mean Laplace per grid). Network weights
are quantised with the step that minimises the rate-distortion loss and counted at their empirical entropy.

This is a research probe, not the product: autograd, one image at a time, no file format, float context model (a
decoder would need integer arithmetic to be exact across machines). What it measured is in docs/performance.md
("Latent pyramids").

    .venv/bin/python bench/latent_probe.py samples/astronaut.png --steps 4000 --lams 0.01,0.003,0.001
"""
import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mrnet_core.pyramid import gaussian_pyramid  # noqa: E402

CONTEXT = 5  # side of the causal window of the context model: the 12 latents before the centre in raster order


def load(path, size):
    im = Image.open(path).convert("RGB")
    im.thumbnail((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None], im


def psnr8(out, ref):
    """PSNR of out against ref, both [1, 3, h, w] in [0, 1], after out is stored as 8-bit pixels."""
    out = torch.round(out.clamp(0, 1) * 255) / 255
    return 10 * math.log10(1 / F.mse_loss(out, ref).item())


def codec_psnr(im, nbytes, fmt):
    """PSNR of the best quality of `fmt` whose file fits in nbytes, or None."""
    ref, best = np.asarray(im).astype(np.float64), None
    for q in range(0, 101):
        buf = io.BytesIO()
        im.save(buf, fmt, quality=q)
        if buf.tell() <= nbytes:
            out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64)
            best = max(best or 0, 10 * math.log10(255**2 / max(((out - ref) ** 2).mean(), 1e-10)))
    return best


def laplace_bits(y, mu, log_b):
    """Bits of each latent y under Laplace(mu, b), integrated over its unit bin."""
    b = log_b.clamp(-4, 6).exp()

    def cdf(v):
        tail = 0.5 * torch.exp(-v.abs())
        return torch.where(v < 0, tail, 1 - tail)
    centred = (y - mu) / b
    return -torch.log2((cdf(centred + 0.5 / b) - cdf(centred - 0.5 / b)).clamp_min(2**-24))


class LatentPyramid(torch.nn.Module):
    def __init__(self, h, w, levels, hidden, context_hidden, factorised, upsample):
        super().__init__()
        self.upsample = upsample
        self.grids = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(1, 1, math.ceil(h / 2**k), math.ceil(w / 2**k))) for k in range(levels)])
        widths = [levels, *hidden, 3]
        self.synthesis = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        mask = torch.zeros(1, 1, CONTEXT, CONTEXT)
        mask.view(-1)[: CONTEXT * CONTEXT // 2] = 1  # rows above, and the left part of the centre row
        self.register_buffer("mask", mask)
        self.context = torch.nn.ModuleList([torch.nn.Conv2d(1, context_hidden, CONTEXT, padding=CONTEXT // 2),
                                            torch.nn.Conv2d(context_hidden, 2, 1)])
        self.factorised = torch.nn.Parameter(torch.zeros(levels)) if factorised else None

    def latents(self, mode):
        if mode == "noise":
            return [g + torch.rand_like(g) - 0.5 for g in self.grids]
        if mode == "ste":
            return [g + (torch.round(g) - g).detach() for g in self.grids]
        return [torch.round(g) for g in self.grids]

    def bits(self, latents):
        total = 0
        for k, y in enumerate(latents):
            if self.factorised is not None:
                total = total + laplace_bits(y, torch.zeros(()), self.factorised[k]).sum()
                continue
            first, second = self.context
            a = F.conv2d(y, first.weight * self.mask, first.bias, padding=CONTEXT // 2)
            mu, log_b = second(F.relu(a)).unbind(1)
            total = total + laplace_bits(y[:, 0], mu, log_b).sum()
        return total

    def forward(self, latents, h, w, level):
        """The image at level `level` (0 = full detail; may be fractional) drawn at h x w pixels."""
        features = []
        for k, y in enumerate(latents):
            weight = min(max(k + 1 - level, 0.0), 1.0)  # c(t): grids finer than the level fade out
            up = F.interpolate(y, size=(h, w), mode=self.upsample, align_corners=False)
            features.append(up * weight)
        x = torch.cat(features, 1).permute(0, 2, 3, 1)
        for i, layer in enumerate(self.synthesis):
            x = layer(x)
            if i < len(self.synthesis) - 1:
                x = F.relu(x)
        return x.permute(0, 3, 1, 2)


def entropy_bits(codes):
    """Empirical entropy of integer codes plus 16 bits per distinct value for the table: what an adaptive coder
    would get close to."""
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / counts.sum()
    return float(-(counts * torch.log2(p)).sum()) + 16 * len(counts)


def quantise_weights(model, modules, distortion, lam, pixels, latents):
    """Quantise the weights of `modules` with the step (a power of two) that minimises distortion + lam * rate;
    returns their bits."""
    saved = [p.detach().clone() for m in modules for p in m.parameters()]
    best = None
    for e in range(3, 13):
        step = 2.0**-e
        codes = []
        with torch.no_grad():
            for p, keep in zip((p for m in modules for p in m.parameters()), saved):
                c = torch.round(keep / step)
                p.copy_(c * step)
                codes.append(c.flatten())
            bits = entropy_bits(torch.cat(codes)) + 8
            loss = distortion() + lam * (bits + float(model.bits(latents))) / pixels
        if best is None or loss < best[0]:
            best = (loss, step, bits)
    with torch.no_grad():
        for p, keep in zip((p for m in modules for p in m.parameters()), saved):
            p.copy_(torch.round(keep / best[1]) * best[1])
    return best[2]


def run(path, lam, args):
    x, im = load(path, args.size)
    h, w = x.shape[-2:]
    pixels = h * w
    pyramid = gaussian_pyramid(x, levels=args.lod)  # finest first
    model = LatentPyramid(h, w, args.levels, args.hidden, args.context_hidden, args.factorised, args.upsample)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    start = time.perf_counter()

    def distortion(latents, levels=range(args.lod)):
        return sum(F.mse_loss(model(latents, g.shape[-2], g.shape[-1], j), g) * (1 if j == 0 else args.lod_weight)
                   for j, g in zip(levels, (pyramid[j] for j in levels)))

    for step in range(args.steps):
        noisy = step < args.noise_share * args.steps
        scale = 1.0 if noisy else 0.1
        lr = args.lr * scale * (0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        latents = model.latents("noise" if noisy else "ste")
        loss = distortion(latents) + lam * model.bits(latents) / pixels
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    latents = model.latents("round")
    with torch.no_grad():
        weight_bits = quantise_weights(model, list(model.synthesis), lambda: float(distortion(latents)), lam, pixels,
                                       latents)
        if args.factorised:
            weight_bits += 8 * args.levels
        else:
            weight_bits += quantise_weights(model, list(model.context), lambda: float(distortion(latents)), lam,
                                            pixels, latents)
        latent_bits = float(model.bits(latents))
        psnr = [psnr8(model(latents, g.shape[-2], g.shape[-1], j), g) for j, g in enumerate(pyramid)]
    total = (latent_bits + weight_bits) / 8 + 16  # 16 bytes of header: sizes, steps, checksum
    return {"photo": Path(path).name, "lambda": lam, "bpp": 8 * total / pixels, "latent bpp": latent_bits / pixels,
            "psnr": psnr, "jpeg": codec_psnr(im, total, "JPEG"), "webp": codec_psnr(im, total, "WEBP"),
            "avif": codec_psnr(im, total, "AVIF"), "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--levels", type=int, default=7, help="latent grids, 1/1 to 1/2^(levels-1) of the side")
    parser.add_argument("--lod", type=int, default=4, help="levels of detail trained and scored")
    parser.add_argument("--lod-weight", type=float, default=0.1, help="loss weight of each coarser level")
    parser.add_argument("--hidden", type=int, nargs="*", default=[16, 16], help="synthesis hidden widths")
    parser.add_argument("--context-hidden", type=int, default=8)
    parser.add_argument("--factorised", action="store_true", help="zero-mean Laplace per grid, no context model")
    parser.add_argument("--upsample", default="bilinear", choices=["bilinear", "bicubic"])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--noise-share", type=float, default=0.8, help="share of steps trained through noise")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--lams", default="0.01,0.003,0.001", help="rate weights, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| photo | lambda | bpp | latent bpp | PSNR per level, full first (dB) | JPEG | WebP | AVIF | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.images:
        for lam in (float(v) for v in args.lams.split(",")):
            torch.manual_seed(0)
            r = run(path, lam, args)
            show = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"| {r['photo']} | {lam:g} | {r['bpp']:.3f} | {r['latent bpp']:.3f} | "
                  f"{' / '.join(f'{p:.2f}' for p in r['psnr'])} | {show(r['jpeg'])} | {show(r['webp'])} | "
                  f"{show(r['avif'])} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
