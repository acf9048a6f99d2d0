"""Hostile configs and flags: every one is a one-line error before any work, exit status 2, and no files left;
input that cannot be used is exit status 1. Random configs either fail the same way or come out within bounds."""
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mrnet_core.config import BOUNDS, MAX_PARAMS, MAX_STEP_VALUES, PER_STAGE, PRESETS, ConfigError, FitConfig, \
    make_config
from mrnet_core.encode import FitDiverged, encode
from mrnet_core.network import MODELS
from pipeline.cli import main
from pipeline.settings import JOB_KEYS, check_job

ROOT = Path(__file__).resolve().parent.parent
CAMERA = str(ROOT / "samples/camera.png")
ONE_EPOCH = "levels = 1\nmax_epochs = [1]\n"


def mrnet(capsys, *args):
    """(exit status, stderr) of the `mrnet` command run in this process."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


def assert_one_line_error(status, err, *words):
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A one-stage model of a 16 px photo, fitted for one epoch: something to render."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "c.toml").write_text(ONE_EPOCH)
    assert main(["fit", CAMERA, "--out", str(folder), "--size", "16", "--preset", "fast",
                 "--config", str(folder / "c.toml")]) == 0
    return folder / "camera.mrnet"


@pytest.mark.parametrize("text,words", [
    ("levels = 9223372036854775807", ["levels: must be an integer from 1 to 16, not 9223372036854775807"]),
    ("levels = 1000", ["levels: must be an integer from 1 to 16, not 1000"]),
    ("hidden = [70000]", ["hidden: must be an integer from 1 to 4096, not 70000"]),
    ("first = [100000000]", ["first: must be an integer from 1 to 4096, not 100000000"]),
    ("lr = [inf]", ["lr: must be a number above 0 and at most 1, not inf"]),
    ("target_bpp = nan", ["target_bpp: must be a number from 0 to 64, not nan"]),
    ("lr = true", ["lr: must be a number above 0 and at most 1, not True"]),
    ("max_epochs = [1.5]", ["max_epochs: must be an integer from 1 to 100000, not 1.5"]),
    ("levels = 1\nfirst = [4096]\nhidden = [4096]\nhidden_layers = 2", ["parameters per image, over the limit"]),
    ("batch_pixels = 1048576", ["batch_pixels: 1048576 pixels a step", "over the limit"]),
    ("[job]\nnum_gpus = nan", ["num_gpus: must be a number from 0 to 16, not nan"]),
    ("[job]\nactors = 1000000000", ["actors: must be an integer from 1 to 1024, not 1000000000"]),
    ("[job]\nsize = 100000", ["size: must be an integer from 1 to 13377, not 100000"]),
    ("[fitt]\nlevels = 2", ["unknown table(s) fitt; use [fit] and [job]"]),
])
def test_a_hostile_fit_config_is_one_line_before_any_work(text, words, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(text + "\n")
    assert_one_line_error(*mrnet(capsys, "fit", CAMERA, "--out", tmp_path / "out", "--config", config), *words)
    assert not (tmp_path / "out").exists()


def test_fit_and_encode_reject_a_config_with_the_same_message(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[job]\nbatch_size = 0\n")
    fit_status, fit_err = mrnet(capsys, "fit", CAMERA, "--out", tmp_path / "out", "--config", config)
    encode_status, encode_err = mrnet(capsys, "encode", ROOT / "samples", "--out", tmp_path / "out", "--config", config)
    assert fit_status == encode_status == 2 and fit_err == encode_err
    assert "batch_size: must be an integer from 1 to 1024, not 0" in fit_err
    assert not (tmp_path / "out").exists()


def test_fit_takes_the_job_tables_preset_and_size(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[job]\npreset = "fast"\nsize = 12\nbatch_size = 4\n[fit]\n{ONE_EPOCH}')
    status, err = mrnet(capsys, "fit", CAMERA, "--out", tmp_path / "out", "--config", config)
    assert status == 0 and "[job] batch_size: for `mrnet encode` only" in err
    assert Image.open(tmp_path / "out/camera/level_0.png").size == (12, 12)


@pytest.mark.parametrize("args,words", [
    (["--domain", "nan,0,1,1"], ["--domain: must be x0,y0,x1,y1", "'nan,0,1,1'"]),
    (["--domain", "-inf,-1,inf,1"], ["--domain: must be x0,y0,x1,y1"]),
    (["--domain", "1,-1,-1,1"], ["x0 < x1"]),
    (["--domain", "-1000,-1000,1000,1000"], ["at the model's own resolution is 16000x16000 pixels"]),
    (["--size", "100000x100000"], ["--size: 100000x100000 is 10,000,000,000 pixels, over the limit"]),
    (["--size", "0x5"], ["--size: must be WxH with positive integers"]),
    (["--level", "nan"], ["--level: must lie in [0, 1]"]),
    (["--levle", "1"], ["unrecognized arguments: --levle"]),
])
def test_a_hostile_render_flag_is_one_line_and_writes_nothing(args, words, model_file, tmp_path, capsys):
    out = tmp_path / "r.png"
    assert_one_line_error(*mrnet(capsys, "render", model_file, "--out", out, *args), *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out,words", [
    ("folder", ["--out: ", "folder is a folder; name an image file"]),
    ("missing/r.png", ["--out: ", "missing is not an existing folder"]),
    ("r.gif", ["r.gif: cannot write .gif; name a .png, .jpg, .jpeg, .webp file"]),
    ("r", ["cannot write a file without a suffix"]),
])
def test_render_out_must_be_an_image_file_it_can_write(out, words, model_file, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    assert_one_line_error(*mrnet(capsys, "render", model_file, "--out", tmp_path / out), *words)
    assert [p.name for p in tmp_path.iterdir()] == ["folder"] and not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("name,image_format", [("r.png", "PNG"), ("r.jpg", "JPEG"), ("R.JPEG", "JPEG"),
                                               ("r.webp", "WEBP")])
def test_render_writes_the_format_its_suffix_names(name, image_format, model_file, tmp_path, capsys):
    assert mrnet(capsys, "render", model_file, "--out", tmp_path / name, "--size", "8x6")[0] == 0
    with Image.open(tmp_path / name) as image:
        assert (image.format, image.size) == (image_format, (8, 6))
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_export_flags_and_outputs_are_checked_before_any_work(model_file, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert_one_line_error(*mrnet(capsys, "export", model_file, "--out", tmp_path / "e", "--size", "1x1000000000"),
                          "over the limit")
    assert_one_line_error(*mrnet(capsys, "export", model_file, "--out", tmp_path / "e", "--mips", "--size", "4x4"),
                          "not allowed with argument --mips")
    assert_one_line_error(*mrnet(capsys, "export", model_file, "--out", tmp_path / "file/e", "--mips"),
                          "file is a file, not a folder")
    assert_one_line_error(*mrnet(capsys, "export-collection", tmp_path, "--out", tmp_path / "file"),
                          "file is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_study_and_encode_check_out_and_the_grid_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    grid = tmp_path / "grid.toml"
    grid.write_text("[job]\nsize = nan\n")
    assert_one_line_error(*mrnet(capsys, "study", ROOT / "samples", "--out", tmp_path / "s", "--grid", grid),
                          "size: must be an integer from 1 to 13377, not nan")
    grid.write_text("[job]\nsize = 32\n")
    assert_one_line_error(*mrnet(capsys, "study", ROOT / "samples", "--out", tmp_path / "s", "--grid", grid,
                                 "--size", "0"), "size: must be an integer from 1 to 13377, not 0")
    assert_one_line_error(*mrnet(capsys, "encode", ROOT / "samples", "--out", tmp_path / "file"), "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "grid.toml"]


def test_input_that_cannot_be_used_is_exit_status_1(tmp_path, capsys):
    (tmp_path / "bad.mrnet").write_bytes(b"MRNET not really")
    for args in (["render", tmp_path / "bad.mrnet", "--out", tmp_path / "r.png"],
                 ["export", tmp_path / "missing.mrnet", "--out", tmp_path / "e", "--mips"],
                 ["export-collection", tmp_path / "nowhere", "--out", tmp_path / "e"]):
        status, err = mrnet(capsys, *args)
        assert status == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.mrnet"]


def test_a_fit_that_diverges_leaves_no_model(tmp_path, capsys):
    # Within bounds, yet sixteen ReLU layers at a learning rate of 1 blow up in two epochs (measured).
    config = tmp_path / "c.toml"
    config.write_text('model = "f"\nlevels = 1\nhidden_layers = 16\nhidden = [256]\nlr = [1.0]\nmax_epochs = [2]\n')
    status, err = mrnet(capsys, "fit", CAMERA, "--out", tmp_path / "out", "--size", "16", "--config", config)
    assert status == 1 and "camera.png: the fit diverged" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]
    with pytest.raises(FitDiverged, match="diverged"):
        encode(torch.full((1, 3, 8, 8), math.inf), make_config("fast", {"levels": 1, "max_epochs": [1]}), "cpu")


# Values of every kind a TOML or JSON file can hold: scalars, lists of them (a list nested in a list among them) and
# tables.
SCALAR = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6))
ANY_VALUE = (SCALAR | st.lists(SCALAR | st.lists(SCALAR, max_size=2), max_size=20)
             | st.dictionaries(st.text(max_size=3), SCALAR, max_size=2))
FIT_KEYS = [f.name for f in fields(FitConfig)]
CHOICES = {"model": list(MODELS), "target": ["gaussian", "laplacian"], "border": ["reflect", "wrap"],
           "periodic": [False, True], "prior": ["auto", "none", "default"], "entropy": ["context", "factorised"]}


def number_in(bound):
    if bound.kind is int:
        return st.integers(bound.low, bound.high)
    return st.floats(bound.low, bound.high, exclude_min=bound.above_low)


def in_range(key):
    """Values a fit key may take on its own, so that some random configs get through to the checks across keys."""
    if key not in BOUNDS:
        return st.sampled_from(CHOICES[key])
    return st.lists(number_in(BOUNDS[key]), min_size=1, max_size=4) if key in PER_STAGE else number_in(BOUNDS[key])


def within(value, bound):
    return type(value) is bound.kind and math.isfinite(value) and value in bound


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from([*PRESETS, "huge"]))
def test_random_fit_configs_are_a_config_error_or_within_bounds(data, preset):
    keys = data.draw(st.lists(st.sampled_from(FIT_KEYS + ["levles"]), unique=True, max_size=4))
    overrides = {k: data.draw(in_range(k) if k != "levles" and data.draw(st.booleans()) else ANY_VALUE) for k in keys}
    try:
        cfg = make_config(preset, overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    for key, bound in BOUNDS.items():
        values = getattr(cfg, key) if key in PER_STAGE else (getattr(cfg, key),)
        assert isinstance(values, tuple) and 1 <= len(values) and all(within(v, bound) for v in values), (key, values)
    assert cfg.model in MODELS and isinstance(cfg.periodic, bool)
    if cfg.model == "g":  # a latent pyramid's own bounds (`_validate_latent`); the MR-Net's widths are not read
        assert 1 <= cfg.hidden_layers <= 4 and cfg.per_stage("hidden")[-1] <= 1024 and cfg.weight_bits == 32
        return
    arch = cfg.architecture(3)
    assert arch.params() <= MAX_PARAMS
    assert cfg.batch_pixels * max(s.first + sum(s.hidden) for s in arch.stages) <= MAX_STEP_VALUES


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_job_tables_are_a_config_error_or_within_bounds(data):
    keys = data.draw(st.lists(st.sampled_from([*JOB_KEYS, "actor"]), unique=True, max_size=4))
    job = {}
    for k in keys:
        rule = JOB_KEYS.get(k)
        kinds = {str: st.sampled_from(list(PRESETS)), bool: st.booleans()}
        valid = kinds[rule] if rule in kinds else number_in(rule) if rule else ANY_VALUE
        job[k] = data.draw(valid if data.draw(st.booleans()) else ANY_VALUE)
    try:
        checked = check_job(job)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert checked.keys() == job.keys()
    for key, value in checked.items():
        rule = JOB_KEYS[key]
        assert isinstance(value, rule) if rule in (str, bool) else within(value, rule)
