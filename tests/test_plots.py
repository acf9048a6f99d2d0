"""The report's figures: hand-drawn SVG plots (pipeline/plots.py) on round ticks with a legend out of the data's
way, and exact codec matches shown as lossless rather than averaged in as 120 dB."""
import re

from pipeline.plots import H, linear_ticks, log_ticks, svg_plot


def test_ticks_are_round_numbers_that_enclose_the_data():
    assert linear_ticks(21.3, 55.9) == (20, 60, [20, 30, 40, 50, 60])
    assert linear_ticks(27.26, 34.48)[2] == [26, 28, 30, 32, 34, 36]
    assert linear_ticks(0, 3, integer=True)[2] == [0, 1, 2, 3]
    assert log_ticks(0.61, 19.6) == (0.5, 20, [0.5, 1, 2, 5, 10, 20])
    assert log_ticks(0.05, 3000)[2] == [0.01, 0.1, 1, 10, 100, 1000, 10000]  # 1-2-5 would crowd: decades


def test_extreme_or_single_values_give_a_few_ticks_and_never_raise():
    for lo, hi in [(1e17, 1e17), (5.0, 5.0), (-3.0, -3.0), (0.0, 0.0), (-1e11, 1e11)]:
        first, last, ticks = linear_ticks(lo, hi)
        assert first <= lo <= hi <= last and first < last and 2 <= len(ticks) <= 12
    for lo, hi in [(1e-12, 1e12), (2.0, 2.0), (1e-3, 1e-3)]:
        first, last, ticks = log_ticks(lo, hi)
        assert first <= lo and hi <= last and 2 <= len(ticks) <= 12 and all(t > 0 for t in ticks)
    svg = svg_plot([("a", "#000", [(1e-300, 1.0), (1e300, 2.0), (float("nan"), 3.0), (2.0, 5.0), (3.0, 6.0)],
                     "line")], "x", "y", logx=True)
    assert svg.count("<circle") == 2  # only the points an axis can show


def test_the_legend_lies_below_the_axes_and_every_point_within_them():
    series = [(f"a long series name number {i}", "#000", [(0.5 + i, 20 + i), (2 + i, 30 + i)], "line")
              for i in range(4)]
    svg = svg_plot(series, "bpp", "PSNR", logx=True)
    height = int(re.search(r'height="(\d+)"', svg).group(1))
    legend_y = [float(y) for y in re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="10"', svg)]
    points_y = [float(y) for y in re.findall(r'cy="([\d.]+)"', svg)]
    assert len(legend_y) == 4 and min(legend_y) > H - 12 and max(legend_y) + 10 <= height
    assert points_y and max(points_y) < H - 40


def test_exact_codec_matches_are_lossless_labels_not_120_db_in_means():
    import torch

    from mrnet_core.metrics import LOSSLESS_DB, is_lossless, lossy_mean, psnr
    from pipeline.compare import CODECS
    from pipeline.report import table_row
    x = torch.rand(1, 3, 8, 8)
    assert is_lossless(psnr(x, x).item()) and not is_lossless(psnr(x, x * 0.9).item())
    assert lossy_mean([30.0, LOSSLESS_DB, None, 32.0]) == (31.0, 1)
    assert lossy_mean([LOSSLESS_DB]) == (None, 1)
    row = {"uri": "a.png", "width": 8, "height": 8, "model_bytes": 10, "bpp": 1.25, "psnr": [30.0], "ssim": [0.9],
           "ratio_raw": 19.2, "ratio_file": 3.0, "note": None}
    for c in CODECS:
        row.update({f"{c}_quality": 100, f"{c}_bpp": 1.0, f"{c}_psnr": 28.0, f"{c}_note": None})
    row["avif_psnr"] = LOSSLESS_DB
    cells = table_row(row)
    assert cells.count(">lossless<") == 1 and "120.00" not in cells


def test_the_report_never_opens_a_planted_fifo_or_crops_a_one_pixel_image(tmp_path):
    import os

    import torch

    from pipeline.report import crops, most_detailed_window, strip_img
    image_id = "ab" * 32
    folder = tmp_path / "thumbnails" / image_id
    folder.mkdir(parents=True)
    os.mkfifo(folder / "strip.png")  # reading it would block for ever
    os.mkfifo(folder / "level_0.png")
    assert "no thumbnails" in strip_img(str(tmp_path), image_id)
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    row = {"image_id": image_id, "uri": str(tmp_path / "a.png"), "psnr": [30.0], "bpp": 2.0, "model_bytes": 16,
           "channels": 3, "width": 8, "height": 8}
    assert "changed since it was compared" in crops(str(tmp_path), row, None)
    assert most_detailed_window(torch.rand(3, 1, 40), 1) == (0, 0)
    assert most_detailed_window(torch.rand(3, 40, 1), 1) == (0, 0)


def test_comparison_rows_from_elsewhere_without_uri_bytes_or_figures_do_not_break_the_report(tmp_path):
    import json

    from pipeline import store
    from pipeline.compare import CODECS, IMAGES
    from pipeline.report import write_report
    config_id = "0123456789abcdef"
    (tmp_path / "manifest.json").write_text(json.dumps({"configs": {config_id: {"fit": {}, "size": 32}}}))
    base = {n: None for n in IMAGES.names}
    rows = [{**base, "image_id": "cd" * 32, "uri": "kept.png", "config_id": config_id, "model_bytes": 100,
             "bpp": 1.0, "psnr": [25.0, None], "ssim": [0.5, None]},  # a level without a figure: not compared
            {**base, "image_id": "ef" * 32, "uri": None, "config_id": config_id, "model_bytes": 100},
            {**base, "image_id": "ab" * 32, "uri": "nobytes.png", "config_id": config_id}]
    for c in CODECS:
        rows[0][f"{c}_psnr"] = 120.0
    store.write_part(str(tmp_path), "comparison/images", "part-0.parquet", rows, IMAGES)
    html = (tmp_path / "report.html").read_text() if write_report(str(tmp_path), config_id) else ""
    assert "Images (1)" in html and "kept.png" in html and "nobytes.png" not in html
    assert "viewer.html" not in html  # no encodings row to draw: no viewer page, and no link to one
