"""Pieces every HTML page here shares: escaping, number formatting, embedded files, the style sheet, and the
script that tells a headless browser when the page's images have loaded."""
import base64
import html
import math

STYLE = """<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin-top: 28px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card b { display: block; font-size: 18px; }
.plots { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; font-size: 12px; } \
td, th { border: 1px solid #ddd; padding: 3px 6px; text-align: right; }
th { background: #f4f4f4; } td.l { text-align: left; } .win { background: #e6f4e6; } .lose { background: #fbeaea; }
.strip img { height: 96px; image-rendering: auto; } .muted { color: #777; }
details { margin: 4px 0; } summary { cursor: pointer; }
.crops { display: flex; gap: 8px; flex-wrap: wrap; margin: 8px 0 16px; }
.crops figure { margin: 0; } .crops figcaption { font-size: 12px; }
.crops img { image-rendering: pixelated; border: 1px solid #ddd; }
</style>"""

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


def esc(x):
    return html.escape(str(x))


def fmt(x, digits=2):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def data_uri(data: bytes, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def versus(ours, theirs):
    """The table cell class of a comparison: "win" where ours is at or above theirs (the goals read "at or
    above"), "lose" below, none when either is missing."""
    if ours is None or theirs is None:
        return ""
    return ' class="win"' if ours >= theirs else ' class="lose"'
