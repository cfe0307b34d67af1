"""Linear mode connectivity: the loss along the straight line between two solutions.

References: J. Frankle, G. K. Dziugaite, D. M. Roy, M. Carbin, "Linear Mode Connectivity and the
Lottery Ticket Hypothesis", arXiv:1912.05671, 2020 (the barrier as the maximum excess over the
linear interpolation of the endpoint losses); K. Jordan, H. Sedghi, O. Saukh, R. Entezari,
B. Neyshabur, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair",
arXiv:2211.08403, 2022 (recomputing BatchNorm statistics at each interpolated point).

``barrier = max_a L((1-a) w_a + a w_b) - [(1-a) L(w_a) + a L(w_b)]``
over the grid of ``a``, endpoints included: the excess is 0 at both endpoints, so the barrier is
>= 0; a convex loss lies below the chord, so its barrier is 0 (excess <= 0 inside).

The error barrier is the quantity Frankle et al. report (their "instability"): the largest
increase of the test error along the line over the *mean* of the endpoint errors,
``error_barrier = max_a Err(a) - (Err(0) + Err(1)) / 2``, with ``Err`` the classification
error (arg-max of ``(N, C)`` logits against integer targets). The same form on a user
``metric`` is ``metric_barrier`` (for a metric where higher is better, such as accuracy, the
increase is ``(M(0) + M(1)) / 2 - M(a)``; ``higher_is_better=False`` for error-like metrics).
Both are >= 0 (the endpoints are on the grid and their excess averages to 0).
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

from ._common import classification_error, evaluate_all
from ._hvp import normalize_batches, seeded_rng

__all__ = ["LMCResult", "lmc_barrier"]

_BN = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class LMCResult:
    """``alphas``, ``losses`` (and ``metrics``) along the line, ``linear`` (the interpolation of
    the endpoint losses), ``barrier`` = max(losses - linear), ``barrier_alpha`` where it is
    attained, ``n_evals`` and ``seconds``.

    ``errors``: classification error along the line (None unless the outputs are ``(N, C)``
    logits and the targets class indices); ``error_barrier`` = max(errors) - mean of the two
    endpoint errors (Frankle et al.), at ``error_barrier_alpha``; ``metric_barrier`` /
    ``metric_barrier_alpha``: the same for ``metric`` (None without one)."""

    barrier: float
    barrier_alpha: float
    alphas: np.ndarray
    losses: np.ndarray
    linear: np.ndarray
    metrics: np.ndarray | None
    n_evals: int
    seconds: float
    errors: np.ndarray | None = None
    error_barrier: float | None = None
    error_barrier_alpha: float | None = None
    metric_barrier: float | None = None
    metric_barrier_alpha: float | None = None


def _mean_endpoint_barrier(values: np.ndarray, alphas: np.ndarray, sign: float):
    """max_a sign * (v(a) - (v(0) + v(1)) / 2) and where it is attained."""
    excess = sign * (values - 0.5 * (values[0] + values[-1]))
    j = int(np.argmax(excess))
    return float(excess[j]), float(alphas[j])


def _recompute_bn(model: nn.Module, data: Any) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) by
    forward passes over ``data`` in train mode."""
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    # every submodule's own mode, not just the root's: model.train(was) would reset them all
    modes = [(m, m.training) for m in model.modules()]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    with torch.no_grad(), seeded_rng(0, device):  # a random forward leaves the caller's RNG
        for x, _, _ in normalize_batches(data):
            model(x)
    for module, tr in modes:
        module.training = tr
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom


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
    higher_is_better: bool = True,
) -> LMCResult:
    """Loss (and metric) at ``n_points`` evenly spaced points on the segment from ``model_a``
    to ``model_b`` and the barrier. Evaluation uses ``model_a``'s train/eval mode. Buffers
    (e.g. BatchNorm statistics) are interpolated like parameters unless ``recompute_bn``, which
    re-estimates them at every point from ``bn_data`` (default: ``data``). Neither model is
    changed (the work happens on a copy). The classification error barrier is computed when
    the outputs are logits and the targets class indices; ``higher_is_better`` says which way
    ``metric`` improves, for its barrier (see the module notes)."""
    t0 = time.perf_counter()
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an integer >= 2, got {n_points!r}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ValueError(
            "model_a and model_b must have the same architecture (state_dict keys and shapes)"
        )
    normalize_batches(data)  # validate early
    if not isinstance(higher_is_better, bool):
        raise ValueError(f"higher_is_better must be True or False, got {higher_is_better!r}")
    work = copy.deepcopy(model_a)
    alphas = np.linspace(0.0, 1.0, n_points)
    losses = np.zeros(n_points)
    metrics = np.zeros(n_points) if metric is not None else None
    errors: np.ndarray | None = np.zeros(n_points)
    fns = [classification_error] + ([metric] if metric is not None else [])
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
        loss, vals = evaluate_all(work, loss_fn, data, metrics=fns)
        losses[i] = loss
        if errors is not None:
            if vals[0] is None:
                errors = None
            else:
                errors[i] = vals[0]
        if metrics is not None:
            metrics[i] = vals[1]
    linear = (1 - alphas) * losses[0] + alphas * losses[-1]
    excess = losses - linear
    j = int(np.argmax(excess))
    eb, eb_a = _mean_endpoint_barrier(errors, alphas, 1.0) if errors is not None else (None, None)
    mb, mb_a = (
        _mean_endpoint_barrier(metrics, alphas, -1.0 if higher_is_better else 1.0)
        if metrics is not None
        else (None, None)
    )
    return LMCResult(
        barrier=float(excess[j]),
        barrier_alpha=float(alphas[j]),
        alphas=alphas,
        losses=losses,
        linear=linear,
        metrics=metrics,
        n_evals=n_points,
        seconds=time.perf_counter() - t0,
        errors=errors,
        error_barrier=eb,
        error_barrier_alpha=eb_a,
        metric_barrier=mb,
        metric_barrier_alpha=mb_a,
    )
