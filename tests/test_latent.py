"""Latent pyramids ("g"): fitting, level of detail, periodic grids, and exact, bounded, checksummed files."""
import dataclasses
import math
import re
import struct

import numpy as np
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


def _checker(grid):
    """A checkerboard of +-5 the size of `grid`: one binomial blur removes it, so a coarser level than the grid's does
    not show it (`LatentNet.mipmaps`)."""
    h, w = grid.shape[-2:]
    return ((torch.arange(h)[:, None] + torch.arange(w)) % 2) * 10.0 - 5


def test_a_coarser_level_reads_finer_grids_only_through_their_low_pass(fitted):
    model, _ = fitted
    before = {k: render(model, 16, 16, t=k) for k in (0.5, 1, 2, 2.5, 3)}
    with torch.no_grad():
        for change, coarse_levels_see_it in ((_checker(model.grids[3]), False), (5.0, True)):
            model.grids[3].add_(change)  # the finest grid's
            try:
                for k, frame in before.items():
                    unchanged = torch.allclose(render(model, 16, 16, t=k), frame, atol=1e-5)
                    assert unchanged != coarse_levels_see_it, (k, coarse_levels_see_it)
                assert not torch.allclose(render(model, 16, 16, t=3.5), render(model, 16, 16, t=3))
            finally:
                model.grids[3].sub_(change)
    assert torch.equal(render(model, 16, 16, t=4), render(model, 16, 16))
    for k in (1, 2, 3, 4):  # continuous in t
        assert torch.allclose(render(model, 16, 16, t=k - 1e-4), render(model, 16, 16, t=k), atol=1e-3)


def test_a_file_without_mipmaps_fades_the_finer_grids_out_as_before(fitted):
    model, _ = fitted
    written = model.select([0])
    written.arch = dataclasses.replace(model.arch, mipmaps=False)  # as files were written before flag 16
    old = modelfile.from_bytes(modelfile.to_bytes(written, META))[0]
    assert old.arch == written.arch and not old.arch.mipmaps
    before = {k: render(old, 16, 16, t=k) for k in (1, 2, 2.5, 3)}
    with torch.no_grad():
        old.grids[3].add_(5.0)  # the finest grid: off below t = 3
    for k, frame in before.items():
        assert torch.equal(render(old, 16, 16, t=k), frame), k
    assert not torch.equal(render(old, 16, 16, t=3.5), render(old, 16, 16, t=3))


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


def _edited(data, offset, fmt, *values):
    """A model file with the field of struct format `fmt` at `offset` set to `values`, checksum recomputed."""
    body = bytearray(data[: -4])
    struct.pack_into(fmt, body, offset, *values)
    return _sealed(body)


def _sealed(body):
    """A model file of `body` and its checksum."""
    import zlib
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


HEAD = len(modelfile.MAGIC) + 4  # the payload's header starts after the magic and version


@pytest.mark.parametrize("offset, fmt, value, reason", [
    (HEAD, "<B", 2, "bad header: channels 2"),
    (HEAD + 2, "<B", 17, "17 levels"),
    (HEAD + 3, "<B", 9, "9 hidden layers"),
    (HEAD + 4, "<I", 2**31, "is not 1 to"),
    (HEAD + 2, "<B", 12, "too small for 12 levels"),
    (HEAD + 12, "<H", 60000, "hidden widths"),
    (HEAD + 1, "<B", 32, "flags 32"),
    (HEAD + 17, "<B", 2, "context step exponent 2"),  # after two hidden widths and the MLP's exponent
    (HEAD + 17, "<B", 13, "context step exponent 13"),
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
    for context in (True, False):
        big = modelfile.to_bytes(_model_of(latent.LatentArchitecture(3, 3000, 3000, 2, (4,), context=context)),
                                 modelfile.ImageMeta(3000, 3000, 3, 2))
        assert len(big) < 200
        loaded, _ = modelfile.from_bytes(big)  # all-zero grids are not coded at all: nothing to decode
        # The header, the MLP's exponent (and the context model's); the groups: the grids first, or, with a context
        # model, after the MLP's 4 groups and the context model's 4.
        grids = HEAD + struct.calcsize("<4BII") + struct.calcsize("<HB") + (1 + 8 * 5 if context else 0)
        forged = _edited(big, grids + 1, "<I", 5)  # the coarsest grid now claims coded symbols
        forged = _edited(forged, grids + 5 + 1, "<I", 5)  # and so does the finest: 9 M of them
        with pytest.raises(modelfile.ModelFileError, match="symbols cannot come from"):
            modelfile.from_bytes(forged)
        if context:  # a context weight over its bound could overflow the integer context model
            forged = _edited(big, grids - 5 + 1, "<I", latent.MAX_CONTEXT_SYMBOL + 1)
            with pytest.raises(modelfile.ModelFileError, match="context weight is over"):
                modelfile.from_bytes(forged)


def _model_of(arch):
    model = latent.LatentNet(arch)
    model.exponents = [8]
    with torch.no_grad():
        for t in [*model.weights, *model.biases]:
            t.copy_(torch.round(t * 256) / 256)
    latent.quantise_context(model, exponents=range(4, 5))  # one step tried: a search over 3000 x 3000 costs a minute
    return model


def test_a_grid_read_in_runs_of_fronts_is_the_same_grid(fitted, monkeypatch):
    # A reader finds latents' causal neighbours a bounded run at a time (a forged 4096 x 4096 grid must not take
    # gigabytes); runs that end inside a front, or hold one front, must read the same file.
    model, _ = fitted
    data = modelfile.to_bytes(model, META)
    whole = modelfile.from_bytes(data)[0]
    for chunk in (1, 7, 50):
        monkeypatch.setattr(latent, "NEIGHBOUR_CHUNK", chunk)
        for a, b in zip(modelfile.from_bytes(data)[0].parameters(), whole.parameters()):
            assert torch.equal(a, b)


def test_factorised_files_round_trip_exactly():
    arch = latent.LatentArchitecture(3, SIZE, SIZE, 4, (8,), context=False)
    image = sample("astronaut.png", SIZE)[None]
    model = latent.fit(image, arch, lam=0.002, steps=100)
    latent.quantise_weights(model, image, lam=0.002)
    loaded, _ = modelfile.from_bytes(modelfile.to_bytes(model, META))
    assert not loaded.arch.context and loaded.context_exponents == [None]
    for a, b in zip(loaded.parameters(), model.parameters()):
        assert torch.equal(a, b)


GRID_ARCH = latent.LatentArchitecture(3, SIZE, SIZE, 4, (8, 8), grid_channels=2)


@pytest.fixture(scope="module")
def two_grids_a_level(fitted):
    images = fitted[1]
    model = latent.fit(images, GRID_ARCH, lam=0.002, steps=400)
    latent.quantise_weights(model, images, lam=0.002)
    return model, images


def test_grid_channels_give_each_level_its_own_grids_and_keep_level_of_detail(two_grids_a_level):
    model, images = two_grids_a_level
    sizes = [g.shape[1:] for g in model.grids]
    assert len(sizes) == 8 and sizes[0::2] == sizes[1::2] == [g.shape[1:] for g in latent.LatentNet(ARCH).grids]
    assert model.weights[0].shape[1] == 2 * ARCH.levels and all(torch.equal(g, g.round()) for g in model.grids)
    targets = gaussian_pyramid(images, levels=4)[::-1]
    for k, target in enumerate(targets):
        h, w = target.shape[-2:]
        assert (psnr(render(model, w, h, t=k + 1).clamp(0, 1), target) > 16).all(), k  # zero latents: 11-13 dB
    before = {t: render(model, 16, 16, t=t) for t in (1, 2, 2.5, 3)}
    with torch.no_grad():
        model.grids[7].add_(_checker(model.grids[7]))  # detail of the finest level's second grid: not below t = 3
        try:
            assert all(torch.allclose(render(model, 16, 16, t=t), frame, atol=1e-5) for t, frame in before.items())
            assert not torch.equal(render(model, 16, 16, t=3.5), before[3])
        finally:
            model.grids[7].sub_(_checker(model.grids[7]))
    with torch.no_grad():
        model.grids[5].add_(_checker(model.grids[5]))  # level 2's second grid's: in from t = 2 on
        try:
            assert torch.allclose(render(model, 16, 16, t=2), before[2], atol=1e-5)
            assert not torch.equal(render(model, 16, 16, t=2.5), before[2.5])
        finally:
            model.grids[5].sub_(_checker(model.grids[5]))


def test_a_file_of_grid_channels_round_trips_exactly_and_one_grid_a_level_is_as_before(fitted, two_grids_a_level):
    model, _ = two_grids_a_level
    for index in range(2):
        data = modelfile.to_bytes(model, META, index=index)
        loaded, _ = modelfile.from_bytes(data)
        assert loaded.arch == GRID_ARCH and data[HEAD + 1] & latent.GRID_CHANNELS
        for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
            assert torch.equal(a[0], b[index])
        assert torch.equal(render(loaded, 24, 20, t=2.5, window=(-1.5, -1, 0.5, 1)),
                           render(model, 24, 20, t=2.5, window=(-1.5, -1, 0.5, 1))[index : index + 1])
    # One grid a level: no flag and no count byte, so files written before grid channels read the same
    one = modelfile.to_bytes(fitted[0], META)
    assert not one[HEAD + 1] & latent.GRID_CHANNELS
    assert len(modelfile.to_bytes(model, META)) > len(one)  # twice the latents cost more bytes
    data = modelfile.to_bytes(model, META)
    for count in (0, 1, 5, 255):  # the count follows the MLP's and the context model's step exponents
        with pytest.raises(modelfile.ModelFileError, match=f"bad header: {count} grid channels"):
            modelfile.from_bytes(_edited(data, HEAD + 18, "<B", count))


def test_grid_channels_in_a_factorised_file_a_batch_and_a_config():
    from mrnet_core.config import ConfigError, make_config
    from mrnet_core.encode import encode
    arch = latent.LatentArchitecture(3, SIZE, SIZE, 4, (8,), context=False, grid_channels=3)
    image = sample("astronaut.png", SIZE)[None]
    model = latent.fit(image, arch, lam=0.002, steps=100)
    latent.quantise_weights(model, image, lam=0.002)
    loaded, _ = modelfile.from_bytes(modelfile.to_bytes(model, META))
    assert loaded.arch == arch
    for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    # A batch fits each image as it would be fitted alone
    pair = torch.cat([image, image.flip(-1)])
    together = latent.fit(pair, arch, lam=0.002, steps=60)
    alone = latent.fit(pair[1:], arch, lam=0.002, steps=60)
    assert torch.allclose(together.on_pixels(SIZE, SIZE)[1], alone.on_pixels(SIZE, SIZE)[0], atol=1e-3)
    # The config's key: g only, 1 to 4, out of the config id at 1
    cfg = make_config("default", {"levels": 4, "max_epochs": [50], "grid_channels": 2}, model="g")
    assert cfg.latent_architecture(3, 64, 64).grid_channels == 2 and cfg.to_dict()["grid_channels"] == 2
    assert "grid_channels" not in make_config("default", {}, model="g").to_dict()
    records, blobs = encode(sample("coffee.png", 32)[None], cfg, device="cpu")
    assert modelfile.from_bytes(blobs[0])[0].arch.grid_channels == 2 and records[0].bpp == pytest.approx(
        8 * len(blobs[0]) / (32 * 21), abs=1e-4)
    with pytest.raises(ConfigError, match="grid_channels: must be an integer from 1 to 4"):
        make_config("default", {"grid_channels": 5}, model="g")
    with pytest.raises(ConfigError, match="grid_channels: only a latent pyramid"):
        make_config("default", {"grid_channels": 2})
    with pytest.raises(latent.TooLarge, match="over a latent pyramid's limit"):
        latent.LatentArchitecture(3, 2000, 2000, 2, grid_channels=4)  # 20 M latents; one grid a level holds 5 M
    latent.LatentArchitecture(3, 2000, 2000, 2, grid_channels=1)


LEVEL_GRIDS_ARCH = latent.LatentArchitecture(3, SIZE, SIZE, 4, (8, 8), grid_channels=(3, 2, 1, 1))


def test_grid_channels_per_level_fit_each_level_from_its_own_grids(fitted):
    arch = LEVEL_GRIDS_ARCH
    assert arch.grid_levels == [0, 0, 0, 1, 1, 2, 3] and arch.grid_count == 7
    assert latent.LatentArchitecture(3, SIZE, SIZE, 4, (8, 8), grid_channels=[2] * 4) == GRID_ARCH  # one count
    for bad in ((2, 1, 1), (0, 1, 1, 1), (1, 1, 1, 5)):
        with pytest.raises(ValueError, match="grid channels"):
            latent.LatentArchitecture(3, SIZE, SIZE, 4, (8, 8), grid_channels=bad)
    images = fitted[1]
    model = latent.fit(images, arch, lam=0.002, steps=400)
    latent.quantise_weights(model, images, lam=0.002)
    # Each level was fitted from its own grids and the coarser ones: the render at t = k + 1 is level k
    for k, target in enumerate(gaussian_pyramid(images, levels=4)[::-1]):
        h, w = target.shape[-2:]
        assert (psnr(render(model, w, h, t=k + 1).clamp(0, 1), target) > 16).all(), k  # zero latents: 11-13 dB
    before = {t: render(model, 16, 16, t=t) for t in (0.5, 1, 1.5, 2)}
    with torch.no_grad():
        model.grids[4].add_(_checker(model.grids[4]))  # level 1's second grid's: not up to t = 1, in past it
        try:
            assert torch.allclose(render(model, 16, 16, t=1), before[1], atol=1e-5)
            assert not torch.equal(render(model, 16, 16, t=1.5), before[1.5])
        finally:
            model.grids[4].sub_(_checker(model.grids[4]))
        model.grids[2].add_(_checker(model.grids[2]))  # level 0's third grid's: in from t = 0
        try:
            assert not torch.equal(render(model, 16, 16, t=0.5), before[0.5])
        finally:
            model.grids[2].sub_(_checker(model.grids[2]))
    # The file: flag 8 and a count per level after the step exponents; decoding is exact
    data = modelfile.to_bytes(model, META, index=1)
    assert data[HEAD + 1] & latent.LEVEL_GRIDS and not data[HEAD + 1] & latent.GRID_CHANNELS
    assert struct.unpack_from("<4B", data, HEAD + 18) == (3, 2, 1, 1)
    loaded, _ = modelfile.from_bytes(data)
    assert loaded.arch == arch
    for a, b in zip(loaded.parameters(), model.parameters(), strict=True):
        assert torch.equal(a[0], b[1])
    for count in (0, 5, 255):
        with pytest.raises(modelfile.ModelFileError, match="bad header: grid channels per level"):
            modelfile.from_bytes(_edited(data, HEAD + 19, "<B", count))
    with pytest.raises(modelfile.ModelFileError, match=r"per level \[1, 1, 1, 1\] \(1 to 4, not all equal"):
        modelfile.from_bytes(_edited(data, HEAD + 18, "<4B", 1, 1, 1, 1))  # one form per model: flag 4, or none
    with pytest.raises(modelfile.ModelFileError, match="truncated header"):  # not the checksum read as counts
        modelfile.from_bytes(_sealed(data[: HEAD + 20]))
    with pytest.raises(modelfile.ModelFileError, match="bad header: channels 3, flags 14"):  # 4 and 8 together
        modelfile.from_bytes(_edited(data, HEAD + 1, "<B", 14))
    with pytest.raises(modelfile.ModelFileError, match="bad header: channels 3, flags 34"):
        modelfile.from_bytes(_edited(data, HEAD + 1, "<B", 34))


def test_grid_channels_per_level_in_a_factorised_file_a_batch_and_a_config():
    from mrnet_core.config import ConfigError, make_config
    arch = latent.LatentArchitecture(3, SIZE, SIZE, 4, (8,), context=False, grid_channels=(1, 2, 2, 1))
    image = sample("astronaut.png", SIZE)[None]
    pair = torch.cat([image, image.flip(-1)])
    together = latent.fit(pair, arch, lam=0.002, steps=60)
    alone = latent.fit(pair[1:], arch, lam=0.002, steps=60)
    assert torch.allclose(together.on_pixels(SIZE, SIZE)[1], alone.on_pixels(SIZE, SIZE)[0], atol=1e-3)
    latent.quantise_weights(together, pair, lam=0.002)
    loaded, _ = modelfile.from_bytes(modelfile.to_bytes(together, META, index=1))
    assert loaded.arch == arch
    for a, b in zip(loaded.parameters(), together.parameters(), strict=True):
        assert torch.equal(a[0], b[1])
    # The config's key is per stage like `hidden`: finest-aligned, the coarser levels repeat the first entry
    cfg = make_config("default", {"levels": 4, "grid_channels": [2, 1]}, model="g")
    assert cfg.latent_architecture(3, 64, 64).grid_channels == (2, 2, 2, 1)
    assert cfg.to_dict()["grid_channels"] == [2, 1]
    assert "grid_channels" not in make_config("default", {"grid_channels": [1, 1]}, model="g").to_dict()
    same = make_config("default", {"grid_channels": [2, 2]}, model="g")  # [2, 2] is 2: one model, one config id
    assert same == make_config("default", {"grid_channels": 2}, model="g") and same.to_dict()["grid_channels"] == 2
    assert make_config("default", {"levels": 2, "grid_channels": [3, 2, 2]}, model="g").latent_architecture(
        3, 64, 64).grid_channels == 2
    with pytest.raises(ConfigError, match="grid_channels: must be an integer from 1 to 4, not 0"):
        make_config("default", {"grid_channels": [2, 0]}, model="g")
    with pytest.raises(ConfigError, match="grid_channels: must be a list of 1 to 16 entries"):
        make_config("default", {"grid_channels": [1] * 17}, model="g")
    with pytest.raises(ConfigError, match=r"grid_channels: only a latent pyramid .* not \[1, 2\]"):
        make_config("default", {"grid_channels": [1, 2]})
    make_config("default", {"grid_channels": [1, 1]})
    # The size limit's hint is this architecture's: a square of about that many pixels fits, a little more does not
    with pytest.raises(latent.TooLarge, match=r"about ([\d.]+) Mpx") as refused:
        latent.LatentArchitecture(3, 2800, 2800, 4, grid_channels=(4, 4, 4, 1))
    side = math.sqrt(float(re.search(r"about ([\d.]+) Mpx", str(refused.value))[1]) * 1e6)
    latent.LatentArchitecture(3, int(side * 0.99), int(side * 0.99), 4, grid_channels=(4, 4, 4, 1))
    with pytest.raises(latent.TooLarge):
        latent.LatentArchitecture(3, int(side * 1.01), int(side * 1.01), 4, grid_channels=(4, 4, 4, 1))


def test_the_context_model_reads_only_latents_decoded_before():
    h, w = 5, 7
    grid = torch.randint(-9, 10, (1, h, w), generator=torch.Generator().manual_seed(1))
    inputs = latent.context_inputs(grid)[0]
    order, fronts = latent.decode_order(h, w)
    neighbours = latent.causal_neighbours(np.arange(h * w), h, w)
    assert sorted(order.tolist()) == list(range(h * w))
    front = torch.empty(h * w, dtype=torch.long)  # each latent's step of the decoder
    for f, (start, stop) in enumerate(zip(fronts[:-1], fronts[1:])):
        front[order[start:stop]] = f
    for i in range(h * w):
        changed = grid.clone()
        changed.view(-1)[front >= front[i]] += 5  # this latent's front and every later one
        assert torch.equal(latent.context_inputs(changed)[0][i], inputs[i]), i
    # The decoder's gather (beyond the edge: a trailing 0) reads what the coder's inputs hold.
    padded = torch.cat([grid.flatten(), torch.zeros(1, dtype=grid.dtype)])
    assert torch.equal(padded[torch.from_numpy(neighbours)], inputs)
    assert len(fronts) - 1 == 3 * (h - 1) + w  # fronts, not latents: 19 vectorised steps for 35 latents


def test_the_integer_context_model_follows_the_float_one(fitted):
    model, _ = fitted
    e = model.context_exponents[0]
    inputs = latent.context_inputs(model.grids[2][:1])
    mean, offset = latent.context_laplace(inputs, [w[:1] for w in model.context_weights],
                                          [b[:1] for b in model.context_biases])
    integers = [(t[0] * 2**e).round().long() for t in (*model.context_weights, *model.context_biases)]
    mean8, offset16 = latent.context_codes(inputs[0].long(), integers[:2], integers[2:], e)
    assert (mean8 / 8 - mean[0]).abs().max() <= 1 / 16 + 1e-4
    assert (offset16 / 16 - offset[0]).abs().max() <= 1 / 32 + 1e-4
    assert mean.abs().max() > 0.1  # the context model was fitted: it predicts, it is not all zeros


def test_the_integer_context_model_is_int64_arithmetic_at_its_bounds():
    # context_codes runs its products in float64, exact only while every sum stays below 2^53: the same integers
    # as int64 products, at the bounds a file allows (which push hidden units to HIDDEN_CAP) and between them.
    def reference(inputs, weights, biases, e):
        hidden = (inputs @ weights[0] + biases[0]).clamp(0, latent.HIDDEN_CAP)
        out = hidden @ weights[1] + biases[1] * 2**e
        return (torch.div(out[:, 0] + 2 ** (2 * e - 4), 2 ** (2 * e - 3), rounding_mode="floor"),
                torch.div(out[:, 1] + 2 ** (2 * e - 5), 2 ** (2 * e - 4), rounding_mode="floor"))

    top, weight_top, cap = latent.MAX_SYMBOL, latent.MAX_CONTEXT_SYMBOL, latent.HIDDEN_CAP
    # The constants keep the largest possible sum of absolute values below 2^53 in both layers.
    assert latent.CONTEXT_INPUTS * top * weight_top + weight_top < 2**53
    assert latent.CONTEXT_HIDDEN * cap * weight_top + weight_top * 2**latent.MAX_CONTEXT_EXPONENT < 2**53
    generator = torch.Generator().manual_seed(0)
    shapes = [*latent.CONTEXT_SHAPES, (latent.CONTEXT_HIDDEN,), (2,)]

    def draw(bound, shape):
        return torch.randint(-bound, bound + 1, shape, generator=generator)

    inputs = torch.cat([torch.full((1, latent.CONTEXT_INPUTS), top), torch.full((1, latent.CONTEXT_INPUTS), -top),
                        draw(top, (4000, latent.CONTEXT_INPUTS)), draw(2**10, (4000, latent.CONTEXT_INPUTS))])
    cases = [[torch.full(shape, fill) for shape in shapes] for fill in (weight_top, -weight_top, weight_top - 1)]
    cases += [[draw(weight_top, shape) for shape in shapes], [draw(2**12, shape) for shape in shapes]]
    # Hidden units one below the cap times odd weights near the bound: odd low bits at about 2^51.
    near = [torch.zeros(shapes[0], dtype=torch.int64), torch.full(shapes[1], weight_top - 1),
            torch.full(shapes[2], cap - 1), torch.full(shapes[3], -weight_top + 1)]
    for e in (3, 7, latent.MAX_CONTEXT_EXPONENT):
        for params in [*cases, near]:
            got = latent.context_codes(inputs, params[:2], params[2:], e)
            want = reference(inputs, params[:2], params[2:], e)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), e
            assert got[0].dtype == got[1].dtype == torch.int64
            as_floats = latent.context_codes(inputs.double(), [p.double() for p in params[:2]],
                                             [p.double() for p in params[2:]], e)  # how a decoder holds them
            assert all(torch.equal(a, b) for a, b in zip(as_floats, want)), e


def test_extreme_latents_and_context_weights_decode_exactly():
    # Every value at its bound: the integer context model must not overflow, and the file must come back exact.
    arch = latent.LatentArchitecture(1, 16, 16, 2, (4,))
    model = latent.LatentNet(arch)
    model.exponents = [0]
    with torch.no_grad():
        for t in [*model.weights, *model.biases]:
            t.zero_()
        for sign, g in zip((1, -1), model.grids):
            g.copy_(sign * latent.MAX_SYMBOL * torch.ones_like(g))
        for t in [*model.context_weights, *model.context_biases]:
            t.fill_(latent.MAX_CONTEXT_SYMBOL * 2.0**-3)
    model.context_exponents = [3]
    loaded, _ = modelfile.from_bytes(modelfile.to_bytes(model, modelfile.ImageMeta(16, 16, 1, 2)))
    for a, b in zip(loaded.grids, model.grids):
        assert torch.equal(a, b)
    with torch.no_grad():
        model.context_biases[0].add_(2.0**-3)  # one step past the bound: the writer refuses what no reader takes
    with pytest.raises(ValueError, match="context weight is over"):
        modelfile.to_bytes(model, modelfile.ImageMeta(16, 16, 1, 2))


@pytest.mark.parametrize("made", ["fitted", "two_grids_a_level"])
def test_random_damage_behind_a_recomputed_checksum_is_an_error_or_a_finite_model(request, made):
    # A forger can recompute the CRC: then every byte is hostile, and the reader must still end in a ModelFileError
    # or a model whose frames are finite numbers, never another exception.
    data = modelfile.to_bytes(request.getfixturevalue(made)[0], META)
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
    latent.quantise_context(model)
    data = modelfile.to_bytes(model, modelfile.ImageMeta(16, 16, 3, 2))
    with pytest.raises(modelfile.ModelFileError, match="overflow"):
        modelfile.from_bytes(data, "huge.mrnet")
    # Hidden units past float32's range spoil a render even where the last layer's weights are 0 (inf * 0: NaN).
    wide = latent.LatentNet(latent.LatentArchitecture(3, 16, 16, 4, (512, 512, 512, 1), context=False))
    wide.exponents = [0]
    with torch.no_grad():
        for t in [*wide.grids, *wide.weights[:-1]]:
            t.fill_(2.0**20)  # the fourth layer's unit reaches 2^129
        wide.weights[-1].zero_()
    assert render(wide, 4, 4).isnan().all()
    with pytest.raises(modelfile.ModelFileError, match="overflow"):
        modelfile.from_bytes(modelfile.to_bytes(wide, modelfile.ImageMeta(16, 16, 3, 4)), "nan.mrnet")
    with pytest.raises(ValueError, match="over a latent pyramid's limit"):
        latent.LatentArchitecture(3, 5000, 5000, 2)
    # A long, thin image would take a decoder one step per latent: refused with a context model, not without.
    with pytest.raises(ValueError, match="steps to decode, over the limit"):
        latent.LatentArchitecture(3, 1, 40000, 1)
    latent.LatentArchitecture(3, 1, 40000, 1, context=False)
    small = modelfile.to_bytes(_model_of(latent.LatentArchitecture(3, 64, 64, 2, (4,))),
                               modelfile.ImageMeta(64, 64, 3, 2))
    forged = _edited(_edited(small, HEAD + 4, "<I", 13000), HEAD + 8, "<I", 13000)
    with pytest.raises(modelfile.ModelFileError, match="over a latent pyramid's limit"):
        modelfile.from_bytes(forged)


def test_models_too_much_work_to_draw_and_words_left_over_are_refused(fitted):
    # Four layers of 1,024 over 3,500 x 3,500 pixels: about 5e13 multiply-adds, a quarter of an hour to draw.
    with pytest.raises(latent.TooLarge, match="multiply-adds to draw"):
        latent.LatentArchitecture(3, 3500, 3500, 1, (1024,) * 4)
    wide = _model_of(latent.LatentArchitecture(3, 16, 16, 1, (1024,) * 4))
    with torch.no_grad():
        for t in [*wide.weights, *wide.biases]:
            t.zero_()
    wide = modelfile.to_bytes(wide, modelfile.ImageMeta(16, 16, 3, 1))
    assert len(wide) < 200  # all-zero weights are not coded: a tiny file could ask for all that work
    forged = _edited(_edited(wide, HEAD + 4, "<I", 3500), HEAD + 8, "<I", 3500)
    with pytest.raises(modelfile.ModelFileError, match="multiply-adds to draw"):
        modelfile.from_bytes(forged, "slow.mrnet")
    # Words after a payload's symbols are junk, or the payload is read under a header it was not written with.
    for data in (modelfile.to_bytes(fitted[0], META), wide):
        body = data[:-4]
        n_words = next(k for k in range(len(body) // 4)  # the word count, then that many words, end the payload
                       if struct.unpack_from("<I", body, len(body) - 4 * k - 4)[0] == k)
        for extra in (2, 50):
            at = len(body) - 4 * n_words - 4
            forged = _sealed(body[:at] + struct.pack("<I", n_words + extra) + body[at + 4 :] + bytes(4 * extra))
            with pytest.raises(modelfile.ModelFileError, match="words are left over"):
                modelfile.from_bytes(forged, "padded.mrnet")


def test_soft_rounding_goes_from_the_identity_to_rounding_and_is_continuous():
    y = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    assert (latent.soft_round(y, 100.0) - y).abs().max() < 1e-4
    away = (y - y.round()).abs() < 0.45  # rounding's steps are at the half-integers
    assert (latent.soft_round(y, 0.01) - y.round())[away].abs().max() < 1e-4
    for temperature in (0.3, 0.1):
        steps = latent.soft_round(y, temperature).diff()
        assert (steps >= 0).all() and steps.max() < 0.01  # monotone, and no jump at an integer or half-integer
        whole = torch.arange(-3.0, 4.0, 0.5, dtype=torch.float64)
        assert torch.allclose(latent.soft_round(whole, temperature), whole)


def test_a_warm_restart_starts_where_its_fit_ended(fitted):
    model, images = fitted
    second = model.select([1])
    assert all(torch.equal(p[1], q[0]) for p, q in zip(model.parameters(), second.parameters(), strict=True))
    assert second.rate_weights == [model.rate_weights[1]]
    unchanged = latent.fit(images[1:], ARCH, 0.002, steps=0, resume=second)
    assert all(torch.equal(p, q) for p, q in zip(second.parameters(), unchanged.parameters(), strict=True))

    def error(m):
        return (m.on_pixels(SIZE, SIZE) - images[1:].flatten(2).transpose(1, 2)).square().mean()

    # 40 more steps from where the 400 ended fit better than 40 from a random draw, and no worse than the 400
    resumed = latent.fit(images[1:], ARCH, 0.002, steps=40, resume=second)
    assert error(resumed) < error(latent.fit(images[1:], ARCH, 0.002, steps=40))
    assert error(resumed) < 1.1 * error(second)


def test_a_restart_is_fitted_again_while_its_file_is_over_the_budget():
    from mrnet_core.encode import LATENT_RATE_FILL, LATENT_RATE_SATURATED, fit_again
    budget, weight = 1000, 0.003
    filled, under = budget - 10, int(LATENT_RATE_FILL * budget) - 1
    assert fit_again(True, filled, filled, budget, weight, weight)  # every first fit gets a restart
    assert not fit_again(False, filled, filled, budget, weight, weight)  # a restart that landed is the last
    # a restart over the budget is fitted again, aimed lower, though an earlier file within it is kept meanwhile
    assert fit_again(False, budget + 1, filled, budget, weight, weight)
    assert fit_again(False, budget + 1, budget + 1, budget, weight, weight)  # none within yet
    assert fit_again(False, under, under, budget, weight, weight)  # far under, with use for more bits
    saturated = LATENT_RATE_SATURATED * weight / 2  # its rate weight fell to ~0: more bits would not help it
    assert not fit_again(False, under, under, budget, saturated, weight)
    assert fit_again(False, budget + 1, under, budget, saturated, weight)  # over is over
    assert not fit_again(False, budget, filled, budget, weight, weight)  # exactly the budget is within it
    assert not fit_again(False, under, filled, budget, weight, weight)  # the kept file, not this one, is filled


def test_the_balanced_rate_weight_is_the_slope_of_a_curve_of_3_db_per_doubling():
    from mrnet_core.encode import balanced_rate_weight

    def error(bpp):  # 30 dB at 0.5 bpp, and 3.01 dB (half the squared error) more per doubling
        return 10 ** (-30 / 10) * (0.5 / bpp)

    assert 10 * math.log10(error(0.5) / error(1.0)) == pytest.approx(3.01, abs=0.01)
    slope = (error(0.5 - 1e-5) - error(0.5 + 1e-5)) / 2e-5  # squared error saved per bit per pixel
    assert balanced_rate_weight(30.0, 0.5) == pytest.approx(slope, rel=1e-4)
    assert balanced_rate_weight(36.0, 1.0) < balanced_rate_weight(30.0, 1.0) < balanced_rate_weight(30.0, 0.5)


def test_a_restart_starts_its_rate_weight_where_its_fit_ended_but_not_too_low():
    from mrnet_core.encode import LATENT_RATE_SATURATED, restart_rate_weights
    line = LATENT_RATE_SATURATED * 0.003
    ended, floors = [1e-3, 1e-7, 1e-4, 1e-7], torch.tensor([0.0, 0.0, 5e-4, 5e-4])
    # where it ended; the saturation line; a floor after a fit over the budget; both
    expected = torch.tensor([1e-3, line, 5e-4, 5e-4])
    assert torch.allclose(restart_rate_weights(ended, floors, 0.003), expected)


def test_a_bpp_target_steers_each_file_to_its_budget():
    from mrnet_core.config import ConfigError, make_config
    from mrnet_core.encode import LATENT_RATE_FILL, LATENT_RATE_TRIES, encode, refit_steps
    # At 1.5 bpp the first fits of both come out under 90% of the budget (89% and 84%): they are fitted again. (At
    # 1.25 the network's weights take 507 of the 640 bytes, and coffee's restarts swing over and under the rest.)
    images = torch.stack([sample("astronaut.png", 96)[:, :64, :64], sample("coffee.png", 96)[:, :64, :64]])
    results = {}
    for bpp in (1.5, 4.0):
        cfg = make_config("default", {"levels": 4, "max_epochs": [400], "target_bpp": bpp}, model="g")
        records, blobs = encode(images, cfg, device="cpu")
        for r, blob in zip(records, blobs):
            assert len(blob) <= bpp * 64 * 64 / 8 and r.rate.met and r.rate.target_bpp == bpp
        results[bpp] = records, blobs
    (low, small), (high, large) = results[1.5], results[4.0]
    for i in range(2):
        assert len(small[i]) >= LATENT_RATE_FILL * 1.5 * 64 * 64 / 8  # steered up to the budget, not far under it
        assert low[i].rate.rate_weight > high[i].rate.rate_weight and len(small[i]) < len(large[i])
        assert low[i].levels[-1].psnr < high[i].levels[-1].psnr
        refits = (low[i].stages[0].epochs - 400) / refit_steps(400)  # every image is fitted again, once or more
        assert refits == int(refits) and 1 <= refits < LATENT_RATE_TRIES, low[i].stages[0].epochs  # warm restarts
        # once only: under 90% of the budget, but its fit had no use for more bits (its rate weight fell to ~0)
        assert high[i].stages[0].epochs == 400 + refit_steps(400)
    with pytest.raises(ConfigError, match="target_bpp: 102 bytes for a 64x64 image leave too little"):
        encode(images, make_config("default", {"levels": 4, "target_bpp": 0.2}, model="g"), device="cpu")
    with pytest.raises(ConfigError, match="target_psnr: a latent pyramid"):
        make_config("default", {"target_psnr": 30}, model="g")
    with pytest.raises(ConfigError, match="rate_weight: a bpp target steers"):  # 0 times anything stays 0
        make_config("default", {"target_bpp": 1.0, "rate_weight": 0}, model="g")


def test_every_preset_means_something_for_a_latent_pyramid():
    from mrnet_core.config import PRESETS, make_config
    from mrnet_core.encode import encode
    default = make_config("default", {}, model="g")
    assert all(make_config(name, {}, model="g").latent_hidden() == (16, 16) for name in PRESETS)  # every one mapped
    fast, compact = make_config("fast", {}, model="g"), make_config("compact", {}, model="g")
    # The MR-Net presets' widths, steps and learning rates are not a latent pyramid's: `fast` once fitted 50 steps at
    # a fifth of its learning rate, and `compact` was refused for its 8-bit weights.
    assert fast.latent_hidden() == default.latent_hidden() and fast.per_stage("lr") == default.per_stage("lr")
    assert fast.per_stage("max_epochs")[-1] == default.per_stage("max_epochs")[-1] // 10
    assert compact == default and make_config("texture", {}, model="g").periodic
    image = sample("astronaut.png", 64)[None]
    record = encode(image, make_config("fast", {"levels": 4}, model="g"), device="cpu")[0][0]
    was = make_config("default", {"levels": 4, "max_epochs": [50], "hidden": [48], "lr": [2e-3]}, model="g")
    assert record.stages[0].epochs == 300
    assert record.levels[-1].psnr > encode(image, was, device="cpu")[0][0].levels[-1].psnr + 5  # 18.6 against 10.2


def test_the_coarse_levels_weight_trades_them_for_the_finest():
    from mrnet_core.config import ConfigError, make_config
    from mrnet_core.encode import encode
    image = sample("astronaut.png", 64)[None]

    def fitted(weight):
        cfg = make_config("default", {"levels": 4, "max_epochs": [300], "coarse_weight": weight}, model="g")
        return [level.psnr for level in encode(image, cfg, device="cpu")[0][0].levels]

    usual, finest_only = fitted(0.1), fitted(0.0)
    assert sum(finest_only[:-1]) < sum(usual[:-1]) - 3  # weighed 0, the 3 coarser levels: 2.5 dB lower each here
    with pytest.raises(ConfigError, match="coarse_weight: must be a number from 0 to 1"):
        make_config("default", {"coarse_weight": 1.5}, model="g")
    assert "coarse_weight" not in make_config("default", {}, model="g").to_dict()  # earlier jobs' config ids stay
    assert make_config("default", {"coarse_weight": 0.03}, model="g").to_dict()["coarse_weight"] == 0.03
    assert "coarse_weight" not in make_config("default", {"coarse_weight": 0.03}).to_dict()  # an M-Net does not read it


def test_the_cheapest_symbols_a_coder_writes_are_read_back():
    # Every latent at the edge of its range, predicted there at the smallest scale: about 0.013 bits each, the least
    # a symbol can cost. The reader's bound on symbols per word must let the file through.
    model = latent.LatentNet(latent.LatentArchitecture(1, 128, 128, 1, (1,)))
    model.exponents = [4]
    with torch.no_grad():
        for t in [*model.weights, *model.biases]:
            t.copy_(torch.round(t * 16) / 16)
        model.grids[0].fill_(1.0)
        model.grid_scales.fill_(latent.MIN_LOG2_SCALE)
        for t in model.context_weights:
            t.zero_()
        model.context_biases[1][0, 0] = 1.0  # the mean of every latent: 1, the largest symbol
    latent.quantise_context(model)
    data = modelfile.to_bytes(model, modelfile.ImageMeta(128, 128, 1, 1))
    assert len(data) < 150  # 16,384 latents
    assert torch.equal(modelfile.from_bytes(data)[0].grids[0], model.grids[0])
