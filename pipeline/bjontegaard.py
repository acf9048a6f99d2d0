"""Bjøntegaard deltas: how far apart two rate-distortion curves are, on average, over the range both cover.

Each curve is a list of (bpp, PSNR) points. Rate is taken on a log scale. Following current common-test-conditions
practice (not Bjøntegaard's original cubic polynomial fit), each curve is interpolated by a monotone piecewise
cubic (PCHIP, Fritsch-Carlson) through its points, and the two interpolants are integrated exactly over the
interval both curves cover:

- BD-rate: log rate as a function of PSNR, averaged over the shared PSNR range; the mean difference d (natural
  log) is reported as 100 (e^d - 1): the average percentage rate change of `test` against `anchor` at equal
  PSNR. Negative: `test` needs fewer bytes.
- BD-PSNR: PSNR as a function of log rate, averaged over the shared log-rate range: the average dB by which
  `test` is above `anchor` at equal rate. Positive: `test` is better.

Points that are not finite, have no positive rate, or score the exact-match PSNR (`EXACT_PSNR`) are dropped
first: an exact match has no finite PSNR, and the metric's cap would pull the integral anywhere. Points with the
same abscissa are merged into their mean. Both functions return None when a curve has fewer than 2 distinct
points left, or when the curves' ranges do not overlap.
"""
import math

import numpy as np

from mrnet_core.metrics import LOSSLESS_DB, is_lossless

EXACT_PSNR = LOSSLESS_DB  # what identical images score: "exact", not a measured quality (metrics.is_lossless)

Curve = list[tuple[float, float]]


def clean(curve: Curve) -> list[tuple[float, float]]:
    """(log rate, PSNR) of the points that can enter an integral."""
    return [(math.log(r), p) for r, p in curve
            if r is not None and p is not None and math.isfinite(r) and math.isfinite(p) and r > 0
            and not is_lossless(p)]


def as_function(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) sorted by x, points with the same x merged into their mean y."""
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(x, []).append(y)
    xs = sorted(merged)
    return np.array(xs), np.array([sum(merged[x]) / len(merged[x]) for x in xs])


def pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Derivatives at the knots of the monotone cubic through (x, y) (Fritsch-Carlson, with the usual
    non-centred three-point ends): no overshoot where the data are monotone, a flat knot at each extremum."""
    h, delta = np.diff(x), np.diff(y) / np.diff(x)
    if len(x) == 2:
        return np.array([delta[0], delta[0]])
    d = np.zeros_like(y)
    for k in range(1, len(x) - 1):
        if delta[k - 1] * delta[k] > 0:  # same sign: weighted harmonic mean of the two secants
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])

    def end(h0, h1, d0, d1):
        s = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(s) != np.sign(d0):
            return 0.0
        if np.sign(d0) != np.sign(d1) and abs(s) > 3 * abs(d0):
            return 3 * d0
        return s

    d[0] = end(h[0], h[1], delta[0], delta[1])
    d[-1] = end(h[-1], h[-2], delta[-1], delta[-2])
    return d


def integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Exact integral over [lo, hi] (inside [x[0], x[-1]]) of the PCHIP interpolant of (x, y)."""
    d, total = pchip_slopes(x, y), 0.0
    for k in range(len(x) - 1):
        a, b = max(lo, x[k]), min(hi, x[k + 1])
        if a >= b:
            continue
        # On [x_k, x_k+1], with t = x - x_k: y_k + d_k t + c2 t^2 + c3 t^3 (the Hermite cubic in power form).
        h = x[k + 1] - x[k]
        s = (y[k + 1] - y[k]) / h
        c2, c3 = (3 * s - 2 * d[k] - d[k + 1]) / h, (d[k] + d[k + 1] - 2 * s) / h**2

        def antiderivative(t):
            return y[k] * t + d[k] * t**2 / 2 + c2 * t**3 / 3 + c3 * t**4 / 4

        total += antiderivative(b - x[k]) - antiderivative(a - x[k])
    return float(total)


def mean_gap(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float | None:
    """Mean of test(x) - anchor(x) over the x both cover; None for fewer than 2 distinct x or no overlap."""
    (xa, ya), (xt, yt) = as_function(anchor), as_function(test)
    if len(xa) < 2 or len(xt) < 2:
        return None
    lo, hi = max(xa[0], xt[0]), min(xa[-1], xt[-1])
    if hi <= lo:
        return None
    return (integral(xt, yt, lo, hi) - integral(xa, ya, lo, hi)) / (hi - lo)


def bd_rate(anchor: Curve, test: Curve) -> float | None:
    """Average rate change of `test` against `anchor` at equal PSNR, in percent (negative: `test` saves bytes)."""
    gap = mean_gap([(p, r) for r, p in clean(anchor)], [(p, r) for r, p in clean(test)])
    return None if gap is None else 100 * math.expm1(gap)


def bd_psnr(anchor: Curve, test: Curve) -> float | None:
    """Average PSNR difference of `test` over `anchor` at equal rate, in dB (positive: `test` is better)."""
    return mean_gap(clean(anchor), clean(test))
