"""`mrnet view`: the page draws the MR-Net in the browser (WebGL 2), and a frame it draws matches `mrnet render`
for the same size, window and level of detail within 1/255, in headless Chromium (a software renderer here)."""
import base64
import re

import numpy as np
import pytest
import torch

from conftest import dump_dom, sample
from mrnet_core.config import make_config
from mrnet_core.encode import encode
from mrnet_core.modelfile import load
from mrnet_core.render import render
from pipeline.cli import main


def frame(browser, page, tmp_path, width, height, t, window):
    """RGB pixels [H, W, 3] in [0, 1] of one frame the page draws for the test hook."""
    url = f"{page.as_uri()}#frame={width}x{height},{t},{','.join(map(str, window))}"
    dom = dump_dom(browser, url, tmp_path / "profile")
    error = re.search(r'data-error="([^"]*)"', dom)
    assert error is None, error.group(1)
    found = re.search(r'data-frame="([^"]*)"', dom)
    assert found, dom[:500]
    pixels = np.frombuffer(base64.b64decode(found.group(1)), np.uint8).reshape(height, width, 4)
    return pixels[..., :3].astype(np.float64) / 255


def reference(model, width, height, t, window):
    out = render(model, width, height, t=t, window=window, index=0).clamp(0, 1)
    return out.expand(3, -1, -1).permute(1, 2, 0).double().numpy()


def model_file(tmp_path, name, preset, overrides, channels=3):
    image = sample("coffee.png", 24)
    image = image.mean(0, keepdim=True) if channels == 1 else image
    cfg = make_config(preset, {"levels": 2, "max_epochs": [30, 30], **overrides})
    _, blobs = encode(image[None], cfg, device="cpu")
    path = tmp_path / f"{name}.mrnet"
    path.write_bytes(blobs[0])
    return path


def assert_frames_match(browser, path, tmp_path, frames):
    """`mrnet view` of the model file at `path` draws each of `frames` (width, height, t, window) as `mrnet render`
    does, within 1/255 on average."""
    page = tmp_path / "view.html"
    assert main(["view", str(path), "--out", str(page)]) == 0
    decoded, _ = load(path)
    for width, height, t, window in frames:
        drawn, expected = frame(browser, page, tmp_path, width, height, t, window), reference(decoded, width, height,
                                                                                             t, window)
        assert np.abs(drawn - expected).mean() <= 1 / 255, (width, height, t)
        assert t < 1 or drawn.std() > 0.01  # a picture, not a blank frame


@pytest.mark.parametrize("model, channels", [("m", 3), ("l", 1), ("f", 3)])
def test_a_frame_drawn_by_the_page_matches_mrnet_render(tmp_path, browser, model, channels):
    path = model_file(tmp_path, "a<b>&'c", "fast", {"model": model, "first": [8, 12], "hidden": [8, 12],
                                                          "weight_bits": 8, "qat_epochs": 2}, channels)
    assert_frames_match(browser, path, tmp_path, [(40, 28, 1.6, (-1.3, -1.0, 1.2, 0.7)),
                                                  (32, 32, 2.0, (-0.2, -0.1, 0.1, 0.2)),
                                                  (24, 20, 0.5, (-1.0, -1.0, 1.0, 1.0))])


def test_a_periodic_texture_keeps_tiling_while_panned(tmp_path, browser):
    path = model_file(tmp_path, "tile", "texture", {"first": [8, 12], "hidden": [8, 12]})
    page = tmp_path / "view.html"
    assert main(["view", str(path), "--out", str(page)]) == 0
    home = frame(browser, page, tmp_path, 24, 24, 2.0, (-1, -1, 1, 1))
    panned = frame(browser, page, tmp_path, 24, 24, 2.0, (1, -3, 3, -1))  # one period right and one up
    assert np.abs(home - panned).mean() <= 1 / 255
    assert np.abs(home - reference(load(path)[0], 24, 24, 2.0, (-1, -1, 1, 1))).mean() <= 1 / 255


@pytest.mark.parametrize("periodic, grid_channels", [(False, 1), (True, 1), (False, 2), (True, [3, 1])])
def test_a_latent_pyramid_frame_drawn_by_the_page_matches_mrnet_render(tmp_path, browser, periodic, grid_channels):
    image = sample("coffee.png", 24)[:, :16, :24]
    cfg = make_config("default", {"levels": 3, "max_epochs": [150], "rate_weight": 0.001, "periodic": periodic,
                                  "border": "wrap" if periodic else "reflect", "grid_channels": grid_channels},
                      model="g")
    _, blobs = encode(image[None], cfg, device="cpu")
    path = tmp_path / "pyramid.mrnet"
    path.write_bytes(blobs[0])
    # Past the edges, zoomed in between latents, and at fractional levels of detail.
    assert_frames_match(browser, path, tmp_path, [(40, 28, 2.6, (-1.3, -1.2, 1.4, 0.9)),
                                                  (32, 32, 3.0, (-0.2, -0.1, 0.1, 0.2)),
                                                  (24, 20, 1.5, (-1.0, -1.0, 1.0, 1.0))])


def test_a_hostile_name_cannot_end_the_page_script():
    from pipeline.viewer import page
    html = page([{"name": "</script><script>alert(1)</script>"}, {"name": "<!--<script>"}],
                title="{{DATA}}<img src=x onerror=alert(1)>")
    assert "</script><script>alert(1)" not in html and "<img src=x" not in html and "<!--" not in html
    assert html.count('"name"') == 2  # the data once, in the script: a title holding {{DATA}} is not expanded
    assert html.count("<script>") == 1 and html.count("</script>") == 1


def test_bad_view_arguments_are_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing.mrnet"), "--out", str(tmp_path / "v.html")]) == 1
    assert main(["view", str(tmp_path), "--out", str(tmp_path / "v.html")]) == 2  # a folder with no encode job
    assert main(["view", str(tmp_path), "--out", str(tmp_path / "v.png")]) == 2
    (tmp_path / "folder.html").mkdir()
    assert main(["view", str(tmp_path), "--out", str(tmp_path / "folder.html")]) == 2
    (tmp_path / "manifest.json").write_text("[1, 2]")  # a manifest that is not a JSON object
    assert main(["view", str(tmp_path), "--out", str(tmp_path / "v.html")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and "missing.mrnet" in err[0] and "no manifest.json" in err[1] and ".html" in err[2]
    assert "not a folder" in err[3] and "manifest.json" in err[4]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not [p for p in tmp_path.glob("*.html") if p.is_file()]
    torch.manual_seed(0)


def test_a_model_too_large_for_the_page_is_one_line(tmp_path, capsys):
    from mrnet_core import latent, modelfile
    model = latent.LatentNet(latent.LatentArchitecture(1, 1500, 1500, 2, (4,)))  # 2.8 M latents, all zero
    model.exponents, model.context_exponents = [8], [8]
    with torch.no_grad():
        for t in [*model.weights, *model.biases, *model.context_weights, *model.context_biases]:
            t.copy_(torch.round(t * 256) / 256)
    path = tmp_path / "large.mrnet"
    path.write_bytes(modelfile.to_bytes(model, modelfile.ImageMeta(1500, 1500, 1, 2)))
    assert main(["view", str(path), "--out", str(tmp_path / "v.html")]) == 2
    err = capsys.readouterr().err
    assert "more than the viewer holds" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v.html").exists()
