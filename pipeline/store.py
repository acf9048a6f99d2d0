"""The output folder, local or on an object store: files written whole, Parquet parts, done work, the manifest.

    OUT/encodings/part-<hash>.parquet   one row per encoded image and config (ENCODINGS)
    OUT/failures/part-<hash>.parquet    one row per image that could not be encoded (FAILURES)
    OUT/manifest.json                   configs, versions and counts
    OUT/_listing/<config_id>/           the job's input listing (scratch; readers skip names starting with _ or .)

Every file in OUT is written through `output` (or `write_bytes`), so a reader never sees half a file: on a local
disk under a hidden temporary name, then renamed; on an object store (s3://, gs://, ...; no rename there) as one
whole-object write that starts only once the content is complete. A part file is named by a hash of its config
and contents, so a retried batch replaces its own file instead of adding one.
"""
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .sources import filesystem, has_scheme, read_object

ENCODINGS = pa.schema([
    ("image_id", pa.string()),  # SHA-256 of the file's bytes, hex
    ("uri", pa.string()),
    ("config_id", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("channels", pa.int32()),
    ("model", pa.string()),
    ("architecture", pa.string()),  # JSON, mrnet_core.network.Architecture.to_dict()
    ("weights", pa.binary()),  # the .mrnet model file: mrnet_core.modelfile.from_bytes(weights)
    ("params", pa.int64()),
    ("weight_bits", pa.int32()),  # 32 or 16: float weights; 2 to 12: quantised and entropy-coded
    ("prior_id", pa.string()),  # the prior the image started from (OUT/priors/<prior_id>.mrprior); an MR-Net's weights
    # are coded against it, a latent pyramid's are not (its file decodes alone); null: none
    ("width_scale", pa.float64()),  # rate control: the widths used, relative to the config's; null without
    ("target_met", pa.bool_()),  # rate control: whether the bpp / PSNR targets were met; null without
    ("step_coarsening", pa.int32()),  # rate control: steps raised by 2^(k/8) so the file fits; null without
    ("model_bytes", pa.int64()),
    ("raw_bytes", pa.int64()),
    ("file_bytes", pa.int64()),
    ("bpp", pa.float64()),
    ("psnr", pa.list_(pa.float64())),  # per level, coarse to fine
    ("ssim", pa.list_(pa.float64())),
    ("fit_seconds", pa.float64()),
    ("batch", pa.int32()),  # images fitted together (fit_seconds is the batch's time shared evenly)
    ("epochs", pa.list_(pa.int32())),  # per stage, coarse to fine
    ("notes", pa.list_(pa.string())),  # conversions made on decoding
    ("device", pa.string()),
    ("encoded_at", pa.timestamp("ms", tz="UTC")),
])

IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # what `image_id` holds; it names folders, so nothing else may pass


def is_image_id(value):
    """Whether `value` is an image_id (64 lowercase hex digits): safe as a folder name under OUT."""
    return isinstance(value, str) and IMAGE_ID.fullmatch(value) is not None


FAILURES = pa.schema([
    ("uri", pa.string()),
    ("config_id", pa.string()),
    ("stage", pa.string()),  # read, decode or fit
    ("error_kind", pa.string()),
    ("message", pa.string()),
    ("failed_at", pa.timestamp("ms", tz="UTC")),
])


def config_id(config: dict):
    """A short stable id of everything that changes an encoding."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def key(*parts):
    """16-byte digest used to look up done work (sorted numpy 'S16' arrays stay small at millions of rows)."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).digest()


def contains(sorted_keys, k):
    # Two searches rather than an equality test: numpy's bytes scalars drop trailing NULs, its searches do not.
    return np.searchsorted(sorted_keys, k, "left") != np.searchsorted(sorted_keys, k, "right")


def part_name(cfg_id, uris):
    return "part-" + hashlib.sha256("\n".join([cfg_id, *sorted(uris)]).encode()).hexdigest()[:32] + ".parquet"


def join(out, *names):
    return "/".join([out.rstrip("/"), *names])


def is_remote(uri):
    """Whether uri names an object store or another non-local filesystem (s3://bucket/key), not a local path."""
    return has_scheme(uri) and not uri.startswith("file://")


@contextmanager
def output(out, name):
    """A binary file object for OUT/name (name may hold folders); the file appears whole when the block ends
    without an error, and not at all otherwise."""
    fs, path = filesystem(join(out, name))
    folder, base = path.rsplit("/", 1)
    fs.create_dir(folder, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{base}"
        try:
            with open(tmp, "wb") as f:
                yield f
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    # An object store: spool locally, then upload in one write, so that an error while the content is being
    # made (or a kill) never leaves a partial object behind.
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
        yield spool
        spool.seek(0)
        with fs.open_output_stream(path) as f:
            shutil.copyfileobj(spool, f, 8 << 20)


def write_bytes(out, name, data):
    """OUT/name holding `data`, written whole (see `output`)."""
    with output(out, name) as f:
        f.write(data)


def read_bytes(out, name):
    """The bytes of OUT/name, or None when there is no such file."""
    fs, path = filesystem(join(out, name))
    try:
        return read_object(fs, path)
    except FileNotFoundError:
        return None


def file_size(out, name):
    """The size in bytes of OUT/name, or None when it is not a file."""
    fs, path = filesystem(join(out, name))
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def read_small(out, name, limit):
    """The bytes of OUT/name when it is a regular file of at most `limit` bytes, else None: a FIFO, a folder or a
    huge file planted there is never opened."""
    size = file_size(out, name)
    return None if size is None or size > limit else read_bytes(out, name)


def exists(out, name):
    """Whether OUT/name is a file."""
    return file_size(out, name) is not None


def delete(out, name):
    """Remove OUT/name if it exists."""
    fs, path = filesystem(join(out, name))
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def write_part(out, folder, name, rows, schema):
    """Write rows (a list of dicts) as the Parquet file OUT/folder/name, whole (see `output`)."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    write_bytes(out, f"{folder}/{name}", buffer.getvalue())


def remove_temporaries(out):
    """Delete temporary files a killed run left behind (never visible to readers, but they take space)."""
    for folder in ("encodings", "failures", "comparison/images", "comparison/curves"):
        fs, path = filesystem(join(out, folder))
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.base_name.startswith(".tmp-"):
                fs.delete_file(info.path)


def part_files(out, folder, schema=None):
    """(paths of OUT/folder's part files, [{"file", "reason"}] of the files skipped there).

    Hidden names (temporaries, scratch) are ignored. Anything else that is not a readable Parquet file whose
    columns match `schema` (default: that of encodings or failures) is skipped, so that a stray README or a
    truncated part never blocks a job or a reader."""
    schema = schema or (ENCODINGS if folder == "encodings" else FAILURES)
    fs, path = filesystem(join(out, folder))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return [], []
    good, skipped = [], []
    for info in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path):
        if info.base_name.startswith((".", "_")):
            continue
        reason = part_problem(fs, info, schema)
        if reason:
            skipped.append({"file": join(out, folder, info.base_name), "reason": reason})
        else:
            good.append(info.path)
    return good, skipped


def part_problem(fs, info, schema):
    """Why the file is not a part of a table with `schema`, or None when it is."""
    if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
        return "not a .parquet file"
    try:
        found = pq.read_schema(info.path, filesystem=fs)
    except (pa.ArrowException, OSError) as e:
        return f"not a readable Parquet file ({str(e).splitlines()[0]})"
    if "config_id" not in found.names:
        return "no config_id column"
    for field in schema:
        if field.name in found.names and not found.field(field.name).type.equals(field.type):
            return f"column {field.name} is {found.field(field.name).type}, not {field.type}"
    return None


def dataset(out, folder, schema=None):
    """OUT/folder's part files as a pyarrow dataset with `schema` (default: that of encodings or failures),
    stray files left out; None when there is no part."""
    schema = schema or (ENCODINGS if folder == "encodings" else FAILURES)
    paths, _ = part_files(out, folder, schema)
    if not paths:
        return None
    fs, _ = filesystem(join(out, folder))
    return pads.dataset(paths, filesystem=fs, format="parquet", schema=schema)


def read_table(out, folder, columns=None, filter=None, schema=None):
    """Every committed row of OUT/folder, read as `schema` (default: that of encodings or failures); an empty
    table when there is none."""
    schema = schema or (ENCODINGS if folder == "encodings" else FAILURES)
    data = dataset(out, folder, schema)
    if data is None:
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return data.to_table(columns=columns, filter=filter)


def done_keys(out, cfg_id):
    """Sorted keys of work already recorded under cfg_id: (uri, image_id) encoded, and uris failed."""
    def scan(folder, columns):
        data = dataset(out, folder)
        keys = []
        for batch in data.to_batches(columns=columns, filter=pads.field("config_id") == cfg_id) if data else []:
            keys.extend(key(*parts) for parts in zip(*(batch.column(c).to_pylist() for c in columns)))
        return np.sort(np.array(keys, dtype="S16"))
    return scan("encodings", ["uri", "image_id"]), scan("failures", ["uri"])


def ensure_tables(out):
    """Give encodings/ and failures/ an empty part when they have none, so that `OUT/failures/*.parquet` readers
    (DuckDB, Polars, pandas) find a table with its columns even when nothing failed."""
    for folder, schema in (("encodings", ENCODINGS), ("failures", FAILURES)):
        if not part_files(out, folder, schema)[0]:
            write_part(out, folder, "part-empty.parquet", [], schema)


def write_json(out, name, obj):
    write_bytes(out, name, json.dumps(obj, indent=2).encode())


class CorruptFile(ValueError):
    """A file in OUT that is not what it should be (one line naming it)."""


def read_json(out, name):
    """The JSON object in OUT/name; {} when there is no such file; CorruptFile when it is not a JSON object."""
    data = read_bytes(out, name)
    if data is None:
        return {}
    try:
        obj = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFile(f"{join(out, name)}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptFile(f"{join(out, name)}: not a JSON object")
    return obj


def read_manifest(out):
    """OUT/manifest.json ({} when there is none); CorruptFile when it is not what `mrnet encode` writes: configs a
    table of {"fit": {...}, "size": int or null}, last_run and versions tables."""
    manifest = read_json(out, "manifest.json")
    configs = manifest.get("configs", {})
    sound = isinstance(configs, dict) and all(
        isinstance(c, dict) and isinstance(c.get("fit"), dict)
        and (c.get("size") is None or type(c.get("size")) is int) for c in configs.values())
    if not sound or not all(isinstance(manifest.get(k, {}), dict) for k in ("last_run", "versions", "counts")):
        raise CorruptFile(f"{join(out, 'manifest.json')}: not a manifest written by mrnet encode")
    return manifest
