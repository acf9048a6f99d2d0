"""`mrnet render-collection OUT`: thumbnails, comparison and report for a config's encodings in OUT.

    OUT/thumbnails/<image_id>/level_<k>.png, strip.png   every level of detail, from the weights alone
    OUT/comparison/images/part-*.parquet                 one row per image (pipeline/compare.py IMAGES)
    OUT/comparison/curves/part-*.parquet                 codec rate-distortion points (CURVES)
    OUT/contact_sheet.png, OUT/report/*.svg, OUT/report.html

Rows stream from Parquet a few at a time, so memory does not grow with the collection. Each batch's comparison
rows are committed as one part file named by its images, and a rerun skips images already compared under the
config, so reruns neither duplicate rows nor redo work.

Rows are not trusted: a row whose image_id is not 64 lowercase hex digits (it names a folder), whose weights are
missing or not a sound model file, whose architecture is not JSON, or whose figures disagree with its model is
skipped with a warning naming its uri and image_id, and the rest of the collection goes on.
"""
import json
import os
import time

import pyarrow.dataset as pads
import pyarrow.fs as pafs
from PIL import Image

from mrnet_core import modelfile
from mrnet_core.images import save_png

from . import store
from .compare import CURVES, IMAGES, compare
from .sources import filesystem
from .thumbnails import GAP, write_thumbnails

BATCH = 8
SHEET_IMAGES = 60  # the contact sheet shows the first images only, so it stays a viewable size
SHEET_HEIGHT = 64


def pick_config(out, config_id=None):
    """(config_id, its manifest entry): the one asked for, else the last run's."""
    manifest = store.read_json(out, "manifest.json")
    configs = manifest.get("configs", {})
    if not configs:
        raise FileNotFoundError(f"{out}: no manifest.json with encodings; run `mrnet encode ... --out {out}` first")
    config_id = config_id or manifest.get("last_run", {}).get("config_id") or next(iter(configs))
    if config_id not in configs:
        raise KeyError(f"{out}: config {config_id} is not in manifest.json (known: {', '.join(configs)})")
    return config_id, configs[config_id]


def thumbnail_folder(out, image_id):
    if not store.is_image_id(image_id):  # the last guard: a path is never built from anything else
        raise ValueError(f"image_id {image_id!r} is not 64 lowercase hex digits")
    return os.path.join(out, "thumbnails", image_id)


class BadRow(ValueError):
    """An encodings row that cannot be used: the message says why."""


def row_label(row):
    """The row's uri and image_id, quoted, so that a hostile value stays on one line."""
    return f"uri {row.get('uri')!r} (image_id {row.get('image_id')!r})"


def row_architecture(row):
    """The architecture (a dict) of an encodings row whose image_id is sound; BadRow otherwise."""
    if not store.is_image_id(row.get("image_id")):
        raise BadRow("image_id is not 64 lowercase hex digits")
    try:
        architecture = json.loads(row.get("architecture"))
    except (TypeError, ValueError):
        architecture = None
    if not isinstance(architecture, dict):
        raise BadRow("architecture is not a JSON object")
    return architecture


def load_row(row):
    """(model, meta) of an encodings row whose image_id, architecture and weights are sound; BadRow otherwise."""
    row_architecture(row)
    try:
        return modelfile.from_bytes(row.get("weights"), "weights")
    except modelfile.ModelFileError as e:
        raise BadRow(str(e)) from None


def _figures_problem(row, meta):
    """Why the row's figures that the comparison uses do not fit its model, or None."""
    if not isinstance(row.get("uri"), str) or not row["uri"]:
        return "uri is missing"
    for key in ("width", "height", "channels"):
        if row.get(key) != meta[key]:
            return f"{key} {row.get(key)!r} is not the model's {meta[key]}"
    if row.get("model_bytes") != len(row["weights"]):
        return f"model_bytes {row.get('model_bytes')!r} is not the weights' {len(row['weights'])} bytes"
    for key in ("raw_bytes", "file_bytes"):
        if not isinstance(row.get(key), int) or row[key] < 0:
            return f"{key} {row.get(key)!r} is not a byte count"
    return None


def render_collection(out, config_id=None, log=print):
    """Thumbnails and comparison rows for every encoded image not yet done, then the contact sheet and report."""
    if "://" in out:
        raise ValueError(f"{out}: render-collection writes thumbnails and a report to a local folder; "
                         "copy the Parquet output to local disk first")
    start = time.perf_counter()
    config_id, config = pick_config(out, config_id)
    is_config = pads.field("config_id") == config_id
    done = set(store.read_table(out, "comparison/images", ["image_id"], is_config, IMAGES).column("image_id").to_pylist())
    fs, path = filesystem(store.join(out, "encodings"))
    new = rejected = 0
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        for batch in dataset.to_batches(filter=is_config, batch_size=BATCH):
            images, curves = [], []
            for row in batch.to_pylist():
                if row["image_id"] in done:
                    continue
                try:
                    model, meta = load_row(row)
                    problem = _figures_problem(row, meta)
                    if problem:
                        raise BadRow(problem)
                except BadRow as e:
                    rejected += 1
                    log(f"render-collection: warning: skipped the row of {row_label(row)} in {out}/encodings: {e}")
                    continue
                done.add(row["image_id"])  # the same file under two uris is compared once
                levels = write_thumbnails(model, meta, thumbnail_folder(out, row["image_id"]))
                image, points = compare(row, levels, config["size"], config["fit"].get("border", "reflect"))
                images.append(image)
                curves.extend(points)
            if images:
                name = store.part_name(config_id, [r["image_id"] for r in images])
                if curves:  # curves first: a kill between the writes leaves the image still to do
                    store.write_part(out, "comparison/curves", name, curves, CURVES)
                store.write_part(out, "comparison/images", name, images, IMAGES)
                new += len(images)
                log(f"render-collection: {len(done)} image(s) rendered and compared")
    table = store.read_table(out, "comparison/images", filter=is_config, schema=IMAGES)
    write_contact_sheet(out, table)
    from .report import write_report  # the report is the last step and the only one that needs the others' output
    write_report(out, config_id)
    seconds = time.perf_counter() - start
    log(f"render-collection: {new} new, {table.num_rows} in all under config {config_id}"
        + (f", {rejected} row(s) skipped" if rejected else "")
        + f" in {seconds:.1f} s -> {os.path.join(out, 'report.html')}")
    return {"config_id": config_id, "rendered": new, "compared": table.num_rows, "rejected": rejected,
            "seconds": round(seconds, 2)}


def write_contact_sheet(out, table):
    """OUT/contact_sheet.png: the level strips of the first SHEET_IMAGES images, one per row, at a small height."""
    strips = []
    image_ids = [i for i in table.column("image_id").to_pylist() if store.is_image_id(i)]
    for image_id in image_ids[:SHEET_IMAGES]:
        path = os.path.join(thumbnail_folder(out, image_id), "strip.png")
        if os.path.exists(path):
            with Image.open(path) as im:
                strips.append(im.convert("RGB").resize((max(1, im.width * SHEET_HEIGHT // im.height), SHEET_HEIGHT),
                                                       Image.LANCZOS))
    if not strips:
        return None
    sheet = Image.new("RGB", (max(s.width for s in strips), len(strips) * (SHEET_HEIGHT + GAP) - GAP), "white")
    for i, s in enumerate(strips):
        sheet.paste(s, (0, i * (SHEET_HEIGHT + GAP)))
    path = os.path.join(out, "contact_sheet.png")
    save_png(sheet, path)
    return path
