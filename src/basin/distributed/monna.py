"""MoNNA robust aggregation: the mean of the ``n - f`` nearest neighbours of a trusted vector.

Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative Learning with Linear
Gradient Overhead", ICML 2023 (arXiv:2209.10931)::

    MoNNA_{f, idx}(x_1, ..., x_n) = mean of the n - f vectors closest (Euclidean) to x_idx

``x_idx`` is the vector of a participant trusted to be correct (in peer-to-peer learning, the
node itself), which is always among its own neighbours. Tolerates ``f`` Byzantine vectors when
``2 f < n``. This is the paper's nearest-neighbour averaging step (byzfl's ``MoNNA``); the
paper's algorithm adds Polyak momentum on the local gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from basin.optim._base import check_int

__all__ = ["monna"]


def monna(vectors: Tensor | Sequence[Tensor], f: int, idx: int = 0) -> Tensor:
    """MoNNA of ``vectors`` (an ``(n, ...)`` tensor or a sequence of same-shape tensors).

    Args:
        vectors: the ``n`` submitted vectors (any shape per vector; distances on the flattened
            vectors).
        f: number of Byzantine vectors to tolerate, ``0 <= 2 f < n``.
        idx: index of the trusted vector, ``0 <= idx < n``.

    Returns the mean of the ``n - f`` vectors nearest to ``vectors[idx]`` (ties broken towards
    the lower index), shaped like one vector.
    """
    x = vectors if isinstance(vectors, Tensor) else torch.stack(list(vectors))
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("vectors must hold at least one vector")
    n = x.shape[0]
    check_int("f", f, 0)
    if 2 * f >= n:
        raise ValueError(f"f must satisfy 2 f < n (n = {n} vectors), got f={f}")
    check_int("idx", idx, 0)
    if idx >= n:
        raise ValueError(f"idx must be in [0, {n - 1}], got {idx}")
    flat = x.reshape(n, -1)
    dist = (flat - flat[idx]).norm(dim=1)
    nearest = torch.sort(dist, stable=True).indices[: n - f]
    return x[nearest].mean(0)
