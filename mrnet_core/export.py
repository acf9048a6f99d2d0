"""Texture assets: a model rendered as a mip chain (sizes halving down to 1 px) or at any size, with a manifest."""
import json
import os
import time
from pathlib import Path

from .images import save_png
from .modelfile import ImageMeta
from .network import MRNet
from .render import antialiased_level, render


def mip_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of every mip level, the full size first, each half the last (rounded down, at least 1)."""
    sizes = [(width, height)]
    while sizes[-1] != (1, 1):
        w, h = sizes[-1]
        sizes.append((max(1, w // 2), max(1, h // 2)))
    return sizes


def export_mips(model: MRNet, meta: ImageMeta, folder: Path | str, sizes: list[tuple[int, int]] | None = None) -> dict:
    """Render a one-image model at each size (default: its mip chain) with the anti-aliased level of detail for
    that size; write `mip_<k>.png` (k = 0 largest) and `manifest.json` in `folder`. Returns the manifest."""
    folder = Path(folder)
    sizes = sizes or mip_sizes(meta.width, meta.height)
    entries = []
    for k, (w, h) in enumerate(sizes):
        start = time.perf_counter()
        t = antialiased_level(meta.sizes, w, h)
        name = f"mip_{k}.png" if len(sizes) > 1 else f"texture_{w}x{h}.png"
        save_png(render(model, w, h, t=t, index=0).clamp(0, 1), folder / name)
        entries.append({"level": k, "width": w, "height": h, "t": round(t, 4), "file": name,
                        "seconds": round(time.perf_counter() - start, 4)})
    manifest = {"width": meta.width, "height": meta.height, "channels": meta.channels,
                "periodic": model.arch.periodic, "images": entries}
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / "manifest.json")
    return manifest
