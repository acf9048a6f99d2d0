"""The `mrnet` command: fit images to MR-Nets and render models."""
import argparse
import functools
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from mrnet_core import device as devices
from mrnet_core import modelfile
from mrnet_core import prior
from mrnet_core.config import ConfigError
from mrnet_core.encode import Failure, choose_prior, encode, encode_in_batches
from mrnet_core.export import export_mips
from mrnet_core.images import (DEFAULT_MAX_PIXELS, WRITE_FORMATS, ImageError, read_image, resize_long_side,
                                save_image, save_png)
from mrnet_core.config import MODELS
from mrnet_core.render import FULL_DOMAIN, antialiased_level, render
from pipeline.console import Progress, quiet_libraries
from pipeline.lease import LeaseHeld
from pipeline.prior_train import add_parser as add_prior_parser
from pipeline.settings import FIT_FLAGS, resolve
from pipeline.sources import has_scheme
from pipeline.thumbnails import render_levels


class FitProgress:
    """`mrnet fit`'s progress line: epochs of every stage against their most (a stage may stop sooner, so the ETA is
    an upper bound), and the last stage loss as a PSNR. A rate target fits several sizes: each starts the count
    again. A latent pyramid (model g) fits in one stage of the finest max_epochs steps; its refits (rate control)
    start the count again and end at a quarter of it."""

    def __init__(self, label, cfg):
        self.max_epochs = [int(e) for e in cfg.per_stage("max_epochs")]
        if cfg.model == "g":
            self.max_epochs = self.max_epochs[-1:]
        self.line = Progress(label, sum(self.max_epochs), unit="epochs")

    def __call__(self, stage, epoch, losses):
        mean_psnr = sum(-10 * math.log10(max(float(v), 1e-12)) for v in losses) / len(losses)
        self.line.update(sum(self.max_epochs[:stage]) + epoch + 1,
                         f"stage {stage + 1}/{len(self.max_epochs)}, stage-loss PSNR {mean_psnr:.2f} dB")

    def done(self):
        self.line.close()


def _unique_stems(paths):
    seen, stems = defaultdict(int), []
    for p in paths:
        stem = Path(p).stem
        seen[stem] += 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _write_json(path, obj):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def cmd_fit(args):
    cfg, job = resolve(args)  # the same config files, bounds and messages as `mrnet encode`
    encode_only = sorted(set(job) - {"preset", "size", "max_pixels"})
    if encode_only:
        print(f"note: {args.config}: [job] {', '.join(encode_only)}: for `mrnet encode` only", file=sys.stderr)
    devices.resolve(args.device)  # a device that cannot be used is one line before any work
    out = _out_folder(args.out)
    out.mkdir(parents=True, exist_ok=True)

    groups, failed = defaultdict(list), 0
    for path, stem in zip(args.images, _unique_stems(args.images)):
        try:
            image, notes = read_image(path, job.get("max_pixels", DEFAULT_MAX_PIXELS))
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if job.get("size"):
            image = resize_long_side(image, job["size"])
        for note in notes:
            print(f"note: {path}: {note}", file=sys.stderr)
        groups[tuple(image.shape)].append((path, stem, image, notes))

    results = []
    for (c, h, w), items in groups.items():
        batch = torch.stack([image for _, _, image, _ in items])
        progress = FitProgress(f"fit {len(items)} image(s) {w}x{h}x{c}", cfg)
        chosen = choose_prior(cfg, c)
        if chosen is not None:  # kept beside the models, where render and export look for it
            prior.save(out / "priors" / f"{chosen.prior_id}.mrprior", chosen)
        outcomes = encode_in_batches(batch, cfg, device=args.device, progress=progress,
                                     encode_fn=functools.partial(encode, prior=chosen))
        progress.done()
        for (path, stem, _, notes), outcome in zip(items, outcomes):
            if isinstance(outcome, Failure):  # e.g. too small for the requested levels, or out of memory alone
                print(f"error: {path}: {outcome.message}", file=sys.stderr)
                failed += 1
                continue
            record, blob = outcome
            model_path = out / f"{stem}.mrnet"
            tmp = model_path.with_name(f".{model_path.name}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, model_path)
            for k, level in enumerate(render_levels(*modelfile.from_bytes(blob, str(model_path), chosen))):
                save_png(level, out / stem / f"level_{k}.png")
            full = record.levels[-1]
            print(f"{path}: {record.params} params, {record.bpp:.2f} bpp, "
                  f"{full.psnr:.2f} dB at {full.width}x{full.height}, {record.fit_seconds:.1f} s")
            results.append({"name": stem, "path": str(path), "notes": notes, **record.to_dict()})
    _write_json(out / "metrics.json", results)
    print(f"wrote {len(results)} model(s) to {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


MODEL_HELP = "m: M-Net (default), l: L-Net, s: S-Net, f: Fourier-feature MLP, g: latent pyramid"

# Render windows may tile the domain many times over, but not so far out that float32 coordinates lose their pixels.
MAX_DOMAIN = 1000.0
MAX_VIEWER_IMAGES = 1000  # a page holds every model's weights


def _out_folder(text):
    """--out as a local folder that is there or can be made; ConfigError otherwise (nothing is made here)."""
    if has_scheme(text):
        raise ConfigError(f"--out: {text}: this command writes to a local folder (only `mrnet encode` and "
                          f"`render-collection` write to object stores)")
    out = Path(text)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ConfigError(f"--out: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out: {existing}: no permission to write there")
    return out


def _out_image(text):
    """--out as an image file to write, in a format its suffix names, in an existing folder; ConfigError otherwise."""
    out = Path(text)
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; name an image file")
    if out.suffix.lower() not in WRITE_FORMATS:
        raise ConfigError(f"--out: {out}: cannot write {out.suffix or 'a file without a suffix'}; name a "
                          f"{', '.join(WRITE_FORMATS)} file")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: {out.parent} is not an existing folder")
    if not os.access(out.parent, os.W_OK):
        raise ConfigError(f"--out: {out.parent}: no permission to write there")
    return out


def _pixel_size(text):
    """(width, height) from --size WxH: positive integers, within the pixel limit; ConfigError otherwise."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if min(width, height) < 1:
        raise ConfigError(f"--size: must be WxH with positive integers, not {text!r}")
    if width * height > DEFAULT_MAX_PIXELS:
        raise ConfigError(f"--size: {text} is {width * height:,} pixels, over the limit of {DEFAULT_MAX_PIXELS:,}")
    return width, height


def _window(text):
    """(x0, y0, x1, y1) from --domain: finite, x0 < x1 and y0 < y1, within MAX_DOMAIN; ConfigError otherwise."""
    try:
        window = tuple(float(v) for v in text.split(","))
    except ValueError:
        window = ()
    if not (len(window) == 4 and all(abs(v) <= MAX_DOMAIN for v in window)  # nan and inf fail
            and window[0] < window[2] and window[1] < window[3]):
        raise ConfigError(f"--domain: must be x0,y0,x1,y1 with x0 < x1 and y0 < y1, each within "
                          f"[-{MAX_DOMAIN:g}, {MAX_DOMAIN:g}], not {text!r}")
    return window


def _load_model(path, prior_path=None):
    """(model, meta) of a model file; a prior it needs comes from --prior, the folder beside it or the default."""
    from pipeline import priors

    given = prior.load(prior_path) if prior_path else None
    return priors.decode(modelfile.read_file(path), str(path), os.path.dirname(os.path.abspath(path)), given)


def cmd_render(args):
    window = _window(args.domain) if args.domain else FULL_DOMAIN
    size = _pixel_size(args.size) if args.size else None
    out = _out_image(args.out)
    model, meta = _load_model(args.model, args.prior)
    if size:
        width, height = size
    else:  # the model's native sampling density over the window
        width = max(1, round(meta.width * (window[2] - window[0]) / 2))
        height = max(1, round(meta.height * (window[3] - window[1]) / 2))
        if width * height > DEFAULT_MAX_PIXELS:
            raise ConfigError(f"--domain: this window at the model's own resolution is {width}x{height} pixels, over "
                              f"the limit of {DEFAULT_MAX_PIXELS:,}; give --size")
    n = meta.levels
    t = args.level if args.level is not None else antialiased_level(meta.sizes, width, height, window)
    if not 0 <= t <= n:
        raise ConfigError(f"--level: must lie in [0, {n}] for this {n}-stage model, not {t}")
    image = render(model, width, height, t=t, window=window, index=0).clamp(0, 1)
    save_image(image, out)
    print(f"wrote {out}: {width}x{height}, level of detail t={t:.2f}")
    return 0


def cmd_export(args):
    sizes = [_pixel_size(args.size)] if args.size else None
    out = _out_folder(args.out)
    model, meta = _load_model(args.model, args.prior)
    manifest = export_mips(model, meta, out, sizes)
    seconds = sum(e["seconds"] for e in manifest["images"])
    print(f"wrote {len(manifest['images'])} image(s) and manifest.json to {out} in {seconds:.2f} s")
    return 0


def cmd_export_collection(args):
    """Every periodic (texture) model of an encode job's output, as mip chains under DIR/<image_id>/.

    A row that cannot be used (image_id not 64 hex digits, bad weights or architecture) is reported and skipped;
    the others are still exported (exit status 1).
    """
    from pipeline import store
    from pipeline.collection import BadRow, load_row, row_architecture, row_label

    out = _out_folder(args.out)
    if "://" not in args.collection and not os.path.isdir(os.path.join(args.collection, "encodings")):
        raise FileNotFoundError(f"{args.collection}: no encodings there: not an `mrnet encode` output folder")
    table = store.read_table(args.collection, "encodings", ["image_id", "uri", "architecture", "weights"])
    given = prior.load(args.prior) if args.prior else None
    count = skipped = 0
    for batch in table.to_batches(max_chunksize=64):
        for row in batch.to_pylist():
            try:
                if not row_architecture(row).get("periodic"):
                    continue  # not a texture: its weights need not be decoded
                model, meta = load_row(row, args.collection, given)
            except BadRow as e:
                print(f"warning: export-collection: skipped the row of {row_label(row)}: {e}", file=sys.stderr)
                skipped += 1
                continue
            export_mips(model, meta, out / row["image_id"])
            count += 1
    print(f"exported {count} texture(s) of {table.num_rows} encoding(s) to {out}"
          + (f"; {skipped} row(s) skipped" if skipped else ""))
    return 1 if skipped else 0


def cmd_encode(args):
    if "://" not in args.out:  # an object store has no folders to check
        _out_folder(args.out)
    from pipeline.encode import cmd_encode  # here, so that the other commands never load Ray

    return cmd_encode(args)


def cmd_study(args):
    _out_folder(args.out)
    from pipeline.study import cmd_study  # here, so that the other commands never load Ray

    return cmd_study(args)


def cmd_view(args):
    from pipeline import viewer

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm") or out.is_dir():
        raise ConfigError(f"--out: {out}: name an .html file (not a folder)")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise ConfigError(f"--out: {out.parent} is not a folder this user can write to")
    if not 1 <= args.limit <= MAX_VIEWER_IMAGES:
        raise ConfigError(f"--limit: must be from 1 to {MAX_VIEWER_IMAGES}, not {args.limit}")
    source = args.source
    if has_scheme(source) or os.path.isdir(source):  # an encode job's OUT
        from pipeline.collection import pick_config  # loads Ray: only for a job's output
        source = source if has_scheme(source) else os.path.abspath(source)
        try:
            config_id, _ = pick_config(source, args.config_id)
        except (FileNotFoundError, KeyError, ValueError) as e:  # ValueError: store.CorruptFile, a bad manifest
            raise ConfigError(e.args[0] if e.args else str(e)) from None
        given = prior.load(args.prior) if args.prior else None
        entries, total = viewer.entries_from_out(source, config_id, limit=args.limit, given=given,
                                                 log=lambda line: print(line, file=sys.stderr))
        if not entries:
            print(f"error: {source}: no model under config {config_id} could be decoded", file=sys.stderr)
            return 1
    else:
        model, meta = _load_model(source, args.prior)
        try:
            entries, total = [viewer.model_entry(Path(source).stem, model, meta)], 1
        except viewer.NotDrawn as e:
            raise ConfigError(f"{source}: {e}") from None
    data = viewer.page(entries, title=f"MR-Net viewer: {Path(source).name}").encode()
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)  # a fresh name of its own (O_EXCL): never a file or link already there
        try:
            f.write(data)
        except BaseException:
            tmp.unlink()
            raise
    os.replace(tmp, out)
    print(f"wrote {out}: {len(entries)} of {total} model(s), {len(data):,} bytes; open it in a browser with WebGL 2")
    return 0


def cmd_render_collection(args):
    from pipeline import store
    from pipeline.collection import render_collection

    try:
        out = args.out if store.is_remote(args.out) else os.path.abspath(args.out)
        summary = render_collection(out, args.config_id,
                                    log=lambda line: print(line, file=sys.stderr, flush=True), workers=args.workers)
    except (FileNotFoundError, KeyError, ValueError) as e:  # no encodings there, unknown config, bad --workers
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 1 if summary["rejected"] else 0  # rows skipped (each warned about): the rest is done


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mrnet")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported on one line (exit status 2) like a bad config."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser():
    parser = _Parser(prog="mrnet", description="Encode images as multiresolution sinusoidal networks.")
    parser.add_argument("--version", action="version", version=f"mrnet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit one MR-Net per image; images of the same size are fitted together")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", choices=sorted(MODELS),
                   help=MODEL_HELP)
    p.add_argument("--preset", help="default, fast, texture or compact (default: the config's [job] preset, else "
                                    "default)")
    p.add_argument("--config", help="TOML or JSON file: fit keys, or [fit] and [job] tables as for encode (see "
                                    "README) (default: none)")
    p.add_argument("--size", type=int, help="resize so that the long side is S pixels (default: as read)")
    p.add_argument("--levels", type=int, help="number of levels (stages) (default 3; 7 for model g)")
    p.add_argument("--seed", type=int, help="seed of the random initialisation (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    for flag, kind, text in FIT_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.set_defaults(run=cmd_fit)

    p = sub.add_parser("render", help="render a model at any size, window and level of detail")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output image: .png, .jpg, .jpeg or .webp")
    p.add_argument("--size", help="WxH (default: the model's own resolution over the window)")
    p.add_argument("--level", type=float, help="level of detail t in [0, N] (default: anti-aliased, from the size)")
    p.add_argument("--domain", help="window x0,y0,x1,y1 of the domain (default -1,-1,1,1); may lie outside it")
    p.add_argument("--prior", help="the .mrprior file the weights were coded against (default: priors/ beside "
                                    "the model, or the shipped prior)")
    p.set_defaults(run=cmd_render)

    p = sub.add_parser("export", help="texture assets: the mip chain, or one render of any size")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--mips", action="store_true", help="every size halving down to 1 px, each anti-aliased")
    what.add_argument("--size", help="WxH: one render of this size instead")
    p.add_argument("--prior", help="the .mrprior file the weights were coded against (default: priors/ beside "
                                    "the model, or the shipped prior)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("export-collection", help="mip chains of every texture model in an encode job's output")
    p.add_argument("collection", metavar="OUT", help="the output folder of `mrnet encode`")
    p.add_argument("--prior", help="the .mrprior file the weights were coded against (default: OUT's copy, or the "
                                    "shipped prior)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=cmd_export_collection)

    p = sub.add_parser("encode", help="encode a folder, glob or URI list into Parquet on Ray (resumable)")
    p.add_argument("input", metavar="INPUT", help="folder, glob, or .txt file of URIs (local, s3://, gs://, file://)")
    p.add_argument("--out", required=True, help="output folder or URI")
    for flag, kind, text in [("--config", str, "TOML/JSON file: [fit] and [job] tables (see README) (default: none)"),
                             ("--preset", str, "default, fast, texture or compact (default: the config's [job] "
                                               "preset, else default)"),
                             ("--size", int, "resize the long side to S pixels (default: as read)"),
                             ("--levels", int, "levels (stages) (default 3; 7 for model g)"),
                             ("--ray-address", str, "join this Ray cluster (default: a local one)"),
                             ("--num-gpus", float, "GPUs per actor (default: 1 when the cluster has GPUs, else 0)"),
                             ("--actors", int, "most fitting actors (default: one per GPU, or every CPU but one)"),
                             ("--batch-size", int, "images per actor call (default 16)"),
                             ("--max-pixels", int, f"larger images fail (default {DEFAULT_MAX_PIXELS:,})"),
                             ("--tracking-deadline", float, "seconds for all MLflow calls (default 60)")]:
        p.add_argument(flag, type=kind, help=text)
    for flag, kind, text in FIT_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--model", choices=sorted(MODELS),
                   help=MODEL_HELP)
    p.add_argument("--experiment", help="MLflow experiment (default: mrnet-<OUT's folder name>)")
    p.add_argument("--no-render", action="store_true", help="skip the thumbnails, comparison and report")
    p.add_argument("--wait", action="store_true", default=None,
                   help="when another job holds OUT, wait for it (or for its lease to expire) rather than stop")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any input of this run failed (default: 0; failures are rows in OUT/failures)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's, Ray Data's and MLflow's own logs")
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser("study", help="rate-distortion sweep over a grid of configs, against JPEG, WebP and AVIF")
    p.add_argument("input", metavar="INPUT", help="folder, glob, or .txt file of URIs")
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--grid", required=True, help="TOML/JSON: [job], [fit], [grid] lists, [[config]] variants")
    p.add_argument("--size", type=int, help="resize the long side to S (default: the grid's job.size, else as read)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: a local one)")
    p.add_argument("--experiment", help="MLflow experiment (default: mrnet-study-<OUT's folder name>)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's, Ray Data's and MLflow's own logs")
    p.set_defaults(run=cmd_study)

    p = sub.add_parser("render-collection", help="thumbnails per level, comparison with codecs, and report.html")
    p.add_argument("out", metavar="OUT", help="an `mrnet encode` output folder (local)")
    p.add_argument("--config-id", help="which config's encodings (default: the last run's)")
    p.add_argument("--workers", type=int, help="Ray actors of one CPU each (default: every CPU of the cluster)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's, Ray Data's and MLflow's own logs")
    p.set_defaults(run=cmd_render_collection)

    p = sub.add_parser("view", help="a standalone page that draws models live in the browser (WebGL 2): pan, "
                                    "zoom and a level-of-detail slider")
    p.add_argument("source", metavar="MODEL|OUT", help="a .mrnet file, or an `mrnet encode` output folder")
    p.add_argument("--out", required=True, help="the page to write (.html)")
    p.add_argument("--prior", help="the .mrprior file the weights were coded against (default: beside the model or "
                                    "in OUT, or the shipped prior)")
    p.add_argument("--config-id", help="OUT only: which config's encodings (default: the last run's)")
    p.add_argument("--limit", type=int, default=24, help="OUT only: the first N images by URI (default 24)")
    p.set_defaults(run=cmd_view)

    add_prior_parser(sub)
    return parser


def _join_domain(argv):
    """Let `--domain -1,-1,3,3` through: argparse would take a value starting with '-' for an option."""
    out, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        out.append(f"--domain={argv.pop(0)}" if arg == "--domain" and argv else arg)
    return out


def main(argv=None):
    args = build_parser().parse_args(_join_domain(sys.argv[1:] if argv is None else argv))
    devices.use_full_precision()
    quiet_libraries(getattr(args, "verbose", False))
    try:
        return args.run(args)
    except (ConfigError, devices.DeviceError, LeaseHeld) as e:  # before any work: a bad flag or config, an unusable
        # device, or another job holding OUT
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ImageError, modelfile.ModelFileError, prior.PriorError, OSError) as e:  # unusable input, a failed write
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
