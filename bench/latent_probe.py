"""Probe for issue 16 (latent pyramids): an M-Net whose stage i also reads a quantised latent grid at its level's
resolution, trained with uniform noise as the quantisation proxy (straight-through rounding for the last 30% of
steps) and a factorised zero-mean Laplace rate per grid channel; weights counted at 8 bits less the 1.5 bits
entropy coding saves here. Prints bpp and PSNR per level beside JPEG and WebP at the same bytes.

This is a research probe, not the product: autograd, one image at a time, no file format. What it measured is in
docs/performance.md ("Latent pyramids: first probe").

    .venv/bin/python bench/latent_probe.py samples/astronaut.png --steps 1500 --lams 0.004,0.001
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
from mrnet_core.pyramid import gaussian_pyramid, pixel_grid  # noqa: E402


def load(path, size):
    im = Image.open(path).convert("RGB")
    im.thumbnail((size, size), Image.LANCZOS)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None], im


def codec_psnr(im, nbytes, fmt):
    """PSNR of the best quality of `fmt` whose file fits in nbytes, or None."""
    ref, best = np.asarray(im).astype(np.float64), None
    for q in range(1, 101):
        buf = io.BytesIO()
        im.save(buf, fmt, quality=q)
        if buf.tell() <= nbytes:
            out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64)
            best = 10 * math.log10(255**2 / ((out - ref) ** 2).mean())
    return best


def laplace_bits(q, log_scale):
    """Bits of integer latents q [C, h, w] under a zero-mean Laplace per channel, integrated over each bin."""
    b = log_scale.exp().view(-1, 1, 1)

    def cdf(v):
        return 0.5 + 0.5 * torch.sign(v) * (1 - torch.exp(-v.abs() / b))
    return -torch.log2((cdf(q + 0.5) - cdf(q - 0.5)).clamp_min(1e-9)).sum()


def uniform(*shape, bound):
    return torch.nn.Parameter((torch.rand(*shape) * 2 - 1) * bound)


class LatentMNet(torch.nn.Module):
    """Stage i: sin(omega_0 (x Wx + b) + gain z_i(x) Wz) -> sin hidden layer reading the previous stage's features
    too (M-Net) -> linear output; z_i is grid i bilinearly upsampled to the pixels evaluated."""

    def __init__(self, sizes, latent, first, hidden, omega=30.0, channels=3, gain=1.0):
        super().__init__()
        self.omega, self.gain = omega, gain
        self.grids = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(c, h, w))
                                             for c, (h, w) in zip(latent, sizes)])
        self.log_scales = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(c)) for c in latent])
        self.weights = torch.nn.ParameterList()
        previous = 0
        for c, f, h in zip(latent, first, hidden):
            fan_in = f + previous
            self.weights.extend([uniform(2, f, bound=1), uniform(c, f, bound=1), uniform(f, bound=1),
                                 uniform(fan_in, h, bound=math.sqrt(6 / fan_in) / 30),
                                 uniform(h, bound=1 / math.sqrt(fan_in)),
                                 uniform(h, channels, bound=math.sqrt(6 / h) / 30),
                                 torch.nn.Parameter(torch.zeros(channels))])
            previous = h

    def latents(self, mode):
        if mode == "noise":
            return [g + torch.rand_like(g) - 0.5 for g in self.grids]
        if mode == "ste":
            return [g + (torch.round(g) - g).detach() for g in self.grids]
        return [torch.round(g) for g in self.grids]

    def forward(self, h, w, t, latents):
        xy = pixel_grid(h, w)
        total, basis = 0, None
        for i in range(min(len(self.grids), math.ceil(t))):
            wx, wz, b0, w1, b1, wo, bo = self.weights[7 * i: 7 * i + 7]
            z = F.interpolate(latents[i][None], size=(h, w), mode="bilinear", align_corners=False)[0]
            z = z.reshape(z.shape[0], -1).t()
            a = torch.sin(self.omega * (xy @ wx + b0) + self.gain * (z @ wz))
            if basis is not None:
                a = torch.cat([a, basis], 1)
            basis = torch.sin(30 * (a @ w1 + b1))
            total = total + min(max(t - i, 0), 1) * (basis @ wo + bo)
        return total.t().reshape(1, -1, h, w)


def run(path, lam, args):
    x, im = load(path, args.size)
    levels = gaussian_pyramid(x, levels=args.levels)[::-1]
    n = args.levels
    model = LatentMNet([g.shape[-2:] for g in levels], [args.channels] * n, args.first[:n], args.hidden[:n],
                       gain=args.gain)
    groups = [{"params": list(model.weights), "lr": 3e-3}, {"params": list(model.grids), "lr": 3e-2},
              {"params": list(model.log_scales), "lr": 1e-2}]
    optimizer = torch.optim.Adam(groups)
    pixels, start = x.shape[-1] * x.shape[-2], time.perf_counter()
    for step in range(args.steps):
        for group, lr in zip(optimizer.param_groups, (3e-3, 3e-2, 1e-2)):
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        latents = model.latents("noise" if step < 0.7 * args.steps else "ste")
        loss = sum(F.mse_loss(model(g.shape[-2], g.shape[-1], k + 1, latents), g) * (1 if k == n - 1 else 0.1)
                   for k, g in enumerate(levels))
        bits = sum(laplace_bits(q, s) for q, s in zip(latents, model.log_scales))
        (loss + lam * bits / pixels).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        latents = model.latents("round")
        bits = float(sum(laplace_bits(q, s) for q, s in zip(latents, model.log_scales)))
        weights = sum(p.numel() for p in model.weights)
        for p in model.weights:  # 8-bit weights, one step per tensor
            step = p.abs().max() / 127
            p.copy_(torch.round(p / step) * step)
        psnr = [10 * math.log10(1 / F.mse_loss(model(g.shape[-2], g.shape[-1], k + 1, latents).clamp(0, 1),
                                                g).item()) for k, g in enumerate(levels)]
    total = bits / 8 + weights * 6.5 / 8
    return {"photo": Path(path).name, "lambda": lam, "bpp": 8 * total / pixels, "latent bpp": bits / pixels,
            "psnr": psnr, "jpeg": codec_psnr(im, total, "JPEG"), "webp": codec_psnr(im, total, "WEBP"),
            "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--channels", type=int, default=2, help="latent channels per level")
    parser.add_argument("--first", type=int, nargs="+", default=[8, 8, 12, 12])
    parser.add_argument("--hidden", type=int, nargs="+", default=[8, 8, 12, 12])
    parser.add_argument("--gain", type=float, default=1.0, help="scale of the latents in the first layer")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lams", default="0.004,0.001", help="rate weights, comma-separated")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print("| photo | lambda | bpp | latent bpp | PSNR per level (dB) | JPEG same bytes | WebP same bytes | s |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.images:
        for lam in (float(v) for v in args.lams.split(",")):
            r = run(path, lam, args)
            show = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"| {r['photo']} | {lam:g} | {r['bpp']:.3f} | {r['latent bpp']:.3f} | "
                  f"{' / '.join(f'{p:.2f}' for p in r['psnr'])} | {show(r['jpeg'])} | {show(r['webp'])} | "
                  f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
