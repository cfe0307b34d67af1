"""The group step of FRUGAL's block variant (``proj_type="block"``): whole projected tensors
are the blocks; every ``update_gap`` group steps some become active (:mod:`.blocks`), take
AdamW on their pooled moments, and the others take the state-free residual rule."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._base import is_compiling, scalar_lr
from .._matrix import adamw_fallback
from .blocks import (
    _POOL_KEYS,
    _block_pools,
    _block_update_branch_free,
    _init_block_state,
    _num_active,
    _reselect,
)
from .compile_ops import reselect_op
from .projectors import RNG_STATE_BYTES, _inactive_direction


def block_step(opt: Any, group: dict[str, Any], blocks: list[Tensor]) -> None:
    """One step of a parameter group of :class:`basin.optim.FRUGAL` (``opt``) with
    ``proj_type="block"``: re-select the active tensors every ``update_gap`` group steps, AdamW
    on the active ones, the residual rule on the others (see :func:`.blocks._block_pools`)."""
    state = opt.state
    owners, pool_of = _block_pools(blocks)
    head = state[blocks[0]]  # group-level counters and generator
    if "block_step" not in head:  # steps and re-selections so far; the generator is
        head["block_step"] = torch.tensor(0, dtype=torch.int64)  # seeded at the first one
        head["block_draws"] = torch.tensor(0, dtype=torch.int64)
        head["rng_state"] = torch.zeros(RNG_STATE_BYTES, dtype=torch.uint8)
    numels = [p.numel() for p in blocks]
    k = _num_active(group["density"], len(blocks))
    if "offset" not in state[blocks[-1]]:
        _init_block_state(
            [state[p] for p in blocks], blocks, owners, pool_of, numels, k,
            group["reset_statistics"],
        )  # fmt: skip
    states = [state[p] for p in blocks]
    pools = [state[blocks[o]][key] for o in owners for key in _POOL_KEYS]
    reselect = reselect_op if is_compiling() else _reselect
    reselect(
        head["block_step"], head["block_draws"], head["rng_state"],
        [st["active"] for st in states], [st["offset"] for st in states],
        [st["step"] for st in states], pools, pool_of, numels, group["update_gap"], k,
        group["block_order"], group["reset_statistics"],
        opt._seeds(group)[id(blocks[0])],
    )  # fmt: skip
    head["block_step"] += 1

    lr, wd = scalar_lr(group["lr"]), group["weight_decay"]
    scale = lr * group["proj_params_lr_scale"]
    stepped = opt._with_grad(blocks)
    if wd != 0:  # decay with the plain lr, as the projected variants
        for p in stepped:
            p.mul_(1 - lr * wd)
    index = {id(p): i for i, p in enumerate(blocks)}
    if is_compiling():
        for p in stepped:
            i = index[id(p)]
            owner = state[blocks[owners[pool_of[i]]]]
            _block_update_branch_free(
                p, p.grad, states[i], owner["exp_avg_pool"], owner["exp_avg_sq_pool"],
                scale=scale, betas=group["betas"], eps=group["eps"],
                inactive_update_rule=group["inactive_update_rule"],
                inactive_lr_scale=group["inactive_lr_scale"], maximize=group["maximize"],
            )  # fmt: skip
        return
    # eager: the active blocks' moments as views of the pools, the shared AdamW on them
    active = [p for p in stepped if int(state[p]["active"])]
    if active:
        moments: dict[str, list[Tensor]] = {key: [] for key in _POOL_KEYS}
        for p in active:
            i = index[id(p)]
            owner = state[blocks[owners[pool_of[i]]]]
            off = int(states[i]["offset"])
            for key in _POOL_KEYS:
                moments[key].append(owner[key].narrow(0, off, numels[i]).view(p.shape))
        beta1, beta2 = group["betas"]
        adamw_fallback(
            active,
            [p.grad for p in active],
            moments["exp_avg_pool"],
            moments["exp_avg_sq_pool"],
            [state[p]["step"] for p in active],
            lr=scale,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=0.0,
            maximize=group["maximize"],
            foreach=group["foreach"],
        )
    for p in stepped:
        if int(state[p]["active"]):
            continue
        g = -p.grad if group["maximize"] else p.grad
        step = _inactive_direction(g, group["inactive_update_rule"])
        if step is not None:
            p.sub_(step * (scale * group["inactive_lr_scale"]))
