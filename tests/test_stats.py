"""Paired differences and t-intervals against scipy."""

import numpy as np
import pytest
from scipy import stats as sp

from margin_regs.experiments import stats


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 29, 30, 31, 45, 100, 1000])
def test_t_quantile_matches_scipy(df):
    assert stats.t_quantile(df) == pytest.approx(sp.t.ppf(0.975, df), rel=2e-4)


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
