"""Property-based fuzzing of model files (hypothesis): damage to a small valid model is either refused with
ModelFileError or, when it changed nothing, decodes to exactly the original weights; and a forged file (damage
with its checksum recomputed) is either refused or loads and renders within the documented bounds."""
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrnet_core import modelfile
from mrnet_core.config import make_config
from mrnet_core.images import DEFAULT_MAX_PIXELS
from mrnet_core.network import MRNet
from mrnet_core.render import render

META = modelfile.ImageMeta(20, 10, 3, 2)
_MODEL = MRNet(make_config("fast", {"levels": 2}).architecture(3), batch=1, seed=4)
FILES = {bits: modelfile.to_bytes(_MODEL, META, bits) for bits in (32, 16, 6, 2)}
ORIGINALS = {bits: modelfile.from_bytes(data) for bits, data in FILES.items()}
# Modest counts keep the file at a few seconds; bench/fuzz_modelfile.py is the long run.
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORGED = settings(FUZZ, max_examples=60)

FIELD_VALUES = {
    "B": st.integers(0, 255),
    "H": st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, modelfile.MAX_LAYER_WIDTH + 1, 65535])),
    "I": st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 4096, 65535, 2**32 - 1])),
    "f": st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, math.nan, math.inf, -30.0, 1e30])),
}


@st.composite
def mutations(draw, data):
    """(description, mutated bytes) of one truncation, a few byte flips, or one header field edit."""
    kind = draw(st.sampled_from(["truncate", "flip", "field"]))
    if kind == "truncate":
        n = draw(st.integers(0, len(data) - 1))
        return f"truncated to {n}", data[:n]
    if kind == "flip":
        out = bytearray(data)
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=4))
        for at, mask in flips:
            out[at] ^= mask
        return f"flipped {flips}", bytes(out)
    name = draw(st.sampled_from(sorted(modelfile._FIELDS)))
    fmt, offset = modelfile._FIELDS[name]
    value = draw(FIELD_VALUES[fmt])
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return f"{name} = {value}", bytes(out)


def reseal(data):
    """What a forger does after editing: recompute the checksum over everything before it."""
    return modelfile._seal(data[: -modelfile._CHECKSUM.size]) if len(data) > modelfile._CHECKSUM.size else data


def same_model(loaded, original):
    (m, meta), (m0, meta0) = loaded, original
    return (meta == meta0 and m.arch == m0.arch
            and all(torch.equal(p, q) for p, q in zip(m.parameters(), m0.parameters())))


@pytest.mark.parametrize("bits", sorted(FILES))
@FUZZ
@given(data=st.data())
def test_damaged_files_are_refused_or_unchanged(bits, data):
    what, damaged = data.draw(mutations(FILES[bits]))
    try:
        loaded = modelfile.from_bytes(damaged, "fuzzed.mrnet")
    except modelfile.ModelFileError as e:
        assert str(e).startswith("fuzzed.mrnet: ") and "\n" not in str(e)
        return
    assert same_model(loaded, ORIGINALS[bits]), f"{what}: loaded a different model without an error"


@pytest.mark.parametrize("bits", [32, 6])
@FORGED
@given(data=st.data())
def test_forged_files_are_refused_or_load_within_bounds(bits, data):
    what, damaged = data.draw(mutations(FILES[bits]))
    try:
        model, meta = modelfile.from_bytes(reseal(damaged), "forged.mrnet")
    except modelfile.ModelFileError as e:
        assert str(e).startswith("forged.mrnet: ") and "\n" not in str(e)
        return
    # A forged file may be a different, valid model; it must still be one the bounds allow, and render.
    assert 1 <= meta.width * meta.height <= DEFAULT_MAX_PIXELS, what
    assert model.arch.params() <= modelfile.MAX_PARAMS, what
    assert all(torch.isfinite(p).all() for p in model.parameters()), what
    assert render(model, 4, 4, index=0).shape == (meta.channels, 4, 4), what
