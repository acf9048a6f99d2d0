"""`mrnet study INPUT --out OUT --grid FILE`: a rate-distortion sweep over configs, through the encode pipeline.

The grid file (TOML or JSON):

    [job]        job settings shared by every config (size, preset, batch_size, actors, ...)
    [fit]        fit keys shared by every config
    [grid]       fit keys with lists of values: every combination is swept (e.g. target_bpp = [0.25, 0.5, 1])
    [[config]]   named variants (name = "siren", levels = 1, ...), each crossed with the grid (or with its own
                 grid = {...} table instead)

Each config is encoded into OUT/configs/<name>/ exactly as `mrnet encode` would (Parquet, thumbnails, comparison
with JPEG/WebP/AVIF at the same bytes, report.html), so reruns skip what is done. The study adds OUT/study.parquet
(one row per config and image), OUT/study_bd.parquet (Bjøntegaard deltas of each variant's curve against each
codec, see `bd_table`), OUT/study.html (the rate-distortion plot and tables over all configs) and, in MLflow, one
parent run with a nested run per config.
"""
import io
import itertools
import json
import os
import re
import statistics
import sys
import tomllib

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mrnet_core.config import ConfigError, make_config
from mrnet_core.metrics import is_lossless, lossy_mean

from . import store, track
from .console import Progress, init_ray
from .bjontegaard import bd_psnr, bd_rate
from .settings import check_job
from .compare import CODECS, CURVES, IMAGES
from .page import CHECK_SCRIPT, STYLE, data_uri, esc, fmt, versus
from .plots import NAMES, rd_plot

PALETTE = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f", "#393b79", "#637939"]
# A config's name is its variant's then "-key=value" per grid key (read_grid). A rate key's value runs up to the
# next "-key=" or the end: a value may hold a "-" itself (1e-05).
RATE_PART = re.compile(r"-target_(?:bpp|psnr)=.*?(?=-[^-=]*=|$)")
BD = pa.schema([
    ("variant", pa.string()), ("codec", pa.string()),
    ("rates", pa.int32()),  # configs on the variant's curve
    ("images", pa.int32()),  # images with an MR-Net row in any of them
    ("bd_rate", pa.float64()), ("bd_rate_images", pa.int32()),  # mean over the images where it is defined
    ("bd_psnr", pa.float64()), ("bd_psnr_images", pa.int32()),
])


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
            entry[c], entry[f"{c}_lossless"] = lossy_mean([r[f"{c}_psnr"] for r in mine])
            entry[f"{c}_missing"] = sum(r[f"{c}_psnr"] is None for r in mine)
            # MR-Net's mean over the images the codec's mean is over: what its cell is judged against.
            paired = [r["psnr"][-1] for r in mine if r[f"{c}_psnr"] is not None and not is_lossless(r[f"{c}_psnr"])]
            entry[f"{c}_versus"] = statistics.fmean(paired) if paired else None
        entry["beats_jpeg"] = sum(r["jpeg_psnr"] is not None and r["psnr"][-1] >= r["jpeg_psnr"] for r in mine)
        out.append(entry)
    return out


def curve_of(name):
    """The rate-distortion curve a config is a point of: its name without its target_bpp/target_psnr parts.

    Not the [[config]] variant: a variant whose grid also sweeps other keys (levels = [1, 2]) has one curve per
    combination of those, and only configs that differ in rate alone lie on one curve."""
    return RATE_PART.sub("", name)


def codec_curves(out, names):
    """{(image_id, codec): [(bpp, PSNR)]}: the comparison's per-image codec curves (each config's folder has its
    images'; the curve of an image is the same in every folder, so the first found serves)."""
    found = {}
    for name in names:
        folder = folder_of(out, name)
        cfg_id = store.read_manifest(folder).get("last_run", {}).get("config_id")
        if not cfg_id:
            continue
        mine = {}
        for r in store.read_table(folder, "comparison/curves", ["image_id", "codec", "bpp", "psnr"],
                                  pads.field("config_id") == cfg_id, CURVES).to_pylist():
            mine.setdefault((r["image_id"], r["codec"]), []).append((r["bpp"], r["psnr"]))
        for k, points in mine.items():
            found.setdefault(k, points)
    return found


def bd_table(out, rows, configs):
    """BD rows: per curve of at least 2 rates (see `curve_of`) and per codec, the Bjøntegaard deltas of the MR-Net
    (test) against the codec (anchor), computed per image and averaged over the images where they are defined.

    An image's MR-Net curve is its (bpp, full-resolution PSNR) in each config of the curve; its codec curve is the
    comparison's (the LADDER qualities). A delta is undefined where the MR-Net has fewer than 2 points for the
    image or where the two curves do not overlap (often so for BD-rate: the codecs reach PSNRs the MR-Net does not).
    """
    curves = {}
    for name, _, _ in configs:
        curves.setdefault(curve_of(name), []).append(name)
    table = []
    for variant, names in curves.items():
        if len(names) < 2:
            continue  # one rate: a point, not a curve
        mrnet = {}
        for r in rows:
            if r["config"] in names and r["psnr"]:
                mrnet.setdefault(r["image_id"], []).append((r["bpp"], r["psnr"][-1]))
        anchors = codec_curves(out, names)
        for codec in CODECS:
            entry = {"variant": variant, "codec": codec, "rates": len(names), "images": len(mrnet)}
            for metric, delta in (("bd_rate", bd_rate), ("bd_psnr", bd_psnr)):
                values = [delta(anchors.get((i, codec), []), points) for i, points in mrnet.items()]
                values = [v for v in values if v is not None]
                entry[metric] = statistics.fmean(values) if values else None
                entry[f"{metric}_images"] = len(values)
            table.append(entry)
    return table


def rd_svg(table, curves):
    """Each variant's mean (bpp, PSNR) at each of its rates as one line, beside each codec's mean curve."""
    series = []
    for i, variant in enumerate(dict.fromkeys(e["variant"] for e in table)):
        points = sorted((e["bpp"], e["psnr"][-1]) for e in table if e["variant"] == variant)
        series.append((variant, PALETTE[i % len(PALETTE)], points, "line"))
    means = {}
    for codec in CODECS:
        points = {}
        for c in curves:
            if c["codec"] == codec:
                points.setdefault(c["quality"], {})[c["image_id"]] = (c["bpp"], c["psnr"])
        means[codec] = [(statistics.fmean(b for b, _ in p.values()), statistics.fmean(q for _, q in p.values()))
                        for _, p in sorted(points.items())]
    return rd_plot(series, means, title="Rate-distortion: each variant against the codecs",
                   ylabel="PSNR (dB), full resolution, mean over images")


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
            cls = versus(e[f"{c}_versus"], e[c])
            missing = f' <span class="muted">({e[f"{c}_missing"]} too small)</span>' if e[f"{c}_missing"] else ""
            if e[f"{c}_lossless"]:
                missing += f' <span class="muted">({e[f"{c}_lossless"]} lossless)</span>'
            cells.append(f"<td{cls}>{fmt(e[c])}{missing}</td>")
        cells.append(f"<td>{e['beats_jpeg']} / {e['images'] - e['jpeg_missing']}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def html_bd(bd):
    """One row per curve, for each codec its BD-rate and BD-PSNR with the images they are averaged over."""
    if not bd:
        return '<p class="muted">no variant has 2 or more rates</p>'
    head = ("<tr><th>variant</th><th>rates</th><th>images</th>"
            + "".join(f"<th>vs {NAMES[c]}: BD-rate %</th><th>BD-PSNR dB</th>" for c in CODECS) + "</tr>")
    body = []
    for variant in dict.fromkeys(e["variant"] for e in bd):
        mine = {e["codec"]: e for e in bd if e["variant"] == variant}
        first = next(iter(mine.values()))
        cells = [f'<td class="l">{esc(variant)}</td><td>{first["rates"]}</td><td>{first["images"]}</td>']
        for c in CODECS:
            for metric in ("bd_rate", "bd_psnr"):  # fewer bits, or more dB, than the codec
                v, n = mine[c][metric], mine[c][f"{metric}_images"]
                cls = versus(0, v) if metric == "bd_rate" else versus(v, 0)
                cells.append(f'<td{cls}>{fmt(v)} <span class="muted">({n})</span></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + head + "".join(body) + "</table>"


def write_study(out, configs):
    """OUT/study.parquet, OUT/study_bd.parquet, OUT/study.html and OUT/study/rate_distortion.svg; the summary
    table and the BD table."""
    rows = study_rows(out, configs)
    if rows:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buffer)
        store.write_bytes(out, "study.parquet", buffer.getvalue())
    bd = bd_table(out, rows, configs)
    buffer = io.BytesIO()  # written even when empty, so that readers find its columns
    pq.write_table(pa.Table.from_pylist(bd, schema=BD), buffer)
    store.write_bytes(out, "study_bd.parquet", buffer.getvalue())
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
<h2>Bjøntegaard deltas against the codecs</h2>
<p class="muted">Per variant (the configs whose names differ only in target_bpp / target_psnr) and image: the
MR-Net's points at its rates against the codec's curve (qualities 10-100), each interpolated by a monotone cubic in
log rate and integrated over the range both cover. BD-rate: the MR-Net's average rate change at equal PSNR
(negative: fewer bytes); BD-PSNR: its average dB above the codec at equal rate. Means over the images where the
curves overlap, their count in brackets. Green: the MR-Net is better.</p>
{html_bd(bd)}
<h2>Settings</h2>
<pre>{esc(json.dumps({name: cfg.to_dict() for name, _, cfg in configs}, indent=1))}</pre>
{CHECK_SCRIPT}
</body></html>
"""
    store.write_bytes(out, "study.html", page.encode())
    return table, bd


def cmd_study(args):
    configs, job = read_grid(args.grid)
    job.pop("preset", None)
    job.pop("wait", None)  # a study writes its own folders; no lease
    if args.size is not None:
        job.update(check_job({"size": args.size}))
    out = os.path.abspath(args.out)
    import ray
    if not ray.is_initialized():
        init_ray(args.ray_address)
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
    progress = Progress("study", len(configs), unit="configs", every=0)  # a line per config, with the ETA
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
        progress.update(i + 1, f"{name} done")
    progress.close()
    table, bd = write_study(out, configs)
    finish_parent(parent, out, table, bd, log)
    for e in table:
        log(f"study: {e['config']}: {e['bpp']:.3f} bpp, {e['psnr'][-1]:.2f} dB (levels "
            f"{' / '.join(f'{p:.2f}' for p in e['psnr'])}); JPEG {fmt(e['jpeg'])}, WebP {fmt(e['webp'])}, "
            f"AVIF {fmt(e['avif'])} dB at the same bytes; "
            f"MR-Net >= JPEG on {e['beats_jpeg']}/{e['images'] - e['jpeg_missing']}"
            + (f" ({e['jpeg_missing']} below JPEG's smallest file)" if e["jpeg_missing"] else ""))
    for e in bd:
        log(f"study: {e['variant']} vs {NAMES[e['codec']]}: BD-rate {fmt(e['bd_rate'])}% ({e['bd_rate_images']} of "
            f"{e['images']} images), BD-PSNR {fmt(e['bd_psnr'])} dB ({e['bd_psnr_images']})")
    print(json.dumps({"out": out, "configs": results, "study": os.path.join(out, "study.html"),
                      "mlflow": {k: parent.get(k) for k in ("experiment", "tracking_uri", "run_id", "error")}}))
    return 0


def finish_parent(parent, out, table, bd, log):
    """The study's run: per config its mean bpp and PSNR, per variant and codec its mean BD-rate and BD-PSNR where
    defined, as metrics; and the study's page and tables."""
    if parent["run_id"] is None:
        return

    def key_of(name):
        return "".join(c if c.isalnum() or c in "-_./ " else "_" for c in name)

    def log_all():
        from mlflow.entities import Metric
        client = track.client_for(out)
        metrics = []
        for e in table:
            key = key_of(e["config"])
            metrics += [Metric(f"{key}/bpp", e["bpp"], 0, 0), Metric(f"{key}/psnr", e["psnr"][-1], 0, 0)]
        metrics += [Metric(f"{m}/{key_of(e['variant'])}/{e['codec']}", e[m], 0, 0)
                    for e in bd for m in ("bd_rate", "bd_psnr") if e[m] is not None]
        for start in range(0, len(metrics), 1000):
            client.log_batch(parent["run_id"], metrics=metrics[start : start + 1000])
        for path in ("study.html", "study.parquet", "study_bd.parquet", "study/rate_distortion.svg"):
            if os.path.exists(os.path.join(out, path)):
                client.log_artifact(parent["run_id"], os.path.join(out, path), os.path.dirname(path) or None)
        client.set_terminated(parent["run_id"], "FINISHED")

    _, parent["error"] = track.retried("log study run", log_all, log, parent)
