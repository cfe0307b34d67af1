"""Linear mode connectivity: the loss along the straight line between two solutions.

References: J. Frankle, G. K. Dziugaite, D. M. Roy, M. Carbin, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis", arXiv:1912.05671, 2020 (the barrier as the maximum excess over the
linear interpolation of the endpoint losses); K. Jordan, H. Sedghi, O. Saukh, R. Entezari,
B. Neyshabur, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
arXiv:2211.08403, 2022 (recomputing BatchNorm statistics at each interpolated point).

``barrier = max_a L((1-a) w_a + a w_b) - [(1-a) L(w_a) + a L(w_b)]``
over the grid of ``a``, endpoints included: the excess is 0 at both endpoints, so the barrier is
>= 0; a convex loss lies below the chord, so its barrier is 0 (excess <= 0 inside).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._common import evaluate
from ._hvp import normalize_batches

__all__ = ["LMCResult", "lmc_barrier"]

_BN = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class LMCResult:
    """``alphas``, ``losses`` (and ``metrics``) along the line, ``linear`` (the interpolation of
    the endpoint losses), ``barrier`` = max(losses - linear), ``barrier_alpha`` where it is
    attained, ``n_evals`` and ``seconds``."""

    barrier: float
    barrier_alpha: float
    alphas: np.ndarray
    losses: np.ndarray
    linear: np.ndarray
    metrics: np.ndarray | None
    n_evals: int
    seconds: float


def _recompute_bn(model: nn.Module, data: Any) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) by
    forward passes over ``data`` in train mode."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    # every submodule's own mode, not just the root's: model.train(was) would reset them all
    modes = [(m, m.training) for m in model.modules()]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x, _, _ in normalize_batches(data):
            model(x)
    for m, tr in modes:
        m.training = tr
    for m, mom in zip(bns, momenta):
        m.momentum = mom


def lmc_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    n_points: int = 11,
    metric: Callable | None = None,
    recompute_bn: bool = False,
    bn_data: Any = None,
) -> LMCResult:
    """Loss (and metric) at ``n_points`` evenly spaced points on the segment from ``model_a``
    to ``model_b`` and the barrier. Evaluation uses ``model_a``'s train/eval mode. Buffers
    (e.g. BatchNorm statistics) are interpolated like parameters unless ``recompute_bn``, which
    re-estimates them at every point from ``bn_data`` (default: ``data``). Neither model is
    changed (the work happens on a copy)."""
    t0 = time.perf_counter()
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ValueError(
            "model_a and model_b must have the same architecture (state_dict keys and shapes)"
        )
    normalize_batches(data)  # validate early
    work = copy.deepcopy(model_a)
    alphas = np.linspace(0.0, 1.0, n_points)
    losses = np.zeros(n_points)
    metrics = np.zeros(n_points) if metric is not None else None
    for i, a in enumerate(alphas):
        state = {}
        for k in sa:
            ta, tb = sa[k], sb[k]
            if ta.is_floating_point():
                state[k] = ta if a == 0 else tb if a == 1 else (1 - a) * ta + a * tb
            else:
                state[k] = ta if a < 0.5 else tb  # e.g. num_batches_tracked
        work.load_state_dict(state)
        if recompute_bn:
            _recompute_bn(work, bn_data if bn_data is not None else data)
        loss, met = evaluate(work, loss_fn, data, metric=metric)
        losses[i] = loss
        if metrics is not None:
            metrics[i] = met
    linear = (1 - alphas) * losses[0] + alphas * losses[-1]
    excess = losses - linear
    j = int(np.argmax(excess))
    return LMCResult(
        barrier=float(excess[j]),
        barrier_alpha=float(alphas[j]),
        alphas=alphas,
        losses=losses,
        linear=linear,
        metrics=metrics,
        n_evals=n_points,
        seconds=time.perf_counter() - t0,
    )
