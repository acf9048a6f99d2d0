import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mrnet_core.images import read_image

ROOT = Path(__file__).resolve().parent.parent


def mrnet(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Three photos (two share a size after resizing) and a corrupt file, fitted with the fast preset."""
    tmp = tmp_path_factory.mktemp("fit")
    Image.open(ROOT / "samples/coffee.png").convert("RGBA").save(tmp / "coffee_alpha.png")
    (tmp / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = [ROOT / "samples/astronaut.png", ROOT / "samples/rocket.jpg", tmp / "coffee_alpha.png", tmp / "broken.jpg"]
    out = tmp / "out"
    result = mrnet("fit", *images, "--out", out, "--preset", "fast", "--size", "48", "--levels", "2")
    return result, out


def test_fit_writes_models_levels_and_metrics(fitted):
    result, out = fitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in metrics] == ["astronaut", "rocket", "coffee_alpha"]
    rocket = metrics[1]
    for key in ("width", "height", "channels", "model", "params", "model_bytes", "raw_bytes", "bpp", "fit_seconds"):
        assert key in rocket
    assert (rocket["width"], rocket["height"], rocket["channels"], rocket["model"]) == (48, 32, 3, "m")
    assert rocket["batch"] == 2, "rocket and the coffee photo share a size and are fitted together"
    assert [(lv["width"], lv["height"]) for lv in rocket["levels"]] == [(24, 16), (48, 32)]
    assert all(lv["psnr"] > 15 and 0 < lv["ssim"] <= 1 for lv in rocket["levels"])
    assert [s["params"] for s in rocket["stages"]] and all(s["epochs"] > 0 for s in rocket["stages"])
    assert rocket["model_bytes"] == (out / "rocket.mrnet").stat().st_size
    assert rocket["raw_bytes"] == 48 * 32 * 3
    assert rocket["bpp"] == pytest.approx(8 * rocket["model_bytes"] / (48 * 32), rel=1e-3)
    assert "alpha composited on white" in metrics[2]["notes"]
    for k in (0, 1):
        level, _ = read_image(out / "rocket" / f"level_{k}.png")
        assert level.shape[1:] == (16 * (k + 1), 24 * (k + 1))


def test_fit_reports_a_bad_file_by_name_and_goes_on(fitted):
    result, out = fitted
    assert result.returncode == 1
    assert "broken.jpg: corrupt or truncated image" in result.stderr
    assert (out / "astronaut.mrnet").exists()


def test_render_any_size_level_and_window(fitted, tmp_path):
    _, out = fitted
    model = out / "astronaut.mrnet"
    r = mrnet("render", model, "--out", tmp_path / "tiles.png", "--size", "40x20", "--domain", "-1,-1,3,1",
              "--level", "1.5")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "tiles.png").size == (40, 20)
    r = mrnet("render", model, "--out", tmp_path / "thumb.png", "--size", "12x12")
    assert r.returncode == 0 and "t=1.00" in r.stdout
    r = mrnet("render", model, "--out", tmp_path / "native.png")
    assert Image.open(tmp_path / "native.png").size == (48, 48) and "t=2.00" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["fit", "samples/camera.png", "--out", "o", "--preset", "huge"], "unknown preset"),
        (["fit", "samples/camera.png", "--out", "o", "--model", "q"], "invalid choice"),
        (["fit", "samples/camera.png", "--out", "o", "--size", "0"], "size: must be an integer from 1 to"),
        (["fit", "samples/camera.png", "--out", "o", "--weight-bits", "12"], "weight_bits: must be one of"),
        (["fit", "samples/camera.png", "--out", "o", "--preset", "texture", "--weight-bits", "8"], "periodic"),
    ],
)
def test_bad_arguments_give_one_clear_error(args, message):
    result = mrnet(*args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("model,message", [("nothing.mrnet", "nothing.mrnet: cannot read"),
                                           ("samples/camera.png", "not an .mrnet model file")])
def test_a_model_that_cannot_be_read_is_a_data_error(model, message, tmp_path):
    result = mrnet("render", model, "--out", tmp_path / "x.png")
    assert result.returncode == 1 and message in result.stderr and not (tmp_path / "x.png").exists()


def test_bad_render_arguments(fitted, tmp_path):
    _, out = fitted
    for flag, value, message in [("--size", "12", "WxH"), ("--domain", "0,0,0,1", "x0,y0,x1,y1"),
                                 ("--level", "7", "[0, 2]")]:
        result = mrnet("render", out / "astronaut.mrnet", "--out", tmp_path / "x.png", flag, value)
        assert result.returncode == 2 and message in result.stderr


def test_config_file_is_validated(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("lr = 1e-3\nwidths = [1, 2]\n")
    result = mrnet("fit", "samples/camera.png", "--out", tmp_path / "o", "--config", cfg)
    assert result.returncode == 2 and "widths: unknown config key" in result.stderr


def test_fit_to_a_target_rate_writes_a_model_within_it(tmp_path):
    out = tmp_path / "o"
    # The product's default path: rate control over the shipped prior's rungs (without a prior: test_rate.py).
    result = mrnet("fit", "samples/chelsea.png", "--out", out, "--preset", "compact", "--size", "40",
                   "--target-bpp", "4")
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "metrics.json").read_text())[0]
    size = (out / "chelsea.mrnet").stat().st_size
    assert record["model_bytes"] == size and 8 * size / (40 * 27) <= 4 and record["weight_bits"] <= 12
    assert record["rate"]["met"] and len(record["levels"]) == 3 and record["prior_id"]
    assert (out / "priors" / f"{record['prior_id']}.mrprior").is_file()


def test_version():
    from importlib.metadata import version
    result = mrnet("--version")
    assert result.returncode == 0 and result.stdout == f"mrnet {version('mrnet')}\n"


def test_every_option_says_its_default():
    import argparse

    from pipeline.cli import build_parser

    def parsers(parser, name="mrnet"):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    silent = []
    for name, parser in parsers(build_parser()):
        chosen = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            # Switches, --help, --version and required options (alone or one of a group) have no default to state.
            if not action.option_strings or action.required or action.nargs == 0 or action in chosen:
                continue
            if "default" not in (action.help or ""):
                silent.append(f"{name} {action.option_strings[-1]}")
    assert not silent, silent
