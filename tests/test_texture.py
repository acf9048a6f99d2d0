import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.export import export_mips, mip_sizes
from mrnet_core.fit import fit
from mrnet_core.metrics import seam
from mrnet_core.network import MRNet
from mrnet_core.render import render

ROOT = Path(__file__).resolve().parent.parent
TEXTURE = {"levels": 2, "periodic": True, "border": "wrap"}


def periodic_texture(size=32, seed=0):
    """A tileable RGB texture: sinusoids with whole periods across the image, plus wrapped noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    image = torch.stack([0.5 + 0.2 * torch.sin(2 * math.pi * (c + 1) * x + 2 * math.pi * 2 * y + c) for c in range(3)])
    noise = torch.rand(3, size // 4, size // 4, generator=g)
    noise = torch.nn.functional.interpolate(noise[None], size=size, mode="nearest")[0]
    return (image + 0.15 * torch.roll(noise, (1, 1), (1, 2))).clamp(0, 1)


@pytest.fixture(scope="module")
def texture_fit():
    cfg = make_config("fast", TEXTURE)
    images = periodic_texture()[None]
    model, _ = fit(images, cfg, device="cpu")
    return model, cfg, images


def test_periodic_frequencies_are_integer_unrepeated_and_stay_fixed(texture_fit):
    model, _, _ = texture_fit
    fresh = MRNet(model.arch, seed=0)
    seen = set()
    for stage, start in zip(model.stages, fresh.stages):
        k = stage.weights[0][0].t() * stage.omegas[0] / math.pi
        assert torch.allclose(k, k.round(), atol=1e-5)
        rows = {tuple(r) for r in k.round().int().tolist()}
        assert len(rows) == k.shape[0] and not rows & seen
        seen |= rows
        assert torch.equal(stage.weights[0], start.weights[0]), "fitting moved a periodic frequency"


def test_every_level_is_exactly_periodic(texture_fit):
    model, cfg, _ = texture_fit
    for t in (1, 1.5, 2):
        tile = render(model, 16, 16, t=t)
        for window in [(1.0, -1.0, 3.0, 1.0), (-1.0, 1.0, 1.0, 3.0), (-5.0, -3.0, -3.0, -1.0)]:
            assert torch.allclose(render(model, 16, 16, t=t, window=window), tile, atol=1e-4)


def test_tiles_are_seamless_and_a_plain_fit_is_not():
    images = periodic_texture()[None]
    periodic, _ = fit(images, make_config("fast", TEXTURE), device="cpu")
    plain, _ = fit(images, make_config("fast", {"levels": 2}), device="cpu")
    window = (-1.0, -1.0, 3.0, 3.0)  # 2 x 2 tiles
    tiles = render(periodic, 64, 64, window=window)[0]
    assert torch.allclose(tiles[:, :32, :32], tiles[:, 32:, 32:], atol=1e-4)
    assert seam(render(periodic, 32, 32))[0] < 1.5
    outside = render(plain, 64, 64, window=window)[0]
    assert (outside[:, :32, :32] - outside[:, 32:, 32:]).abs().mean() > 0.02


def test_seam_metric_sees_a_jump_at_the_boundary():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    assert seam(ramp)[0] > 10
    assert seam(periodic_texture()[None])[0] < 1.5


def test_float16_model_files_stay_exactly_periodic(texture_fit, tmp_path):
    model, _, _ = texture_fit
    meta = modelfile.ImageMeta(32, 32, 3, 2)
    loaded, _ = modelfile.from_bytes(modelfile.to_bytes(model, meta, 16))
    shifted = render(loaded, 16, 16, window=(1.0, 1.0, 3.0, 3.0))
    assert torch.allclose(render(loaded, 16, 16), shifted, atol=1e-4)


def test_mip_chain_sizes_levels_and_files(texture_fit, tmp_path):
    assert mip_sizes(8, 2) == [(8, 2), (4, 1), (2, 1), (1, 1)]
    model, _, _ = texture_fit
    meta = modelfile.ImageMeta(32, 32, 3, 2)
    manifest = export_mips(model, meta, tmp_path)
    sizes = [(e["width"], e["height"]) for e in manifest["images"]]
    assert sizes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    ts = [e["t"] for e in manifest["images"]]
    assert ts[0] == 2 and ts[1] == 1 and ts == sorted(ts, reverse=True)
    for e in manifest["images"]:
        assert Image.open(tmp_path / e["file"]).size == (e["width"], e["height"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


def test_export_command(tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, a)], cwd=ROOT,
                              capture_output=True, text=True)

    r = run("fit", ROOT / "samples/camera.png", "--out", tmp_path, "--preset", "texture", "--config",
            _fast_config(tmp_path), "--size", "16", "--levels", "2")
    assert r.returncode == 0, r.stderr
    r = run("export", tmp_path / "camera.mrnet", "--out", tmp_path / "mips", "--mips")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "mips/manifest.json").read_text())["images"]) == 5
    r = run("export", tmp_path / "camera.mrnet", "--out", tmp_path / "big", "--size", "40x24")
    assert Image.open(tmp_path / "big/texture_40x24.png").size == (40, 24)
    r = run("export", tmp_path / "camera.mrnet", "--out", tmp_path / "none")
    assert r.returncode != 0 and "--mips" in r.stderr


def _fast_config(folder):
    path = folder / "fast.toml"
    path.write_text("first = [8, 8]\nhidden = [16, 16]\nmax_epochs = [20, 20]\n")
    return path


def test_export_collection_exports_every_texture_of_an_encode_job(texture_fit, tmp_path):
    from pipeline import store

    model, cfg, images = texture_fit
    meta = modelfile.ImageMeta(32, 32, 3, 2)
    photo = MRNet(make_config("fast", {"levels": 2}).architecture(3))
    ids = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("tex", "photo")}  # as encode makes them
    rows = [{"image_id": ids[name], "uri": f"{name}.png", "architecture": m.arch.to_json(),
             "weights": modelfile.to_bytes(m, meta)} for name, m in (("tex", model), ("photo", photo))]
    store.write_part(str(tmp_path / "job"), "encodings", "part-1.parquet", rows, store.ENCODINGS)
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "export-collection", tmp_path / "job", "--out",
                        tmp_path / "assets"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "exported 1 texture(s) of 2" in r.stdout
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == [ids["tex"]]
    assert (tmp_path / "assets" / ids["tex"] / "mip_5.png").exists()
