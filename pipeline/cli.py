"""The `mrnet` command: fit images to MR-Nets and render models."""
import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from mrnet_core import modelfile
from mrnet_core.config import ConfigError, load_file, make_config
from mrnet_core.encode import encode
from mrnet_core.export import export_mips
from mrnet_core.fit import max_batch
from mrnet_core.images import ImageError, read_image, resize_long_side, save_png
from mrnet_core.network import MODELS
from mrnet_core.render import FULL_DOMAIN, antialiased_level, render
from pipeline.settings import FIT_FLAGS, fit_overrides
from pipeline.thumbnails import render_levels


class Progress:
    """One status line per stage on stderr, redrawn in place on a terminal."""

    def __init__(self, label, levels):
        self.label, self.levels, self.start, self.tty = label, levels, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, stage, epoch, losses):
        mean_psnr = sum(-10 * math.log10(max(float(v), 1e-12)) for v in losses) / len(losses)
        line = (f"{self.label}: stage {stage + 1}/{self.levels} epoch {epoch + 1} "
                f"stage-loss PSNR {mean_psnr:.2f} dB, {time.perf_counter() - self.start:.1f} s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif epoch % 100 == 0:
            print(line, file=sys.stderr, flush=True)

    def done(self):
        if self.tty:
            print(file=sys.stderr)


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


def _free_memory(device):
    """Bytes a fit may use: most of the GPU's free memory, or half of the machine's available memory."""
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        return int(torch.cuda.mem_get_info(torch.device(device or "cuda"))[0] * 0.8)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def cmd_fit(args):
    overrides = fit_overrides(args, load_file(args.config)[0] if args.config else {})
    cfg = make_config(args.preset, overrides, model=args.model)
    if args.size is not None and args.size < 1:
        raise ConfigError(f"--size must be a positive number of pixels, not {args.size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    groups, failed = defaultdict(list), 0
    for path, stem in zip(args.images, _unique_stems(args.images)):
        try:
            image, notes = read_image(path)
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if args.size:
            image = resize_long_side(image, args.size)
        for note in notes:
            print(f"note: {path}: {note}", file=sys.stderr)
        groups[tuple(image.shape)].append((path, stem, image, notes))

    results, batches = [], []
    for (c, h, w), items in groups.items():
        limit = max_batch(cfg, c, h, w, _free_memory(args.device))
        batches += [items[i : i + limit] for i in range(0, len(items), limit)]
    for items in batches:
        c, h, w = items[0][2].shape
        batch = torch.stack([image for _, _, image, _ in items])
        progress = Progress(f"{len(items)} image(s) {w}x{h}x{c}", cfg.levels)
        try:
            records, blobs = encode(batch, cfg, device=args.device, progress=progress)
        except ValueError as e:  # e.g. too small for the requested levels
            progress.done()
            print(f"error: {', '.join(p for p, *_ in items)}: {e}", file=sys.stderr)
            failed += len(items)
            continue
        progress.done()
        for (path, stem, _, notes), record, blob in zip(items, records, blobs):
            model_path = out / f"{stem}.mrnet"
            tmp = model_path.with_name(f".{model_path.name}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, model_path)
            for k, level in enumerate(render_levels(*modelfile.from_bytes(blob, str(model_path)))):
                save_png(level, out / stem / f"level_{k}.png")
            full = record["levels"][-1]
            print(f"{path}: {record['params']} params, {record['bpp']:.2f} bpp, "
                  f"{full['psnr']:.2f} dB at {full['width']}x{full['height']}, {record['fit_seconds']:.1f} s")
            results.append({"name": stem, "path": str(path), "notes": notes, **record})
    _write_json(out / "metrics.json", results)
    print(f"wrote {len(results)} model(s) to {out}" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


def _numbers(text, sep, kind):
    """`text` split on `sep` as numbers of `kind`, or [] when any part is not one."""
    try:
        return [kind(v) for v in text.split(sep)]
    except ValueError:
        return []


def cmd_render(args):
    model, meta = modelfile.load(args.model)
    window = FULL_DOMAIN
    if args.domain:
        window = tuple(_numbers(args.domain, ",", float))
        if len(window) != 4 or window[0] == window[2] or window[1] == window[3]:
            raise SystemExit(f"error: --domain must be x0,y0,x1,y1 with x0 != x1 and y0 != y1, not {args.domain!r}")
    if args.size:
        size = _numbers(args.size.lower(), "x", int)
        if len(size) != 2 or min(size) < 1:
            raise SystemExit(f"error: --size must be WxH with positive integers, not {args.size!r}")
        width, height = size
    else:  # the model's native sampling density over the window
        width = max(1, round(meta["width"] * abs(window[2] - window[0]) / 2))
        height = max(1, round(meta["height"] * abs(window[3] - window[1]) / 2))
    n = len(model.stages)
    t = args.level if args.level is not None else antialiased_level(meta["levels"], width, height, window)
    if not 0 <= t <= n:
        raise SystemExit(f"error: --level must lie in [0, {n}] for this {n}-stage model, not {t}")
    image = render(model, width, height, t=t, window=window, index=0).clamp(0, 1)
    save_png(image, args.out)
    print(f"wrote {args.out}: {width}x{height}, level of detail t={t:.2f}")
    return 0


def cmd_export(args):
    model, meta = modelfile.load(args.model)
    sizes = None
    if args.size:
        size = _numbers(args.size.lower(), "x", int)
        if len(size) != 2 or min(size) < 1:
            raise SystemExit(f"error: --size must be WxH with positive integers, not {args.size!r}")
        sizes = [tuple(size)]
    elif not args.mips:
        raise SystemExit("error: give --mips for the mip chain, or --size WxH")
    manifest = export_mips(model, meta, args.out, sizes)
    seconds = sum(e["seconds"] for e in manifest["images"])
    print(f"wrote {len(manifest['images'])} image(s) and manifest.json to {args.out} in {seconds:.2f} s")
    return 0


def cmd_export_collection(args):
    """Every periodic (texture) model of an encode job's output, as mip chains under DIR/<image_id>/.

    A row that cannot be used (image_id not 64 hex digits, bad weights or architecture) is reported and skipped;
    the others are still exported (exit status 1).
    """
    from pipeline import store
    from pipeline.collection import BadRow, load_row, row_architecture, row_label

    table = store.read_table(args.collection, "encodings", ["image_id", "uri", "architecture", "weights"])
    count = skipped = 0
    for batch in table.to_batches(max_chunksize=64):
        for row in batch.to_pylist():
            try:
                if not row_architecture(row).get("periodic"):
                    continue  # not a texture: its weights need not be decoded
                model, meta = load_row(row)
            except BadRow as e:
                print(f"warning: export-collection: skipped the row of {row_label(row)}: {e}", file=sys.stderr)
                skipped += 1
                continue
            export_mips(model, meta, Path(args.out) / row["image_id"])
            count += 1
    print(f"exported {count} texture(s) of {table.num_rows} encoding(s) to {args.out}"
          + (f"; {skipped} row(s) skipped" if skipped else ""))
    return 1 if skipped else 0


def cmd_encode(args):
    from pipeline.encode import cmd_encode  # here, so that the other commands never load Ray

    return cmd_encode(args)


def cmd_study(args):
    from pipeline.study import cmd_study  # here, so that the other commands never load Ray

    return cmd_study(args)


def cmd_render_collection(args):
    from pipeline.collection import render_collection

    try:
        summary = render_collection(os.path.abspath(args.out), args.config_id,
                                    log=lambda line: print(line, file=sys.stderr, flush=True))
    except (FileNotFoundError, KeyError, ValueError) as e:  # no encodings there, unknown config, remote OUT
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 1 if summary["rejected"] else 0  # rows skipped (each warned about): the rest is done


def build_parser():
    parser = argparse.ArgumentParser(prog="mrnet", description="Encode images as multiresolution sinusoidal networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit one MR-Net per image; images of the same size are fitted together")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", choices=sorted(MODELS), help="m: M-Net (default), l: L-Net, s: S-Net, f: Fourier-feature MLP")
    p.add_argument("--preset", default="default", help="default, fast or texture")
    p.add_argument("--config", help="TOML or JSON file of config keys (see README)")
    p.add_argument("--size", type=int, help="resize so that the long side is S pixels")
    p.add_argument("--levels", type=int, help="number of levels (stages)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    for flag, kind, text in FIT_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.set_defaults(run=cmd_fit)

    p = sub.add_parser("render", help="render a model at any size, window and level of detail")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output image (PNG)")
    p.add_argument("--size", help="WxH (default: the model's own resolution over the window)")
    p.add_argument("--level", type=float, help="level of detail t in [0, N] (default: anti-aliased, from the size)")
    p.add_argument("--domain", help="window x0,y0,x1,y1 of the domain (default -1,-1,1,1); may lie outside it")
    p.set_defaults(run=cmd_render)

    p = sub.add_parser("export", help="texture assets: the mip chain, or one render of any size")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mips", action="store_true", help="every size halving down to 1 px, each anti-aliased")
    p.add_argument("--size", help="WxH: one render of this size instead")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("export-collection", help="mip chains of every texture model in an encode job's output")
    p.add_argument("collection", metavar="OUT", help="the output folder of `mrnet encode`")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=cmd_export_collection)

    p = sub.add_parser("encode", help="encode a folder, glob or URI list into Parquet on Ray (resumable)")
    p.add_argument("input", metavar="INPUT", help="folder, glob, or .txt file of URIs (local, s3://, gs://, file://)")
    p.add_argument("--out", required=True, help="output folder or URI")
    for flag, kind, text in [("--config", str, "TOML/JSON, [fit] and [job] tables"), ("--preset", str, "default, fast or texture"),
                             ("--size", int, "resize the long side to S"), ("--levels", int, "levels (stages)"),
                             ("--ray-address", str, "join this Ray cluster (default: a local one)"),
                             ("--num-gpus", float, "GPUs per actor"), ("--actors", int, "most fitting actors"),
                             ("--batch-size", int, "images per actor call"), ("--max-pixels", int, "over it: fail")]:
        p.add_argument(flag, type=kind, help=text)
    for flag, kind, text in FIT_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--model", choices=sorted(MODELS))
    p.add_argument("--experiment", help="MLflow experiment (default: mrnet-<OUT's folder name>)")
    p.add_argument("--no-render", action="store_true", help="skip the thumbnails, comparison and report")
    p.set_defaults(run=cmd_encode)

    p = sub.add_parser("study", help="rate-distortion sweep over a grid of configs, against JPEG, WebP and AVIF")
    p.add_argument("input", metavar="INPUT", help="folder, glob, or .txt file of URIs")
    p.add_argument("--out", required=True, help="output folder (local)")
    p.add_argument("--grid", required=True, help="TOML/JSON: [job], [fit], [grid] lists, [[config]] variants")
    p.add_argument("--size", type=int, help="resize the long side to S (overrides the grid's job.size)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: a local one)")
    p.add_argument("--experiment", help="MLflow experiment (default: mrnet-study-<OUT's folder name>)")
    p.set_defaults(run=cmd_study)

    p = sub.add_parser("render-collection", help="thumbnails per level, comparison with codecs, and report.html")
    p.add_argument("out", metavar="OUT", help="an `mrnet encode` output folder (local)")
    p.add_argument("--config-id", help="which config's encodings (default: the last run's)")
    p.set_defaults(run=cmd_render_collection)
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
    try:
        return args.run(args)
    except (ConfigError, modelfile.ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
