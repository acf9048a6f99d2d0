"""Weight storage: size, quality and speed of each bit depth, with and without quantisation-aware fine-tuning.

Fits one M-Net to a sample photo once, then stores copies of it at each bit depth and prints a table: model bytes,
bpp, bits per parameter, PSNR per level (coarse to fine) of the stored model, and the time to encode and decode
the model file.

    python bench/weight_codec.py [--image samples/astronaut.png] [--size 256] [--preset fast] [--scale 2]
                                 [--column-fan-in 32] [--fine-bits 12]

The last two override `quantize.COLUMN_FAN_IN` and `quantize.FINE_BITS`, to measure other quantisation schemes
(the files then only decode under the same settings).
"""
import argparse
import copy
import time

import torch

from mrnet_core import modelfile, quantize
from mrnet_core.config import make_config
from mrnet_core.encode import measure
from mrnet_core.fit import fit
from mrnet_core.images import read_image, resize_long_side
from mrnet_core.rate import scaled


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="samples/astronaut.png")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--scale", type=float, default=2.0, help="widths relative to the preset's")
    parser.add_argument("--epochs", default="400,300,300")
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--column-fan-in", type=int, default=quantize.COLUMN_FAN_IN,
                        help="weight matrices with this many inputs or more get a step per column")
    parser.add_argument("--fine-bits", type=int, default=quantize.FINE_BITS, help="bits of first layers and biases")
    args = parser.parse_args()
    quantize.COLUMN_FAN_IN, quantize.FINE_BITS = args.column_fan_in, args.fine_bits
    torch.manual_seed(0)
    image = resize_long_side(read_image(args.image)[0], args.size)[None]
    cfg = scaled(make_config(args.preset, {"max_epochs": [int(e) for e in args.epochs.split(",")],
                                           "lr": [5e-3, 3e-3, 2e-3], "lr_final": 1e-4}), args.scale)
    start = time.perf_counter()
    fitted, _ = fit(image, cfg, device="cpu")
    print(f"{args.image} at {image.shape[-1]}x{image.shape[-2]}: {fitted.arch.params():,} parameters, "
          f"fitted in {time.perf_counter() - start:.1f} s")
    h, w = image.shape[-2:]
    meta = modelfile.ImageMeta(w, h, image.shape[-3], cfg.levels, cfg.border)
    print("| storage | bytes | bpp | bits/param | PSNR per level (dB) | encode ms | decode ms |")
    print("|---|---|---|---|---|---|---|")
    rows = [(32, 0), (16, 0), (8, 0), (8, args.qat_epochs), (6, 0), (6, args.qat_epochs), (5, args.qat_epochs),
            (4, args.qat_epochs)]
    for bits, qat in rows:
        model = copy.deepcopy(fitted)
        if qat:
            quantize.finetune(model, image, bits, qat, cfg.qat_lr, cfg.batch_pixels, cfg.levels, cfg.border)
        t0 = time.perf_counter()
        blob = modelfile.to_bytes(model, meta, bits)
        t1 = time.perf_counter()
        modelfile.from_bytes(blob)
        t2 = time.perf_counter()
        record = measure(model, image, cfg, bits)[0][0]
        name = {32: "float32", 16: "float16"}.get(bits, f"{bits}-bit" + (f", {qat} QAT epochs" if qat else ", rounded"))
        levels = " / ".join(f"{lv.psnr:.2f}" for lv in record.levels)
        print(f"| {name} | {len(blob):,} | {8 * len(blob) / (h * w):.3f} | "
              f"{8 * len(blob) / fitted.arch.params():.2f} | "
              f"{levels} | {1000 * (t1 - t0):.1f} | {1000 * (t2 - t1):.1f} |")


if __name__ == "__main__":
    main()
