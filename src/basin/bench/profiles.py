"""AlgoPerf-style performance profiles.

For each workload the fastest optimizer's time-to-target ``t_best`` is the reference; an
optimizer's ratio is ``t / t_best`` (infinite if it never reached the target). Its profile
``rho(tau)`` is the fraction of workloads with ratio <= tau, and its score the area under
``rho`` over ``tau`` in [1, tau_max] divided by ``tau_max - 1`` (1 = fastest everywhere,
0 = never reached a target).

Reference: Dahl et al., "Benchmarking Neural Network Training Algorithms", arXiv:2306.07179
(2023), section 4.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["performance_profiles", "profile_scores", "taus"]


def taus(tau_max: float = 4.0, n: int = 301) -> np.ndarray:
    if not tau_max > 1:
        raise ValueError(f"tau_max must be > 1, got {tau_max!r}")
    return np.linspace(1.0, tau_max, n)


def performance_profiles(
    times: Mapping[str, Mapping[str, float]], grid: Sequence[float] | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """``times[workload][optimizer]`` (inf or nan = target not reached) -> ``rho`` per
    optimizer on ``grid`` (default :func:`taus`). Every optimizer must appear on every
    workload it is compared on; a missing entry counts as not reached."""
    tau = taus() if grid is None else np.asarray(grid, dtype=float)
    opts = sorted({o for per in times.values() for o in per})
    n_w = len(times)
    if n_w == 0:
        return {o: np.zeros_like(tau) for o in opts}
    ratios: dict[str, list[float]] = {o: [] for o in opts}
    for per in times.values():
        finite = [t for t in per.values() if t is not None and math.isfinite(t)]
        best = min(finite) if finite else math.inf
        for o in opts:
            t = per.get(o, math.inf)
            if t is None or not math.isfinite(t) or not math.isfinite(best):
                ratios[o].append(math.inf)
            elif best <= 0:
                ratios[o].append(1.0 if t <= 0 else math.inf)
            else:
                ratios[o].append(t / best)
    return {o: (np.asarray(r)[None, :] <= tau[:, None]).sum(1) / n_w for o, r in ratios.items()}


def profile_scores(
    profiles: Mapping[str, np.ndarray], grid: Sequence[float] | np.ndarray | None = None
) -> dict[str, float]:
    """Normalised area under each profile (trapezoid rule on ``grid``)."""
    tau = taus() if grid is None else np.asarray(grid, dtype=float)
    width = tau[-1] - tau[0]
    out = {}
    for o, rho in profiles.items():
        rho = np.asarray(rho, dtype=float)
        area = float(np.sum((rho[1:] + rho[:-1]) * np.diff(tau)) / 2)
        out[o] = area / width
    return out
