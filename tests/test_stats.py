"""granet.reports.stats: Student-t quantiles, paired intervals and verdicts, checked against closed forms."""
import math

import pytest

from granet.reports.stats import (
    HOLDS,
    NOT_SEPARABLE,
    REVERSED,
    paired_interval,
    t_quantile,
    t_two_sided_probability,
    verdict,
)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 40.0])
def test_probability_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(t):
    # df = 1 is the Cauchy distribution: P(|T| <= t) = 2 atan(t) / pi; df = 2: t / sqrt(t^2 + 2).
    assert t_two_sided_probability(t, 1) == pytest.approx(2 * math.atan(t) / math.pi, abs=1e-15)
    assert t_two_sided_probability(t, 2) == pytest.approx(t / math.sqrt(t * t + 2), abs=1e-15)


def test_quantiles_match_closed_forms_and_the_standard_table():
    assert t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)  # 12.7062...
    assert t_quantile(2) == pytest.approx(math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2)), rel=1e-12)  # 4.3027...
    assert t_quantile(1, 0.5) == pytest.approx(1.0, rel=1e-12)  # Cauchy quartile: tan(pi / 4)
    # Values of the standard two-sided 95% table (10 digits).
    for df, value in ((3, 3.182446305), (4, 2.776445105), (5, 2.570581836), (9, 2.262157163), (30, 2.042272456)):
        assert t_quantile(df) == pytest.approx(value, abs=1e-9)
    assert t_two_sided_probability(t_quantile(4), 4) == pytest.approx(0.95, abs=1e-14)


def test_paired_interval_exact_values():
    # Differences 2, 3, 1: mean 2, sample std 1, half-width t(2) / sqrt(3).
    iv = paired_interval([3.0, 5.0, 4.0], [1.0, 2.0, 3.0])
    half = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2)) / math.sqrt(3)
    assert (iv.n, iv.mean, iv.std, iv.confidence) == (3, 2.0, 1.0, 0.95)
    assert iv.low == pytest.approx(2.0 - half, abs=1e-12) and iv.high == pytest.approx(2.0 + half, abs=1e-12)
    assert iv.verdict == NOT_SEPARABLE  # -0.484 .. 4.484
    # Five pairs, differences 2, 2.5, 1.5, 2, 2: mean 2, std sqrt(0.125), half-width 2.7764451052 * std / sqrt(5).
    iv = paired_interval([12, 12.5, 11.5, 12, 12], [10, 10, 10, 10, 10])
    assert iv.mean == 2.0 and iv.std == pytest.approx(math.sqrt(0.125), abs=1e-15)
    half = 2.7764451051977934 * math.sqrt(0.125) / math.sqrt(5)
    assert (iv.low, iv.high) == (pytest.approx(2 - half, abs=1e-12), pytest.approx(2 + half, abs=1e-12))
    assert iv.verdict == HOLDS
    assert paired_interval([10, 10, 10, 10, 10], [12, 12.5, 11.5, 12, 12]).verdict == REVERSED
    # Identical differences: zero width, the verdict follows the sign.
    assert (paired_interval([1, 2], [0, 1]).low, paired_interval([1, 2], [0, 1]).high) == (1.0, 1.0)


def test_verdict_boundaries():
    assert verdict(0.1, 2.0) == HOLDS
    assert verdict(-2.0, -0.1) == REVERSED
    assert verdict(-1.0, 1.0) == NOT_SEPARABLE
    assert verdict(0.0, 1.0) == NOT_SEPARABLE and verdict(-1.0, 0.0) == NOT_SEPARABLE  # 0 inside: not separable


@pytest.mark.parametrize("call, message", [
    (lambda: paired_interval([1, 2], [1]), "paired_interval needs pairs: got 2 and 1 values"),
    (lambda: paired_interval([1], [0]), "paired_interval needs at least 2 pairs, got 1"),
    (lambda: paired_interval([1, float("nan")], [0, 0]), "paired_interval: values must be finite"),
    (lambda: t_quantile(0), "degrees of freedom must be a positive integer, got 0"),
    (lambda: t_quantile(2.5), "degrees of freedom must be a positive integer, got 2.5"),
    (lambda: t_quantile(4, 1.0), "confidence must be strictly between 0 and 1, got 1.0"),
    (lambda: t_two_sided_probability(-1.0, 3), "t must be a finite number >= 0, got -1.0"),
])
def test_bad_inputs_are_one_line_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
