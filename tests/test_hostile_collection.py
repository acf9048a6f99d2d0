"""Hostile rows in an encode job's output (issue 13): render-collection and export-collection skip them with a
warning naming the row, go on with the rest, and never write outside their output folder. The OUT folders are
real (Parquet parts written by pipeline.store, real model files), built without running Ray;
render-collection then runs on a real local Ray."""
import datetime
import hashlib
import json
import os
import struct

import pytest
import torch

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.images import save_png
from mrnet_core.network import MRNet
from pipeline import store
from pipeline.cli import main
from pipeline.compare import IMAGES

pytestmark = pytest.mark.usefixtures("local_ray")  # render-collection runs on Ray: tests/conftest.py
CONFIG_ID = "0123456789abcdef"
SIZE = 16


def files_under(folder):
    return {os.path.join(root, name) for root, _, names in os.walk(folder) for name in names}


def model_file(preset="fast", seed=0):
    cfg = make_config(preset, {"levels": 2, "first": [8, 8], "hidden": [8, 8]})
    m = MRNet(cfg.architecture(3), batch=1, seed=seed)
    meta = modelfile.ImageMeta(SIZE, SIZE, 3, 2, "wrap" if preset == "texture" else "reflect")
    return m.arch.to_json(), modelfile.to_bytes(m, meta)


def row(uri, image_id, architecture, weights, **changes):
    """An encodings row as `mrnet encode` writes it, with `changes` applied."""
    size = len(weights) if isinstance(weights, bytes) else 0
    base = {"image_id": image_id, "uri": uri, "config_id": CONFIG_ID, "width": SIZE, "height": SIZE, "channels": 3,
            "model": "m", "architecture": architecture, "weights": weights, "params": 0, "weight_bits": 32,
            "model_bytes": size, "raw_bytes": SIZE * SIZE * 3, "file_bytes": 100, "bpp": 8 * size / SIZE**2,
            "psnr": [20.0, 20.0], "ssim": [0.5, 0.5], "fit_seconds": 1.0, "batch": 1, "epochs": [1, 1], "notes": [],
            "device": "cpu", "encoded_at": datetime.datetime.now(datetime.timezone.utc)}
    return {**base, **changes}


def write_job(out, rows):
    store.write_part(str(out), "encodings", "part-test.parquet", rows, store.ENCODINGS)
    fit = make_config("fast", {"levels": 2}).to_dict()
    store.write_json(str(out), "manifest.json", {"configs": {CONFIG_ID: {"fit": fit, "size": SIZE, "format": 1}},
                                                 "last_run": {"config_id": CONFIG_ID}})


def hostile_rows(root, architecture, weights):
    """(row, the reason expected in its warning) for each hostile row; `root` is where traversal would land."""
    flipped = bytearray(weights)
    flipped[len(flipped) // 2] ^= 0x10
    absurd = store.ENCODINGS.field("width").type  # int32: the largest a row can hold
    assert str(absurd) == "int32"
    escape = os.path.relpath(root / "escaped", root / "out" / "thumbnails")
    return [
        (row("a.png", escape, architecture, weights), "image_id is not 64 lowercase hex digits"),
        (row("b.png", str(root / "absolute"), architecture, weights), "image_id is not 64 lowercase hex digits"),
        (row("c.png", "AB" * 32, architecture, weights), "image_id is not 64 lowercase hex digits"),
        (row("d.png", "d" * 64, architecture, None), "no model bytes (got NoneType)"),
        (row("e.png", "e" * 64, architecture, bytes(flipped)), "checksum mismatch"),
        (row("f.png", "f" * 64, "{not json", weights), "architecture is not a JSON object"),
        (row("g.png", "0" * 64, architecture, weights, width=2**31 - 1, height=2**31 - 1), "width 2147483647"),
    ]


@pytest.fixture
def job(tmp_path):
    """OUT with one sound row whose original is a real PNG, and every kind of hostile row."""
    out = tmp_path / "out"
    original = tmp_path / "images" / "good.png"
    save_png(torch.rand(3, SIZE, SIZE), original)
    architecture, weights = model_file()
    good_id = hashlib.sha256(original.read_bytes()).hexdigest()
    fifo = tmp_path / "images" / "fifo.png"
    os.mkfifo(fifo)  # reading this original would block forever
    fifo_row = row(str(fifo), hashlib.sha256(b"fifo").hexdigest(), architecture, weights)
    hostile = hostile_rows(tmp_path, architecture, weights)
    write_job(out, [row(str(original), good_id, architecture, weights), fifo_row, *(r for r, _ in hostile)])
    return out, good_id, fifo_row, hostile


def test_render_collection_skips_hostile_rows_and_writes_only_under_out(job, tmp_path, capsys):
    out, good_id, fifo_row, hostile = job
    outside = files_under(tmp_path) - files_under(out)
    assert main(["render-collection", str(out)]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["rendered"] == 2 and summary["rejected"] == len(hostile)
    for bad, reason in hostile:  # one line each, naming the row and the reason
        lines = [line for line in captured.err.splitlines() if f"uri {bad['uri']!r}" in line]
        assert len(lines) == 1 and f"image_id {bad['image_id']!r}" in lines[0] and reason in lines[0], lines
    assert "Traceback" not in captured.err
    assert files_under(tmp_path) - files_under(out) == outside  # nothing written outside OUT
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()
    assert sorted(os.listdir(out / "thumbnails")) == sorted([good_id, fifo_row["image_id"]])
    compared = {r["image_id"]: r for r in store.read_table(str(out), "comparison/images", schema=IMAGES).to_pylist()}
    assert compared[good_id]["psnr"] is not None
    assert "not a regular file" in compared[fifo_row["image_id"]]["note"]
    assert (out / "report.html").exists() and (out / "contact_sheet.png").exists()


def test_a_hostile_image_id_in_the_comparison_table_is_never_a_path(tmp_path):
    from pipeline.collection import thumbnail_folder, write_contact_sheet
    from pipeline.report import strip_img

    secret = tmp_path / "secret" / "strip.png"
    save_png(torch.rand(3, 4, 4), secret)
    out = tmp_path / "out"
    traversal = os.path.relpath(secret.parent, out / "thumbnails")
    table = IMAGES.empty_table().from_pylist([{"image_id": traversal}], schema=IMAGES)
    assert write_contact_sheet(str(out), table) is None  # the strip outside OUT is not read
    assert "no thumbnails" in strip_img(str(out), traversal)
    with pytest.raises(ValueError, match="not 64 lowercase hex"):
        thumbnail_folder(traversal)


def test_export_collection_skips_hostile_rows_and_writes_only_under_its_folder(tmp_path, capsys):
    out, assets = tmp_path / "out", tmp_path / "assets"
    architecture, weights = model_file("texture", seed=2)
    assert json.loads(architecture)["periodic"]
    good_id = "c" * 64
    hostile = [(r, reason) for r, reason in hostile_rows(tmp_path, architecture, weights) if r["uri"] != "g.png"]
    # export-collection reads only image_id, uri, architecture and weights: absurd sizes are the model file's own
    forged = bytearray(weights[: -4])
    struct.pack_into("<II", forged, modelfile._FIELDS["width"][1], 65535, 65535)
    hostile.append((row("h.png", "1" * 64, architecture, modelfile._seal(bytes(forged))), "65535x65535 is outside"))
    write_job(out, [row("good.png", good_id, architecture, weights), *(r for r, _ in hostile)])
    outside = files_under(tmp_path) - files_under(assets)
    assert main(["export-collection", str(out), "--out", str(assets)]) == 1
    captured = capsys.readouterr()
    assert f"exported 1 texture(s) of {1 + len(hostile)} encoding(s)" in captured.out
    assert f"{len(hostile)} row(s) skipped" in captured.out
    for bad, reason in hostile:
        lines = [line for line in captured.err.splitlines() if f"uri {bad['uri']!r}" in line]
        assert len(lines) == 1 and f"image_id {bad['image_id']!r}" in lines[0] and reason in lines[0], lines
    assert "Traceback" not in captured.err
    assert files_under(tmp_path) - files_under(assets) == outside
    assert os.listdir(assets) == [good_id] and (assets / good_id / "manifest.json").exists()


def test_level_strips_of_rgb_models_have_neutral_gaps():
    from pipeline.thumbnails import GAP, STRIP_HEIGHT, strip
    architecture, weights = model_file()
    model, meta = modelfile.from_bytes(weights)
    sheet = strip(model, meta, height=16)
    gap = sheet.crop((16, 0, 16 + GAP, 16))  # between the first level (16 px wide: a square image) and the next
    assert sheet.mode == "RGB" and set(gap.getdata()) == {(255, 255, 255)}
    assert STRIP_HEIGHT > 16
