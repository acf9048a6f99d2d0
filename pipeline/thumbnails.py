"""Thumbnails of an encoding: every level of detail drawn from the weights alone, and a strip of all levels.

Level k (k = 0 coarsest) is drawn at that level's own size with t = k + 1, the level of detail that size can
show: a small thumbnail evaluates only the coarse stages its pixels need, so it is both cheap and free of
aliasing. Nothing here reads the original image.
"""
import torch
from PIL import Image

from mrnet_core.images import png_bytes, to_pil
from mrnet_core.render import render

from . import store

STRIP_HEIGHT = 128  # every level is shown at this height in the strip, so the levels line up
GAP = 4


def render_levels(model, meta):
    """[C, h_k, w_k] in [0, 1] per level, coarse to fine, each at its own resolution."""
    return [render(model, w, h, t=k + 1, index=0).clamp(0, 1) for k, (h, w) in enumerate(meta.sizes)]


def strip(model, meta, height=STRIP_HEIGHT):
    """One PIL image: every level side by side at a common height, each drawn by the network at that size.

    Drawing at display size (rather than enlarging the small thumbnail) shows what the level really holds: the
    band-limited image, smooth rather than blocky.
    """
    n = len(meta.sizes)
    width = max(1, round(meta.width * height / meta.height))
    tiles = [to_pil(render(model, width, height, t=k + 1, index=0).clamp(0, 1)) for k in range(n)]
    sheet = Image.new(tiles[0].mode, (n * width + (n - 1) * GAP, height), "white")  # 255 alone is red in RGB
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (k * (width + GAP), 0))
    return sheet


@torch.no_grad()
def write_thumbnails(model, meta, out, folder):
    """OUT/folder/level_<k>.png for every level and OUT/folder/strip.png; the rendered levels (for the comparison)."""
    levels = render_levels(model, meta)
    for k, image in enumerate(levels):
        store.write_bytes(out, f"{folder}/level_{k}.png", png_bytes(image))
    store.write_bytes(out, f"{folder}/strip.png", png_bytes(strip(model, meta)))
    return levels
