"""Golden `.mrnet` bitstreams: files written by this version must stay readable, bit for bit, by every later one.

The quantised format range-codes its symbols with constriction, whose models could change between its versions;
a change there (or in our coder) that alters the bytes is caught here rather than by users whose files stop
decoding. The weights are exact binary fractions built without any random generator, so the expected bytes
depend on the format alone, not on torch's random streams.
"""
from pathlib import Path

import numpy as np
import torch

from mrnet_core.modelfile import ImageMeta, from_bytes, to_bytes
from mrnet_core.network import Architecture, MRNet, StageSpec

GOLDEN = Path(__file__).parent / "data"
ARCH = Architecture("m", 3, (StageSpec(6, (5,), 20.0), StageSpec(8, (6,), 40.0)))
META = ImageMeta(12, 8, 3, 2)


def golden_model():
    """ARCH with weights ((37 k) mod 101 - 50) / 64 for parameter element k: exact in float32 and in float16."""
    model = MRNet(ARCH)
    with torch.no_grad():
        k = 0
        for p in model.parameters():
            n = p.numel()
            values = ((torch.arange(k, k + n, dtype=torch.int64) * 37) % 101 - 50).float() / 64
            p.copy_(values.view_as(p))
            k += n
    return model


def check(bits):
    data = (GOLDEN / f"golden-m{bits}.mrnet").read_bytes()
    assert to_bytes(golden_model(), META, bits) == data  # the writer still makes the same bytes
    model, meta = from_bytes(data)  # and the reader still reads them, to the same weights
    assert meta == META and meta.sizes == ((4, 6), (8, 12)) and model.arch == ARCH
    return model


def test_float_files_decode_to_the_exact_weights():
    for bits in (32, 16):
        decoded = check(bits)
        for p, q in zip(decoded.parameters(), golden_model().parameters()):
            assert torch.equal(p, q)


def test_quantised_files_decode_to_the_same_symbols_as_when_they_were_written():
    decoded = check(8)
    # Every weight within half a step of the original (steps of 8-bit codes cover [-50/64, 50/64] in 255 codes),
    # and exactly the reference values recorded when the file was written.
    for p, q in zip(decoded.parameters(), golden_model().parameters()):
        assert (p - q).abs().max() <= 0.01
    reference = np.fromfile(GOLDEN / "golden-m8.weights.f32", dtype="<f4")  # every parameter, in order, flattened
    assert torch.equal(torch.cat([p.flatten() for p in decoded.parameters()]), torch.from_numpy(reference))
