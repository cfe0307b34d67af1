"""FRUGAL's projection maths: the projectors (SVD, random semi-orthogonal, random coordinates),
the rebuild phase that refreshes them, the maps into and out of the kept subspace, and the
state-free rule of the residual. Pure functions over tensors; no optimizer state layout."""

from __future__ import annotations

import torch
from torch import Tensor

RNG_STATE_BYTES = torch.Generator().get_state().numel()


def _generator(rng_state: Tensor, seed: int, first: bool) -> torch.Generator:
    """The CPU generator of a random draw: seeded with ``seed`` at the first draw, else restored
    from ``rng_state`` (the caller writes ``get_state()`` back after drawing)."""
    gen = torch.Generator()
    if first:
        gen.manual_seed(seed)
    else:
        gen.set_state(rng_state.cpu())
    return gen


def _inactive_direction(residual: Tensor, rule: str) -> Tensor | None:
    """The state-free step direction of the residual: its sign, itself, or none."""
    if rule == "no":
        return None
    return residual.sign() if rule == "sign_sgd" else residual


def _side(shape: tuple[int, int], proj_side: str) -> str:
    if proj_side == "std":
        return "right" if shape[0] >= shape[1] else "left"
    return proj_side


def _canonical_signs(Q: Tensor) -> Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    pivot = Q.gather(0, Q.abs().argmax(dim=0, keepdim=True))
    return Q * torch.where(pivot < 0, -1.0, 1.0).to(Q.dtype)


def _build_projector(
    G: Tensor,
    side: str,
    rank: int,
    proj_type: str,
    rng_state: Tensor | None,
    seed: int,
    first: bool,
) -> Tensor:
    """Orthonormal columns spanning the kept subspace of the projected side (dim x r), or the
    kept indices for randperm. ``G`` is 2-D in a dtype torch.linalg supports. The random ones
    draw from a generator seeded with ``seed`` at the first build, else restored from
    ``rng_state``, whose new state is written back into ``rng_state``."""
    dim = G.size(1) if side == "right" else G.size(0)
    if proj_type == "svd":
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        Q = Vh[:rank].mT if side == "right" else U[:, :rank]
        return _canonical_signs(Q)
    assert rng_state is not None
    gen = _generator(rng_state, seed, first)
    if proj_type == "random":
        gauss = torch.randn(dim, rank, generator=gen, dtype=torch.float64)
        Q, R = torch.linalg.qr(gauss)
        Q = Q * torch.sign(torch.diagonal(R))
        out = Q.to(device=G.device, dtype=G.dtype)
    else:  # randperm
        out = torch.randperm(dim, generator=gen)[:rank].to(G.device)
    rng_state.copy_(gen.get_state())
    return out


def _rebuild(
    G: Tensor,
    global_step: Tensor,
    proj: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    rng_state: Tensor | None,
    update_gap: int,
    proj_type: str,
    side: str,
    seed: int,
    reset_statistics: bool,
) -> None:
    """The rebuild phase of one step, in place: when ``global_step`` (the number of steps taken
    so far) is a multiple of ``update_gap``, overwrite ``proj`` with a new projector and, with
    ``reset_statistics`` or at the first build, zero the moments and their step count; else
    nothing. Python control flow on a CPU counter, eager by design: under ``torch.compile`` it
    runs as the opaque custom op ``basin::frugal_rebuild`` (see :mod:`.compile_ops`)."""
    t = int(global_step)
    if t % update_gap:
        return
    rank = proj.numel() if proj.dtype == torch.int64 else proj.size(1)
    proj.copy_(_build_projector(G, side, rank, proj_type, rng_state, seed, t == 0))
    if reset_statistics or t == 0:
        step.zero_()
        exp_avg.zero_()
        exp_avg_sq.zero_()


def _projected_shapes(
    shape: tuple[int, int], side: str, density: float, proj_type: str
) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(projector shape, moment shape) of a projected ``shape`` matrix."""
    dim = shape[1] if side == "right" else shape[0]
    rank = max(1, round(density * dim))
    if proj_type == "svd":  # at most min(m, n) singular vectors exist
        rank = min(rank, *shape)
    proj = (rank,) if proj_type == "randperm" else (dim, rank)
    return proj, ((shape[0], rank) if side == "right" else (rank, shape[1]))


def _down(G: Tensor, proj: Tensor, side: str) -> Tensor:
    if proj.dtype == torch.int64:
        return G[:, proj] if side == "right" else G[proj]
    return G @ proj if side == "right" else proj.mT @ G


def _up(low: Tensor, proj: Tensor, side: str, shape: tuple[int, int]) -> Tensor:
    if proj.dtype == torch.int64:
        out = low.new_zeros(shape)
        if side == "right":
            out[:, proj] = low
        else:
            out[proj] = low
        return out
    return low @ proj.mT if side == "right" else proj @ low
