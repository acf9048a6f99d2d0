"""A live level-of-detail viewer: one standalone HTML page that evaluates MR-Nets and latent pyramids in the browser
with WebGL 2.

The page holds each model's decoded weights (float32, base64) and a fragment shader written here for its
architecture, so every pixel on screen is f(x, t) computed from the stored weights, as `mrnet render` computes
it: pan and zoom far past the original resolution (a periodic texture keeps tiling), and move t continuously,
by default the anti-aliased t of the current zoom (`render.antialiased_level`).

Test hook: a page opened with `#frame=WxH,t,x0,y0,x1,y1` draws that one frame off screen and writes its RGBA8
pixels (rows top to bottom, base64) into <body data-frame>, so a headless browser can compare them with
`mrnet render` for the same window, size and t.
"""
import base64
import json
import re

import numpy as np
import torch

from mrnet_core.network import MODELS

from .page import esc

TEXTURE_WIDTH = 1024  # weights live in an R32F texture this many floats wide
VIEWER_IMAGES = 24  # models one page of a job holds at most (each is its weights, 4 bytes a parameter, in base64)
# Values one model may bring: as many rows of the texture as every WebGL 2 device holds (a latent pyramid of about
# 1.2 Mpx at one grid per level, its mipmaps included); and all of a page's models together (about 85 MB of base64).
MAX_MODEL_VALUES = 2048 * TEXTURE_WIDTH
MAX_PAGE_VALUES = 8 * MAX_MODEL_VALUES


def flat_weights(model, index=0):
    """Image `index`'s weights as one float32 array, stage by stage, layer by layer, weight [fan_in, fan_out]
    (row-major) then bias: the order `Architecture.layer_shapes` gives, as in the model file. A latent pyramid's:
    its grids coarse to fine (row-major), then its MLP's layers in the same order, then, with mipmaps, each grid's
    mipmaps below its own level, coarse to fine (`latent_offsets`)."""
    if model.arch.model == "g":
        tensors = [*model.grids, *(t for pair in zip(model.weights, model.biases) for t in pair)]
        if model.arch.mipmaps:
            with torch.no_grad():
                tensors += [m for chain in model.mipmaps(list(model.grids)) for m in chain[:-1]]
    else:
        tensors = [t for stage in model.stages for pair in zip(stage.weights, stage.biases) for t in pair]
    return np.concatenate([t[index].detach().cpu().float().numpy().ravel() for t in tensors]).astype("<f4")


def glsl_float(v):
    """A GLSL float literal of v (a bare "30" would be an int)."""
    text = f"{float(v):.9g}"
    return text if any(c in text for c in ".en") else text + ".0"


# Every shader starts the same: the weights texture, the window and t, and (px, py), the pixel centre in the domain
# as in pyramid.pixel_grid (x to the right, y downwards: row 0 at the top).
PROLOGUE = ["#version 300 es", "precision highp float; precision highp int;",
            "uniform highp sampler2D u_weights; uniform vec2 u_size; uniform vec4 u_window; uniform float u_t;",
            "out vec4 color;",
            f"float w(int i) {{ return texelFetch(u_weights, ivec2(i % {TEXTURE_WIDTH}, i / {TEXTURE_WIDTH}), 0).r; }}",
            "void main() {",
            "  float px = u_window.x + (u_window.z - u_window.x) * gl_FragCoord.x / u_size.x;",
            "  float py = u_window.y + (u_window.w - u_window.y) * (u_size.y - gl_FragCoord.y) / u_size.y;"]


def shader_source(arch):
    """GLSL ES 3.0 fragment shader evaluating f(x, t) = sum_i c_i(t) g_i(x) for `arch` at each pixel centre."""
    if arch.model == "g":
        return latent_shader_source(arch)
    lines = [*PROLOGUE, f"  float acc[{arch.channels}];", f"  for (int c = 0; c < {arch.channels}; c++) acc[c] = 0.0;"]
    base, previous = 0, None  # previous: (name, width) of the last stage's last hidden layer, for the M-Net
    for i, spec in enumerate(arch.stages):
        shapes = arch.layer_shapes(i)
        omegas = [spec.omega_0] + [1.0 if arch.model == "f" else arch.omega_hidden] * len(spec.hidden)
        activations = ["sin"] + ["relu" if arch.model == "f" else "sin"] * len(spec.hidden)
        lines.append(f"  float s{i}l{len(shapes) - 2}[{shapes[-1][0]}];")  # the last hidden layer: read by stage i+1
        # stage i shows where c_i(t) > 0, that is t > i (stage 0 always, as MRNet.forward); a later M-Net stage
        # that shows needs every earlier one's basis, and those show too
        lines.append(f"  if ({'true' if i == 0 else f'u_t > {float(i)}'}) {{")
        for j, (fan_in, fan_out) in enumerate(shapes[:-1]):
            name = f"s{i}l{j}"
            if j < len(shapes) - 2:
                lines.append(f"    float {name}[{fan_out}];")
            bias = base + fan_in * fan_out
            lines.append(f"    for (int o = 0; o < {fan_out}; o++) {{")
            lines.append(f"      float z = w({bias} + o);")
            if j == 0:
                lines.append(f"      z += px * w({base} + o) + py * w({base + fan_out} + o);")
            else:
                own = shapes[j - 1][1]
                lines.append(f"      for (int k = 0; k < {own}; k++) "
                             f"z += s{i}l{j - 1}[k] * w({base} + k * {fan_out} + o);")
                if own < fan_in:  # the M-Net's first hidden layer also reads the previous stage's basis
                    pname, pwidth = previous
                    lines.append(f"      for (int k = 0; k < {pwidth}; k++) "
                                 f"z += {pname}[k] * w({base} + ({own} + k) * {fan_out} + o);")
            omega = glsl_float(omegas[j])
            act = f"sin({omega} * z)" if activations[j] == "sin" else f"max({omega} * z, 0.0)"
            lines.append(f"      {name}[o] = {act};")
            lines.append("    }")
            base = bias + fan_out
        fan_in, fan_out = shapes[-1]
        last = f"s{i}l{len(shapes) - 2}"
        lines.append(f"    float c = clamp(u_t - {float(i)}, 0.0, 1.0);")
        lines.append(f"    for (int o = 0; o < {fan_out}; o++) {{")
        lines.append(f"      float z = w({base + fan_in * fan_out} + o);")
        lines.append(f"      for (int k = 0; k < {fan_in}; k++) z += {last}[k] * w({base} + k * {fan_out} + o);")
        lines.append("      acc[o] += c * z;")
        lines.append("    }")
        lines.append("  }")
        base += fan_in * fan_out + fan_out
        previous = (last, fan_in)
    rgb = "acc[0], acc[0], acc[0]" if arch.channels == 1 else "acc[0], acc[1], acc[2]"
    lines += [f"  color = vec4(clamp(vec3({rgb}), 0.0, 1.0), 1.0);", "}"]
    return "\n".join(lines)


def latent_offsets(arch):
    """Where `flat_weights` puts each grid of a latent pyramid: per grid, [(offset, height, width)] of its read at
    every level up to its own, coarse to fine (without mipmaps, its own alone); and where the MLP starts."""
    own, offset = [], 0
    for h, w in arch.sizes:
        own.append((offset, h, w))
        offset += h * w
    mlp = offset
    offset += sum((fan_in + 1) * fan_out for fan_in, fan_out in arch.layer_shapes())
    reads = []
    for (base, h, w), k in zip(own, arch.grid_levels):
        chain = []
        for mh, mw in arch.level_shapes[:k] if arch.mipmaps else []:
            chain.append((offset, mh, mw))
            offset += mh * mw
        reads.append([*chain, (base, h, w)])
    return reads, mlp


def latent_shader_source(arch):
    """GLSL ES 3.0 fragment shader evaluating a latent pyramid (`latent.LatentNet`) for `arch` at each pixel centre:
    each grid read at level of detail t as `LatentNet.reads` reads it (bilinearly interpolated as `latent.sample`
    does, edge values continuing or the grid wrapping; with mipmaps, a blend of two levels' mipmaps; without,
    faded by c_k(t)), then the MLP (ReLU hidden layers, linear output)."""
    index = "int(mod(x, float(n)))" if arch.periodic else "int(clamp(x, 0.0, float(n - 1)))"  # GLSL's % of a negative
    lines = [*PROLOGUE[:-3], f"int at(float x, int n) {{ return {index}; }}",
             "float tap(int base, int gh, int gw, float px, float py) {",
             "  float u = (px + 1.0) * float(gw) * 0.5 - 0.5, v = (py + 1.0) * float(gh) * 0.5 - 0.5;",
             "  float u0 = floor(u), v0 = floor(v), fu = u - u0, fv = v - v0;",
             "  int l = at(u0, gw), r = at(u0 + 1.0, gw);",
             "  int a = base + at(v0, gh) * gw, b = base + at(v0 + 1.0, gh) * gw;",
             "  float upper = w(a + l) * (1.0 - fu) + w(a + r) * fu;",
             "  float lower = w(b + l) * (1.0 - fu) + w(b + r) * fu;",
             "  return upper * (1.0 - fv) + lower * fv;", "}", *PROLOGUE[-3:], f"  float h0[{arch.grid_count}];",
             f"  float level = clamp(u_t - 1.0, 0.0, {float(arch.levels - 1)});",
             "  int low = int(floor(level)); float blend = level - float(low), fade = clamp(u_t, 0.0, 1.0);"]
    reads, base = latent_offsets(arch)
    for j, (chain, k) in enumerate(zip(reads, arch.grid_levels)):
        if not arch.mipmaps:
            offset, h, w = chain[-1]
            lines.append(f"  h0[{j}] = clamp(u_t - {float(k)}, 0.0, 1.0) * tap({offset}, {h}, {w}, px, py);")
            continue
        n = len(chain)
        lines += [f"  {{ const int oo[{n}] = int[{n}]({', '.join(str(o) for o, _, _ in chain)}), "
                  f"hh[{n}] = int[{n}]({', '.join(str(h) for _, h, _ in chain)}), "
                  f"ww[{n}] = int[{n}]({', '.join(str(w) for _, _, w in chain)});",
                  f"    int m = min(low, {k}), m1 = min(low + 1, {k});",
                  f"    h0[{j}] = fade * ((1.0 - blend) * tap(oo[m], hh[m], ww[m], px, py)"
                  " + blend * tap(oo[m1], hh[m1], ww[m1], px, py)); }"]
    shapes = arch.layer_shapes()
    for j, (fan_in, fan_out) in enumerate(shapes):
        bias = base + fan_in * fan_out
        act = "z" if j == len(shapes) - 1 else "max(z, 0.0)"
        lines += [f"  float h{j + 1}[{fan_out}];",
                  f"  for (int o = 0; o < {fan_out}; o++) {{",
                  f"    float z = w({bias} + o);",
                  f"    for (int k = 0; k < {fan_in}; k++) z += h{j}[k] * w({base} + k * {fan_out} + o);",
                  f"    h{j + 1}[o] = {act};",
                  "  }"]
        base = bias + fan_out
    out = f"h{len(shapes)}"
    rgb = f"{out}[0], {out}[0], {out}[0]" if arch.channels == 1 else f"{out}[0], {out}[1], {out}[2]"
    return "\n".join([*lines, f"  color = vec4(clamp(vec3({rgb}), 0.0, 1.0), 1.0);", "}"])


class NotDrawn(ValueError):
    """A model too large for the page (`MAX_MODEL_VALUES`)."""


def model_entry(name, model, meta, index=0):
    """What the page needs of one model: its shader, weights and level sizes; NotDrawn for one too large."""
    weights = flat_weights(model, index)
    if weights.size > MAX_MODEL_VALUES:
        raise NotDrawn(f"its {weights.size:,} values are more than the viewer holds ({MAX_MODEL_VALUES:,}); "
                       "draw it with mrnet render")
    latent = model.arch.model == "g"
    return {"name": name, "shader": shader_source(model.arch), "weights": base64.b64encode(weights.tobytes()).decode(),
            "count": int(weights.size), "levels": [list(s) for s in meta.sizes], "width": meta.width,
            "height": meta.height, "stages": model.arch.levels if latent else len(model.arch.stages),
            "model": "latent pyramid" if latent else MODELS[model.arch.model], "periodic": bool(model.arch.periodic)}


def entries_from_out(out, config_id, uris=None, limit=VIEWER_IMAGES, given=None, log=print):
    """(model entries, rows in all) of an encode job's rows under `config_id`: those of `uris` in that order
    (else every row by uri), `limit` at most; `given`: the prior to decode with (else OUT's copy or the default).
    A row that cannot be decoded is skipped with a warning."""
    import pyarrow.dataset as pads

    from . import store
    from .collection import BadRow, load_row
    is_config = pads.field("config_id") == config_id
    listed = {u for u in store.read_table(out, "encodings", ["uri"], is_config).column("uri").to_pylist()
              if isinstance(u, str)}
    order = [u for u in uris if u in listed] if uris is not None else sorted(listed)
    chosen = order[: limit * 2]  # weights only of the rows that may be shown (some may be unusable)
    rows = store.read_table(out, "encodings", ["image_id", "uri", "architecture", "weights", "prior_id"],
                            is_config & pads.field("uri").isin(chosen)).to_pylist() if chosen else []
    by_uri = {r["uri"]: r for r in rows}
    entries, values = [], 0
    for uri in chosen:
        if len(entries) == limit:
            break
        try:
            model, meta = load_row(by_uri[uri], out, given)
            entry = model_entry(uri.rstrip("/").rsplit("/", 1)[-1], model, meta)
        except (BadRow, NotDrawn) as e:
            log(f"view: warning: {uri!r}: {e}; not shown")
            continue
        if values + entry["count"] > MAX_PAGE_VALUES:
            log(f"view: warning: {uri!r} and the rows after it are not shown: the page holds {MAX_PAGE_VALUES:,} "
                "values at most")
            break
        entries.append(entry)
        values += entry["count"]
    return entries, len(listed)


def page(entries, title="MR-Net viewer"):
    """The standalone viewer page for model entries (`model_entry`)."""
    # No "<" at all in the script's data: no name can close the element or open a comment that hides its end.
    values = {"TITLE": esc(title), "DATA": json.dumps(entries).replace("<", "\\u003c"), "TW": str(TEXTURE_WIDTH)}
    return re.sub(r"\{\{(TITLE|DATA|TW)\}\}", lambda m: values[m[1]], PAGE)  # one pass: values are never re-read


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{TITLE}}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
canvas { border: 1px solid #ccc; cursor: grab; touch-action: none; display: block; margin: 8px 0; }
.controls { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; } .muted { color: #777; }
</style></head>
<body>
<h1 style="font-size:20px;margin:0">{{TITLE}}</h1>
<div class="controls">
  <select id="model"></select>
  <label>level of detail t <input id="t" type="range" min="0" max="1" step="0.01" value="1" style="width:240px"></label>
  <span id="tval"></span>
  <label><input id="auto" type="checkbox" checked> anti-aliased t for the zoom</label>
  <button id="reset">reset view</button>
</div>
<canvas id="view" width="512" height="512"></canvas>
<div id="status" class="muted">drag to pan, wheel to zoom; the network is evaluated for every pixel on screen</div>
<script>
const MODELS = {{DATA}};
const TW = {{TW}};
const canvas = document.getElementById('view');
const gl = canvas.getContext('webgl2', {preserveDrawingBuffer: true});
const status = document.getElementById('status');
let current = null, view = [-1, -1, 1, 1], t = 1;

function compile(source) {
  const vs = gl.createShader(gl.VERTEX_SHADER);
  gl.shaderSource(vs, '#version 300 es\\nin vec2 p; void main() { gl_Position = vec4(p, 0.0, 1.0); }');
  gl.compileShader(vs);
  const fs = gl.createShader(gl.FRAGMENT_SHADER);
  gl.shaderSource(fs, source);
  gl.compileShader(fs);
  if (!gl.getShaderParameter(fs, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(fs));
  const program = gl.createProgram();
  gl.attachShader(program, vs); gl.attachShader(program, fs);
  gl.bindAttribLocation(program, 0, 'p');
  gl.linkProgram(program);
  if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
  return program;
}

function load(entry) {
  const bytes = Uint8Array.from(atob(entry.weights), c => c.charCodeAt(0));
  const floats = new Float32Array(bytes.buffer);
  const rows = Math.ceil(floats.length / TW);
  const padded = new Float32Array(rows * TW);
  padded.set(floats);
  const texture = gl.createTexture();
  gl.bindTexture(gl.TEXTURE_2D, texture);
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.R32F, TW, rows, 0, gl.RED, gl.FLOAT, padded);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
  return {entry, texture, program: compile(entry.shader)};
}

function antialiasedLevel(entry, width, height, w) {  // render.antialiased_level
  const n = entry.levels.length, [fh, fw] = entry.levels[n - 1];
  const density = Math.min(width * 2 / Math.abs(w[2] - w[0]) / fw, height * 2 / Math.abs(w[3] - w[1]) / fh);
  return Math.min(n, Math.max(1, n + Math.log2(density)));
}

function draw(width, height, level, w) {
  gl.viewport(0, 0, width, height);
  gl.useProgram(current.program);
  gl.activeTexture(gl.TEXTURE0);
  gl.bindTexture(gl.TEXTURE_2D, current.texture);
  gl.uniform1i(gl.getUniformLocation(current.program, 'u_weights'), 0);
  gl.uniform2f(gl.getUniformLocation(current.program, 'u_size'), width, height);
  gl.uniform4f(gl.getUniformLocation(current.program, 'u_window'), w[0], w[1], w[2], w[3]);
  gl.uniform1f(gl.getUniformLocation(current.program, 'u_t'), level);
  gl.drawArrays(gl.TRIANGLES, 0, 6);
}

function redraw() {
  const e = current.entry;
  if (document.getElementById('auto').checked) {
    t = antialiasedLevel(e, canvas.width, canvas.height, view);
    document.getElementById('t').value = t;
  }
  draw(canvas.width, canvas.height, t, view);
  const zoom = 2 / (view[2] - view[0]);
  document.getElementById('tval').textContent = t.toFixed(2) + ' of ' + e.stages;
  status.textContent = `${e.name}: ${e.model}, ${e.width}x${e.height}, ${e.count.toLocaleString()} weights` +
    `${e.periodic ? ', periodic' : ''} · zoom ${zoom.toFixed(2)}x · window ` +
    view.map(v => v.toFixed(3)).join(', ');
}

function select(k, show = true) {
  current = load(MODELS[k]);
  const e = current.entry, scale = 512 / Math.max(e.width, e.height);
  canvas.width = Math.round(e.width * scale); canvas.height = Math.round(e.height * scale);
  view = [-1, -1, 1, 1];
  const slider = document.getElementById('t');
  slider.max = e.stages;
  if (show) redraw();
}

function frameFromHash() {  // the test hook: #frame=WxH,t,x0,y0,x1,y1
  const m = location.hash.match(/^#frame=(\\d+)x(\\d+),([^,]+),([^,]+),([^,]+),([^,]+),([^,]+)$/);
  if (!m) return false;
  const [width, height] = [+m[1], +m[2]], level = +m[3], w = [+m[4], +m[5], +m[6], +m[7]];
  const fb = gl.createFramebuffer(), rb = gl.createRenderbuffer();
  gl.bindRenderbuffer(gl.RENDERBUFFER, rb);
  gl.renderbufferStorage(gl.RENDERBUFFER, gl.RGBA8, width, height);
  gl.bindFramebuffer(gl.FRAMEBUFFER, fb);
  gl.framebufferRenderbuffer(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.RENDERBUFFER, rb);
  draw(width, height, level, w);
  const pixels = new Uint8Array(width * height * 4), flipped = new Uint8Array(width * height * 4);
  gl.readPixels(0, 0, width, height, gl.RGBA, gl.UNSIGNED_BYTE, pixels);
  for (let r = 0; r < height; r++)  // WebGL reads bottom row first; images go top row first
    flipped.set(pixels.subarray((height - 1 - r) * width * 4, (height - r) * width * 4), r * width * 4);
  let text = '';
  for (let i = 0; i < flipped.length; i += 8192) text += String.fromCharCode.apply(null, flipped.subarray(i, i + 8192));
  document.body.setAttribute('data-frame', btoa(text));
  gl.bindFramebuffer(gl.FRAMEBUFFER, null);
  return true;
}

try {
  if (!gl) throw new Error('this browser has no WebGL 2');
  const quad = gl.createBuffer();
  gl.bindBuffer(gl.ARRAY_BUFFER, quad);
  gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, -1, 1, 1, -1, 1, 1]), gl.STATIC_DRAW);
  gl.enableVertexAttribArray(0);
  gl.vertexAttribPointer(0, 2, gl.FLOAT, false, 0, 0);
  const chooser = document.getElementById('model');
  MODELS.forEach((e, k) => chooser.add(new Option(e.name, k)));
  chooser.onchange = () => select(+chooser.value);
  const testing = location.hash.startsWith('#frame=');
  select(0, !testing);  // a test frame only: a large model on a software renderer takes long for the whole canvas
  if (testing) frameFromHash();
  document.body.setAttribute('data-ready', 'yes');
} catch (err) {
  status.textContent = 'cannot draw: ' + err.message;
  document.body.setAttribute('data-error', err.message);
}

let dragging = null;
canvas.onpointerdown = e => { dragging = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); };
canvas.onpointerup = () => { dragging = null; };
canvas.onpointermove = e => {
  if (!dragging) return;
  const dx = (e.clientX - dragging[0]) / canvas.clientWidth * (view[2] - view[0]);
  const dy = (e.clientY - dragging[1]) / canvas.clientHeight * (view[3] - view[1]);
  view = [view[0] - dx, view[1] - dy, view[2] - dx, view[3] - dy];
  dragging = [e.clientX, e.clientY];
  redraw();
};
canvas.onwheel = e => {
  e.preventDefault();
  const r = canvas.getBoundingClientRect(), f = Math.exp(e.deltaY * 0.002);
  const cx = view[0] + (e.clientX - r.left) / r.width * (view[2] - view[0]);
  const cy = view[1] + (e.clientY - r.top) / r.height * (view[3] - view[1]);
  view = [cx + (view[0] - cx) * f, cy + (view[1] - cy) * f, cx + (view[2] - cx) * f, cy + (view[3] - cy) * f];
  redraw();
};
document.getElementById('t').oninput = e => {
  document.getElementById('auto').checked = false;
  t = +e.target.value;
  redraw();
};
document.getElementById('auto').onchange = redraw;
document.getElementById('reset').onclick = () => { view = [-1, -1, 1, 1]; redraw(); };
</script>
</body></html>
"""
