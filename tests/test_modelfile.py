import os
import pickle
import re
import struct
import threading
import time

import pytest
import torch

from mrnet_core import modelfile, quantize
from mrnet_core.config import make_config
from mrnet_core.network import Architecture, MRNet, StageSpec
from mrnet_core.render import render

META = modelfile.ImageMeta(20, 10, 3, 2)


def model(batch=2):
    return MRNet(make_config("fast", {"levels": 2}).architecture(3), batch=batch, seed=4)


def test_round_trip_renders_identically(tmp_path):
    m = model()
    path = tmp_path / "a.mrnet"
    n = modelfile.save(path, m, META, index=1)
    assert n == path.stat().st_size
    loaded, meta = modelfile.load(path)
    assert meta == META
    assert torch.equal(render(loaded, 20, 10, t=1.5)[0], render(m, 20, 10, t=1.5)[1])


def test_float16_halves_the_payload_and_stays_close():
    m = model(1)
    full, half = modelfile.to_bytes(m, META), modelfile.to_bytes(m, META, 16)
    params = m.arch.params()
    assert len(full) - len(half) == 2 * params
    loaded, _ = modelfile.from_bytes(half)
    assert torch.allclose(render(loaded, 8, 8), render(m, 8, 8), atol=2e-2)


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_quantised_weights_decode_exactly_onto_their_grid(bits):
    m = model(1)
    assert {quantize.column_steps(p.shape[1:]) for p in m.parameters()} == {True, False}  # both kinds of step
    data = modelfile.to_bytes(m, META, bits)
    loaded, meta = modelfile.from_bytes(data)
    assert meta == META
    # Exact: the decoded weights are the quantiser's grid values, bit for bit.
    grid = quantize.quantised_parameters(m, bits, fake=False)
    for name, p in loaded.named_parameters():
        assert torch.equal(p, grid[name]), name
    # Each value is within half a step of the original (the step: the peak of the tensor, or of its column, over the
    # symbol range).
    for name, p in m.named_parameters():
        layer = int(name.rsplit(".", 1)[1])
        is_weight = ".weights." in name
        b = quantize.tensor_bits(bits, layer, is_weight)
        peak = p.abs().amax(dim=1, keepdim=True) if quantize.column_steps(p.shape[1:]) else p.abs().amax()
        step = peak / quantize.max_symbol(b) * 2 ** (1 / 8)  # steps are rounded up to the next 2^(1/8)
        assert ((dict(loaded.named_parameters())[name] - p).abs() <= step / 2 + 1e-7).all(), name


def test_fewer_bits_make_smaller_files():
    m = model(1)
    sizes = [len(modelfile.to_bytes(m, META, b)) for b in (32, 16, 8, 6, 4, 2)]
    assert sizes == sorted(sizes, reverse=True)
    # Entropy coding never costs more than the fixed-width symbols: the bound is bits per value, plus the step bytes
    # and a spread byte per tensor, plus the header and the range coder's last word.
    bound = 100
    for name, p in m.named_parameters():
        is_weight, layer = ".weights." in name, int(name.rsplit(".", 1)[1])
        bound += (p[0].numel() * quantize.tensor_bits(8, layer, is_weight) / 8
                  + (p.shape[-1] if quantize.column_steps(p.shape[1:]) else 1) + 1)
    assert sizes[2] <= bound


def sealed(body):
    """A file whose checksum is right for `body`: what a forger (or a bug in a writer) could make."""
    return modelfile._seal(body)


def corrupt_variants():
    good = modelfile.to_bytes(model(1), META)
    body = good[: -modelfile._CHECKSUM.size]  # magic to payload
    quantised = modelfile.to_bytes(model(1), META, 6)[: -modelfile._CHECKSUM.size]
    head = len(modelfile.MAGIC)
    yield "empty", b"", "bad magic"
    yield "pickle", pickle.dumps({"weights": [1, 2, 3]}), "bad magic"
    # Any damage to a file is caught by its checksum before the header is parsed.
    yield "truncated", good[:-10], "checksum mismatch: the file is truncated or corrupt"
    yield "extra", good + b"\0\0\0\0", "checksum mismatch"
    yield "flipped payload byte", good[:-20] + bytes([good[-20] ^ 1]) + good[-19:], "checksum mismatch"
    yield "flipped header byte", good[: head + 9] + bytes([good[head + 9] ^ 0x40]) + good[head + 10 :], "checksum"
    yield "cut to the version", good[: head + 4], "truncated"
    yield "version", good[:head] + struct.pack("<I", 99) + good[head + 4 :], "version 99 is not supported"
    # With a right checksum, every structural check still holds.
    yield "sealed truncated", sealed(body[:-10]), "truncated"
    yield "sealed extra", sealed(body + b"\0\0\0\0"), "payload"
    yield "header cut", sealed(body[: head + 10]), "header runs past"
    yield "model kind", sealed(body[: head + 4] + b"x" + body[head + 5 :]), "bad header"
    huge = bytearray(body)  # the first stage's width: would need gigabytes if it were allocated
    struct.pack_into("<H", huge, head + 4 + modelfile._HEAD.size, 65535)
    yield "huge widths", sealed(bytes(huge)), "bad header: stage 0 layer widths"
    zero = bytearray(body)
    struct.pack_into("<H", zero, head + 4 + modelfile._HEAD.size, 0)
    yield "zero width", sealed(bytes(zero)), "bad header"
    nan = bytearray(body)
    nan[-4:] = struct.pack("<f", float("nan"))
    yield "nan", sealed(bytes(nan)), "NaN"
    yield "quantised truncated", sealed(quantised[:-4]), "truncated"
    yield "quantised extra", sealed(quantised + b"\0\0\0\0"), "truncated or corrupt"
    yield "quantised cut in steps", sealed(quantised[: len(quantised) // 3]), "truncated"


@pytest.mark.parametrize("name,data,reason", list(corrupt_variants()), ids=[v[0] for v in corrupt_variants()])
def test_corrupt_files_are_rejected_with_a_clear_error(tmp_path, name, data, reason):
    path = tmp_path / "bad.mrnet"
    path.write_bytes(data)
    with pytest.raises(modelfile.ModelFileError, match=reason) as e:
        modelfile.load(path)
    assert str(path) in str(e.value)


def test_hostile_parameter_counts_are_refused_before_allocating():
    arch = Architecture("m", 3, (StageSpec(8000, (8000,), 30.0),))  # every width within bounds, 64 M parameters
    header = modelfile._header(arch, modelfile.ImageMeta(8, 8, 3, 1), 32)
    with pytest.raises(modelfile.ModelFileError, match="more than any MR-Net"):
        modelfile.from_bytes(sealed(header))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(modelfile.ModelFileError, match="nothing.mrnet"):
        modelfile.load(tmp_path / "nothing.mrnet")


def test_encode_measures_the_stored_model():
    from mrnet_core.encode import encode

    images = torch.rand(2, 3, 16, 16)
    cfg32 = make_config("fast", {"levels": 2, "max_epochs": [30, 30]})
    cfg8 = make_config("fast", {"levels": 2, "max_epochs": [30, 30], "weight_bits": 4, "qat_epochs": 0})
    (r32, _), (r8, blobs) = encode(images, cfg32, device="cpu"), encode(images, cfg8, device="cpu")
    assert r8[0].model_bytes == len(blobs[0]) < r32[0].model_bytes / 3
    stored, meta = modelfile.from_bytes(blobs[1])
    assert meta.sizes == ((8, 8), (16, 16))
    from mrnet_core.metrics import psnr
    direct = psnr(render(stored, 16, 16).clamp(0, 1), images[1:2])[0]
    assert r8[1].levels[-1].psnr == pytest.approx(float(direct), abs=0.01)
    assert r8[1].levels[-1].psnr < r32[1].levels[-1].psnr


def edited(data, **fields):
    """`data` (a whole file) with header fields set, checksum recomputed: a forger's file."""
    body = bytearray(data[: -modelfile._CHECKSUM.size])
    for name, value in fields.items():
        fmt, offset = modelfile._FIELDS[name]
        struct.pack_into("<" + fmt, body, offset, value)
    return sealed(bytes(body))


def test_field_offsets_match_the_header():
    m = model(1)
    data = modelfile.to_bytes(m, META)
    stage = m.arch.stages[0]
    expected = {"model": ord("m"), "channels": 3, "in_features": 2, "flags": 0, "omega_hidden": m.arch.omega_hidden,
                "width": 20, "height": 10, "stages": 2, "first": stage.first, "hidden_layers": len(stage.hidden),
                "omega_0": stage.omega_0, "hidden": stage.hidden[0]}
    for name, (fmt, offset) in modelfile._FIELDS.items():
        assert struct.unpack_from("<" + fmt, data, offset)[0] == pytest.approx(expected[name]), name


# Each of these gave a traceback, an allocation of gigabytes or a different image on main's reader (issue 13).
HOSTILE_HEADERS = [
    ({"omega_hidden": 0.0}, "omega_hidden 0.0 is not a finite number"),  # was ZeroDivisionError
    ({"omega_hidden": float("nan")}, "omega_hidden nan"),
    ({"omega_0": -8.0}, "stage 0 omega_0 -8.0"),
    ({"omega_0": float("inf")}, "stage 0 omega_0 inf"),
    ({"omega_0": 1e30}, "stage 0 omega_0"),
    ({"width": 1, "height": 1}, "too small for 2 levels"),  # was ValueError from the pyramid's level sizes
    ({"width": 65535, "height": 65535}, "65535x65535 is outside 1 to 178,956,970 pixels"),  # was a 34 GB allocation
    ({"width": 0}, "image size 0x10"),
    ({"channels": 2}, "2 channels"),
    ({"channels": 0}, "0 channels"),
    ({"in_features": 3}, "3 input features"),
    ({"flags": 4}, "unknown flags"),
    ({"stages": 0}, "0 stages"),
    ({"stages": 200}, "200 stages"),
    ({"hidden_layers": 200}, "200 hidden layers"),
    ({"first": 9000}, "layer widths"),
]


@pytest.mark.parametrize("fields,reason", HOSTILE_HEADERS,
                         ids=[",".join(f) + str(i) for i, (f, _) in enumerate(HOSTILE_HEADERS)])
def test_header_fields_out_of_bounds_are_refused_even_with_a_right_checksum(fields, reason):
    with pytest.raises(modelfile.ModelFileError, match=re.escape(reason)):
        modelfile.from_bytes(edited(modelfile.to_bytes(model(1), META), **fields), "forged.mrnet")


def test_an_edited_size_without_a_new_checksum_is_caught():
    # main rendered this file at 4096 x 4096 for 90 s; its pixels are within the limit, so only the checksum sees it
    data = bytearray(modelfile.to_bytes(model(1), META))
    struct.pack_into("<II", data, modelfile._FIELDS["width"][1], 4096, 4096)
    with pytest.raises(modelfile.ModelFileError, match="checksum mismatch"):
        modelfile.from_bytes(bytes(data))


def test_the_writer_refuses_what_the_reader_would():
    grey_and_alpha = MRNet(Architecture("m", 2, (StageSpec(8, (8,), 8.0),)), batch=1)
    meta = modelfile.ImageMeta(8, 8, 2, 1)
    with pytest.raises(ValueError, match="2 channels"):
        modelfile.to_bytes(grey_and_alpha, meta)


def test_version_3_files_without_a_checksum_still_load():
    m = model(1)
    data = modelfile.to_bytes(m, META, 6)
    head = len(modelfile.MAGIC)
    version_3 = data[:head] + struct.pack("<I", 3) + data[head + 4 : -modelfile._CHECKSUM.size]
    loaded, meta = modelfile.from_bytes(version_3)
    expected, _ = modelfile.from_bytes(data)
    assert meta == META
    for p, q in zip(loaded.parameters(), expected.parameters()):
        assert torch.equal(p, q)
    # The bounds apply to them too.
    forged = bytearray(version_3)
    struct.pack_into("<f", forged, modelfile._FIELDS["omega_hidden"][1], 0.0)
    with pytest.raises(modelfile.ModelFileError, match="omega_hidden"):
        modelfile.from_bytes(bytes(forged))


def test_periodic_models_load_exactly_without_drawing_frequencies():
    cfg = make_config("texture", {"levels": 2, "first": [16, 24], "hidden": [16, 24]})
    m = MRNet(cfg.architecture(3), batch=1, seed=1)
    data = modelfile.to_bytes(m, META)
    loaded, _ = modelfile.from_bytes(data)
    assert loaded.arch == m.arch and loaded.arch.periodic
    for p, q in zip(loaded.parameters(), m.parameters()):
        assert torch.equal(p, q)
    # A forged omega_0 at the bound: drawing periodic frequencies for it would take a (2 x 31,831)^2 grid.
    start = time.perf_counter()
    modelfile.from_bytes(edited(data, omega_0=modelfile.MAX_OMEGA))
    assert time.perf_counter() - start < 5


def call_with_timeout(function, seconds=10):
    """function()'s exception (or None), failing the test instead of hanging when it blocks."""
    result = {}

    def target():
        try:
            function()
        except BaseException as e:  # handed back to the test, which checks its type
            result["error"] = e
        result["done"] = True

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result.get("done"), f"still running after {seconds} s"
    return result.get("error")


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_only_regular_files_are_read(tmp_path, kind):
    path = {"fifo": tmp_path / "pipe.mrnet", "directory": tmp_path, "device": "/dev/zero"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # main's reader blocked here, waiting for a writer
    error = call_with_timeout(lambda: modelfile.load(path))
    assert isinstance(error, modelfile.ModelFileError)
    what = dict(fifo="a FIFO (named pipe)", directory="a directory", device="a character device")[kind]
    assert str(error) == f"{path}: is {what}, not a model file"


def test_files_over_the_cap_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.mrnet"
    with open(path, "wb") as f:
        f.truncate(modelfile.MAX_FILE_BYTES + 1)  # sparse: no disk used, and reading it would take 200 MB
    start = time.perf_counter()
    with pytest.raises(modelfile.ModelFileError, match="more than any model file holds"):
        modelfile.load(path)
    assert time.perf_counter() - start < 1
    with pytest.raises(modelfile.ModelFileError, match="more than any model file holds"):
        modelfile.from_bytes(modelfile.MAGIC + struct.pack("<I", modelfile.VERSION) + bytes(modelfile.MAX_FILE_BYTES))


def test_no_bytes_at_all_is_a_clean_error():
    with pytest.raises(modelfile.ModelFileError, match=r"row 3: no model bytes \(got NoneType\)"):
        modelfile.from_bytes(None, "row 3")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "forged"])
def test_render_command_gives_one_line_for_hostile_model_paths(tmp_path, capfd, target):
    from pipeline.cli import main

    if target == "fifo":
        target = tmp_path / "pipe.mrnet"
        os.mkfifo(target)
    elif target == "forged":
        target = tmp_path / "forged.mrnet"
        target.write_bytes(edited(modelfile.to_bytes(model(1), META), omega_hidden=0.0))
    codes = []
    argv = ["render", str(target), "--out", str(tmp_path / "o.png")]
    assert call_with_timeout(lambda: codes.append(main(argv))) is None
    assert codes == [1]  # unusable input, not a bad flag
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {target}: ") and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()
