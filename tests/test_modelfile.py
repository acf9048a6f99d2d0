import pickle
import struct

import pytest
import torch

from mrnet_core import modelfile, quantize
from mrnet_core.config import make_config
from mrnet_core.network import Architecture, MRNet, StageSpec
from mrnet_core.render import render

META = {"width": 20, "height": 10, "channels": 3, "levels": [[5, 10], [10, 20]], "border": "reflect"}


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
        bound += p[0].numel() * quantize.tensor_bits(8, layer, is_weight) / 8 + (p.shape[-1] if quantize.column_steps(p.shape[1:]) else 1) + 1
    assert sizes[2] <= bound


def corrupt_variants():
    good = modelfile.to_bytes(model(1), META)
    quantised = modelfile.to_bytes(model(1), META, 6)
    head = len(modelfile.MAGIC)
    yield "empty", b"", "bad magic"
    yield "pickle", pickle.dumps({"weights": [1, 2, 3]}), "bad magic"
    yield "truncated", good[:-10], "truncated"
    yield "extra", good + b"\0\0\0\0", "payload"
    yield "version", good[:head] + struct.pack("<I", 99) + good[head + 4 :], "version 99"
    yield "header cut", good[: head + 10], "header runs past"
    yield "model kind", good[: head + 4] + b"x" + good[head + 5 :], "bad header"
    huge = bytearray(good)  # the first stage's width: would need gigabytes if it were allocated
    struct.pack_into("<H", huge, head + 4 + modelfile._HEAD.size, 65535)
    yield "huge widths", bytes(huge), "payload"
    zero = bytearray(good)
    struct.pack_into("<H", zero, head + 4 + modelfile._HEAD.size, 0)
    yield "zero width", bytes(zero), "bad header"
    nan = bytearray(good)
    nan[-4:] = struct.pack("<f", float("nan"))
    yield "nan", bytes(nan), "NaN"
    yield "quantised truncated", quantised[:-4], "truncated"
    yield "quantised extra", quantised + b"\0\0\0\0", "truncated or corrupt"
    yield "quantised cut in steps", quantised[: len(quantised) // 3], "truncated"


@pytest.mark.parametrize("name,data,reason", list(corrupt_variants()), ids=[v[0] for v in corrupt_variants()])
def test_corrupt_files_are_rejected_with_a_clear_error(tmp_path, name, data, reason):
    path = tmp_path / "bad.mrnet"
    path.write_bytes(data)
    with pytest.raises(modelfile.ModelFileError, match=reason) as e:
        modelfile.load(path)
    assert str(path) in str(e.value)


def test_hostile_parameter_counts_are_refused_before_allocating():
    arch = Architecture("m", 3, (StageSpec(60000, (60000,), 30.0),))
    header = modelfile._header(arch, {"width": 8, "height": 8}, 32)
    with pytest.raises(modelfile.ModelFileError, match="more than any MR-Net"):
        modelfile.from_bytes(header)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(modelfile.ModelFileError, match="nothing.mrnet"):
        modelfile.load(tmp_path / "nothing.mrnet")


def test_encode_measures_the_stored_model():
    from mrnet_core.encode import encode

    images = torch.rand(2, 3, 16, 16)
    cfg32 = make_config("fast", {"levels": 2, "max_epochs": [30, 30]})
    cfg8 = make_config("fast", {"levels": 2, "max_epochs": [30, 30], "weight_bits": 4, "qat_epochs": 0})
    (r32, _), (r8, blobs) = encode(images, cfg32, device="cpu"), encode(images, cfg8, device="cpu")
    assert r8[0]["model_bytes"] == len(blobs[0]) < r32[0]["model_bytes"] / 3
    stored, meta = modelfile.from_bytes(blobs[1])
    assert meta["levels"] == [[8, 8], [16, 16]]
    from mrnet_core.metrics import psnr
    direct = psnr(render(stored, 16, 16).clamp(0, 1), images[1:2])[0]
    assert r8[1]["levels"][-1]["psnr"] == pytest.approx(float(direct), abs=0.01)
    assert r8[1]["levels"][-1]["psnr"] < r32[1]["levels"][-1]["psnr"]
