"""FRUGAL's block variant (``proj_type="block"``): which whole tensors are active, the pooled
moment layout, the re-selection phase and the branch-free compiled block update. The group step
that uses them is :func:`basin.optim.frugal.block_step.block_step`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._matrix import MatrixOptimizer
from .projectors import _generator, _inactive_direction

_POOL_KEYS = ("exp_avg_pool", "exp_avg_sq_pool")


def _num_active(density: float, n: int) -> int:
    """Number of active blocks among ``n``: ``max(1, round(density * n))``."""
    return max(1, round(density * n))


def _block_selection(order: str, n: int, k: int, draw: int, gen: torch.Generator) -> list[int]:
    """Indices of the ``k`` active blocks (of ``n``, in parameter order) at re-selection number
    ``draw`` (0 at the first step): ``"random"`` the first ``k`` of ``randperm(n)`` from ``gen``;
    ``"ascending"`` the ``k`` blocks from ``draw * k`` upwards, cyclically; ``"descending"`` the
    ``k`` blocks from ``n - 1 - draw * k`` downwards, cyclically; ``"mirror"`` (``k`` even) the
    ``k / 2`` blocks from ``draw * k / 2`` upwards, cyclically within the first ``n // 2``, each
    with its mirror ``n - 1 - i``."""
    if order == "random":
        return torch.randperm(n, generator=gen)[:k].tolist()
    if order == "ascending":
        return [(draw * k + i) % n for i in range(k)]
    if order == "descending":
        return [(n - 1 - draw * k - i) % n for i in range(k)]
    half, pairs = n // 2, k // 2  # mirror
    front = [(draw * pairs + i) % half for i in range(pairs)]
    return front + [n - 1 - i for i in front]


def _block_pools(blocks: list[Tensor]) -> tuple[list[int], list[int]]:
    """The blocks' moment pools, one per (device, dtype) among them: (index of the block whose
    state holds each pool, the first block of that kind; pool index of every block)."""
    kinds: dict[tuple[torch.device, torch.dtype], int] = {}
    owners: list[int] = []
    pool_of: list[int] = []
    for i, p in enumerate(blocks):
        kind = (p.device, p.dtype)
        if kind not in kinds:
            kinds[kind] = len(owners)
            owners.append(i)
        pool_of.append(kinds[kind])
    return owners, pool_of


def _init_block_state(
    states: list[dict[str, Any]],
    blocks: list[Tensor],
    owners: list[int],
    pool_of: list[int],
    numels: list[int],
    k: int,
    reset_statistics: bool,
) -> None:
    """Allocate the block variant's state once, at its final size (a compiled step never sees it
    change): per block its ``active`` flag, the ``offset`` of its moments in its pool and its
    AdamW ``step``; per pool (in the state of its first block) ``exp_avg_pool`` and
    ``exp_avg_sq_pool``, flat. With ``reset_statistics`` only active blocks own moments, so a
    pool holds the ``min(k, count)`` largest blocks of its kind; without it every block keeps
    its own moments at a fixed offset."""
    sizes = [0] * len(owners)
    for j in range(len(owners)):
        mine = sorted((numels[i] for i in range(len(blocks)) if pool_of[i] == j), reverse=True)
        sizes[j] = sum(mine[:k]) if reset_statistics else sum(mine)
    for j, o in enumerate(owners):
        for key in _POOL_KEYS:
            states[o][key] = torch.zeros(sizes[j], dtype=blocks[o].dtype, device=blocks[o].device)
    ends = [0] * len(owners)
    for i, st in enumerate(states):
        st["active"] = torch.tensor(0, dtype=torch.int64)
        st["offset"] = torch.tensor(0 if reset_statistics else ends[pool_of[i]], dtype=torch.int64)
        ends[pool_of[i]] += numels[i]
        st["step"] = MatrixOptimizer._new_step()


def _reselect(
    block_step: Tensor,
    block_draws: Tensor,
    rng_state: Tensor,
    active: list[Tensor],
    offset: list[Tensor],
    steps: list[Tensor],
    pools: list[Tensor],
    pool_of: list[int],
    numels: list[int],
    update_gap: int,
    k: int,
    block_order: str,
    reset_statistics: bool,
    seed: int,
) -> None:
    """The re-selection phase of a block step, in place: when ``block_step`` is a multiple of
    ``update_gap``, draw the active set, write the ``active`` flags and, with
    ``reset_statistics``, pack the active blocks' moments into their pools (``offset``, in
    block order; inactive blocks point at 0 and are never read) and zero them and their step
    counts (``pools``: exp_avg and exp_avg_sq pool of each kind, interleaved). Eager by design,
    as :func:`.projectors._rebuild`: under ``torch.compile`` it is the opaque op ``basin::frugal_reselect``."""
    t = int(block_step)
    if t % update_gap:
        return
    gen = _generator(rng_state, seed, t == 0)  # the generator of "random" starts from seed
    n = len(active)
    chosen = set(_block_selection(block_order, n, k, int(block_draws), gen))
    rng_state.copy_(gen.get_state())
    block_draws += 1
    ends = [0] * (len(pools) // 2)
    for i in range(n):
        active[i].fill_(int(i in chosen))
        if i in chosen and reset_statistics:
            j = pool_of[i]
            offset[i].fill_(ends[j])
            ends[j] += numels[i]
        elif reset_statistics:
            offset[i].zero_()
    if reset_statistics:
        for pool in pools:
            pool.zero_()
        for s in steps:
            s.zero_()


def _block_update_branch_free(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    exp_avg_pool: Tensor,
    exp_avg_sq_pool: Tensor,
    *,
    scale: float | Tensor,
    betas: tuple[float, float],
    eps: float,
    inactive_update_rule: str,
    inactive_lr_scale: float,
    maximize: bool,
) -> None:
    """One block's step under ``torch.compile``, without branching on its ``active`` flag: the
    AdamW step on its moments (gathered from the pool at its run-time ``offset``) and the
    residual step are both computed and ``torch.where`` keeps one; the moments and step count
    are written back unchanged for an inactive block (its offset may alias an active block's
    region: it rewrites what it read, after that block's update). The same arithmetic as the
    eager path (:func:`basin.optim._matrix.adamw_fallback`) up to compiler rounding."""
    beta1, beta2 = betas
    on = state["active"].to(p.device) != 0
    g = -grad if maximize else grad
    idx = state["offset"].to(p.device) + torch.arange(p.numel(), device=p.device)
    m_old = exp_avg_pool[idx].view(p.shape)
    v_old = exp_avg_sq_pool[idx].view(p.shape)
    state["step"] += state["active"].to(state["step"].dtype)
    step = state["step"]
    m = m_old.lerp(g, 1 - beta1)
    v = v_old.lerp(g.square(), 1 - beta2)
    adam = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    adam_p = p - adam * scale
    direction = _inactive_direction(g, inactive_update_rule)
    other_p = p if direction is None else p - direction * (scale * inactive_lr_scale)
    p.copy_(torch.where(on, adam_p, other_p))
    exp_avg_pool.index_copy_(0, idx, torch.where(on, m, m_old).reshape(-1))
    exp_avg_sq_pool.index_copy_(0, idx, torch.where(on, v, v_old).reshape(-1))
