"""The projected FRUGAL step (``proj_type`` svd, random, randperm) of one matrix: its fixed-size
state (:func:`init_frugal_state`) and the functional step (:func:`frugal`), a rebuild phase
(eager, or one custom op when compiled) followed by branch-free per-step math."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._base import get_value, is_compiling, scalar_lr
from .._matrix import MatrixOptimizer, as_matrix, compute_dtype, from_matrix, matrix_shape
from .compile_ops import rebuild_op
from .projectors import (
    RNG_STATE_BYTES,
    _down,
    _inactive_direction,
    _projected_shapes,
    _rebuild,
    _side,
    _up,
)


def init_frugal_state(
    p: Tensor,
    state: dict[str, Any],
    density: float,
    proj_type: str,
    proj_side: str,
    transposed: bool = False,
) -> None:
    """Allocate the state of a projected matrix, fixed in size for the whole run (so that a
    compiled step never sees it change): the step counters (CPU; ``global_step`` int64 because
    ``load_state_dict`` casts floating state to the parameter's dtype), the projector and the
    moments (filled by the first rebuild) and, for the random projectors, the generator state."""
    shape = matrix_shape(p, transposed)
    proj_shape, low_shape = _projected_shapes(shape, _side(shape, proj_side), density, proj_type)
    state["step"] = MatrixOptimizer._new_step()
    state["global_step"] = torch.tensor(0, dtype=torch.int64)
    proj_dtype = torch.int64 if proj_type == "randperm" else p.dtype
    state["proj"] = torch.zeros(proj_shape, dtype=proj_dtype, device=p.device)
    state["exp_avg"] = torch.zeros(low_shape, dtype=p.dtype, device=p.device)
    state["exp_avg_sq"] = torch.zeros(low_shape, dtype=p.dtype, device=p.device)
    if proj_type != "svd":
        state["rng_state"] = torch.zeros(RNG_STATE_BYTES, dtype=torch.uint8)


def frugal(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    update_gap: int,
    proj_type: str,
    proj_side: str,
    inactive_update_rule: str,
    inactive_lr_scale: float,
    proj_params_lr_scale: float,
    reset_statistics: bool,
    seed: int,
    maximize: bool,
    transposed: bool = False,
) -> None:
    """Functional FRUGAL step of one projected matrix; see :class:`FRUGAL`. ``state`` holds
    the buffers of :func:`init_frugal_state` (``seed``: the parameter's generator seed;
    ``transposed``: ``p`` is stored ``(in, out)``)."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    g = -grad if maximize else grad
    cd = compute_dtype(p.dtype)
    shape = matrix_shape(p, transposed)
    G = as_matrix(g, transposed).to(cd)
    side = _side(shape, proj_side)

    # rebuild phase (eager; one opaque op when compiled), then branch-free per-step math
    rebuild = rebuild_op if is_compiling() else _rebuild
    rebuild(
        G, state["global_step"], state["proj"], state["exp_avg"], state["exp_avg_sq"],
        state["step"], state.get("rng_state"), update_gap, proj_type, side, seed,
        reset_statistics,
    )  # fmt: skip
    state["global_step"] += 1
    state["step"] += 1
    step = get_value(state["step"])
    proj = state["proj"]
    proj = proj if proj.dtype == torch.int64 else proj.to(cd)

    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    scale = lr * proj_params_lr_scale
    low = _down(G, proj, side)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(low.to(m.dtype), 1 - beta1)
    v.mul_(beta2).addcmul_(low.to(v.dtype), low.to(v.dtype), value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    direction = m.to(cd) / bc1 / (v.to(cd).sqrt() / bc2**0.5 + eps)
    update = _up(direction, proj, side, shape) * scale
    rank, dim = (low.size(1), shape[1]) if side == "right" else (low.size(0), shape[0])
    full_rank = rank == dim
    if not full_rank:
        residual = _inactive_direction(G - _up(low, proj, side, shape), inactive_update_rule)
        if residual is not None:
            update = update + residual * (scale * inactive_lr_scale)
    p.sub_(from_matrix(update, p.shape, transposed).to(p.dtype))
