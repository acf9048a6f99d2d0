"""Two runs of bench/latent_rd.py against each other: BD-rate and BD-PSNR of the second against the first, per photo,
at every level of detail. Reads the runs' printed tables (one row per photo and rate). Prints a markdown table.

    python bench/latent_rd.py --photos ... --lams 0.01,0.003,0.001 > base.md
    python bench/latent_rd.py --photos ... --lams 0.01,0.003,0.001 --grid-channels 2 > two.md
    python bench/latent_bd.py base.md two.md

Each level's curve is its PSNR against the whole file's bpp (the file draws every level).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.bjontegaard import bd_psnr, bd_rate  # noqa: E402


def read_run(path):
    """{photo: [(bpp, [PSNR per level, coarse to fine])]} from latent_rd.py's first table."""
    runs = {}
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11:  # not a row of the first table: photo, rate, bpp, PSNR per level, ...
            continue
        try:
            row = (float(cells[2]), [float(v) for v in cells[3].split(" / ")])
        except ValueError:  # its header
            continue
        runs.setdefault(cells[0], []).append(row)
    return runs


def cell(value, unit):
    return "-" if value is None else f"{value:+.{1 if unit == '%' else 2}f}{unit}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="latent_rd.py's output: the anchor")
    parser.add_argument("test", help="latent_rd.py's output: the run compared with it")
    args = parser.parse_args()
    base, test = read_run(args.base), read_run(args.test)
    photos = [p for p in base if p in test]
    if not photos:
        sys.exit(f"no photo is in both {args.base} and {args.test}")
    counts = {len(psnrs) for run in (base, test) for p in photos for _, psnrs in run[p]}
    if len(counts) != 1:
        sys.exit(f"the runs have different level counts ({sorted(counts)}); compare runs of the same --levels")
    levels = counts.pop()
    print("| photo | " + " | ".join(f"level {k}" for k in range(levels)) + " |")
    print("|---|" + "---|" * levels)
    for photo in photos:
        cells = []
        for k in range(levels):
            anchor = [(bpp, psnrs[k]) for bpp, psnrs in base[photo]]
            other = [(bpp, psnrs[k]) for bpp, psnrs in test[photo]]
            cells.append(f"{cell(bd_rate(anchor, other), '%')} / {cell(bd_psnr(anchor, other), ' dB')}")
        print(f"| {photo} | " + " | ".join(cells) + " |")
    print("\nEach cell: BD-rate (negative: the second run needs fewer bytes) / BD-PSNR (positive: it is better); "
          f"levels coarse to fine, the last at full resolution. Second: {args.test}; first: {args.base}.")


if __name__ == "__main__":
    main()
