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
