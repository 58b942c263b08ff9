"""Paired differences and t-intervals against scipy."""

import numpy as np
import pytest
from scipy import stats as sp

from margin_regs.experiments import stats


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 29, 30, 31, 45, 100, 1000])
def test_t_quantile_matches_scipy(df):
    assert stats.t_quantile(df) == pytest.approx(sp.t.ppf(0.975, df), rel=2e-4)


# The Student's t table this module carried before it called scipy (ν = 1, 2, 3, 4,
# 5, 10, 30): scipy.stats.t gives the same quantiles to 4 decimals.
_FORMER_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281,
                 30: 2.0423}  # fmt: skip


@pytest.mark.parametrize("df", sorted(_FORMER_TABLE))
def test_t_quantile_keeps_the_former_table(df):
    assert stats.t_quantile(df) == pytest.approx(_FORMER_TABLE[df], abs=1e-4)


def test_gap_threshold_is_the_lowest_best_minus_a_point():
    curves = [[0.5, 0.91, 0.9], [0.6, 0.87, 0.86], [0.2, 0.99]]
    assert stats.gap_threshold(curves) == pytest.approx(0.86)
    assert stats.gap_threshold([[0.005]]) == 0.0


def test_paired_difference_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    control = rng.uniform(0.8, 0.9, 5)
    treated = control + rng.normal(0.01, 0.01, 5)
    d = stats.paired_difference(treated, control)
    ci = sp.ttest_rel(treated, control).confidence_interval(0.95)
    assert d.mean == pytest.approx(np.mean(treated - control))
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-4)
    assert d.n == 5
    assert d.excludes_zero == (ci.low > 0 or ci.high < 0)


def test_one_seed_has_no_interval_and_bad_input_is_refused():
    d = stats.paired_difference([0.9], [0.8])
    assert d.mean == pytest.approx(0.1) and d.low is None and not d.excludes_zero
    with pytest.raises(ValueError, match="one value per seed"):
        stats.paired_difference([0.9, 0.8], [0.8])
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0)
