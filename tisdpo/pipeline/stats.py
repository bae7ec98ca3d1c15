"""Standard errors and Student-t bounds for the demo's report, without scipy.

:func:`t_quantile` inverts the Student-t distribution function by bisection; the distribution
function comes from the regularized incomplete beta function (continued fraction, modified
Lentz), P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2). :func:`combined_se` is the standard error
the demo's verdict and its table use when policies were trained with several seeds and each
was scored on the same held-out items (pairs, or prompts).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["standard_error", "betainc", "t_two_sided_p", "t_cdf", "t_quantile",
           "satterthwaite_df", "combined_se"]

#: an SE below this is 0: equal differences up to float rounding, not a measured spread
ZERO_SE = 1e-9


def standard_error(values) -> float:
    """Standard error of the mean (sample standard deviation / √n); nan for fewer than 2."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf, modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (tiny if abs(d) < tiny else d)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (tiny if abs(d) < tiny else d)
            c = 1.0 + aa / c
            c = tiny if abs(c) < tiny else c
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b); ``y`` = 1 − x when the caller
    knows it more precisely than ``1 - x``."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's t with ``df`` degrees of freedom."""
    t2 = float(t) * float(t)
    return betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    half = 0.5 * t_two_sided_p(t, df)
    return 1.0 - half if t >= 0 else half


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` > 0 degrees of freedom (bisection on
    :func:`t_cdf` to float precision); t_quantile(0.975, df) is the two-sided 95% bound."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    tail = 2.0 * (1.0 - p)                       # P(|T| > q) at the quantile q
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def satterthwaite_df(parts) -> float:
    """Welch–Satterthwaite degrees of freedom of a sum of independent variance estimates,
    ``parts`` = [(variance, its degrees of freedom), ...]: (Σ v)² / Σ (v² / df), rounded
    down (at least 1); nan when every variance is 0."""
    total = sum(v for v, _ in parts)
    denom = sum(v * v / d for v, d in parts if v > 0)
    if not denom > 0:
        return float("nan")
    return float(max(1, math.floor(total * total / denom + 1e-9)))


def combined_se(per_seed, items=None) -> dict:
    """The standard error of a mean over seeds and over held-out items.

    ``per_seed``: one value per policy seed (a method's metric, or a paired difference);
    ``items``: None, or the per-item values behind them, one row per seed ([seeds, items]:
    every seed scored on the same items; a 1-d list is one seed). Returns ``se``,
    ``se_seeds`` (SE of ``per_seed``: nan for one seed), ``se_items`` (SE over the items of
    their seed-averaged values: nan without items or with one item), ``df`` and ``bound``
    (the two-sided 95% Student-t quantile at ``df``).

    se = √(se_seeds² + se_items²), df by Welch–Satterthwaite from S − 1 and I − 1 (the one
    available component alone when the other is nan; nan with neither). Under a two-way
    model (value = item + seed + seed×item) se_seeds² and se_items² both contain the
    seed×item interaction's variance / (S·I), so the sum counts it twice: conservative.
    A component below :data:`ZERO_SE` is 0 (rounding), and an se that is 0 has no df. A
    value that is not finite makes everything nan (no SE from the other part alone)."""
    per_seed = np.asarray(per_seed, dtype=np.float64).reshape(-1)
    nan = float("nan")
    if not np.isfinite(per_seed).all() or (
            items is not None and not np.isfinite(np.asarray(items, dtype=np.float64)).all()):
        return {"se_seeds": nan, "se_items": nan, "se": nan, "df": nan, "bound": nan}
    parts, out = [], {"se_seeds": standard_error(per_seed), "se_items": float("nan")}
    if items is not None:
        m = np.atleast_2d(np.asarray(items, dtype=np.float64))
        out["se_items"] = standard_error(m.mean(0))
        if math.isfinite(out["se_items"]):
            parts.append((out["se_items"], m.shape[1] - 1))
    if math.isfinite(out["se_seeds"]):
        parts.append((out["se_seeds"], per_seed.size - 1))
    parts = [(0.0 if s < ZERO_SE else s * s, d) for s, d in parts]
    se = math.sqrt(sum(v for v, _ in parts)) if parts else float("nan")
    se = 0.0 if se < ZERO_SE else se
    df = satterthwaite_df(parts) if se > 0 else float("nan")
    out.update(se=se, df=df, bound=t_quantile(0.975, df) if df == df else float("nan"))
    return out
