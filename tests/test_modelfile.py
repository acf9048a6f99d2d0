import json
import pickle
import struct

import pytest
import torch

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.network import MRNet
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
    full, half = modelfile.to_bytes(m, META), modelfile.to_bytes(m, META, "float16")
    params = m.arch.params()
    assert len(full) - len(half) == 2 * params
    loaded, _ = modelfile.from_bytes(half)
    assert torch.allclose(render(loaded, 8, 8), render(m, 8, 8), atol=2e-2)


def corrupt_variants():
    good = modelfile.to_bytes(model(1), META)
    head = len(modelfile.MAGIC)
    length = struct.unpack_from("<I", good, head + 4)[0]
    header_end = head + 8 + length
    yield "empty", b"", "bad magic"
    yield "pickle", pickle.dumps({"weights": [1, 2, 3]}), "bad magic"
    yield "truncated", good[:-10], "truncated"
    yield "extra", good + b"\0\0\0\0", "payload"
    yield "version", good[:head] + struct.pack("<I", 99) + good[head + 4 :], "version 99"
    yield "header length", good[: head + 4] + struct.pack("<I", 1 << 30) + good[head + 8 :], "header length"
    yield "garbage header", good[: head + 8] + b"{" * length + good[header_end:], "bad header"
    header = json.loads(good[head + 8 : header_end])
    header["architecture"]["stages"][0]["first"] = 10**9  # would need gigabytes if it were allocated
    hostile = json.dumps(header).encode()
    yield "huge widths", good[:head] + struct.pack("<II", 1, len(hostile)) + hostile + good[header_end:], "payload"
    header["architecture"]["stages"] = "__import__('os')"
    code = json.dumps(header).encode()
    yield "code in header", good[:head] + struct.pack("<II", 1, len(code)) + code + good[header_end:], "bad header"
    nan = bytearray(good)
    nan[-4:] = struct.pack("<f", float("nan"))
    yield "nan", bytes(nan), "NaN"


@pytest.mark.parametrize("name,data,reason", list(corrupt_variants()), ids=[v[0] for v in corrupt_variants()])
def test_corrupt_files_are_rejected_with_a_clear_error(tmp_path, name, data, reason):
    path = tmp_path / "bad.mrnet"
    path.write_bytes(data)
    with pytest.raises(modelfile.ModelFileError, match=reason) as e:
        modelfile.load(path)
    assert str(path) in str(e.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(modelfile.ModelFileError, match="nothing.mrnet"):
        modelfile.load(tmp_path / "nothing.mrnet")


def test_int8_stores_a_byte_a_weight_plus_scales_and_decodes_closely():
    m = model(1)
    int8 = modelfile.to_bytes(m, META, "int8")
    full = modelfile.to_bytes(m, META)
    header = len(modelfile.to_bytes(m, META, "float16")) - 2 * m.arch.params()
    scales = sum(fo + 1 for i in range(len(m.arch.stages)) for _, fo in m.arch.layer_shapes(i))
    assert len(int8) == header - len('"float16"') + len('"int8"') + m.arch.params() + 4 * scales
    loaded, _ = modelfile.from_bytes(int8)
    for stage, original in zip(loaded.stages, m.stages):
        for p, q in zip(stage.weights, original.weights):  # within half a step of each column's scale
            step = q.abs().amax(dim=1, keepdim=True) / 127
            assert ((p - q).abs() <= step / 2 + 1e-7).all()
    assert torch.allclose(render(loaded, 8, 8), render(m, 8, 8), atol=0.05)
    assert len(int8) < len(full) / 3
    with pytest.raises(modelfile.ModelFileError, match="payload"):
        modelfile.from_bytes(int8[:-1])


def test_encode_measures_the_stored_model():
    from mrnet_core.encode import encode

    images = torch.rand(2, 3, 16, 16)
    cfg32 = make_config("fast", {"levels": 2, "max_epochs": [30, 30]})
    cfg8 = make_config("fast", {"levels": 2, "max_epochs": [30, 30], "weights_dtype": "int8"})
    (r32, _), (r8, blobs) = encode(images, cfg32, device="cpu"), encode(images, cfg8, device="cpu")
    assert r8[0]["model_bytes"] == len(blobs[0]) < r32[0]["model_bytes"] / 3
    stored, meta = modelfile.from_bytes(blobs[1])
    assert meta["levels"] == [[8, 8], [16, 16]]
    from mrnet_core.metrics import psnr
    direct = psnr(render(stored, 16, 16).clamp(0, 1), images[1:2])[0]
    assert r8[1]["levels"][-1]["psnr"] == pytest.approx(float(direct), abs=0.01)
    assert r8[1]["levels"][-1]["psnr"] < r32[1]["levels"][-1]["psnr"]
