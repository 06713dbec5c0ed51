"""The Beta distribution's CDF and quantile, for credible intervals of error rates (no SciPy needed).

The CDF is the regularized incomplete beta function, evaluated by its continued fraction (modified
Lentz) on the side where that converges fast; the quantile is a Newton iteration kept inside a
shrinking bisection bracket, so it always converges.

Example:
    >>> round(beta_cdf(0.5, 2.0, 2.0), 12)
    0.5
    >>> round(beta_ppf(0.05, 4.0, 1.0), 6) == round(0.05 ** (1 / 4), 6)
    True
    >>> [round(x, 4) for x in credible_interval(9.0, 3.0, 0.9)]
    [0.5299, 0.9212]
"""

from __future__ import annotations

import math

_TINY = 1e-300
_EPS = 1e-15


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _continued_fraction(x: float, a: float, b: float) -> float:
    """1 + d1/(1 + d2/(1 + ...)) of the incomplete beta expansion, by the modified Lentz method."""
    value, c, d = 1.0, 1.0, 0.0
    for j in range(1, 10_000):
        m = j // 2
        if j % 2:
            coefficient = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coefficient = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coefficient * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + coefficient / c
        c = c if abs(c) > _TINY else _TINY
        delta = c * d
        value *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return value


def beta_cdf(x: float, a: float, b: float) -> float:
    """P(X <= x) for X ~ Beta(a, b), a, b > 0.

    >>> beta_cdf(0.3, 1.0, 1.0)
    0.3
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - beta_cdf(1.0 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)) / a
    return front / _continued_fraction(x, a, b)


def _beta_pdf(x: float, a: float, b: float) -> float:
    return math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - _log_beta(a, b))


def beta_ppf(p: float, a: float, b: float) -> float:
    """The p-quantile of Beta(a, b): the x with P(X <= x) = p.

    >>> round(beta_ppf(0.5, 3.0, 3.0), 12)
    0.5
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return p
    low, high = 0.0, 1.0
    x = a / (a + b)
    for _ in range(200):
        error = beta_cdf(x, a, b) - p
        if error == 0.0:
            return x
        if error < 0.0:
            low = x
        else:
            high = x
        density = _beta_pdf(x, a, b)
        candidate = x - error / density if density > 0.0 else -1.0
        if not low < candidate < high:
            candidate = 0.5 * (low + high)
        if abs(candidate - x) <= 1e-14 * x or high - low <= 1e-15 * high:
            return candidate
        x = candidate
    return x


def credible_interval(a: float, b: float, level: float) -> tuple[float, float]:
    """Equal-tailed `level` credible interval of Beta(a, b)."""
    tail = (1.0 - level) / 2.0
    return beta_ppf(tail, a, b), beta_ppf(1.0 - tail, a, b)
