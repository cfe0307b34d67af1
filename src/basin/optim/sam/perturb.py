"""SAM's and ASAM's ascent step ``e``: a readable loop over tensors (the reference) and a
multi-tensor path (``torch._foreach_*``, one call per device and dtype) that gives the same
``e`` up to the rounding of the per-tensor norms.

``items`` are ``(group, param, name)`` for every perturbed parameter with a gradient::

    SAM:  e = rho g / (||g|| + eps)
    ASAM: e = rho T^2 g / (||T g|| + eps),  T = |w| + eta  ("weight" params; 1 for the others)

Norms are global (over all items) and taken in float64; bfloat16/float16 gradients are
computed in float64 and ``e`` is cast back to the parameter's dtype."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, cast

import torch
from torch import Tensor

from .._base import grad_of

__all__ = ["ascent_step"]

Item = tuple[dict[str, Any], Tensor, str | None]


def _low_precision(p: Tensor) -> bool:
    return p.dtype in (torch.float16, torch.bfloat16)


def _scaled(group: dict[str, Any], name: str | None) -> bool:
    """ASAM's rule: parameters whose name says ``weight`` (all of them when names are unknown)."""
    return bool(group.get("adaptive", False)) and (name is None or "weight" in name)


def _inverse_norm(sq: Tensor, eps: float) -> Tensor:
    norm = sq.sum().sqrt()
    return torch.where(norm > 0, 1.0 / (norm + eps), torch.zeros_like(norm))


def _scale(group: dict[str, Any], inv: Tensor) -> Tensor:
    scale = inv * group.get("rho", 0.05)
    return -scale if group.get("maximize", False) else scale


def _single_tensor(items: list[Item], eps: float) -> list[Tensor]:
    dirs, sq = [], []
    for group, p, name in items:
        g = grad_of(p).double() if _low_precision(p) else grad_of(p)
        t = None
        if _scaled(group, name):
            t = p.to(g.dtype).abs().add_(group.get("eta", 0.01))
            g = g * t
        sq.append(torch.linalg.vector_norm(g).double().square())
        dirs.append(g if t is None else g * t)  # T^2 g for ASAM
    inv = _inverse_norm(torch.stack(sq), eps)
    return [
        (d * _scale(group, inv).to(d.dtype)).to(p.dtype) for (group, p, _), d in zip(items, dirs)
    ]


def _multi_tensor(items: list[Item], eps: float) -> list[Tensor]:
    buckets: dict[Any, list[int]] = defaultdict(list)
    for i, (group, p, name) in enumerate(items):
        dtype = torch.float64 if _low_precision(p) else grad_of(p).dtype
        buckets[(p.device, dtype, _scaled(group, name))].append(i)
    dirs: list[Tensor | None] = [None] * len(items)
    sq = []
    for (_, dtype, scaled), idx in buckets.items():
        gs: list[Tensor] = [grad_of(items[i][1]).to(dtype) for i in idx]
        if scaled:
            ts = torch._foreach_abs([items[i][1].to(dtype) for i in idx])
            torch._foreach_add_(ts, [float(items[i][0].get("eta", 0.01)) for i in idx])
            gs = list(torch._foreach_mul(gs, ts))
        sq.append(torch.stack(torch._foreach_norm(gs)).double().square())
        if scaled:
            torch._foreach_mul_(gs, ts)  # T^2 g
        for i, d in zip(idx, gs):
            dirs[i] = d
    inv = _inverse_norm(torch.cat(sq), eps)
    # one scale per (group, dtype): the same products as the loop
    by_scale: dict[Any, list[int]] = defaultdict(list)
    done = cast(list[Tensor], dirs)  # every entry set above
    for i, (group, _p, _) in enumerate(items):
        by_scale[(id(group), done[i].device, done[i].dtype)].append(i)
    out: list[Tensor | None] = [None] * len(items)
    for (_, _, dtype), idx in by_scale.items():
        scale = _scale(items[idx[0]][0], inv).to(dtype)
        for i, e in zip(idx, torch._foreach_mul([done[i] for i in idx], scale)):
            out[i] = e.to(items[i][1].dtype)
    return out  # type: ignore[return-value]


def ascent_step(items: list[Item], eps: float, foreach: bool) -> list[Tensor]:
    """``e`` for every item (see the module docstring), in each parameter's dtype."""
    if not items:
        return []
    return (_multi_tensor if foreach else _single_tensor)(items, eps)
