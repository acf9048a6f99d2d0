"""SVG plots drawn by hand for the report and the study page: lines and points on round ticks, with the legend
in its own band below the axes so that it never covers data. (matplotlib would do it too, at the cost of a
plotting stack in every worker image; these plots need a dozen lines of SVG.)"""
import math

from .page import esc

COLORS = {"mrnet": "#d62728", "jpeg": "#1f77b4", "webp": "#2ca02c", "avif": "#9467bd"}
NAMES = {"mrnet": "MR-Net", "jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
W, H, M = 520, 340, 50  # the axes' box and margin; the legend band is added below
LEGEND_ROW = 16
LIMIT = 1e12  # points beyond it are not drawn (no figure here comes near it; hostile rows might)


def _step(span, count):
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about `count` intervals over `span`."""
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if raw <= m * power * (1 + 1e-9))


def linear_ticks(lo, hi, count=5, integer=False):
    """(axis low, axis high, ticks): round ticks, the axis widened to the nearest ones outside the data."""
    if hi - lo <= 1e-9 * max(1.0, abs(lo), abs(hi)):  # one value: an axis around it
        lo, hi = lo - max(1.0, abs(lo) / 10), hi + max(1.0, abs(hi) / 10)
    step = max(1, round(_step(hi - lo, count))) if integer else _step(hi - lo, count)
    first, last = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [float(f"{first + i * step:.12g}") for i in range(int(round((last - first) / step)) + 1)]
    return first, last, ticks


def log_ticks(lo, hi):
    """(axis low, axis high, ticks) of a log axis over [lo, hi] (positive): 1-2-5 steps, or decades alone when
    those would be crowded; the axis ends at the nearest ticks outside the data."""
    low, high = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    every = max(1, math.ceil((high - low + 1) / 9))  # decades between ticks, so that there are 10 at most
    for mantissas in ((1, 2, 5), (1,)):
        candidates = [m * 10.0 ** e for e in range(low - every, high + every, every) for m in mantissas]
        below = max(c for c in candidates if c <= lo * (1 + 1e-9))
        above = min(c for c in candidates if c >= hi * (1 - 1e-9))
        ticks = [float(f"{c:.12g}") for c in candidates if below <= c <= above]
        if len(ticks) <= 9:
            break
    if len(ticks) < 2:
        ticks = [below, below * 10]
    return ticks[0], ticks[-1], ticks


def _label(v):
    return f"{v:g}"


def _legend_rows(names):
    """Legend entries laid out in rows across the plot's width: [[(index, x)]]."""
    rows, x = [[]], M
    for i, name in enumerate(names):
        width = 22 + 7 * len(name)
        if rows[-1] and x + width > W - 10:
            rows.append([])
            x = M
        rows[-1].append((i, x))
        x += width + 14
    return rows if rows[0] else []


def svg_plot(series, xlabel, ylabel, logx=False, title="", integer_x=False):
    """An SVG line/point plot. series: [(name, color, [(x, y)], 'line' | 'points')]; unnamed series have no
    legend entry."""
    def valid(x, y):  # a point the axes can show: numbers within +-1e12, and x of 1e-12 or more on a log axis
        return (x is not None and y is not None and abs(x) <= LIMIT and abs(y) <= LIMIT
                and (x >= 1 / LIMIT or not logx))

    pts = [(x, y) for _, _, xy, _ in series for x, y in xy if valid(x, y)]
    if not pts:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">'
                '<text x="20" y="30">no data</text></svg>')
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    if logx:
        x0, x1, xticks = log_ticks(min(xs), max(xs))
        tx = math.log10
    else:
        x0, x1, xticks = linear_ticks(min(xs), max(xs), integer=integer_x)
        tx = float
    y0, y1, yticks = linear_ticks(min(ys), max(ys))
    left, right, top, bottom = M, W - M / 2, 0.6 * M, H - M

    def px(x):
        return left + (tx(x) - tx(x0)) / (tx(x1) - tx(x0)) * (right - left)

    def py(y):
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    named = [(name, color) for name, color, _, _ in series if name]
    rows = _legend_rows([name for name, _ in named])
    height = H + LEGEND_ROW * len(rows) + (10 if rows else 0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect width="{W}" height="{height}" fill="white"/>',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>']
    for t in xticks:
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#eee"/>'
                     f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{_label(t)}</text>')
    for t in yticks:
        y = py(t)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>'
                 f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{top}" stroke="#444"/>'
                 f'<text x="{(left + right) / 2}" y="{H - 12}" text-anchor="middle">{esc(xlabel)}</text>'
                 f'<text x="14" y="{(top + bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + bottom) / 2})">{esc(ylabel)}</text>')
    for name, color, xy, kind in series:
        xy = [(x, y) for x, y in xy if valid(x, y)]
        if kind == "line" and len(xy) > 1:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in xy)
            parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in xy:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" '
                         f'r="{3.5 if kind == "points" else 2.5}" fill="{color}"/>')
    for r, row in enumerate(rows):  # the legend's own band, below the x label
        y = H + 6 + r * LEGEND_ROW
        for i, x in row:
            name, color = named[i]
            parts.append(f'<rect x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{x + 14:.1f}" y="{y}">{esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def codec_series(means):
    """Legend-named line series of each codec's mean curve. means: {codec: [(mean bpp, mean PSNR)] by quality}."""
    return [(f"{NAMES[c]} (mean over images, quality 10-100)", COLORS[c], curve, "line")
            for c, curve in means.items() if curve]


def rd_plot(series, means, title="Rate-distortion", ylabel="PSNR (dB), full resolution"):
    """bpp (log) against full-resolution PSNR: the MR-Net series given, beside each codec's mean curve."""
    return svg_plot(series + codec_series(means), "bits per pixel (log scale)", ylabel, logx=True, title=title)
