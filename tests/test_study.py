"""`mrnet study`: a grid of configs through the real pipeline, nested MLflow runs, and the study's table."""
import json
import math
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.study import curve_of, html_table, read_grid, summary_table

GRID = """
[job]
preset = "fast"
size = 32
[fit]
levels = 2
max_epochs = [40, 40]
qat_epochs = 2
[grid]
target_bpp = [3.0, 8.0]
"""


pytestmark = pytest.mark.usefixtures("local_ray")  # tests/conftest.py


def test_grid_crosses_variants_with_grid_points_and_rejects_bad_keys(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GRID + '[[config]]\nname = "mnet"\n[[config]]\nname = "siren"\nlevels = 1\nhidden_layers = 2\n')
    configs, job = read_grid(path)
    assert [n for n, _, _ in configs] == ["mnet-target_bpp=3.0", "mnet-target_bpp=8.0", "siren-target_bpp=3.0",
                                       "siren-target_bpp=8.0"]
    assert configs[2][1] == "siren" and configs[2][2].levels == 1 and configs[2][2].hidden_layers == 2
    assert configs[3][2].target_bpp == 8.0
    assert job == {"preset": "fast", "size": 32}
    for text, reason in [(GRID + "[extra]\na = 1\n", "unknown table"),
                         (GRID + '[[config]]\nname = "x"\nwidht = 3\n', "config x-target_bpp=3.0: widht: unknown"),
                         (GRID.replace("[3.0, 8.0]", "3.0"), "non-empty list"),
                         (GRID + "[[config]]\nname = 'v'\ngrid = { target_bpp = 2 }\n", "config v: grid"),
                         (GRID + "[[config]]\nname = 'a'\n[[config]]\nname = 'a'\n", "repeat")]:
        path.write_text(text)
        with pytest.raises(Exception, match=reason):
            read_grid(path)


def test_a_curve_is_the_configs_that_differ_only_in_rate():
    assert curve_of("mnet-target_bpp=3.0") == curve_of("mnet-target_bpp=8") == "mnet"
    assert curve_of("mnet-levels=2-target_psnr=30-target_bpp=1e-05") == "mnet-levels=2"
    assert curve_of("a-b-target_bpp=1e-05-levels=1") == "a-b-levels=1" != curve_of("a-b-target_bpp=2-levels=2")


def test_study_runs_every_config_through_the_pipeline_and_nests_its_runs(tmp_path, samples, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        shutil.copy(samples / name, src / name)
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    assert main(["study", str(src), "--out", str(out), "--grid", str(grid)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = pq.read_table(out / "study.parquet").to_pylist()
    assert len(rows) == 4 and {r["config"] for r in rows} == {"config0-target_bpp=3.0", "config0-target_bpp=8.0"}
    for r in rows:
        assert r["bpp"] <= r["target_bpp"] and len(r["psnr"]) == 2
    mean = {c: sum(r["bpp"] for r in rows if r["config"] == c) / 2 for c in {r["config"] for r in rows}}
    assert mean["config0-target_bpp=8.0"] > 1.5 * mean["config0-target_bpp=3.0"]
    for name in ("config0-target_bpp=3.0", "config0-target_bpp=8.0"):
        encoded = pq.read_table(out / "configs" / name / "encodings").to_pylist()
        assert len(encoded) == 2 and all(e["target_met"] and e["weight_bits"] == 8 and 0 < e["width_scale"]
                                         for e in encoded)
    html = (out / "study.html").read_text()
    assert "config0-target_bpp=3.0" in html and "<svg" not in html  # the plot is an embedded data URI
    # Bjøntegaard deltas of the variant's two rates against each codec's curve, per image, then averaged.
    bd = pq.read_table(out / "study_bd.parquet").to_pylist()
    assert [(e["variant"], e["codec"], e["rates"], e["images"]) for e in bd] == [
        ("config0", c, 2, 2) for c in ("jpeg", "webp", "avif")]
    assert any(e["bd_psnr_images"] > 0 for e in bd) and all(
        math.isfinite(e[m]) for e in bd for m in ("bd_rate", "bd_psnr") if e[f"{m}_images"])
    assert "Bjøntegaard deltas" in html

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mrnet-study-out").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow"]["run_id"]]
    assert len(parent) == 1 and parent[0].info.run_id == summary["mlflow"]["run_id"] and len(children) == 2
    assert parent[0].info.status == "FINISHED" and "config0-target_bpp_8.0/psnr" in parent[0].data.metrics
    assert {f"{m}/config0/{e['codec']}" for e in bd for m in ("bd_rate", "bd_psnr") if e[f"{m}_images"]} == {
        k for k in parent[0].data.metrics if k.startswith("bd_")}
    assert all(c.info.status == "FINISHED" and "psnr/level_1/mean" in c.data.metrics for c in children)
    assert {c.data.params["fit.target_bpp"] for c in children} == {"3.0", "8.0"}

    # A rerun encodes nothing again and adds no rows.
    assert main(["study", str(src), "--out", str(out), "--grid", str(grid)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(c["done"] == 0 and c["skipped"] == 2 for c in again["configs"].values())
    assert len(pq.read_table(out / "study.parquet")) == 4


def test_a_codec_cell_is_judged_on_the_images_that_codec_was_measured_on():
    # JPEG fits only the first image's budget, and AVIF matches the second exactly (lossless): each codec's mean,
    # and MR-Net's beside it, are over that codec's lossy figures only.
    rows = [{"config": "c", "psnr": [28.0, 30.0], "bpp": 0.5, "jpeg_psnr": 29.0, "webp_psnr": 31.0, "avif_psnr": 25.0},
            {"config": "c", "psnr": [18.0, 20.0], "bpp": 0.5, "jpeg_psnr": None, "webp_psnr": 19.0,
             "avif_psnr": 120.0}]
    [entry] = summary_table(rows, [("c", "c", None)])
    assert entry["psnr"][-1] == 25.0 and entry["jpeg"] == 29.0 and entry["jpeg_versus"] == 30.0
    assert entry["webp"] == 25.0 and entry["webp_versus"] == 25.0
    assert entry["avif"] == 25.0 and entry["avif_lossless"] == 1 and entry["avif_versus"] == 30.0
    cells = html_table([entry]).split("<td")[1:]  # config, images, bpp, PSNR, 2 levels, JPEG, WebP, AVIF, wins
    assert [c.startswith(' class="win">') for c in cells[6:9]] == [True, True, True], cells
