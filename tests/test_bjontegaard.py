"""Bjøntegaard deltas: known shifts, exact values on straight lines, and the cases with no answer."""
import math

import numpy as np
import pytest

from pipeline.bjontegaard import EXACT_PSNR, bd_psnr, bd_rate, integral

# A concave, codec-like curve: PSNR grows ever more slowly with rate.
ANCHOR = [(0.1, 26.0), (0.25, 29.5), (0.5, 32.0), (1.0, 34.6), (2.0, 37.0), (4.0, 39.1)]


def test_identical_curves_are_zero_apart():
    assert bd_rate(ANCHOR, ANCHOR) == pytest.approx(0, abs=1e-12)
    assert bd_psnr(ANCHOR, ANCHOR) == pytest.approx(0, abs=1e-12)


def test_half_the_rate_is_minus_fifty_percent_and_a_higher_psnr():
    halved = [(r / 2, p) for r, p in ANCHOR]
    assert bd_rate(ANCHOR, halved) == pytest.approx(-50, abs=0.1)
    assert bd_psnr(ANCHOR, halved) > 0


def test_one_db_up_everywhere_is_one_db():
    assert bd_psnr(ANCHOR, [(r, p + 1) for r, p in ANCHOR]) == pytest.approx(1.0, abs=1e-6)
    assert bd_rate(ANCHOR, [(r, p + 1) for r, p in ANCHOR]) < 0


def test_straight_lines_in_log_rate_give_the_hand_computed_values():
    # Anchor: PSNR = 30 + 5 u over u = log10(bpp) in [-1, 1]; test: PSNR = 30 + 10 u over u in [0, 1].
    anchor = [(10**u, 30 + 5 * u) for u in (-1, -0.5, 0, 0.5, 1)]
    test = [(10**u, 30 + 10 * u) for u in (0, 0.25, 0.5, 1)]
    # Equal rate, u in [0, 1]: the gap is 5 u, on average 2.5 dB.
    assert bd_psnr(anchor, test) == pytest.approx(2.5, abs=1e-9)
    # Equal PSNR, P in [30, 35]: u_test - u_anchor = (P - 30) (1/10 - 1/5), on average -0.25 (log10), so the
    # test needs 10^-0.25 of the anchor's rate.
    assert bd_rate(anchor, test) == pytest.approx(100 * (10**-0.25 - 1), abs=1e-9)


def test_swapping_the_curves_flips_the_sign():
    test = [(r * 0.8, p + 0.3 * math.sin(i)) for i, (r, p) in enumerate(ANCHOR)]
    assert bd_psnr(test, ANCHOR) == pytest.approx(-bd_psnr(ANCHOR, test), abs=1e-12)
    # Rates are ratios: a saving of s one way is a cost of 1 / (1 + s) - 1 the other.
    forward, backward = bd_rate(ANCHOR, test) / 100, bd_rate(test, ANCHOR) / 100
    assert forward < 0 < backward and (1 + forward) * (1 + backward) == pytest.approx(1, abs=1e-12)


def test_no_answer_without_a_curve_or_an_overlap():
    assert bd_rate(ANCHOR, [(0.5, 32.0)]) is None and bd_psnr(ANCHOR, [(0.5, 32.0)]) is None
    assert bd_psnr(ANCHOR, [(0.5, 30.0), (0.5, 31.0)]) is None  # two points, one rate: no curve over rate
    assert bd_rate([], ANCHOR) is None
    far = [(r * 1000, p + 50) for r, p in ANCHOR]  # neither the rates nor the PSNRs overlap
    assert bd_rate(ANCHOR, far) is None and bd_psnr(ANCHOR, far) is None


def test_unusable_points_are_dropped():
    noisy = ANCHOR + [(0.7, math.nan), (math.nan, 30.0), (math.inf, 40.0), (0.0, 20.0), (8.0, None),
                      (8.0, EXACT_PSNR)]
    assert bd_rate(ANCHOR, noisy) == pytest.approx(0, abs=1e-12)
    assert bd_psnr(ANCHOR, noisy) == pytest.approx(0, abs=1e-12)
    assert bd_psnr(ANCHOR, [(1.0, math.nan), (2.0, 37.0)]) is None  # one point left


def test_the_integral_matches_scipys_pchip():
    PchipInterpolator = pytest.importorskip("scipy.interpolate").PchipInterpolator
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 7):
        for _ in range(50):
            x = np.sort(rng.choice(np.linspace(-3, 3, 601), n, replace=False))
            y = rng.normal(size=n) * 10
            lo, hi = np.sort(rng.uniform(x[0], x[-1], 2))
            assert integral(x, y, lo, hi) == pytest.approx(PchipInterpolator(x, y).integrate(lo, hi), abs=1e-9)
