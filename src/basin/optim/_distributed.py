"""Sharing the per-matrix work of a matrix optimizer across data-parallel ranks.

Under DDP every rank holds the same parameters and the same (averaged) gradients, so every rank
would compute the same expensive per-matrix update (Muon's Newton-Schulz). :func:`shared_updates`
lets each rank compute the updates of only its share of the matrices and all-gathers the
results, as the reference's distributed ``Muon`` (KellerJordan/Muon, ``muon.py``) does:

* **Assignment** (:func:`assign`): greedy longest-processing-time over a cost per matrix
  (largest first, each to the least-loaded rank, ties to the lowest rank): deterministic, the
  same on every rank, and balanced by cost rather than by count.
* **Exchange**: per (device, dtype) of the parameters, each rank packs its updates into one flat
  buffer, padded to the longest rank's length (the reference pads its parameter list to a
  multiple of the world size the same way), and one ``all_gather`` of those buffers (as bytes,
  so that any dtype goes over gloo) hands every rank every update.
* **Layout**: each update is written into, and read back from, a view with the strides the
  local computation gives it (found once per shape by running the computation on the ``meta``
  device), so the parameter update that follows sees the same memory layout as in a single
  process (on CPU, a contiguous and a transposed operand can take differently rounded kernels,
  vectorised with FMA or not). Muon's update multiplies by a tensor lr first, which is
  layout-independent, so today this is insurance rather than a measured necessity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["assign", "data_parallel_group", "shared_updates"]

_ALIGN = 16  # elements: each packed update starts at a multiple of this


def data_parallel_group(process_group: Any | None) -> tuple[Any, int, int] | None:
    """``(group, rank, world_size)`` to share the work over, or None for the local path (no
    initialised process group, or a group of one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world < 2:
        return None
    return group, dist.get_rank(group), world


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The owning rank of each item: greedy LPT (largest cost first, to the least-loaded rank;
    ties by item index, then by lowest rank)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _dense(shape: torch.Size, stride: tuple[int, ...]) -> tuple[torch.Size, tuple[int, ...]]:
    """``(shape, stride)`` if it covers exactly ``numel`` elements (a permuted contiguous
    layout), else the contiguous layout of ``shape``."""
    shape = torch.Size(shape)
    expected = 1
    dims = sorted((s, n) for n, s in zip(shape, stride) if n > 1)
    for s, n in dims:
        if s != expected:
            return shape, torch.empty(shape, device="meta").stride()
        expected *= n
    return shape, tuple(stride)


def _pad(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def shared_updates(
    refs: Sequence[Tensor],
    compute: Callable[[int], Tensor],
    layout: Callable[[int], tuple[torch.Size, tuple[int, ...]]],
    costs: Sequence[float],
    group: object,
    rank: int,
    world: int,
) -> tuple[list[Tensor], list[int]]:
    """Every rank gets ``compute(i)`` for every ``i``, each computed on one rank only.

    ``refs[i]``: a tensor with the device and dtype of update ``i`` (its parameter);
    ``layout(i)``: the ``(shape, stride)`` of ``compute(i)``, known on every rank without
    computing it; ``costs[i]``: the assignment's cost of item ``i``. Returns the updates (views
    into the gathered buffers, with ``layout``'s strides) and the owner of each item. Every rank
    must call this with the same items in the same order (collectives)."""
    out: list[Tensor | None] = [None] * len(refs)
    owners = [0] * len(refs)
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(refs):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    for (device, dtype), idx in buckets.items():
        own = assign([costs[i] for i in idx], world)
        lay = {i: _dense(*layout(i)) for i in idx}
        offsets, totals = {}, [0] * world
        for i, r in zip(idx, own):
            owners[i] = r
            offsets[i] = totals[r]
            totals[r] += _pad(lay[i][0].numel())
        size = max(totals)
        send = torch.zeros(size, dtype=dtype, device=device)
        for i, r in zip(idx, own):
            if r == rank:
                shape, stride = lay[i]
                send.as_strided(shape, stride, offsets[i]).copy_(compute(i))
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather([b.view(torch.uint8) for b in recv], send.view(torch.uint8), group=group)
        for i, r in zip(idx, own):
            shape, stride = lay[i]
            out[i] = recv[r].as_strided(shape, stride, offsets[i])
    return out, owners  # type: ignore[return-value]
