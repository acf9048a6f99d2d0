"""Compare an encoding with the original pixels and with the codecs people would otherwise use.

Per image: PSNR and SSIM of each rendered level against the Gaussian pyramid level of the original (re-read by
uri and resized as the job did); the model's bytes against the raw pixels and the original file; and JPEG, WebP
and AVIF encodings of the same pixels at the model's byte budget (the highest quality whose file fits), scored
at full resolution. A few fixed qualities per codec give the rate-distortion curves of the report.
"""
import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from PIL import Image

from mrnet_core.images import decode, resize_long_side, to_pil
from mrnet_core.metrics import psnr, ssim
from mrnet_core.pyramid import gaussian_pyramid

from .sources import filesystem, read_bytes

CODECS = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
# Each codec gets its best settings at the budget: full chroma (at high budgets 4:2:0 alone caps JPEG near 31 dB
# on colour photos) and 4:2:0 (better at low budgets) are both tried and the higher PSNR counts; JPEG's Huffman
# tables are optimised. WebP's lossy mode is always 4:2:0. The curves use the first setting.
OPTIONS = {"jpeg": [{"subsampling": 0, "optimize": True}, {"subsampling": 2, "optimize": True}], "webp": [{}],
           "avif": [{"subsampling": "4:4:4"}, {"subsampling": "4:2:0"}]}
QUALITY_RANGE = (0, 100)  # Pillow's scale for all three; 0 is the smallest file
LADDER = (10, 30, 50, 70, 90, 100)  # qualities sampled for the rate-distortion curves

IMAGES = pa.schema([
    ("image_id", pa.string()), ("uri", pa.string()), ("config_id", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("channels", pa.int32()),
    ("model_bytes", pa.int64()), ("raw_bytes", pa.int64()), ("file_bytes", pa.int64()),
    ("bpp", pa.float64()),
    ("ratio_raw", pa.float64()),  # raw pixel bytes / model bytes (over 1: the model is smaller)
    ("ratio_file", pa.float64()),  # original file bytes / model bytes
    ("level_width", pa.list_(pa.int32())), ("level_height", pa.list_(pa.int32())),  # coarse to fine
    ("psnr", pa.list_(pa.float64())), ("ssim", pa.list_(pa.float64())),  # rendered level vs Gaussian level
    *[f for c in CODECS for f in (
        (f"{c}_quality", pa.int32()), (f"{c}_bytes", pa.int64()), (f"{c}_bpp", pa.float64()),
        (f"{c}_psnr", pa.float64()), (f"{c}_ssim", pa.float64()), (f"{c}_note", pa.string()))],
    ("note", pa.string()),  # why figures are missing (original unreadable, ...), else null
])

CURVES = pa.schema([
    ("image_id", pa.string()), ("config_id", pa.string()), ("codec", pa.string()), ("quality", pa.int32()),
    ("bytes", pa.int64()), ("bpp", pa.float64()), ("psnr", pa.float64()), ("ssim", pa.float64()),
])


def original_pixels(uri, size):
    """The pixels the job encoded: the file at `uri` decoded and shrunk so its long side is at most `size`.

    Only a regular file is read: a uri naming a FIFO or a device (a hostile row) would block or never end.
    """
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind != pafs.FileType.File:
        raise OSError(f"{uri}: {'no such file' if kind == pafs.FileType.NotFound else 'not a regular file'}")
    image, _ = decode(read_bytes(uri), uri)
    if size and max(image.shape[1:]) > size:
        image = resize_long_side(image, size)
    return image


def score(a, b):
    """(PSNR, SSIM) of two [C, H, W] images."""
    return round(psnr(a[None], b[None]).item(), 3), round(ssim(a[None], b[None]).item(), 4)


def encode_with(pil, codec, quality, options=None):
    buf = io.BytesIO()
    pil.save(buf, format=CODECS[codec], quality=quality, **(options or OPTIONS[codec][0]))
    return buf.getvalue()


def decoded(data, channels):
    """A codec's file back as [C, H, W] in [0, 1] with the original's channels (AVIF returns grey as RGB)."""
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)


def fit_budget(pil, codec, budget, options):
    """(quality, bytes) of the highest quality whose file is at most `budget` bytes, or (None, smallest size).

    Binary search: file size grows with quality (near enough monotone for all three codecs).
    """
    lo, hi = QUALITY_RANGE
    top = encode_with(pil, codec, hi, options)
    if len(top) <= budget:
        return hi, top
    bottom = encode_with(pil, codec, lo, options)
    if len(bottom) > budget:
        return None, bottom
    best = (lo, bottom)
    while hi - lo > 1:  # invariant: size(lo) <= budget < size(hi)
        mid = (lo + hi) // 2
        data = encode_with(pil, codec, mid, options)
        if len(data) <= budget:
            lo, best = mid, (mid, data)
        else:
            hi = mid
    return best


def best_at_budget(original, codec, budget):
    """(best, tried): best is ((PSNR, SSIM), quality, file bytes, decoded pixels) of the codec's best file within
    `budget` bytes over its option sets, or None when none fits; tried is [(quality or None, file)] per option set."""
    pil = to_pil(original)
    tried = [fit_budget(pil, codec, budget, options) for options in OPTIONS[codec]]
    fitting = []
    for q, data in tried:
        if q is not None:
            pixels = decoded(data, original.shape[0])
            fitting.append((score(pixels, original), q, data, pixels))
    return max(fitting, key=lambda f: f[0][0], default=None), tried


def codec_at_budget(original, codec, budget):
    """Columns {codec}_quality/bytes/bpp/psnr/ssim/note for one codec at `budget` bytes."""
    pixels = original.shape[1] * original.shape[2]
    best, tried = best_at_budget(original, codec, budget)
    if best is None:
        data = min((data for _, data in tried), key=len)
        return {f"{codec}_quality": None, f"{codec}_bytes": len(data), f"{codec}_bpp": 8 * len(data) / pixels,
                f"{codec}_psnr": None, f"{codec}_ssim": None,
                f"{codec}_note": f"even quality {QUALITY_RANGE[0]} takes {len(data)} bytes, "
                                 f"over the budget of {budget}"}
    (p, s), quality, data, _ = best
    note = f"quality {quality} is the highest and uses only {len(data)} of {budget} bytes" \
        if quality == QUALITY_RANGE[1] and len(data) < budget else None
    return {f"{codec}_quality": quality, f"{codec}_bytes": len(data), f"{codec}_bpp": round(8 * len(data) / pixels, 4),
            f"{codec}_psnr": p, f"{codec}_ssim": s, f"{codec}_note": note}


def curves(original, image_id, config_id):
    """CURVES rows: each codec at the LADDER qualities."""
    pil, pixels, rows = to_pil(original), original.shape[1] * original.shape[2], []
    for codec in CODECS:
        for q in LADDER:
            data = encode_with(pil, codec, q)
            p, s = score(decoded(data, original.shape[0]), original)
            rows.append({"image_id": image_id, "config_id": config_id, "codec": codec, "quality": q,
                         "bytes": len(data), "bpp": round(8 * len(data) / pixels, 4), "psnr": p, "ssim": s})
    return rows


def compare(row, levels, size, border):
    """(IMAGES row, CURVES rows) for one encodings row whose levels (coarse to fine) are already rendered.

    An original that cannot be read any more still gets a row: sizes and ratios, no quality, and a note naming
    the file.
    """
    out = {k: row[k] for k in ("image_id", "uri", "config_id", "width", "height", "channels", "model_bytes",
                               "raw_bytes", "file_bytes", "bpp")}
    out.update(ratio_raw=round(row["raw_bytes"] / row["model_bytes"], 4),
               ratio_file=round(row["file_bytes"] / row["model_bytes"], 4),
               level_width=[lv.shape[2] for lv in levels], level_height=[lv.shape[1] for lv in levels])
    try:
        original = original_pixels(row["uri"], size)
    except (OSError, ValueError) as e:  # ImageError, and pyarrow's ArrowInvalid for a uri it cannot parse
        return {**out, "note": f"original not compared: {e}"}, []
    if tuple(original.shape) != (row["channels"], row["height"], row["width"]):
        return {**out, "note": f"{row['uri']}: the file changed since it was encoded "
                               f"({tuple(original.shape)} now, "
                               f"not {(row['channels'], row['height'], row['width'])})"}, []
    pyramid = gaussian_pyramid(original[None], levels=len(levels), border=border)[::-1]
    scores = [score(lv, g[0]) for lv, g in zip(levels, pyramid)]
    out.update(psnr=[p for p, _ in scores], ssim=[s for _, s in scores])
    for codec in CODECS:
        out.update(codec_at_budget(original, codec, row["model_bytes"]))
    return out, curves(original, row["image_id"], row["config_id"])
