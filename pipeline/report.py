"""OUT/report.html: one self-contained page (images embedded as data URIs) about a config's encodings.

Rate-distortion plot (MR-Net against JPEG, WebP and AVIF), PSNR per level, the comparison table, crops of the
best, median and worst images beside each codec at the same bytes, every image with its level strip (collapsed),
the failures and the config. The plots (`plots.py`) are also written to OUT/report/ so they can be logged as
artifacts.
"""
import io
import json
import statistics

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from PIL import Image

from mrnet_core.images import png_bytes
from mrnet_core.metrics import is_lossless, lossy_mean

from . import store
from .collection import batches
from .compare import CODECS, CURVES, IMAGES, best_at_budget, decoded, original_pixels
from .page import CHECK_SCRIPT, STYLE, data_uri, esc, fmt, versus
from .plots import COLORS, NAMES, rd_plot, svg_plot
from .viewer import VIEWER_IMAGES, entries_from_out
from .viewer import page as viewer_page

REPORT_COLUMNS = [n for n in IMAGES.names if n != "config_id"]  # what the page shows of each image
ROWS_AT_ONCE = 256  # comparison rows turned into Python objects at a time while the page is written


def level_plot(rows):
    """PSNR of each level against its Gaussian level: every image thin, the mean bold. rows: PSNR lists."""
    series = [("", "#f2b8b8", list(enumerate(p)), "line") for p in rows]
    if rows:
        n = max(len(p) for p in rows)
        mean = [(k, statistics.fmean(p[k] for p in rows if len(p) > k)) for k in range(n)]
        series.append(("mean", COLORS["mrnet"], mean, "line"))
    return svg_plot(series, "level k (0 = coarsest)", "PSNR (dB) vs Gaussian level", title="PSNR per level",
                    integer_x=True)


def curve_means(out, is_config):
    """{codec: [(mean bpp, mean PSNR) per quality, low to high]}, summed a batch of curves rows at a time."""
    sums = {}
    for b in batches(out, "comparison/curves", ["codec", "quality", "bpp", "psnr"], is_config, CURVES):
        for codec, quality, bpp, psnr in zip(*(b.column(c).to_pylist() for c in ("codec", "quality", "bpp", "psnr"))):
            s = sums.setdefault((codec, quality), [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + bpp, s[1] + psnr, s[2] + 1
    return {codec: [(b / n, p / n) for (c, _), (b, p, n) in sorted(sums.items()) if c == codec] for codec in CODECS}


def name_of(uri):
    return uri.rstrip("/").rsplit("/", 1)[-1]


def strip_img(out, image_id):
    if not store.is_image_id(image_id):  # it names a folder: anything else could point outside OUT
        return '<span class="muted">no thumbnails</span>'
    data = store.read_small(out, f"thumbnails/{image_id}/strip.png", THUMBNAIL_BYTES)
    if data is None:
        return '<span class="muted">no thumbnails</span>'
    return f'<img alt="levels of {esc(image_id[:12])}" src="{data_uri(data, "image/png")}">'


TABLE_HEAD = ("<table><tr><th>image</th><th>size</th><th>MR-Net bytes</th><th>bpp</th><th>PSNR</th><th>SSIM</th>"
              "<th>raw / model</th><th>file / model</th>"
              + "".join(f"<th>{NAMES[c]} q</th><th>{NAMES[c]} bpp</th><th>{NAMES[c]} PSNR</th>" for c in CODECS)
              + "<th>note</th></tr>")


def table_row(r):
    """One row of the comparison table."""
    mr = r["psnr"][-1] if r["psnr"] else None
    cells = [f'<td class="l">{esc(name_of(r["uri"]))}</td><td>{r["width"]}x{r["height"]}</td>',
             f"<td>{r['model_bytes']:,}</td><td>{fmt(r['bpp'])}</td><td>{fmt(mr)}</td>"
             f"<td>{fmt(r['ssim'][-1] if r['ssim'] else None, 4)}</td>"
             f"<td>{fmt(r['ratio_raw'])}</td><td>{fmt(r['ratio_file'])}</td>"]
    notes = [r["note"]] if r["note"] else []
    for c in CODECS:
        p = r[f"{c}_psnr"]
        cls = versus(mr, p)
        cells.append(f"<td>{r[f'{c}_quality'] if r[f'{c}_quality'] is not None else '–'}</td>"
                     f"<td>{fmt(r[f'{c}_bpp'])}</td><td{cls}>{'lossless' if is_lossless(p) else fmt(p)}</td>")
        if r[f"{c}_note"]:
            notes.append(f"{NAMES[c]}: {r[f'{c}_note']}")
    cells.append(f'<td class="l muted">{esc("; ".join(notes))}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


EMBEDDED_STRIPS = 200  # level strips embedded in the page; later images link to OUT/thumbnails/ (a big job's page
# would otherwise hold every thumbnail it made)
CROP = 64  # side of the equal-bytes crops, in pixels of the image
THUMBNAIL_BYTES = 64 << 20  # a thumbnail PNG larger than this was not written by render-collection: not read
CROP_ZOOM = 3


def image_entry(out, r, embed=True):
    """One image's collapsible line: its figures, and its level strip when opened."""
    figures = (f'{fmt(r["psnr"][-1])} dB at {fmt(r["bpp"])} bpp; levels {" / ".join(fmt(p) for p in r["psnr"])} dB'
               if r["psnr"] else esc(r["note"] or "not compared"))
    if embed:
        strip = strip_img(out, r["image_id"])
    elif store.is_image_id(r["image_id"]):
        strip = f'<img loading="lazy" alt="levels" src="thumbnails/{r["image_id"]}/strip.png">'
    else:
        strip = '<span class="muted">no thumbnails</span>'
    return (f'<details class="strip"><summary>{esc(name_of(r["uri"]))}: {figures}</summary>{strip}</details>')


def most_detailed_window(image, side):
    """(top, left) of the side x side window of [C, H, W] with the most detail (gradient energy), on a half-side
    grid."""
    if min(image.shape[1:]) < 2:  # no differences to measure
        return 0, 0
    grey = image.mean(0)
    energy = (grey[1:, :-1] - grey[:-1, :-1]).abs() + (grey[:-1, 1:] - grey[:-1, :-1]).abs()
    stride = max(1, side // 2)
    pooled = torch.nn.functional.avg_pool2d(energy[None, None], min(side - 1, *energy.shape) or 1, stride)[0, 0]
    flat = int(pooled.argmax())
    top, left = divmod(flat, pooled.shape[1])
    return min(top * stride, image.shape[1] - side), min(left * stride, image.shape[2] - side)


def crops(out, r, size):
    """Side-by-side crops of one image at equal bytes: the original, the MR-Net's full-resolution render and each
    codec's file at the MR-Net's bytes. A line saying why, when the original or the render cannot be read."""
    title = f'<p>{esc(name_of(r["uri"]))}: {fmt(r["bpp"])} bpp, {r["model_bytes"]:,} bytes</p>'
    if not store.is_image_id(r["image_id"]) or not r["psnr"]:
        return title + '<p class="muted">not compared</p>'
    try:
        original = original_pixels(r["uri"], size)
    except (OSError, ValueError) as e:
        return title + f'<p class="muted">original not shown: {esc(e)}</p>'
    render = store.read_small(out, f"thumbnails/{r['image_id']}/level_{len(r['psnr']) - 1}.png", THUMBNAIL_BYTES)
    if render is None or tuple(original.shape) != (r["channels"], r["height"], r["width"]):
        return title + '<p class="muted">the original or its render changed since it was compared</p>'
    try:
        with Image.open(io.BytesIO(render)) as im:  # the header alone: a planted file of another size is not decoded
            if im.size != (r["width"], r["height"]):
                return title + '<p class="muted">its render is not the size of the image</p>'
        rendered = decoded(render, r["channels"])
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return title + f'<p class="muted">its render cannot be read: {esc(e)}</p>'
    side = min(CROP, r["width"], r["height"])
    top, left = most_detailed_window(original, side)
    window = (slice(None), slice(top, top + side), slice(left, left + side))
    shown = [("original", original), (f"MR-Net, {fmt(r['psnr'][-1])} dB", rendered)]
    for c in CODECS:
        best, _ = best_at_budget(original, c, r["model_bytes"])
        if best is None:
            shown.append((f"{NAMES[c]}: does not fit in {r['model_bytes']:,} bytes", None))
        else:
            (p, _), quality, data, pixels = best
            shown.append((f"{NAMES[c]} q {quality}, {len(data):,} B, {fmt(p)} dB", pixels))
    figures = []
    for caption, pixels in shown:
        img = ('<div class="muted" style="width:{0}px;height:{0}px">–</div>'.format(side * CROP_ZOOM)
               if pixels is None else
               f'<img alt="{esc(caption)}" width="{side * CROP_ZOOM}" height="{side * CROP_ZOOM}" '
               f'src="{data_uri(png_bytes(pixels[window].contiguous()), "image/png")}">')
        figures.append(f"<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>")
    return title + f'<div class="crops">{"".join(figures)}</div>'


def write_report(out, config_id):
    """Write OUT/report.html and OUT/report/{rate_distortion,psnr_per_level}.svg; the report's path.

    The page's columns of every image are held as one Arrow table (no Python object per row), sorted as the
    table shows them; rows become dicts a slice at a time as the page is written. Curves and failures are read
    a batch at a time."""
    is_config = pads.field("config_id") == config_id
    images = store.read_table(out, "comparison/images", REPORT_COLUMNS, is_config, IMAGES)
    # Rows written by someone else may lack what every row has: such rows are left out of the page.
    images = images.filter(pc.and_(pc.is_valid(images["uri"]), pc.is_valid(images["model_bytes"]))).sort_by("uri")
    psnr, bpp = images.column("psnr").to_pylist(), images.column("bpp").to_pylist()
    psnr = [p if p and None not in p else None for p in psnr]  # a level without a figure: not compared
    scored = [i for i, p in enumerate(psnr) if p]
    failed = sum(b.num_rows for b in batches(out, "failures", ["uri"], is_config, store.FAILURES))
    manifest = store.read_manifest(out)
    mrnet = [("MR-Net (per image)", COLORS["mrnet"], [(bpp[i], psnr[i][-1]) for i in scored], "points")]
    plots = {"rate_distortion.svg": rd_plot(mrnet, curve_means(out, is_config)),
             "psnr_per_level.svg": level_plot([psnr[i] for i in scored])}
    for name, svg in plots.items():
        store.write_bytes(out, f"report/{name}", svg.encode())

    ranked = sorted(scored, key=lambda i: psnr[i][-1], reverse=True)
    ranked += [i for i in range(images.num_rows) if not psnr[i]]  # not compared: last
    chosen = list(dict.fromkeys(ranked[j] for j in (0, len(scored) // 2, len(scored) - 1))) if scored else []
    size = manifest.get("configs", {}).get(config_id, {}).get("size")
    uris = images.column("uri").to_pylist()
    shown, _ = entries_from_out(out, config_id, [uris[i] for i in ranked], VIEWER_IMAGES, log=lambda line: None)
    if shown:
        store.write_bytes(out, "viewer.html", viewer_page(shown, title="MR-Net viewer: best first").encode())
    viewer_link = (f'<p><a href="viewer.html">Open the live viewer</a>: the {len(shown)} best image(s), each drawn '
                   'in the browser from its weights (WebGL 2): pan, zoom past the original resolution, and any level '
                   'of detail.</p>' if shown else "")

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def column(name):
        return images.column(name).to_pylist()

    cards = [("images compared", images.num_rows), ("failed", failed), ("mean bpp", fmt(mean(bpp))),
             ("mean PSNR (full)", fmt(mean(psnr[i][-1] for i in scored)) + " dB"),
             ("raw / model", fmt(mean(column("ratio_raw"))))]
    for c in CODECS:  # exact matches are counted apart, not averaged in as 120 dB
        codec_mean, lossless = lossy_mean(column(f"{c}_psnr"))
        cards.append((f"{NAMES[c]} PSNR at same bytes", fmt(codec_mean) + " dB"
                      + (f" ({lossless} lossless)" if lossless else "")))
    last = manifest.get("last_run", {})

    def image_entries(picked, offset):
        rows = images.take(pa.array(picked, pa.int64())).to_pylist()
        return "".join(image_entry(out, r, embed=offset + j < EMBEDDED_STRIPS) for j, r in enumerate(rows))

    head = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MR-Net report: {esc(out)}</title>{STYLE}</head>
<body>
<h1>MR-Net encoding report</h1>
<div class="muted">{esc(out)} · config {esc(config_id)} · last run {esc(last.get('finished_at', '?'))}:
{esc(last.get('done', '?'))} done, {esc(last.get('failed', '?'))} failed, {esc(last.get('skipped', '?'))} skipped</div>
<div class="cards">{"".join(f'<div class="card">{esc(n)}<b>{esc(v)}</b></div>' for n, v in cards)}</div>
<div class="plots">
<img alt="rate-distortion plot" src="{data_uri(plots['rate_distortion.svg'].encode(), 'image/svg+xml')}">
<img alt="PSNR per level" src="{data_uri(plots['psnr_per_level.svg'].encode(), 'image/svg+xml')}">
</div>
{viewer_link}
<p class="muted">Codecs encode the same pixels the MR-Net was fitted to, at the highest quality whose file fits in the
MR-Net's bytes, and are scored at full resolution. Green: the MR-Net's PSNR is higher; red: the codec's is.</p>
<h2>Comparison</h2>
"""
    middle = f"""
<h2>At equal bytes</h2>
<p class="muted">The best, the median and the worst image by PSNR: a crop where the original has most detail, shown
3x, from the full-resolution MR-Net and each codec's file at the MR-Net's bytes (PSNR of the whole image).</p>
{"".join(crops(out, images.take(pa.array([i], pa.int64())).to_pylist()[0], size) for i in chosen)
 or '<p class="muted">no image was compared</p>'}
<h2>Images ({images.num_rows})</h2>
<p class="muted">Best first by full-resolution PSNR; open one for its levels of detail, coarse to fine{
f" (the first {EMBEDDED_STRIPS} are embedded; later ones link to OUT/thumbnails/)"
if images.num_rows > EMBEDDED_STRIPS else ""}.</p>
"""
    failures_head = f"""
<h2>Failures ({failed})</h2>
"""
    tail = f"""
<h2>Config</h2>
<pre>{esc(json.dumps({"config_id": config_id, **manifest.get("configs", {}).get(config_id, {}),
                  "versions": manifest.get("versions", {}), "last_run": last}, indent=2))}</pre>
{CHECK_SCRIPT}
</body></html>
"""
    with store.output(out, "report.html") as f:
        write = lambda text: f.write(text.encode())  # noqa: E731
        write(head + TABLE_HEAD)
        for offset in range(0, images.num_rows, ROWS_AT_ONCE):
            write("".join(table_row(r) for r in images.slice(offset, ROWS_AT_ONCE).to_pylist()))
        write("</table>" + middle)
        for offset in range(0, len(ranked), ROWS_AT_ONCE):
            write(image_entries(ranked[offset : offset + ROWS_AT_ONCE], offset))
        write(failures_head)
        if failed:
            write("<table><tr><th>uri</th><th>stage</th><th>kind</th><th>message</th></tr>")
            for b in batches(out, "failures", ["uri", "stage", "error_kind", "message"], is_config, store.FAILURES):
                write("".join(f'<tr><td class="l">{esc(r["uri"])}</td><td class="l">{esc(r["stage"])}</td>'
                            f'<td class="l">{esc(r["error_kind"])}</td><td class="l">{esc(r["message"])}</td></tr>'
                            for r in b.to_pylist()))
            write("</table>")
        else:
            write('<p class="muted">none</p>')
        write(tail)
    return store.join(out, "report.html")
