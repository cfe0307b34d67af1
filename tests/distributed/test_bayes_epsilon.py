"""Bayesian estimation of epsilon from attack outcomes (arXiv:2206.05199): the closed-form
epsilon of a pair of error rates, the integrated posterior against Monte Carlo draws from the
Beta posteriors, the credible interval's coverage of a known epsilon over simulated attacks,
and invalid counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from basin.distributed import epsilon_from_rates, epsilon_posterior


def test_epsilon_of_rates_closed_form() -> None:
    assert epsilon_from_rates(0.1, 0.2, 0.0) == pytest.approx(math.log(8.0), rel=1e-15)
    assert epsilon_from_rates(0.2, 0.1, 0.0) == pytest.approx(math.log(8.0), rel=1e-15)
    assert epsilon_from_rates(0.1, 0.2, 0.05) == pytest.approx(math.log(7.5), rel=1e-15)
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0  # chance
    assert epsilon_from_rates(0.55, 0.45, 0.0) == pytest.approx(0.0, abs=1e-15)  # chance line
    # worse than chance: its flipped answers have rates (0.4, 0.4)
    assert epsilon_from_rates(0.6, 0.6, 1e-5) == pytest.approx(math.log((0.6 - 1e-5) / 0.4))
    # an attack that is always wrong, flipped, is as good as its mirror image
    assert epsilon_from_rates(0.9, 0.8, 0.0) == pytest.approx(math.log(8.0), rel=1e-15)
    assert epsilon_from_rates(0.1, 0.0, 1e-5) == math.inf
    assert epsilon_from_rates(0.0, 0.0, 0.0) == math.inf


def test_epsilon_is_the_smallest_consistent_with_the_dp_inequalities() -> None:
    """On random rates: the four hypothesis-testing inequalities of (eps, delta)-DP hold at
    the returned epsilon and one of them fails just below it."""
    rng = np.random.default_rng(0)
    fpr, fnr = rng.uniform(0.01, 0.99, 500), rng.uniform(0.01, 0.99, 500)
    delta = 1e-3
    eps = epsilon_from_rates(fpr, fnr, delta)

    def holds(e, a, b):
        ee = math.exp(e)
        return (a + ee * b >= 1 - delta - 1e-12 and b + ee * a >= 1 - delta - 1e-12
                and (1 - a) + ee * (1 - b) >= 1 - delta - 1e-12
                and (1 - b) + ee * (1 - a) >= 1 - delta - 1e-12)  # fmt: skip

    for e, a, b in zip(eps, fpr, fnr):
        assert holds(e, a, b)
        if e > 0:
            assert not holds(e - 1e-6, a, b)


def test_integrated_posterior_matches_monte_carlo() -> None:
    counts = dict(fp=12, fn=40, n=200, delta=1e-5, level=0.9)
    num = epsilon_posterior(**counts)
    mc = epsilon_posterior(**counts, method="monte_carlo", n_samples=400_000, seed=3)
    assert num.fpr_beta == (12.5, 188.5) and num.fnr_beta == (40.5, 160.5)
    for a, b in zip((num.estimate, *num.interval), (mc.estimate, *mc.interval)):
        assert a == pytest.approx(b, abs=0.01)
    for e in (1.5, 2.0, 2.5):
        assert num.cdf(e) == pytest.approx(mc.cdf(e), abs=0.004)
    lo, hi = num.interval
    assert num.cdf(lo) == pytest.approx(0.05, abs=1e-9) and num.cdf(hi) == pytest.approx(0.95, abs=1e-9)
    # the same seed, the same draws
    again = epsilon_posterior(**counts, method="monte_carlo", n_samples=400_000, seed=3)
    assert again.interval == mc.interval


def test_credible_interval_covers_the_true_epsilon_at_its_level() -> None:
    rng = np.random.default_rng(1)
    fpr, fnr, delta, n = 0.05, 0.3, 1e-5, 400
    true_eps = epsilon_from_rates(fpr, fnr, delta)
    reps, covered = 150, 0
    for _ in range(reps):
        fp, fn = int(rng.binomial(n, fpr)), int(rng.binomial(n, fnr))
        post = epsilon_posterior(fp=fp, fn=fn, n=n, delta=delta, level=0.9, n_nodes=300)
        covered += post.interval[0] <= true_eps <= post.interval[1]
    # 90% nominal; 3 binomial standard deviations over 150 repetitions is about 0.074
    assert 0.9 - 0.074 <= covered / reps <= 0.9 + 0.074, covered / reps


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"fp": -1, "fn": 3, "n": 10}, "fp must be a non-negative integer"),
        ({"fp": 1.5, "fn": 3, "n": 10}, "fp must be a non-negative integer"),
        ({"fp": 11, "fn": 3, "n": 10}, "cannot exceed n=10"),
        ({"fp": 1, "fn": 3}, "give n .* or both tn and tp"),
        ({"fp": 1, "fn": 3, "n": 10, "tn": 9}, "not both"),
        ({"fp": 0, "fn": 3, "tn": 0, "tp": 5}, "at least one negative"),
        ({"fp": 1, "fn": 3, "n": 10, "delta": 1.0}, r"delta must be in \[0, 1\)"),
        ({"fp": 1, "fn": 3, "n": 10, "level": 1.0}, r"level must be in \(0, 1\)"),
        ({"fp": 1, "fn": 3, "n": 10, "prior": 0.0}, "prior must be a positive"),
        ({"fp": 1, "fn": 3, "n": 10, "method": "mcmc"}, "method must be"),
    ],
)
def test_invalid_counts_raise(kw, match) -> None:
    kw = {"delta": 1e-5, **kw}
    with pytest.raises(ValueError, match=match):
        epsilon_posterior(**kw)
    with pytest.raises(ValueError, match="rates in"):
        epsilon_from_rates(1.2, 0.1, 0.0)
