"""Collection priors: the .mrprior file, encoding from a prior, residual coding, rate control and decoding."""
import json
import struct
import zlib
from dataclasses import replace

import pytest
import torch

from mrnet_core import modelfile
from mrnet_core import prior as priors
from mrnet_core.config import make_config
from mrnet_core.encode import encode
from mrnet_core.network import MRNet
from mrnet_core.quantize import dequantise, quantise
from mrnet_core.rate import scaled
from mrnet_core.render import render
from test_pipeline import synthetic

FIT = {"epochs": 2, "lr": 3e-3, "batch_pixels": 256}
SCALES = (0.5, 0.59, 0.71, 0.84, 1.0)  # 2^(1/4) apart, as `mrnet prior train` makes them


def make_prior(seed=1, scales=SCALES):
    cfg = make_config("fast", {"prior": "none"})
    rungs = [priors.from_model(MRNet(scaled(cfg, s).architecture(3), seed=seed + k), FIT, bytes_per_param=[1.0])
             for k, s in enumerate(scales)]
    merged = priors.merge(rungs)
    merged.data = priors.to_bytes(merged)
    return merged


@pytest.fixture(scope="module")
def prior():
    return make_prior()


def test_a_prior_file_round_trips_and_is_named_by_its_content(prior, tmp_path):
    path = tmp_path / "p.mrprior"
    prior_id = priors.save(path, prior)
    loaded = priors.load(path)
    assert loaded.prior_id == prior_id == priors.prior_id(path.read_bytes())
    assert loaded.architectures == prior.architectures
    assert [a.params() for a in loaded.architectures] == sorted(a.params() for a in prior.architectures)
    for mine, theirs in zip(prior.weights, loaded.weights):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert loaded.fit == FIT
    assert make_prior(seed=2).prior_id != prior_id  # other weights, another id


def reseal(data):
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def with_header(prior, header):
    """The prior's file with its JSON header replaced (and the checksum made right again)."""
    data = priors.to_bytes(prior)
    start = len(priors.MAGIC) + 8
    (length,) = struct.unpack_from("<I", data, len(priors.MAGIC) + 4)
    text = json.dumps(header).encode()
    body = data[: len(priors.MAGIC) + 4] + struct.pack("<I", len(text)) + text + data[start + length : -4]
    return reseal(body + b"\0\0\0\0")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: d[:-10], "checksum"),
    (lambda d: d[:5], "magic"),
    (lambda d: b"\x89MRNET\r\n" + d[8:], "magic"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum"),
    (lambda d: reseal(d[:8] + struct.pack("<I", 9) + d[12:]), "version 9"),
    (lambda d: reseal(d[:12] + struct.pack("<I", 1 << 30) + d[16:]), "header length"),
    (lambda d: reseal(d[:-20] + struct.pack("<f", float("nan")) + d[-16:]), "NaN"),
])
def test_a_damaged_prior_is_refused_with_the_reason(prior, damage, reason):
    with pytest.raises(priors.PriorError, match=reason) as e:
        priors.from_bytes(damage(priors.to_bytes(prior)), "hostile.mrprior")
    assert "hostile.mrprior" in str(e.value)


def test_a_hostile_prior_header_is_refused_before_allocating(prior):
    arch = prior.architectures[0].to_dict()
    every = [a.to_dict() for a in prior.architectures]
    huge = dict(arch, stages=[dict(s, first=60000, hidden=[60000]) for s in arch["stages"]])
    for header, reason in [({"architectures": [huge], "fit": FIT}, "not 1 to|parameters|rung 0"),
                           ({"architectures": "x", "fit": FIT}, "no list of architectures"),
                           ({"architectures": [], "fit": FIT}, "0 rungs"),
                           ({"architectures": every, "fit": {"epochs": 10**9, "lr": 1, "batch_pixels": 64}},
                            "epochs"),
                           ({"architectures": every, "fit": FIT, "bytes_per_param": [1, 2]}, "one number"),
                           ({"architectures": [dict(arch, model="z")], "fit": FIT}, "rung 0")]:
        with pytest.raises(priors.PriorError, match=reason):
            priors.from_bytes(with_header(prior, header), "hostile.mrprior")
    with pytest.raises(priors.PriorError, match="payload"):  # the header is fine, the payload is not its size
        priors.from_bytes(with_header(prior, {"architectures": [arch] * 2, "fit": FIT}), "p")


def test_residuals_are_quantised_on_the_weights_own_steps():
    w = torch.randn(1, 40, 16) * 0.1
    base = w + torch.randn(1, 40, 16) * 0.005  # close to the weights, as a good prior is
    codes, symbols = quantise(w, 8, base=base)
    plain_codes, plain = quantise(w, 8)
    assert torch.equal(codes, plain_codes)  # the same precision...
    assert symbols.abs().float().mean() < plain.abs().float().mean() / 5  # ...in much smaller symbols
    assert (dequantise(codes, symbols, base) - w).abs().max() <= dequantise(codes, torch.ones_like(symbols)).max()


@pytest.fixture(scope="module")
def encoded(prior):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 0.2 + torch.linspace(0, 0.8, 32).view(1, 1, 1, 32)
    cfg = replace(make_config("fast", {"prior": "none"}), weight_bits=8)
    records, blobs = encode(images, scaled(cfg, 1.0), prior=prior)
    return images, records, blobs


def test_an_image_encoded_from_a_prior_decodes_only_with_that_prior(prior, encoded):
    _, records, blobs = encoded
    assert all(r.prior_id == prior.prior_id for r in records)
    assert modelfile.required_prior(blobs[0]) == prior.prior_id
    model, meta = modelfile.from_bytes(blobs[0], "a.mrnet", prior)
    assert render(model, 32, 32).isfinite().all()
    with pytest.raises(modelfile.ModelFileError, match=f"a.mrnet: .*prior {prior.prior_id}.*no prior was given"):
        modelfile.from_bytes(blobs[0], "a.mrnet")
    other = make_prior(seed=7)
    with pytest.raises(modelfile.ModelFileError, match=f"{prior.prior_id}, not the given prior {other.prior_id}"):
        modelfile.from_bytes(blobs[0], "a.mrnet", other)


def test_decoding_gives_the_weights_the_encoder_measured(prior, encoded):
    images, records, blobs = encoded
    from mrnet_core.metrics import psnr
    for i, (r, blob) in enumerate(zip(records, blobs)):
        model, _ = modelfile.from_bytes(blob, "a", prior)
        out = render(model, 32, 32).clamp(0, 1)
        assert psnr(out, images[i : i + 1]).item() == pytest.approx(r.levels[-1].psnr, abs=1e-3)


def test_a_grey_image_starts_from_the_luma_mix_of_the_rgb_rung(prior):
    arch = prior.architectures[1]
    grey = replace(arch, channels=1)
    rgb, mixed = prior.model(arch), prior.model(grey)
    x = torch.rand(1, 50, 2)
    luma = torch.tensor(priors.LUMA)
    assert torch.allclose(mixed(x)[0, :, 0], (rgb(x)[0] * luma).sum(-1), atol=1e-5)


@pytest.fixture(scope="module")
def measured_prior():
    """A prior whose bytes per parameter are measured, as `mrnet prior train` measures them, on these images."""
    images = torch.rand(2, 3, 64, 64) * 0.2 + torch.linspace(0, 0.8, 64).view(1, 1, 1, 64)
    measured = make_prior(seed=3)
    cfg = replace(make_config("fast", {"prior": "none"}), weight_bits=8)
    measured.bytes_per_param = []
    for arch, s in zip(measured.architectures, SCALES):
        blobs = encode(images, scaled(cfg, s), prior=measured)[1]
        measured.bytes_per_param.append(sum(map(len, blobs)) / len(blobs) / arch.params())
    measured.data = priors.to_bytes(measured)
    return images, measured


@pytest.mark.parametrize("bpp", [3.0, 4.5, 6.0, 9.0])
def test_rate_control_from_a_prior_fills_the_budget_and_never_exceeds_it(measured_prior, bpp):
    images, prior = measured_prior
    cfg = replace(make_config("fast", {"prior": "none"}), target_bpp=bpp)
    records, blobs = encode(images, cfg, prior=prior)
    budget = bpp * 64 * 64 / 8
    for r, blob in zip(records, blobs):
        assert len(blob) <= budget
        assert len(blob) >= 0.9 * budget, (len(blob), budget, r.rate, r.weight_bits)
        assert r.rate.met and r.prior_id == prior.prior_id
        modelfile.from_bytes(blob, "x", prior)


@pytest.mark.usefixtures("local_ray")
def test_rows_encoded_from_a_prior_render_from_parquet_with_the_copy_in_out(tmp_path, measured_prior):
    from pipeline import store
    from pipeline.cli import main
    from pipeline.collection import BadRow, load_row
    from pipeline.encode import run
    _, prior = measured_prior
    path = tmp_path / "p.mrprior"
    priors.save(path, prior)
    cfg = make_config("fast", {"target_bpp": 4.0, "prior": str(path)})
    out = tmp_path / "out"
    summary = run(str(synthetic(tmp_path / "in", 2, size=64)), str(out), cfg, size=64)
    assert summary["done"] == 2 and summary["prior_id"] == prior.prior_id
    assert (out / "priors" / f"{prior.prior_id}.mrprior").read_bytes() == path.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["priors"] == {prior.prior_id: f"priors/{prior.prior_id}.mrprior"}
    path.unlink()  # decoding needs OUT's copy alone
    for row in store.read_table(str(out), "encodings").to_pylist():
        assert row["prior_id"] == prior.prior_id and row["model_bytes"] <= 4.0 * 64 * 64 / 8
        model, meta = load_row(row, str(out))
        full = render(model, 64, 64, index=0).clamp(0, 1)
        from mrnet_core.images import read_image
        from mrnet_core.metrics import psnr
        original = read_image(row["uri"])[0][None]
        assert psnr(full, original).item() == pytest.approx(row["psnr"][-1], abs=1e-3)
        with pytest.raises(BadRow, match=f"against prior {prior.prior_id}; (no default prior|the default prior is)"):
            load_row(row)  # without OUT: neither given nor the default
    # The command line finds OUT's copy for a model file written there, and refuses another prior.
    row = store.read_table(str(out), "encodings").to_pylist()[0]
    (out / "one.mrnet").write_bytes(row["weights"])
    assert main(["render", str(out / "one.mrnet"), "--out", str(tmp_path / "one.png")]) == 0
    other = tmp_path / "other.mrprior"
    priors.save(other, make_prior(seed=9))
    assert main(["render", str(out / "one.mrnet"), "--out", str(tmp_path / "two.png"), "--prior", str(other)]) == 1
    # A huge file planted as OUT's copy is refused by its size, before a byte of it is read.
    from pipeline import priors as found
    found._from_out.cache_clear()
    with open(out / "priors" / f"{prior.prior_id}.mrprior", "r+b") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB that take no disk
    with pytest.raises(BadRow, match="more than any prior holds"):
        load_row(row, str(out))


def test_a_killed_prior_train_resumes_from_its_checkpoint(tmp_path):
    """Three rungs on a Ray of two CPUs: a rung waits for a finished one's actor to give its CPU back."""
    import os
    import signal
    import subprocess
    import sys
    import time
    images = synthetic(tmp_path / "in", 3, size=48)
    out = tmp_path / "prior"
    command = [sys.executable, "-m", "pipeline.cli", "prior", "train", str(images), "--out", str(out), "--size", "32",
               "--scales", "0.5,0.6,0.7", "--steps", "30", "--crops", "2", "--batch", "2", "--epochs", "1",
               "--inner-epochs", "1", "--batch-pixels", "256", "--holdout", "3", "--ray-address", "local"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoint = out / "rungs" / "0.mrprior"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and its Ray, mid-training
    first.wait()
    assert checkpoint.exists(), first.stderr.read()
    step = priors.load(checkpoint).training["step"]
    assert 0 < step < 30  # 30 steps, 6 checkpoints: a fast machine once finished 10 before the kill landed
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr
    assert f"rung 0 resumes at step {step}" in second.stderr
    trained = priors.load(out / "prior.mrprior")
    history = json.loads((out / "training.json").read_text())["history"]["0"]
    assert [s for s, _ in history] == list(range(30))  # every outer step once, across the kill
    assert len(trained.architectures) == 3 and len(trained.bytes_per_param) == 3
    assert all(s["crops"] > 0 for s in trained.training["scores"])
    assert json.loads(second.stdout)["prior_id"] == trained.prior_id
