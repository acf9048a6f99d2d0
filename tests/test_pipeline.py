"""`mrnet encode` on a real local Ray: rows read back and rendered, reruns, bad input, a worker killed mid-job."""
import hashlib
import json
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.images import read_image, resize_long_side
from mrnet_core.metrics import psnr
from mrnet_core.render import render
from pipeline import store
from pipeline.cli import main
from pipeline.encode import run

TINY = make_config("fast", {"levels": 2})


pytestmark = pytest.mark.usefixtures("local_ray")  # tests/conftest.py


def rows(out, folder="encodings"):
    return store.read_table(str(out), folder).to_pylist()


def parts(out, folder="encodings"):
    path = out / folder
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def synthetic(folder, n, size=32, seed=0):
    """n distinct smooth RGB images as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rng.uniform(1, 4, 3)
        a = np.stack([np.sin(6.28 * (f[c] * x + (c + i) * y)) for c in range(3)], -1) * 0.5 + 0.5
        Image.fromarray((a * 255).astype(np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def test_samples_encode_read_back_render_and_rerun_skips(samples, tmp_path):
    out = tmp_path / "out"
    first = run(str(samples), str(out), TINY, size=32)
    assert (first["done"], first["failed"], first["skipped"]) == (5, 0, 0)
    got = rows(out)
    assert sorted(os.path.basename(r["uri"]) for r in got) == sorted(p.name for p in samples.iterdir()
                                                                     if p.suffix in (".png", ".jpg"))
    for r in got:
        assert r["image_id"] == hashlib.sha256(open(r["uri"], "rb").read()).hexdigest()
        assert r["file_bytes"] == os.path.getsize(r["uri"])
        assert max(r["width"], r["height"]) == 32 and len(r["psnr"]) == len(r["ssim"]) == len(r["epochs"]) == 2
        assert r["model_bytes"] == len(r["weights"]) and r["config_id"] == first["config_id"]
        assert json.loads(r["architecture"])["model"] == "m"
        model, meta = modelfile.from_bytes(r["weights"])  # the weights load straight into mrnet_core
        image = resize_long_side(read_image(r["uri"])[0], 32)
        rendered = render(model, r["width"], r["height"], t=2, index=0).clamp(0, 1)
        assert abs(psnr(rendered[None], image[None]).item() - r["psnr"][-1]) < 0.05
        assert r["psnr"][-1] > 20
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"][first["config_id"]] == {"encoded": 5, "failed": 0}  # failures/ always exists
    assert manifest["configs"][first["config_id"]]["fit"]["levels"] == 2

    # A temporary left by a killed run is invisible to readers, and the next run removes it.
    (out / "encodings" / ".tmp-dead-part.parquet").write_bytes(b"half a file")
    before = parts(out)
    again = run(str(samples), str(out), TINY, size=32)
    assert (again["done"], again["failed"], again["skipped"]) == (0, 0, 5)
    assert parts(out) == [p for p in before if not p.startswith(".tmp")] and len(rows(out)) == 5

    # Another config encodes everything again, under its own config_id.
    other = run(str(samples), str(out), TINY, size=24)
    assert other["config_id"] != first["config_id"] and other["done"] == 5
    assert len(rows(out)) == 10 and len({(r["uri"], r["config_id"]) for r in rows(out)}) == 10


def bad_corpus(folder):
    """Every kind of awkward input, and what should become of it: a note to find, or a failure kind."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    expect = {}

    def save(name, im, outcome, **kw):
        im.save(folder / name, **kw)
        expect[name] = outcome

    save("cmyk.jpg", photo.convert("CMYK"), "CMYK converted to RGB")
    save("grey16.png", Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)), "I;16")
    save("palette.png", photo.convert("P"), "palette expanded")
    save("alpha.png", photo.convert("RGBA"), "alpha composited on white")
    frames = [photo.rotate(a) for a in (0, 90, 180)]
    save("anim.gif", frames[0], "first of 3 frames", save_all=True, append_images=frames[1:])
    save("wide.png", photo.resize((300, 30)), "")  # 32x3 after resizing: still enough for 2 levels
    save("bomb.png", Image.new("RGB", (400, 400)), "too_large")  # over the job's max_pixels below
    save("tiny.png", Image.new("RGB", (1, 1)), "too_small")
    save("sliver.png", Image.new("L", (400, 4)), "too_small")  # 32x1 after resizing
    good = (folder / "palette.png").read_bytes()
    for name, data, kind in [("empty.png", b"", "empty"), ("truncated.png", good[: len(good) // 2], "corrupt"),
                             ("corrupt.png", good[: len(good) // 2] + bytes(64) + good[len(good) // 2 + 64 :],
                              "corrupt"),
                             ("text.jpg", b"these are not the pixels you are looking for\n" * 20, "not_an_image")]:
        (folder / name).write_bytes(data)
        expect[name] = kind
    (folder / "adir.png").mkdir()
    uris = [str(folder / n) for n in expect] + [str(folder / "missing.png"), str(folder / "adir.png")]
    expect.update({"missing.png": "unreadable", "adir.png": "unreadable"})
    (folder / "list.txt").write_text("\n".join(uris) + "\n")
    return folder / "list.txt", expect


def test_bad_inputs_are_converted_with_a_note_or_recorded_and_the_job_goes_on(tmp_path):
    listing, expect = bad_corpus(tmp_path / "bad")
    out = tmp_path / "out"
    summary = run(str(listing), str(out), TINY, size=32, max_pixels=100_000, batch_size=4)
    encoded = {os.path.basename(r["uri"]): r for r in rows(out)}
    failed = {os.path.basename(r["uri"]): r for r in rows(out, "failures")}
    assert set(encoded) | set(failed) == set(expect) and not set(encoded) & set(failed)
    for name, outcome in expect.items():
        if name in encoded:
            assert not outcome or any(outcome in n for n in encoded[name]["notes"]), (name, encoded[name]["notes"])
        else:
            f = failed[name]
            assert f["error_kind"] == outcome, (name, f)
            assert name in f["message"] and f["stage"] in ("read", "decode") and f["config_id"]
    assert encoded["grey16.png"]["channels"] == 1 and encoded["wide.png"]["height"] == 3
    assert (summary["done"], summary["failed"]) == (len(encoded), len(failed)) == (6, 9)

    # A rerun retries nothing: every image is either encoded or recorded as failed under this config.
    again = run(str(listing), str(out), TINY, size=32, max_pixels=100_000, batch_size=4)
    assert (again["done"], again["failed"], again["skipped"]) == (0, 0, 15)
    assert len(rows(out)) == 6 and len(rows(out, "failures")) == 9


def test_bad_config_is_one_line_before_any_work(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text("[fit]\nlevles = 2\n")
    assert main(["encode", "samples", "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: levles: unknown config key") and "\n" not in err
    config.write_text("[job]\nsize = -3\n")
    assert main(["encode", "samples", "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    assert "size: must be an integer from 1 to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def encoder_processes():
    return [p for p in psutil.Process().children(recursive=True)
            if "MapBatches(Encoder)" in " ".join(p.cmdline())]


def test_worker_killed_mid_job_loses_and_duplicates_nothing(tmp_path):
    images = synthetic(tmp_path / "images", 6, size=16)  # three calls: one committed, one to kill, one after
    out = tmp_path / "out"
    cfg = make_config("fast", {"levels": 2, "max_epochs": [300, 300]})  # about a second a call: time to kill one
    result = {}
    job = threading.Thread(target=lambda: result.update(run(str(images), str(out), cfg, batch_size=2)))
    job.start()
    deadline = time.time() + 120
    while not parts(out) and time.time() < deadline:
        time.sleep(0.1)
    victims = encoder_processes()
    assert parts(out) and len(victims) == 1
    victims[0].send_signal(signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive() and result["done"] == 6 and result["failed"] == 0
    got = rows(out)
    assert len(got) == 6 and len({(r["uri"], r["image_id"]) for r in got}) == 6
    assert not victims[0].is_running()  # so the job finished on a restarted actor


def test_latent_pyramids_encode_into_rows_thumbnails_and_the_report(samples, tmp_path, monkeypatch):
    from mrnet_core.latent import LatentNet
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        (images / name).write_bytes((samples / name).read_bytes())
    config = tmp_path / "g.toml"
    config.write_text('[job]\nsize = 32\n[fit]\nmodel = "g"\nlevels = 3\nmax_epochs = [300]\nrate_weight = 0.001\n')
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["encode", str(images), "--out", str(out), "--config", str(config)]) == 0
    got = rows(out)
    assert len(got) == 2
    for r in got:
        assert json.loads(r["architecture"])["model"] == "g" and r["weight_bits"] == 0 and len(r["psnr"]) == 3
        model, meta = modelfile.from_bytes(r["weights"])
        assert isinstance(model, LatentNet) and (meta.width, meta.height, meta.levels) == (r["width"], r["height"], 3)
        image = resize_long_side(read_image(r["uri"])[0], 32)
        rendered = render(model, r["width"], r["height"], index=0).clamp(0, 1)
        assert psnr(rendered[None], image[None]).item() == pytest.approx(r["psnr"][-1], abs=0.05)
        assert r["psnr"][-1] > 16 and r["bpp"] == pytest.approx(8 * r["model_bytes"] / (r["width"] * r["height"]),
                                                                rel=1e-3)
        assert (out / "thumbnails" / r["image_id"] / "level_2.png").is_file()
    assert (out / "report.html").is_file() and "latent pyramid" in (out / "viewer.html").read_text()
