"""The hand-drawn SVG plots (pipeline/plots.py): round ticks, and a legend that stays out of the data's way."""
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
