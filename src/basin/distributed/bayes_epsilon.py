"""Bayesian estimation of differential privacy from a membership-inference attack's outcomes.

An attack guesses, over trials with a known answer, whether a target example was in the
training data. Its false positive rate ``FPR`` (over the negative trials) and false negative
rate ``FNR`` (over the positive ones) bound the epsilon of any (epsilon, delta)-DP training
run: ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta`` (and the same for
the attack with its answers flipped). With Beta posteriors on ``FPR`` and ``FNR`` (Jeffreys
prior by default), the posterior of epsilon is the push-forward of theirs through
:func:`epsilon_from_rates`; :func:`epsilon_posterior` returns its credible interval and median.

Reference: Zanella-Béguelin, Wutschitz, Tople, Salem, Rühle, Paverd, Naseri, Köpf, Jones,
"Bayesian Estimation of Differential Privacy", ICML 2023, arXiv:2206.05199.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EpsilonPosterior", "epsilon_from_rates", "epsilon_posterior"]


def _log_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``log(num / den)``: ``-inf`` where ``num <= 0``, ``+inf`` where ``den == 0 < num``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        safe = np.where(num > 0, num, 1.0)
        return np.where(num > 0, np.log(safe) - np.log(den), -np.inf)


def epsilon_from_rates(fpr: Any, fnr: Any, delta: float) -> Any:
    """The smallest epsilon for which an attack with rates ``(fpr, fnr)`` is consistent with
    (epsilon, ``delta``)-DP::

        max(0, log((1-delta-FPR)/FNR), log((1-delta-FNR)/FPR),
               log((FPR-delta)/(1-FNR)), log((FNR-delta)/(1-FPR)))

    (the last two: the attack with its answers flipped, for one worse than chance).
    ``inf`` where no epsilon suffices. Vectorised over arrays; a float for scalars."""
    _check_delta(delta)
    a, b = np.asarray(fpr, dtype=float), np.asarray(fnr, dtype=float)
    if np.any((a < 0) | (a > 1) | (b < 0) | (b > 1)) or np.any(np.isnan(a) | np.isnan(b)):
        raise ValueError("fpr and fnr must be rates in [0, 1]")
    eps = np.maximum.reduce([
        np.zeros(np.broadcast(a, b).shape),
        _log_ratio(1 - delta - a, b),
        _log_ratio(1 - delta - b, a),
        _log_ratio(a - delta, 1 - b),
        _log_ratio(b - delta, 1 - a),
    ])  # fmt: skip
    return float(eps) if eps.ndim == 0 else eps


def _check_delta(delta: Any) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return float(delta)


@dataclass(frozen=True)
class EpsilonPosterior:
    """The posterior of epsilon given an attack's outcomes.

    ``estimate``: the posterior median; ``interval``: the equal-tailed credible interval at
    ``level``; ``fpr_beta`` / ``fnr_beta``: the Beta posteriors' parameters; ``cdf(e)``:
    ``P(epsilon <= e | outcomes)``; ``samples``: the Monte Carlo draws (``method="monte_carlo"``)
    or ``None``."""

    estimate: float
    interval: tuple[float, float]
    level: float
    delta: float
    fpr_beta: tuple[float, float]
    fnr_beta: tuple[float, float]
    method: str
    cdf: Callable[[float], float]
    samples: np.ndarray | None = None


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {v!r}")
    return int(v)


def epsilon_posterior(
    *,
    fp: int,
    fn: int,
    tn: int | None = None,
    tp: int | None = None,
    n: int | None = None,
    delta: float,
    level: float = 0.95,
    prior: float = 0.5,
    method: str = "integrate",
    n_samples: int = 200_000,
    n_nodes: int = 2000,
    seed: int = 0,
) -> EpsilonPosterior:
    """Posterior of epsilon from a membership-inference attack's outcomes (Zanella-Béguelin
    et al., arXiv:2206.05199).

    Counts: ``fp`` false positives and ``fn`` false negatives, with either ``n`` (negative
    and positive trials each) or ``tn`` and ``tp``. ``FPR ~ Beta(prior + fp, prior + tn)``,
    ``FNR ~ Beta(prior + fn, prior + tp)`` (independent; ``prior=0.5``: Jeffreys). ``method``:
    ``"integrate"`` (deterministic: ``P(eps <= e)`` is the posterior mass of the
    (e, delta)-DP region, a one-dimensional integral over FNR's quantiles with ``n_nodes``
    midpoints) or ``"monte_carlo"`` (``n_samples`` draws, seeded by ``seed``)."""
    from scipy import optimize, special

    fp, fn = _count("fp", fp), _count("fn", fn)
    if n is not None:
        if tn is not None or tp is not None:
            raise ValueError("give n (trials of each kind) or tn and tp, not both")
        n = _count("n", n)
        if fp > n or fn > n:
            raise ValueError(f"fp={fp} and fn={fn} cannot exceed n={n} trials")
        tn, tp = n - fp, n - fn
    elif tn is None or tp is None:
        raise ValueError("give n (trials of each kind) or both tn and tp")
    tn, tp = _count("tn", tn), _count("tp", tp)
    if fp + tn == 0 or fn + tp == 0:
        raise ValueError("need at least one negative (fp + tn) and one positive (fn + tp) trial")
    delta = _check_delta(delta)
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not prior > 0:
        raise ValueError(f"prior must be a positive Beta parameter, got {prior!r}")
    if method not in ("integrate", "monte_carlo"):
        raise ValueError(f"method must be 'integrate' or 'monte_carlo', got {method!r}")
    a_fpr, b_fpr = prior + fp, prior + tn
    a_fnr, b_fnr = prior + fn, prior + tp
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2

    if method == "monte_carlo":
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 100:
            raise ValueError(f"n_samples must be an integer >= 100, got {n_samples!r}")
        rng = np.random.default_rng(seed)
        fpr = rng.beta(a_fpr, b_fpr, n_samples)
        fnr = rng.beta(a_fnr, b_fnr, n_samples)
        eps = np.sort(epsilon_from_rates(fpr, fnr, delta))

        def cdf_mc(e: float) -> float:
            return float(np.searchsorted(eps, e, side="right")) / len(eps)

        q = np.quantile(eps, [lo_q, 0.5, hi_q])
        return EpsilonPosterior(float(q[1]), (float(q[0]), float(q[2])), float(level), delta,
                                (a_fpr, b_fpr), (a_fnr, b_fnr), method, cdf_mc, eps)  # fmt: skip

    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 10:
        raise ValueError(f"n_nodes must be an integer >= 10, got {n_nodes!r}")
    x = special.betaincinv(a_fnr, b_fnr, (np.arange(n_nodes) + 0.5) / n_nodes)  # FNR quantiles

    def fpr_cdf(t: np.ndarray) -> np.ndarray:
        return special.betainc(a_fpr, b_fpr, t)

    def cdf(e: float) -> float:
        """Posterior mass of the (e, delta)-DP region: for each FNR x, the FPR interval
        that the four DP inequalities allow."""
        if e < 0:
            return 0.0
        if math.isinf(e):
            return 1.0
        ee = math.exp(e)
        lo = np.maximum.reduce([np.zeros_like(x), 1 - delta - ee * x, (1 - delta - x) / ee])
        hi = np.minimum.reduce([np.ones_like(x), delta + ee * (1 - x), 1 - (x - delta) / ee])
        mass = np.where(hi > lo, fpr_cdf(hi) - fpr_cdf(lo), 0.0)
        return float(mass.mean())

    def quantile(p: float) -> float:
        if cdf(0.0) >= p:
            return 0.0
        top = 1.0
        while cdf(top) < p:
            top *= 2
            if top > 1e4:
                return math.inf
        return float(optimize.brentq(lambda e: cdf(e) - p, 0.0, top, xtol=1e-9))

    return EpsilonPosterior(quantile(0.5), (quantile(lo_q), quantile(hi_q)), float(level),
                            delta, (a_fpr, b_fpr), (a_fnr, b_fnr), method, cdf)  # fmt: skip
