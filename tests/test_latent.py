"""Latent pyramids ("g"): fitting, level of detail, periodic grids, and exact, bounded, checksummed files."""
import struct

import pytest
import torch

from conftest import sample
from mrnet_core import latent, modelfile
from mrnet_core.metrics import psnr
from mrnet_core.pyramid import gaussian_pyramid
from mrnet_core.render import render

SIZE = 32
ARCH = latent.LatentArchitecture(3, SIZE, SIZE, 4, (8, 8))
META = modelfile.ImageMeta(SIZE, SIZE, 3, 4)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    photo = sample("astronaut.png", 2 * SIZE)
    images = torch.stack([photo[:, :SIZE, :SIZE], photo[:, SIZE:, SIZE:]])  # the face, and the flag and suit
    model = latent.fit(images, ARCH, lam=0.002, steps=400)
    latent.quantise_weights(model, images, lam=0.002)
    return model, images


def test_fit_learns_every_level_with_integer_latents(fitted):
    model, images = fitted
    assert all(torch.equal(g, g.round()) for g in model.grids)
    targets = gaussian_pyramid(images, levels=4)[::-1]
    for k, target in enumerate(targets):
        h, w = target.shape[-2:]
        quality = psnr(render(model, w, h, t=k + 1).clamp(0, 1), target)
        assert (quality > 18).all(), (k, quality)


def test_level_k_reads_only_the_coarsest_k_grids(fitted):
    model, _ = fitted
    before = {k: render(model, 16, 16, t=k) for k in (1, 2, 2.5, 3)}
    with torch.no_grad():
        model.grids[3].add_(5.0)  # the finest grid: off below t = 3
        try:
            for k, frame in before.items():
                assert torch.equal(render(model, 16, 16, t=k), frame), k
            assert not torch.equal(render(model, 16, 16, t=3.5), render(model, 16, 16, t=3))
        finally:
            model.grids[3].sub_(5.0)
    assert torch.equal(render(model, 16, 16, t=4), render(model, 16, 16))


def test_the_fitting_fast_path_draws_what_render_draws():
    from mrnet_core.pyramid import pixel_grid
    model = latent.LatentNet(latent.LatentArchitecture(3, 37, 29, 4, (8, 8)), batch=2)
    with torch.no_grad():
        for g in model.grids:
            g.copy_(torch.randn_like(g) * 3)
    for h, w in ((29, 37), (15, 19), (8, 10)):
        for t in (1, 2.5, 4):
            assert torch.allclose(model.on_pixels(h, w, t), model(pixel_grid(h, w), t), atol=1e-4)


def test_file_round_trip_is_exact(fitted):
    model, _ = fitted
    for index in range(2):
        data = modelfile.to_bytes(model, META, index=index)
        loaded, meta = modelfile.from_bytes(data)
        assert meta == META and loaded.arch == ARCH and modelfile.required_prior(data) is None
        for a, b in zip(loaded.parameters(), model.parameters()):
            assert torch.equal(a[0], b[index])
        assert torch.equal(render(loaded, 24, 20, t=2.5, window=(-1.5, -1, 0.5, 1)),
                           render(model, 24, 20, t=2.5, window=(-1.5, -1, 0.5, 1))[index : index + 1])


def test_a_higher_rate_weight_makes_a_smaller_file():
    image = sample("astronaut.png", SIZE)[None]
    sizes = []
    for lam in (0.0005, 0.02):
        model = latent.fit(image, ARCH, lam=lam, steps=300)
        latent.quantise_weights(model, image, lam)
        sizes.append(len(modelfile.to_bytes(model, META)))
    assert sizes[1] < 0.8 * sizes[0], sizes


def test_a_periodic_pyramid_tiles_the_plane():
    arch = latent.LatentArchitecture(3, 16, 16, 3, (8,), periodic=True)
    model = latent.LatentNet(arch, seed=3)
    with torch.no_grad():
        for g in model.grids:
            g.copy_(torch.randint(-3, 4, g.shape).float())
    base = render(model, 16, 16)
    assert torch.allclose(render(model, 16, 16, window=(1, -1, 3, 1)), base, atol=1e-5)
    assert torch.allclose(render(model, 16, 16, window=(-3, -3, -1, -1)), base, atol=1e-5)
    latent.quantise_weights(model, base.clamp(0, 1), lam=0.0)
    loaded, meta = modelfile.from_bytes(modelfile.to_bytes(model, modelfile.ImageMeta(16, 16, 3, 3, "wrap")))
    assert loaded.arch.periodic and meta.border == "wrap"


def test_a_batch_fits_each_image_as_well_as_alone(fitted):
    model, images = fitted
    together = psnr(render(model, SIZE, SIZE).clamp(0, 1), images)
    for i in range(2):
        alone = latent.fit(images[i : i + 1], ARCH, lam=0.002, steps=400)
        latent.quantise_weights(alone, images[i : i + 1], lam=0.002)
        single = psnr(render(alone, SIZE, SIZE).clamp(0, 1), images[i : i + 1])[0]
        assert abs(float(single - together[i])) < 0.05, (i, float(single), float(together[i]))


def _edited(data, offset, fmt, value):
    """A model file with the field of struct format `fmt` at `offset` set to `value`, checksum recomputed."""
    import zlib
    body = bytearray(data[: -4])
    struct.pack_into(fmt, body, offset, value)
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


HEAD = len(modelfile.MAGIC) + 4  # the payload's header starts after the magic and version


@pytest.mark.parametrize("offset, fmt, value, reason", [
    (HEAD, "<B", 2, "bad header: channels 2"),
    (HEAD + 2, "<B", 17, "17 levels"),
    (HEAD + 3, "<B", 9, "9 hidden layers"),
    (HEAD + 4, "<I", 2**31, "is not 1 to"),
    (HEAD + 2, "<B", 12, "too small for 12 levels"),
    (HEAD + 12, "<H", 60000, "hidden widths"),
])
def test_hostile_headers_are_refused_before_allocating(fitted, offset, fmt, value, reason):
    data = _edited(modelfile.to_bytes(fitted[0], META), offset, fmt, value)
    with pytest.raises(modelfile.ModelFileError, match=reason):
        modelfile.from_bytes(data, "forged.mrnet")


def test_corrupt_truncated_and_forged_symbol_counts_are_refused(fitted):
    data = modelfile.to_bytes(fitted[0], META)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    with pytest.raises(modelfile.ModelFileError, match="checksum mismatch"):
        modelfile.from_bytes(bytes(flipped))
    with pytest.raises(modelfile.ModelFileError, match="checksum mismatch|truncated"):
        modelfile.from_bytes(data[:-7])
    # A header that says a tiny payload holds the latents of a huge image is refused without decoding them.
    big = modelfile.to_bytes(_model_of(latent.LatentArchitecture(3, 3000, 3000, 2, (4,))),
                             modelfile.ImageMeta(3000, 3000, 3, 2))
    assert len(big) < 200
    loaded, _ = modelfile.from_bytes(big)  # all-zero grids are not coded at all: nothing to decode
    first_group = HEAD + struct.calcsize("<4BII") + struct.calcsize("<HB")
    forged = _edited(big, first_group + 1, "<I", 5)  # the coarsest grid now claims coded symbols
    forged = _edited(forged, first_group + 5 + 1, "<I", 5)  # and so does the finest: 9 M of them
    with pytest.raises(modelfile.ModelFileError, match="symbols cannot come from"):
        modelfile.from_bytes(forged)


def _model_of(arch):
    model = latent.LatentNet(arch)
    model.exponents = [8]
    with torch.no_grad():
        for t in [*model.weights, *model.biases]:
            t.copy_(torch.round(t * 256) / 256)
    return model


def test_random_damage_behind_a_recomputed_checksum_is_an_error_or_a_finite_model(fitted):
    # A forger can recompute the CRC: then every byte is hostile, and the reader must still end in a ModelFileError
    # or a model whose frames are finite numbers, never another exception.
    data = modelfile.to_bytes(fitted[0], META)
    generator = torch.Generator().manual_seed(0)
    outcomes = {"error": 0, "model": 0}
    for _ in range(300):
        position = int(torch.randint(len(modelfile.MAGIC) + 4, len(data) - 4, (1,), generator=generator))
        forged = _edited(data, position, "<B", int(torch.randint(0, 256, (1,), generator=generator)))
        try:
            model, _ = modelfile.from_bytes(forged, "forged.mrnet")
        except modelfile.ModelFileError as e:
            assert str(e).startswith("forged.mrnet: ")
            outcomes["error"] += 1
            continue
        assert torch.isfinite(render(model, 8, 8)).all()
        outcomes["model"] += 1
    assert outcomes["error"] > 0 and outcomes["model"] > 0, outcomes  # both paths were exercised


def test_values_that_could_overflow_and_pyramids_over_the_latent_limit_are_refused():
    arch = latent.LatentArchitecture(3, 16, 16, 2, (64, 64, 64, 64))
    model = latent.LatentNet(arch)
    model.exponents = [0]
    with torch.no_grad():
        for t in [*model.grids, *model.weights, *model.biases]:
            t.fill_(2.0**20)  # every value within a file's bounds; together far past float32's range
    data = modelfile.to_bytes(model, modelfile.ImageMeta(16, 16, 3, 2))
    with pytest.raises(modelfile.ModelFileError, match="overflow"):
        modelfile.from_bytes(data, "huge.mrnet")
    with pytest.raises(ValueError, match="over a latent pyramid's limit"):
        latent.LatentArchitecture(3, 5000, 5000, 2)
    small = modelfile.to_bytes(_model_of(latent.LatentArchitecture(3, 64, 64, 2, (4,))),
                               modelfile.ImageMeta(64, 64, 3, 2))
    forged = _edited(_edited(small, HEAD + 4, "<I", 13000), HEAD + 8, "<I", 13000)
    with pytest.raises(modelfile.ModelFileError, match="over a latent pyramid's limit"):
        modelfile.from_bytes(forged)
