"""OUT/report.html: one self-contained page (images embedded as data URIs) about a config's encodings.

Rate-distortion plot (MR-Net against JPEG, WebP and AVIF), PSNR per level, the comparison table, the best and
worst images with their level strips, the failures and the config. The plots are SVG drawn here by hand (no
plotting dependency) and also written to OUT/report/ so they can be logged as artifacts.
"""
import base64
import html
import json
import math
import statistics

import pyarrow as pa
import pyarrow.dataset as pads

from . import store
from .collection import batches
from .compare import CODECS, CURVES, IMAGES

COLORS = {"mrnet": "#d62728", "jpeg": "#1f77b4", "webp": "#2ca02c", "avif": "#9467bd"}
NAMES = {"mrnet": "MR-Net", "jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
W, H, M = 520, 340, 50  # plot size and margin
REPORT_COLUMNS = [n for n in IMAGES.names if n != "config_id"]  # what the page shows of each image
ROWS_AT_ONCE = 256  # comparison rows turned into Python objects at a time while the page is written

# Sets data-images-loaded on <body> once every <img> has decoded, so a headless browser can check the page.
CHECK_SCRIPT = """<script>
function check() {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
  if (ok < imgs.length) setTimeout(check, 50);
}
window.addEventListener('load', check);
</script>"""

STYLE = """<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin-top: 28px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card b { display: block; font-size: 18px; }
.plots { display: flex; gap: 16px; flex-wrap: wrap; }
table { border-collapse: collapse; font-size: 12px; } \
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f4f4f4; } td.l { text-align: left; } .win { background: #e6f4e6; } .lose { background: #fbeaea; }
.strip img { height: 96px; image-rendering: auto; } .muted { color: #777; }
</style>"""


def esc(x):
    return html.escape(str(x))


def fmt(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def data_uri(data: bytes, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ticks(lo, hi, n=5):
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def svg_plot(series, xlabel, ylabel, logx=False, title="", integer_x=False):
    """An SVG line/point plot. series: [(name, color, [(x, y)], 'line' | 'points')]."""
    pts = [(x, y) for _, _, xy, _ in series for x, y in xy if x is not None and y is not None]
    if not pts:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">'
                '<text x="20" y="30">no data</text></svg>')
    tx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    xs, ys = [tx(x) for x, _ in pts], [y for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = math.floor(min(ys)) - 1, math.ceil(max(ys)) + 1
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if logx:
        x0, x1 = math.floor(x0 * 4) / 4, math.ceil(x1 * 4) / 4

    def px(x):
        return M + (tx(x) - x0) / (x1 - x0) * (W - 1.5 * M)

    def py(y):
        return H - M - (y - y0) / (y1 - y0) * (H - 1.6 * M)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>',
             f'<line x1="{M}" y1="{H - M}" x2="{W - M / 2}" y2="{H - M}" stroke="#444"/>',
             f'<line x1="{M}" y1="{H - M}" x2="{M}" y2="{0.6 * M}" stroke="#444"/>']
    for t in (range(int(x0), int(x1) + 1) if integer_x else ticks(x0, x1)):
        v = 10 ** t if logx else t
        x = M + (t - x0) / (x1 - x0) * (W - 1.5 * M)
        parts.append(f'<line x1="{x:.1f}" y1="{H - M}" x2="{x:.1f}" y2="{H - M + 4}" stroke="#444"/>'
                     f'<text x="{x:.1f}" y="{H - M + 16}" text-anchor="middle">{v:.3g}</text>')
    for t in ticks(y0, y1):
        parts.append(f'<line x1="{M - 4}" y1="{py(t):.1f}" x2="{W - M / 2}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{M - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.1f}</text>')
    parts.append(f'<text x="{(W + M) / 2}" y="{H - 10}" text-anchor="middle">{esc(xlabel)}</text>'
                 f'<text x="14" y="{H / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {H / 2})">{esc(ylabel)}</text>')
    for i, (name, color, xy, kind) in enumerate(series):
        xy = [(x, y) for x, y in xy if x is not None and y is not None]
        if kind == "line" and len(xy) > 1:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in xy)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in xy:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" '
                         f'r="{3.5 if kind == "points" else 2.5}" fill="{color}"/>')
        if name:  # legend in the lower right, where rate-distortion curves rarely go
            ly = H - M - 14 * (len(series) - i) - 4
            parts.append(f'<rect x="{W - 130}" y="{ly}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{W - 115}" y="{ly + 9}">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def rd_plot(points, means):
    """bpp (log) against full-resolution PSNR: one point per MR-Net, each codec's mean curve over the images.
    points: [(bpp, PSNR)] per image; means: {codec: [(mean bpp, mean PSNR)] by quality} (curve_means)."""
    series = [("MR-Net (per image)", COLORS["mrnet"], points, "points")]
    series += [(f"{NAMES[c]} (mean, q 10-100)", COLORS[c], means.get(c, []), "line") for c in CODECS]
    return svg_plot(series, "bits per pixel (log scale)", "PSNR (dB), full resolution", logx=True,
                    title="Rate-distortion")


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
    data = store.read_bytes(out, f"thumbnails/{image_id}/strip.png")
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
        cls = "" if p is None or mr is None else (' class="win"' if mr > p else ' class="lose"')
        cells.append(f"<td>{r[f'{c}_quality'] if r[f'{c}_quality'] is not None else '–'}</td>"
                     f"<td>{fmt(r[f'{c}_bpp'])}</td><td{cls}>{fmt(p)}</td>")
        if r[f"{c}_note"]:
            notes.append(f"{NAMES[c]}: {r[f'{c}_note']}")
    cells.append(f'<td class="l muted">{esc("; ".join(notes))}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def write_report(out, config_id):
    """Write OUT/report.html and OUT/report/{rate_distortion,psnr_per_level}.svg; the report's path.

    The page's columns of every image are held as one Arrow table (no Python object per row), sorted as the
    table shows them; rows become dicts a slice at a time as the page is written. Curves and failures are read
    a batch at a time."""
    is_config = pads.field("config_id") == config_id
    images = store.read_table(out, "comparison/images", REPORT_COLUMNS, is_config, IMAGES).sort_by("uri")
    psnr, bpp = images.column("psnr").to_pylist(), images.column("bpp").to_pylist()
    scored = [i for i, p in enumerate(psnr) if p]
    failed = sum(b.num_rows for b in batches(out, "failures", ["uri"], is_config, store.FAILURES))
    manifest = store.read_manifest(out)
    plots = {"rate_distortion.svg": rd_plot([(bpp[i], psnr[i][-1]) for i in scored], curve_means(out, is_config)),
             "psnr_per_level.svg": level_plot([psnr[i] for i in scored])}
    for name, svg in plots.items():
        store.write_bytes(out, f"report/{name}", svg.encode())

    ranked = sorted(scored, key=lambda i: psnr[i][-1], reverse=True)
    k = min(3, len(ranked) // 2) or len(ranked)
    best, worst = ranked[:k], ranked[::-1][:k] if len(ranked) > 1 else []

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def column(name):
        return images.column(name).to_pylist()

    cards = [("images compared", images.num_rows), ("failed", failed), ("mean bpp", fmt(mean(bpp))),
             ("mean PSNR (full)", fmt(mean(psnr[i][-1] for i in scored)) + " dB"),
             ("raw / model", fmt(mean(column("ratio_raw"))))]
    cards += [(f"{NAMES[c]} PSNR at same bytes", fmt(mean(column(f"{c}_psnr"))) + " dB") for c in CODECS]
    last = manifest.get("last_run", {})

    def gallery(picked):
        rows = images.take(pa.array(picked, pa.int64())).to_pylist()
        return "".join(f'<div class="strip"><p>{esc(name_of(r["uri"]))}: {fmt(r["psnr"][-1])} dB at '
                       f'{fmt(r["bpp"])} bpp; levels {" / ".join(fmt(p) for p in r["psnr"])} dB</p>'
                       f'{strip_img(out, r["image_id"])}</div>' for r in rows)

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
<p class="muted">Codecs encode the same pixels the MR-Net was fitted to, at the highest quality whose file fits in the
MR-Net's bytes, and are scored at full resolution. Green: the MR-Net's PSNR is higher; red: the codec's is.</p>
<h2>Comparison</h2>
"""
    middle = f"""
<h2>Best images</h2>{gallery(best)}
<h2>Worst images</h2>{gallery(worst) or '<p class="muted">too few images</p>'}
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
