"""1-D and 2-D slices of the loss surface: ``L(w + a d1 (+ b d2))`` on a grid.

Directions default to filter-normalised Gaussian ones (Li et al., arXiv:1712.09913, 2018, see
:mod:`basin.landscape.directions`); pass your own (e.g. the top eigenvectors, or
``direction_to(model, other)``). The model is evaluated through ``functional_call`` on copies of
its parameters and buffers, in the caller's train/eval mode; it is never modified.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from ._common import evaluate, params_dict
from .directions import random_direction

__all__ = ["SurfaceResult", "loss_surface"]


@dataclass(frozen=True)
class SurfaceResult:
    """``alphas`` (and ``betas`` for 2-D), ``losses`` of shape (len(alphas),) or
    (len(alphas), len(betas)), ``metrics`` likewise or None, the ``directions`` used, the number
    of loss evaluations ``n_evals`` and ``seconds``."""

    alphas: np.ndarray
    betas: np.ndarray | None
    losses: np.ndarray
    metrics: np.ndarray | None
    directions: tuple[dict[str, Tensor], ...]
    n_evals: int
    seconds: float


def loss_surface(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    directions: Sequence[Mapping[str, Tensor]] | None = None,
    *,
    dim: int | None = None,
    steps: int = 21,
    span: tuple[float, float] = (-1.0, 1.0),
    metric: Callable | None = None,
    seed: int = 0,
) -> SurfaceResult:
    """Loss along 1 or 2 directions (``dim``, default: ``len(directions)`` or 1) on a
    ``steps`` (x ``steps``) grid spanning ``span`` in each coordinate."""
    t0 = time.perf_counter()
    if directions is not None:
        directions = list(directions)
        if dim is None:
            dim = len(directions)
    dim = 1 if dim is None else dim
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if directions is None:
        directions = [random_direction(model, seed=seed + i) for i in range(dim)]
    if len(directions) != dim:
        raise ValueError(f"dim={dim} needs {dim} directions, got {len(directions)}")
    base = params_dict(model)
    for d in directions:
        for n in d:
            if n not in base or d[n].shape != base[n].shape:
                raise ValueError(f"direction entry {n!r} does not match the model's parameters")
    alphas = np.linspace(span[0], span[1], steps)
    betas = np.linspace(span[0], span[1], steps) if dim == 2 else None
    shape = (steps,) if dim == 1 else (steps, steps)
    losses = np.zeros(shape)
    metrics = np.zeros(shape) if metric is not None else None

    def at(coefs):
        p = dict(base)
        for c, d in zip(coefs, directions):
            for n, t in d.items():
                p[n] = p[n] + c * t.to(p[n].dtype)
        return p

    for idx in np.ndindex(*shape):
        coefs = [alphas[idx[0]]] + ([betas[idx[1]]] if betas is not None else [])
        loss, met = evaluate(model, loss_fn, data, at(coefs), metric)
        losses[idx] = loss
        if metrics is not None:
            metrics[idx] = met
    return SurfaceResult(
        alphas=alphas,
        betas=betas,
        losses=losses,
        metrics=metrics,
        directions=tuple({n: t.detach().clone() for n, t in d.items()} for d in directions),
        n_evals=int(np.prod(shape)),
        seconds=time.perf_counter() - t0,
    )
