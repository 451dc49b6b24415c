"""Statistics of a comparison over seeds: mean ± std, and paired differences with a Student-t interval.

Runs of different rows that share a seed share their data order, augmentation draws and (where the
rows have the same stages) their first models, so rows are compared pairwise by seed: for rows ``A``
and ``B`` with final top-1 ``a_s`` and ``b_s`` on the seeds ``s`` both ran, the differences
``d_s = a_s - b_s`` give a mean ``d̄``, a sample std ``s_d`` and the two-sided 95% Student-t interval
``d̄ ± t(0.975, n - 1) · s_d / sqrt(n)`` (``n`` pairs; none for ``n < 2``).

The t quantile is computed here (SciPy is not a dependency): the t distribution's CDF through the
regularized incomplete beta function (its continued fraction, evaluated with the modified Lentz
method), inverted by bisection to double precision.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass

__all__ = ["Paired", "Summary", "paired", "summary", "t_cdf", "t_quantile"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (``df > 0``)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Final top-1 of one row over seeds.

    Attributes:
        per_seed: top-1 by seed.
        n: number of seeds.
        mean: their mean.
        std: their sample standard deviation (``None`` for one seed).
    """

    per_seed: dict[int, float]
    n: int
    mean: float
    std: float | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_seed"] = {str(k): v for k, v in self.per_seed.items()}
        return d


@dataclass(frozen=True)
class Paired:
    """A row minus a reference row, paired by seed.

    Attributes:
        seeds: the seeds both rows ran (the pairs).
        n: number of pairs.
        mean: mean difference (points of top-1).
        std: sample std of the differences (``None`` for fewer than 2 pairs).
        low: lower end of the two-sided 95% Student-t interval (``None`` for fewer than 2 pairs).
        high: upper end.
        t: the quantile used, ``t(0.975, n - 1)``.
    """

    seeds: list[int]
    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    t: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summary(per_seed: Mapping[int, float]) -> Summary:
    """Mean and sample std of ``per_seed`` (seed -> top-1); at least one value."""
    if not per_seed:
        raise ValueError("no value to summarize")
    values = [per_seed[s] for s in sorted(per_seed)]
    std = statistics.stdev(values) if len(values) > 1 else None
    return Summary(dict(sorted(per_seed.items())), len(values), statistics.fmean(values), std)


def paired(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Paired | None:
    """``a - b`` paired by seed, with its two-sided ``level`` Student-t interval; ``None`` when no
    seed is in both."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Paired(seeds, 1, mean, None, None, None, None)
    sd = statistics.stdev(d)
    t = t_quantile(0.5 + level / 2.0, len(d) - 1)
    half = t * sd / math.sqrt(len(d))
    return Paired(seeds, len(d), mean, sd, mean - half, mean + half, t)
