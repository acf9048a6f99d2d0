"""`mrnet render-collection OUT`: thumbnails, comparison and report for a config's encodings in OUT.

    OUT/thumbnails/<image_id>/level_<k>.png, strip.png   every level of detail, from the weights alone
    OUT/comparison/images/part-*.parquet                 one row per image (pipeline/compare.py IMAGES)
    OUT/comparison/curves/part-*.parquet                 codec rate-distortion points (CURVES)
    OUT/contact_sheet.png, OUT/report/*.svg, OUT/report.html, OUT/viewer.html

A Ray Data stage, like encode: read the encodings -> map_batches on a pool of CPU actors, each call rendering
and comparing its rows and committing their comparison parts atomically -> the driver sums small summaries,
then writes the contact sheet and report from the committed Parquet rows.

Exactly once: the driver first loads the keys of images already compared under the config, and the actors skip
those. A part is named by a hash of (config_id, its images), so a batch Ray retries rewrites its own file. A run
killed at any moment leaves only whole parts, so a rerun does only what is missing.

Rows are not trusted: a row whose image_id is not 64 lowercase hex digits (it names a folder), whose weights are
missing or not a sound model file, whose architecture is not JSON, or whose figures disagree with its model is
skipped with a warning naming its uri and image_id, and the rest of the collection goes on.
"""
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from mrnet_core import modelfile
from mrnet_core.images import png_bytes

from . import priors, store
from .console import init_ray
from .compare import CURVES, IMAGES, compare
from .sources import filesystem
from .thumbnails import GAP, write_thumbnails

BATCH = 8
SHEET_IMAGES = 60  # the contact sheet shows the first images only, so it stays a viewable size
SHEET_HEIGHT = 64
COLUMNS = ["image_id", "uri", "config_id", "width", "height", "channels", "architecture", "weights", "model_bytes",
           "raw_bytes", "file_bytes", "bpp"]  # what the stage reads of an encodings row
SUMMARY = pa.schema([("rendered", pa.int64()), ("rejected", pa.int64()), ("warnings", pa.list_(pa.string()))])


def pick_config(out, config_id=None):
    """(config_id, its manifest entry): the one asked for, else the last run's."""
    manifest = store.read_manifest(out)
    configs = manifest.get("configs", {})
    if not configs or not isinstance(configs, dict):
        raise FileNotFoundError(f"{out}: no manifest.json with encodings; run `mrnet encode ... --out {out}` first")
    last = manifest.get("last_run")
    config_id = config_id or (last.get("config_id") if isinstance(last, dict) else None) or next(iter(configs))
    if not isinstance(config_id, str) or config_id not in configs:
        raise KeyError(f"{out}: config {config_id} is not in manifest.json (known: {', '.join(configs)})")
    return config_id, configs[config_id]


def thumbnail_folder(image_id):
    """thumbnails/<image_id>, the image's folder under OUT."""
    if not store.is_image_id(image_id):  # the last guard: a path is never built from anything else
        raise ValueError(f"image_id {image_id!r} is not 64 lowercase hex digits")
    return f"thumbnails/{image_id}"


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
    except (TypeError, ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        architecture = None
    if not isinstance(architecture, dict):
        raise BadRow("architecture is not a JSON object")
    return architecture


def load_row(row, out=None, prior=None):
    """(model, meta) of an encodings row whose image_id, architecture and weights are sound; BadRow otherwise.

    Weights coded against a prior are decoded with it: `prior` if given, else OUT's copy or the default one
    (`priors.find`)."""
    row_architecture(row)
    try:
        return priors.decode(row.get("weights"), "weights", out, prior)
    except modelfile.ModelFileError as e:
        raise BadRow(str(e)) from None


def _figures_problem(row, meta):
    """Why the row's figures that the comparison uses do not fit its model, or None."""
    if not isinstance(row.get("uri"), str) or not row["uri"]:
        return "uri is missing"
    for key in ("width", "height", "channels"):
        if row.get(key) != getattr(meta, key):
            return f"{key} {row.get(key)!r} is not the model's {getattr(meta, key)}"
    if row.get("model_bytes") != len(row["weights"]):
        return f"model_bytes {row.get('model_bytes')!r} is not the weights' {len(row['weights'])} bytes"
    for key in ("raw_bytes", "file_bytes"):
        if not isinstance(row.get(key), int) or row[key] < 0:
            return f"{key} {row.get(key)!r} is not a byte count"
    return None


def batches(out, folder, columns, filter=None, schema=None):
    """Committed rows of OUT/folder as record batches, a few at a time; stray files are left out
    (`store.part_files`), and there are none when the folder is missing."""
    data = store.dataset(out, folder, schema)
    if data is not None:
        yield from (b for b in data.to_batches(columns=columns, filter=filter) if b.num_rows)


def first_rows(out, folder, columns, n, filter=None, schema=None):
    """The first n committed rows of OUT/folder (in the order a full read gives them), as a table."""
    data = store.dataset(out, folder, schema)
    return schema.empty_table().select(columns) if data is None else data.head(n, columns=columns, filter=filter)


def skip_keys(out, is_config):
    """Sorted keys of the rows the stage must not do: store.key(image_id) of images already compared under the
    config, and store.key(uri, image_id) of each row but the one with the least uri of a file encoded under
    several uris (compared once). Only 16 bytes an image, like encode's done keys."""
    done = [store.key(i) for b in batches(out, "comparison/images", ["image_id"], is_config, IMAGES)
            for i in b.column("image_id").to_pylist() if store.is_image_id(i)]
    ids = np.array([store.key(i) for b in batches(out, "encodings", ["image_id"], is_config)
                    for i in b.column("image_id").to_pylist() if store.is_image_id(i)], dtype="S16")
    keys, counts = np.unique(ids, return_counts=True)
    shared, first = np.sort(keys[counts > 1]), {}
    if len(shared):  # rare: a second pass over the few image_ids seen under several uris
        for b in batches(out, "encodings", ["uri", "image_id"], is_config):
            for uri, image_id in zip(b.column("uri").to_pylist(), b.column("image_id").to_pylist()):
                if store.is_image_id(image_id) and isinstance(uri, str) and store.contains(shared, store.key(image_id)):
                    first.setdefault(image_id, set()).add(uri)
    later = [store.key(uri, image_id) for image_id, uris in first.items() for uri in sorted(uris)[1:]]
    return np.sort(np.array(done + later, dtype="S16"))


def read_parts(uris: pa.Table, config_id) -> pa.Table:
    """The config's rows of the encodings parts named in `uris`, only the columns the stage needs."""
    return pa.concat_tables(pq.read_table(path, columns=COLUMNS, filters=pads.field("config_id") == config_id,
                                          filesystem=fs)
                            for fs, path in map(filesystem, uris.column("item").to_pylist()))


class Comparer:
    """An actor of the final stage: each call renders thumbnails of its rows, compares them with the originals
    and the codecs, commits the comparison rows as one part, and returns only a one-row SUMMARY."""

    def __init__(self, out, config_id, size, border, skip_ref):
        torch.set_num_threads(1)  # one CPU reserved each; small renders and the codecs gain little from threads
        self.out, self.config_id, self.size, self.border = out, config_id, size, border
        self.skip = ray.get(skip_ref[0])

    def skipped(self, row):
        image_id, uri = row.get("image_id"), row.get("uri")
        if not store.is_image_id(image_id):
            return False  # checked, and warned about, below
        return bool(store.contains(self.skip, store.key(image_id))
                    or isinstance(uri, str) and store.contains(self.skip, store.key(uri, image_id)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        images, curves, warnings = [], [], []
        for row in batch.to_pylist():
            if self.skipped(row):
                continue
            try:
                model, meta = load_row(row, self.out)
                problem = _figures_problem(row, meta)
                if problem:
                    raise BadRow(problem)
            except BadRow as e:
                warnings.append(f"skipped the row of {row_label(row)} in {self.out}/encodings: {e}")
                continue
            levels = write_thumbnails(model, meta, self.out, thumbnail_folder(row["image_id"]))
            image, points = compare(row, levels, self.size, self.border)
            images.append(image)
            curves.extend(points)
        if images:
            name = store.part_name(self.config_id, [r["image_id"] for r in images])
            if curves:  # curves first: a kill between the writes leaves the image still to do
                store.write_part(self.out, "comparison/curves", name, curves, CURVES)
            store.write_part(self.out, "comparison/images", name, images, IMAGES)
        return pa.Table.from_pylist([{"rendered": len(images), "rejected": len(warnings), "warnings": warnings}],
                                    schema=SUMMARY)


def committed_parts(out, folder, schema=None):
    """URIs of the committed parts of OUT/folder: not the hidden temporaries of a running or killed job, nor
    stray files (`store.part_files`)."""
    return [store.join(out, folder, path.rsplit("/", 1)[-1]) for path in store.part_files(out, folder, schema)[0]]


def remove_unfinished(out):
    """Delete the curves parts whose images part is missing (a run killed between the two writes): the images
    are done again, perhaps in other batches, and their curves must not count twice."""
    done = {uri.rsplit("/", 1)[-1] for uri in committed_parts(out, "comparison/images", IMAGES)}
    for uri in committed_parts(out, "comparison/curves", CURVES):
        if uri.rsplit("/", 1)[-1] not in done:
            store.delete(out, f"comparison/curves/{uri.rsplit('/', 1)[-1]}")


def render_collection(out, config_id=None, log=print, workers=None):
    """Thumbnails and comparison rows for every encoded image not yet done, then the contact sheet and report.

    Uses the Ray already initialised (as `mrnet encode` does), else a local one for this call. `workers`: actors
    of one CPU each (default: every CPU of the cluster)."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers: {workers}; at least 1")
    start = time.perf_counter()
    config_id, config = pick_config(out, config_id)
    local = not ray.is_initialized()
    if local:
        # a new one: never attach to another job's
        init_ray("local", include_dashboard=False)
    try:
        totals = compare_all(out, config_id, config, log, workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
    finally:
        if local:
            ray.shutdown()
    is_config = pads.field("config_id") == config_id
    write_contact_sheet(out, first_rows(out, "comparison/images", ["image_id"], SHEET_IMAGES, is_config, IMAGES))
    from .report import write_report  # the report is the last step and the only one that needs the others' output
    write_report(out, config_id)
    compared = sum(b.num_rows for b in batches(out, "comparison/images", ["image_id"], is_config, IMAGES))
    seconds = time.perf_counter() - start
    log(f"render-collection: {totals['rendered']} new, {compared} in all under config {config_id}"
        + (f", {totals['rejected']} row(s) skipped" if totals["rejected"] else "")
        + f" in {seconds:.1f} s -> {store.join(out, 'report.html')}")
    return {"config_id": config_id, **totals, "compared": compared, "seconds": round(seconds, 2)}


def compare_all(out, config_id, config, log, workers):
    """Run the stage over the config's encodings; the summed summaries, each warning logged as it comes."""
    totals = {"rendered": 0, "rejected": 0}
    remove_unfinished(out)
    parts = committed_parts(out, "encodings")
    if not parts:
        return totals
    is_config = pads.field("config_id") == config_id
    skip_ref = [ray.put(skip_keys(out, is_config))]  # in a list so Ray passes the reference, not the array
    # Reading a part is light next to rendering and the codecs, so reads hold no CPU and every CPU holds an actor
    # (ray.data.read_parquet's file listing holds one, and waits forever where the actors hold them all). Two at
    # a time: Ray would otherwise start a worker process for every part at once, since they need no CPU.
    ds = ray.data.from_items(parts).map_batches(read_parts, batch_size=1, batch_format="pyarrow", num_cpus=0,
                                                compute=ray.data.TaskPoolStrategy(size=2),
                                                fn_kwargs={"config_id": config_id})
    ds = ds.map_batches(Comparer, batch_size=BATCH, batch_format="pyarrow", num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                        fn_constructor_kwargs={"out": out, "config_id": config_id, "size": config["size"],
                                               "border": config["fit"].get("border", "reflect"), "skip_ref": skip_ref})
    last = time.perf_counter()
    for summary in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in summary.to_pylist():
            totals["rendered"] += row["rendered"]
            totals["rejected"] += row["rejected"]
            for warning in row["warnings"]:
                log(f"render-collection: warning: {warning}")
        if time.perf_counter() - last > 5:
            last = time.perf_counter()
            log(f"render-collection: {totals['rendered']} image(s) rendered and compared")
    return totals


def write_contact_sheet(out, table):
    """OUT/contact_sheet.png: the level strips of the first SHEET_IMAGES images, one per row, at a small height."""
    strips = []
    image_ids = [i for i in table.column("image_id").to_pylist() if store.is_image_id(i)]
    for image_id in image_ids[:SHEET_IMAGES]:
        data = store.read_bytes(out, f"{thumbnail_folder(image_id)}/strip.png")
        if data is not None:
            with Image.open(io.BytesIO(data)) as im:
                strips.append(im.convert("RGB").resize((max(1, im.width * SHEET_HEIGHT // im.height), SHEET_HEIGHT),
                                                       Image.LANCZOS))
    if not strips:
        return None
    sheet = Image.new("RGB", (max(s.width for s in strips), len(strips) * (SHEET_HEIGHT + GAP) - GAP), "white")
    for i, s in enumerate(strips):
        sheet.paste(s, (0, i * (SHEET_HEIGHT + GAP)))
    store.write_bytes(out, "contact_sheet.png", png_bytes(sheet))
    return store.join(out, "contact_sheet.png")
