"""Latent pyramids (model g): seconds per fitting step and per image-step, at each size and batch, and per image in the
work after a fit (quantising the MLP and the context model, writing and reading the file; on at most 4 images of the
batch). Prints a markdown table; the quality of a short fit is printed beside it, so that a faster step that fits
worse shows.

    python bench/latent_step.py [--sizes 128,256] [--batches 1,4] [--steps 30] [--threads 2] [--device cuda]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mrnet_core import latent, modelfile  # noqa: E402
from mrnet_core.images import read_image  # noqa: E402
from mrnet_core.metrics import psnr  # noqa: E402

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]


def crops(size, count):
    """`count` size x size RGB crops from the top-left of the bundled photos, resized so that their short side is
    `size`."""
    out = []
    for i in range(count):
        image = read_image(ROOT / "samples" / PHOTOS[i % len(PHOTOS)])[0].expand(3, -1, -1)
        scale = size / min(image.shape[1:])
        shape = (max(size, round(image.shape[1] * scale)), max(size, round(image.shape[2] * scale)))
        out.append(torch.nn.functional.interpolate(image[None], size=shape, mode="area")[0, :, :size, :size])
    return torch.stack(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    print("| size | batch | s per step | s per image-step | PSNR after the steps (dB, mean) | s per image: quantise, "
          "write, read |")
    print("|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            images = crops(size, batch).to(device)
            arch = latent.LatentArchitecture(3, size, size, 7, (16, 16))
            latent.fit(images, arch, 0.003, steps=3)  # warm-up
            sync()
            start = time.perf_counter()
            model = latent.fit(images, arch, 0.003, steps=args.steps)
            sync()
            seconds = (time.perf_counter() - start) / args.steps
            quality = psnr(model.on_pixels(size, size).transpose(1, 2).reshape(images.shape), images).mean()
            # The work after a fit is per image: timed on the first few only, so that large batches stay quick.
            few = min(batch, 4)
            model, images = model.select(list(range(few))), images[:few]
            after = [time.perf_counter()]
            latent.quantise_weights(model, images, model.rate_weights)
            sync()
            after.append(time.perf_counter())
            meta = modelfile.ImageMeta(size, size, 3, arch.levels)
            files = [modelfile.to_bytes(model, meta, index=i) for i in range(few)]
            after.append(time.perf_counter())
            for data in files:
                modelfile.from_bytes(data)
            after.append(time.perf_counter())
            post = ", ".join(f"{(b - a) / few:.3f}" for a, b in zip(after, after[1:]))
            print(f"| {size} | {batch} | {seconds:.3f} | {seconds / batch:.3f} | {float(quality):.2f} | {post} |",
                  flush=True)


if __name__ == "__main__":
    main()
