"""Reading images into float tensors, with every conversion said, and writing them back as PNG, JPEG or WebP."""
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own guard against decompression bombs; callers may lower it.
DEFAULT_MAX_PIXELS = 178_956_970


class ImageError(ValueError):
    """An image that cannot be used: the message names the file and the reason."""

    def __init__(self, name, reason, kind="unreadable"):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason, self.kind = str(name), reason, kind


def decode(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, list[str]]:
    """Decode image bytes into (tensor [C, H, W] float32 in [0, 1], notes). C is 1 (grey) or 3 (RGB).

    Notes list every conversion made (alpha composited on white, palette expanded, CMYK to RGB, 16-bit scaled,
    first frame of an animation, EXIF rotation), so a caller can record them.
    """
    if not data:
        raise ImageError(name, "empty file", "empty")
    notes = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(name, f"{width}x{height} is over the limit of {max_pixels} pixels", "too_large")
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of {im.n_frames} frames")
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # the EXIF orientation tag
                notes.append("rotated by EXIF orientation")
            pixels, mode_notes = _to_array(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image Pillow can read", "not_an_image") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"decompression bomb: {e}", "too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(name, f"corrupt or truncated image: {e}", "corrupt") from None
    notes.extend(mode_notes)
    if min(pixels.shape[:2]) < 1:
        raise ImageError(name, "image has no pixels", "empty")
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), notes


def _to_array(im):
    """A Pillow image in any mode as [H, W, C] float32 in [0, 1] with C in (1, 3), and the conversions made."""
    mode, notes = im.mode, []
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        notes.append(f"{mode} scaled from 0..{int(peak)}")
        return (np.clip(a / peak, 0, 1)[..., None]).astype(np.float32), notes
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        notes.append("32-bit float clipped to 0..1")
        return np.clip(np.nan_to_num(a), 0, 1)[..., None], notes
    if mode == "P":
        has_alpha = "transparency" in im.info or im.palette.mode == "RGBA"
        im = im.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette expanded")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba).convert("RGB" if mode != "LA" else "L")
        notes.append("alpha composited on white")
    elif mode == "1":
        im = im.convert("L")
        notes.append("1-bit expanded to grey")
    elif mode not in ("L", "RGB"):
        im = im.convert("RGB")
        notes.append(f"{mode} converted to RGB")
    a = np.asarray(im, dtype=np.float32) / 255.0
    return (a[..., None] if a.ndim == 2 else a), notes


def read_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, list[str]]:
    """Read an image file: (tensor [C, H, W], notes). Raises ImageError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror or e}", "unreadable") from None
    return decode(data, os.fspath(path), max_pixels)


def resize_long_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [C, H, W] so that its long side is `size` pixels (anti-aliased bicubic); other sides round."""
    c, h, w = image.shape
    scale = size / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return image
    out = F.interpolate(image[None], size=new, mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] float in [0, 1] to a Pillow image (L or RGB), rounding to 8 bits."""
    a = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


# What `save_image` writes, by the file's suffix; lossy formats at quality 95, so a render keeps its detail.
WRITE_FORMATS = {".png": ("PNG", {}), ".jpg": ("JPEG", {"quality": 95}), ".jpeg": ("JPEG", {"quality": 95}),
                 ".webp": ("WEBP", {"quality": 95})}


def save_image(image: torch.Tensor | Image.Image, path: Path | str) -> None:
    """Write [C, H, W] (or a Pillow image) in the format its suffix names (WRITE_FORMATS); ValueError for another."""
    path = Path(path)
    if path.suffix.lower() not in WRITE_FORMATS:
        raise ValueError(f"{path}: cannot write {path.suffix or 'a file without a suffix'}; use "
                         f"{', '.join(WRITE_FORMATS)}")
    _write(image, path, *WRITE_FORMATS[path.suffix.lower()])


def save_png(image: torch.Tensor | Image.Image, path: Path | str) -> None:
    """Write [C, H, W] (or a Pillow image) as PNG, whatever the suffix."""
    _write(image, Path(path), "PNG", {})


def png_bytes(image: torch.Tensor | Image.Image) -> bytes:
    """[C, H, W] (or a Pillow image) as the bytes of a PNG file."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else to_pil(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(image, path, image_format, options):
    """Atomically: written under a hidden name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    (image if isinstance(image, Image.Image) else to_pil(image)).save(tmp, format=image_format, **options)
    os.replace(tmp, path)
