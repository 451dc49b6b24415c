"""recipes.stats: the Student-t quantile against closed forms, tables and a numerical integral; paired intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from morph.recipes.stats import paired, summary, t_cdf, t_quantile

# two-sided 95% critical values t(0.975, df) from standard tables (3 decimals)
TABLE = {3: 3.182, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.3])
def test_quantile_closed_forms(p):
    # df = 1 is the Cauchy distribution; df = 2 has F^-1(p) = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)


@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 11.0])
def test_cdf_closed_forms(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    # df = 4: F(t) = 1/2 + 3/4 x - 1/4 x^3 with x = t / sqrt(4 + t^2)
    x = t / math.sqrt(4 + t * t)
    assert t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * x - 0.25 * x**3, abs=1e-14)


def test_quantile_table_and_normal_limit():
    for df, v in TABLE.items():
        assert round(t_quantile(0.975, df), 3) == v, df
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, abs=1e-6)  # the normal's 97.5% point
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)


@pytest.mark.parametrize("df", [3, 4, 9, 29])
def test_quantile_against_integrated_density(df):
    """The density integrated from 0 to t(0.975) in float64 (composite Simpson) is 0.475."""
    q = t_quantile(0.975, df)
    x = np.linspace(0.0, q, 20001)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = c * (1 + x * x / df) ** (-(df + 1) / 2)
    h = x[1] - x[0]
    integral = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    assert integral == pytest.approx(0.475, abs=1e-12)


def test_paired_interval_by_hand():
    a = {0: 50.1, 1: 51.3, 2: 49.8, 3: 52.0, 4: 50.6, 7: 10.0}  # seed 7 has no partner
    b = {0: 49.0, 1: 50.0, 2: 50.2, 3: 50.5, 4: 49.9, 5: 99.0}
    p = paired(a, b)
    d = np.array([1.1, 1.3, -0.4, 1.5, 0.7])
    half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)  # t(0.975, 4)
    assert p.seeds == [0, 1, 2, 3, 4] and p.n == 5
    assert p.mean == pytest.approx(d.mean(), abs=1e-12)
    assert p.std == pytest.approx(d.std(ddof=1), abs=1e-12)
    assert p.low == pytest.approx(d.mean() - half, abs=1e-9) and p.high == pytest.approx(d.mean() + half, abs=1e-9)
    one = paired({0: 2.0}, {0: 1.5})
    assert (one.n, one.mean, one.low, one.high) == (1, 0.5, None, None)
    assert paired({0: 1.0}, {1: 1.0}) is None
    s = summary({3: 1.0, 1: 2.0, 2: 4.0})
    assert list(s.per_seed) == [1, 2, 3] and s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(np.std([1, 2, 4], ddof=1))
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
