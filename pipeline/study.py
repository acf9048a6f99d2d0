"""`mrnet study INPUT --out OUT --grid FILE`: a rate-distortion sweep over configs, through the encode pipeline.

The grid file (TOML or JSON):

    [job]        job settings shared by every config (size, preset, batch_size, actors, ...)
    [fit]        fit keys shared by every config
    [grid]       fit keys with lists of values: every combination is swept (e.g. target_bpp = [0.25, 0.5, 1])
    [[config]]   named variants (name = "siren", levels = 1, ...), each crossed with the grid (or with its own
                 grid = {...} table instead)

Each config is encoded into OUT/configs/<name>/ exactly as `mrnet encode` would (Parquet, thumbnails, comparison
with JPEG/WebP/AVIF at the same bytes, report.html), so reruns skip what is done. The study adds OUT/study.parquet
(one row per config and image), OUT/study.html (the rate-distortion plot and table over all configs) and, in
MLflow, one parent run with a nested run per config.
"""
import io
import itertools
import json
import os
import statistics
import sys
import tomllib

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mrnet_core.config import ConfigError, make_config

from . import store, track
from .settings import check_job
from .compare import CODECS, CURVES, IMAGES
from .report import CHECK_SCRIPT, NAMES, STYLE, data_uri, esc, fmt, svg_plot

PALETTE = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#393b79", "#637939"]
CODEC_COLORS = {"jpeg": "#1f77b4", "webp": "#2ca02c", "avif": "#9467bd"}


def read_grid(path):
    """[(name, variant, FitConfig)], job settings: every [[config]] variant crossed with every [grid] combination.

    Each config is resolved here, so a bad key or value is one ConfigError before any work starts.
    """
    try:
        with open(path, "rb") as f:
            data = json.load(f) if str(path).endswith(".json") else tomllib.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read grid: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a table of [job], [fit], [grid] and [[config]]")
    unknown = set(data) - {"job", "fit", "grid", "config"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; "
                          "use [job], [fit], [grid], [[config]]")
    for table in ("job", "fit", "grid"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{path}: {table} must be a table ([{table}])")
    job, shared, grid = check_job(data.get("job", {})), data.get("fit", {}), data.get("grid", {})
    variants = data.get("config", [{}])
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"{path}: config must be an array of tables ([[config]])")
    configs = []
    for i, variant in enumerate(variants):
        variant = dict(variant)
        base = str(variant.pop("name", f"config{i}"))
        own = variant.pop("grid", grid)  # a variant may sweep its own grid instead
        if not isinstance(own, dict) or not all(isinstance(v, list) and v for v in own.values()):
            raise ConfigError(f"{path}: config {base}: grid must be a table of non-empty lists")
        for values in itertools.product(*own.values()):
            point = dict(zip(own, values))
            name = "-".join([base] + [f"{k}={v}" for k, v in point.items()])
            overrides = {**shared, **variant, **point}
            try:
                cfg = make_config(job.get("preset", "default"), overrides)
            except ConfigError as e:
                raise ConfigError(f"{path}: config {name}: {e}") from None
            configs.append((name, base, cfg))
    names = [n for n, _, _ in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: config names repeat; give each [[config]] its own name")
    return configs, job


def folder_of(out, name):
    return os.path.join(out, "configs", "".join(c if c.isalnum() or c in "-=._" else "_" for c in name))


def study_rows(out, configs):
    """One row per (config, image) compared: the config's name and keys beside the comparison figures."""
    rows = []
    for name, variant, cfg in configs:
        folder = folder_of(out, name)
        manifest = store.read_manifest(folder)
        cfg_id = manifest.get("last_run", {}).get("config_id")
        if not cfg_id:
            continue
        for r in store.read_table(folder, "comparison/images", filter=pads.field("config_id") == cfg_id,
                                  schema=IMAGES).to_pylist():
            rows.append({"config": name, "variant": variant, "model": cfg.model, "levels": cfg.levels,
                         "weight_bits": cfg.weight_bits, "target_bpp": cfg.target_bpp or None, **r})
    return rows


def summary_table(rows, configs):
    """Per config: mean bpp, mean PSNR per level, each codec's mean PSNR at the same bytes, and JPEG wins."""
    out = []
    for name, variant, _ in configs:
        mine = [r for r in rows if r["config"] == name and r["psnr"]]
        if not mine:
            continue
        levels = max(len(r["psnr"]) for r in mine)
        full = [r for r in mine if len(r["psnr"]) == levels]
        entry = {"config": name, "variant": variant, "images": len(mine),
                 "bpp": statistics.fmean(r["bpp"] for r in mine),
                 "psnr": [statistics.fmean(r["psnr"][k] for r in full) for k in range(levels)]}
        for c in CODECS:
            scored = [r[f"{c}_psnr"] for r in mine if r[f"{c}_psnr"] is not None]
            entry[c] = statistics.fmean(scored) if scored else None
            entry[f"{c}_missing"] = len(mine) - len(scored)
        entry["beats_jpeg"] = sum(r["jpeg_psnr"] is not None and r["psnr"][-1] >= r["jpeg_psnr"] for r in mine)
        out.append(entry)
    return out


def rd_svg(table, curves):
    """Each variant's mean (bpp, PSNR) at each of its rates as one line, beside each codec's mean curve."""
    series = []
    for i, variant in enumerate(dict.fromkeys(e["variant"] for e in table)):
        points = sorted((e["bpp"], e["psnr"][-1]) for e in table if e["variant"] == variant)
        series.append((variant, PALETTE[i % len(PALETTE)], points, "line"))
    for codec in CODECS:
        points = {}
        for c in curves:
            if c["codec"] == codec:
                points.setdefault(c["quality"], {})[c["image_id"]] = (c["bpp"], c["psnr"])
        mean = [(statistics.fmean(b for b, _ in p.values()), statistics.fmean(q for _, q in p.values()))
                for _, p in sorted(points.items())]
        series.append((f"{NAMES[codec]} (mean)", CODEC_COLORS[codec], mean, "line"))
    return svg_plot(series, "bits per pixel (log scale)", "PSNR (dB), full resolution, mean over images", logx=True,
                    title="Rate-distortion: each variant against the codecs")


def html_table(table):
    levels = max((len(e["psnr"]) for e in table), default=0)
    head = ("<tr><th>config</th><th>images</th><th>bpp</th><th>PSNR full</th>"
            + "".join(f"<th>level {k}</th>" for k in range(levels))
            + "".join(f"<th>{NAMES[c]} same bytes</th>" for c in CODECS)
            + "<th>MR-Net ≥ JPEG (where JPEG fits)</th></tr>")
    body = []
    for e in table:
        cells = [f'<td class="l">{esc(e["config"])}</td><td>{e["images"]}</td><td>{fmt(e["bpp"], 3)}</td>',
                 f"<td>{fmt(e['psnr'][-1])}</td>", "".join(f"<td>{fmt(p)}</td>" for p in e["psnr"]),
                 "<td></td>" * (levels - len(e["psnr"]))]
        for c in CODECS:
            cls = "" if e[c] is None else (' class="win"' if e["psnr"][-1] >= e[c] else ' class="lose"')
            missing = f' <span class="muted">({e[f"{c}_missing"]} too small)</span>' if e[f"{c}_missing"] else ""
            cells.append(f"<td{cls}>{fmt(e[c])}{missing}</td>")
        cells.append(f"<td>{e['beats_jpeg']} / {e['images'] - e['jpeg_missing']}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def write_study(out, configs):
    """OUT/study.parquet, OUT/study.html and OUT/study/rate_distortion.svg; the summary table."""
    rows = study_rows(out, configs)
    if rows:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        store.write_bytes(out, "study.parquet", buffer.getvalue())
    # The codecs' curves are of the same images whatever the config: the first config's serve for all.
    curves = store.read_table(folder_of(out, configs[0][0]), "comparison/curves", schema=CURVES).to_pylist() \
        if configs else []
    table = summary_table(rows, configs)
    svg = rd_svg(table, curves)
    store.write_bytes(out, "study/rate_distortion.svg", svg.encode())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MR-Net study: {esc(out)}</title>{STYLE}</head>
<body>
<h1>MR-Net rate-distortion study</h1>
<div class="muted">{esc(out)} · {len(configs)} config(s) · {len({r['image_id'] for r in rows})} image(s)</div>
<div class="plots"><img alt="rate-distortion plot" src="{data_uri(svg.encode(), 'image/svg+xml')}"></div>
<p class="muted">Means over the images. PSNR is of the stored model at full resolution; level k is against the
Gaussian pyramid level k of the original (0 = coarsest), which the codecs do not give. Codecs encode the same pixels
at the highest quality whose file fits in each image's model bytes, with their best chroma setting; an image whose
budget is below a codec's smallest file is left out of that codec's mean. Green: the MR-Net mean is at least the
codec's. Each config's own report is configs/&lt;name&gt;/report.html.</p>
<h2>Configs</h2>
{html_table(table)}
<h2>Settings</h2>
<pre>{esc(json.dumps({name: cfg.to_dict() for name, _, cfg in configs}, indent=1))}</pre>
{CHECK_SCRIPT}
</body></html>
"""
    store.write_bytes(out, "study.html", page.encode())
    return table


def cmd_study(args):
    configs, job = read_grid(args.grid)
    job.pop("preset", None)
    job.pop("wait", None)  # a study writes its own folders; no lease
    if args.size is not None:
        job.update(check_job({"size": args.size}))
    out = os.path.abspath(args.out)
    import ray
    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=False)
    from .encode import plan_resources
    plan_resources(job.get("num_gpus"), job.get("num_cpus", 1), job.get("actors"))  # its ConfigError before any file
    os.makedirs(out, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    # Every config's run goes to the study's store, nested under the study's run.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = track.tracking_uri(out)
    try:
        return sweep(args, configs, job, out, log)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def sweep(args, configs, job, out, log):
    from .collection import render_collection
    from .encode import run, versions
    experiment = args.experiment or track.default_experiment(out, "study")
    # One tracking deadline for the whole study: its configs' runs share what the study's run leaves.
    parent = track.start(out, experiment, log, command="study", deadline=job.pop("tracking_deadline", track.DEADLINE))
    results = {}
    for i, (name, _, cfg) in enumerate(configs):
        folder = folder_of(out, name)
        log(f"study: config {i + 1}/{len(configs)}: {name} -> {folder}")
        child = track.start(folder, experiment, log, command=f"study {name}", parent=parent["run_id"],
                            deadline=parent["seconds_left"])
        summary = run(args.input, folder, cfg, log=log, **job)
        summary["render"] = render_collection(folder, summary["config_id"], log=log)
        summary["mlflow"] = track.finish(child, folder, summary, cfg, job, versions(), log)
        parent["seconds_left"] = child["seconds_left"]  # one deadline for the study: its configs' calls count
        results[name] = {k: summary[k] for k in ("config_id", "done", "failed", "skipped", "seconds")}
    table = write_study(out, configs)
    finish_parent(parent, out, table, log)
    for e in table:
        log(f"study: {e['config']}: {e['bpp']:.3f} bpp, {e['psnr'][-1]:.2f} dB (levels "
            f"{' / '.join(f'{p:.2f}' for p in e['psnr'])}); JPEG {fmt(e['jpeg'])}, WebP {fmt(e['webp'])}, "
            f"AVIF {fmt(e['avif'])} dB at the same bytes; "
            f"MR-Net >= JPEG on {e['beats_jpeg']}/{e['images'] - e['jpeg_missing']}"
            + (f" ({e['jpeg_missing']} below JPEG's smallest file)" if e["jpeg_missing"] else ""))
    print(json.dumps({"out": out, "configs": results, "study": os.path.join(out, "study.html"),
                      "mlflow": {k: parent.get(k) for k in ("experiment", "tracking_uri", "run_id", "error")}}))
    return 0


def finish_parent(parent, out, table, log):
    """The study's run: per config its mean bpp and PSNR as metrics, and the study's page and table."""
    if parent["run_id"] is None:
        return

    def log_all():
        from mlflow.entities import Metric
        client = track.client_for(out)
        metrics = []
        for e in table:
            key = "".join(c if c.isalnum() or c in "-_./ " else "_" for c in e["config"])
            metrics += [Metric(f"{key}/bpp", e["bpp"], 0, 0), Metric(f"{key}/psnr", e["psnr"][-1], 0, 0)]
        for start in range(0, len(metrics), 1000):
            client.log_batch(parent["run_id"], metrics=metrics[start : start + 1000])
        for path in ("study.html", "study.parquet", "study/rate_distortion.svg"):
            if os.path.exists(os.path.join(out, path)):
                client.log_artifact(parent["run_id"], os.path.join(out, path), os.path.dirname(path) or None)
        client.set_terminated(parent["run_id"], "FINISHED")

    _, parent["error"] = track.retried("log study run", log_all, log, parent)
