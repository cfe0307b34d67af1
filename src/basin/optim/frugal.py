"""FRUGAL: AdamW on a low-dimensional projection of the gradient, state-free signSGD on the rest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    check_bool,
    check_nonnegative,
    check_range,
    get_value,
    is_compiling,
    scalar_lr,
)
from ._matrix import (
    MatrixOptimizer,
    adamw_fallback,
    as_matrix,
    check_fallback,
    check_int,
    compute_dtype,
    from_matrix,
    matrix_shape,
)
from .param_groups import matrix_groups
from .registry import ADAM_SPACE, OptimInfo, Paper, register

__all__ = ["FRUGAL", "frugal"]

_PROJ_TYPES = ("svd", "random", "randperm", "block")
_INACTIVE_RULES = ("sign_sgd", "sgd", "no")
_PROJ_SIDES = ("std", "left", "right")
_BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
_RNG_STATE_BYTES = torch.Generator().get_state().numel()


class FRUGAL(MatrixOptimizer):
    r"""FRUGAL (Zmushko et al., 2024): gradient splitting. For each weight matrix the gradient
    ``G`` is split by an orthogonal projector ``Q Q^T`` into a state-full part, updated by AdamW in
    the ``r``-dimensional coordinates ``Q^T G`` (``r = round(density * dim)``), and the residual
    ``G - Q Q^T G``, updated by a state-free rule (signSGD by default).

    Per projected matrix (``Q`` acts on the smaller side by default: ``G Q`` when
    ``rows >= cols`` ("right"), else ``Q^T G`` ("left"))::

        every update_gap steps (first step included): rebuild Q from the current G, and with
            reset_statistics zero the AdamW moments and restart their step count
        W  <- W (1 - lr wd)
        g_low = Q^T G                             (r x n, or m x r on the right)
        u  = AdamW direction of g_low (bias-corrected m / (sqrt(v) + eps))
        W  <- W - lr proj_params_lr_scale Q u
        R  = G - Q g_low
        W  <- W - lr proj_params_lr_scale inactive_lr_scale sign(R)   (sign_sgd; R for sgd;
                                                                      nothing for "no")

    ``G`` is the gradient as ``(out, in)``: in groups with ``transposed=True`` (weights stored
    ``(in, out)``, e.g. HF's GPT-2 ``Conv1D``; detected by :func:`basin.optim.matrix_param_groups`)
    the side, the projector and the moments are those of the transposed weight, so such a layer
    gets the update of the same ``nn.Linear``, transposed (the block variant is elementwise per
    tensor: orientation does not matter there).

    Projectors (``proj_type``): ``"svd"`` top-``r`` singular vectors of ``G``; ``"random"`` a
    random semi-orthogonal matrix (QR of a Gaussian, R with positive diagonal); ``"randperm"``
    ``r`` random columns (rows) of the identity, stored as an index vector. Randomness comes from
    a per-parameter ``torch.Generator`` seeded with ``seed + index of the parameter`` (in
    param-group order), whose state is kept in the optimizer state, so runs are deterministic
    and a ``state_dict`` round trip continues identically.

    Block variant (``proj_type="block"``, the paper's BlockAdamW state-full part): whole
    projected tensors are the blocks. Every ``update_gap`` steps of a parameter group (first step
    included), ``k = max(1, round(density * n))`` of its ``n`` projected tensors (in parameter
    order) become active, chosen by ``block_order`` (the authors' four orders; re-selection
    number ``j = 0, 1, ...``):

    * ``"random"`` (default): the first ``k`` of ``randperm(n)`` from a generator seeded with
      ``seed + index of the group's first projected parameter`` (its state is kept in that
      parameter's state as ``"rng_state"``);
    * ``"ascending"``: blocks ``jk, jk + 1, ..., jk + k - 1`` (mod ``n``), i.e. sweeping from
      the first tensor upwards, cyclically;
    * ``"descending"``: blocks ``n - 1 - jk, ..., n - jk - k`` (mod ``n``), sweeping from the
      last tensor (nearest the output) downwards, as BAdam (Luo et al., arXiv:2404.02827);
    * ``"mirror"``: ``k / 2`` blocks ``i`` from ``jk/2`` upwards (mod ``n // 2``), each with
      its mirror ``n - 1 - i``; ``k`` must be even (``ValueError`` naming ``block_order``
      otherwise) and, for odd ``n``, the middle tensor is never active (as in the reference).

    The count ``j`` is kept in the first parameter's state (``"block_draws"``), so a
    ``state_dict`` round trip continues the cycle. Each block's ``"active"`` flag is in its
    state. Active blocks take the AdamW step (:func:`basin.optim._matrix.adamw_fallback`,
    scaled by ``proj_params_lr_scale``); inactive ones take the residual rule on their whole
    gradient. With ``reset_statistics`` a block's moments are zeroed (step count restarted)
    when it becomes active and are not kept when it leaves; without it, a block keeps (frozen)
    moments while inactive and continues them when chosen again. ``proj_side`` is ignored.

    Block state layout (fixed in size, so that a compiled step never sees it change): the
    moments live in flat pools, one per (device, dtype) of the group's blocks, held in the
    state of the first block of that kind (``"exp_avg_pool"``, ``"exp_avg_sq_pool"``); each
    block has an ``"offset"`` into its pool and its own ``"step"``. With ``reset_statistics``
    a pool holds the ``k`` largest blocks of its kind, and each re-selection packs the active
    blocks into it in parameter order; without it every block has a fixed region (the whole
    size of its kind).

    Routing (shared by the matrix optimizers, :mod:`basin.optim._matrix`): a parameter group's
    ``matrix_rule`` decides who is projected: ``None`` (default) projects every 2-D parameter;
    ``True`` projects (ndim > 2 viewed as ``(size(0), -1)``; an ``ndim < 2`` parameter raises
    ``ValueError`` naming it); ``False`` gives full AdamW
    (:func:`basin.optim._matrix.adamw_fallback`, with the group's ``lr``, ``betas``, ``eps``,
    ``weight_decay``). The paper projects the attention/MLP linear layers and trains
    embeddings, norms and the output head with AdamW: :func:`basin.optim.matrix_param_groups`
    builds those two groups.

    Memory of a projected ``m x n`` matrix: ``2 r x (other side)`` floats of AdamW state, i.e.
    ``2 * density`` times the parameter (0.5 at the default), plus the projector (``r * dim``
    floats for svd/random, ``r`` indices for randperm). Block variant with
    ``reset_statistics``: ``2 x (sum of the k largest blocks)`` floats per group (per kind),
    the most any selection can need: ``2 * density`` of the blocks when they are equal-sized,
    more when they are not (e.g. 0.67 of a GPT-like stack of qkv/proj/fc1/fc2 at density 0.25,
    whose selections need 0.5 on average); without ``reset_statistics``, twice all blocks.

    ``torch.compile(opt.step, fullgraph=True)``: the projected variants (svd, random,
    randperm) compile with no graph break and no recompile across rebuilds. Their state is
    allocated once at its final size; each step is a rebuild phase, :func:`_rebuild`, eager
    Python (a branch on the CPU step counter, the SVD or seeded draw, in-place overwrite of
    projector, moments and generator state), then branch-free per-step math. Under compile the
    rebuild phase is the opaque custom op ``basin::frugal_rebuild`` (``torch.library``, with its
    in-place mutations declared): one extern call in the graph that decides at run time, while
    Inductor compiles the rest. Eager and compiled steps run the same rebuild code. The block
    variant compiles the same way: its re-selection (the draw, the ``active`` flags, the
    offsets, zeroing the pools) is the opaque op ``basin::frugal_reselect``, and under
    compile each block's step gathers its moments from the pool at its run-time offset,
    computes both the AdamW and the residual step and keeps one with ``torch.where`` on its
    flag (:func:`_block_update_branch_free`: the inactive blocks' AdamW is wasted work);
    eagerly only the active blocks' AdamW runs, on views of the pool. So the compiled block
    step does more work than the eager one: on CPU it was about 5x slower (22 vs 4 ms, 24
    float32 blocks of a d=128 GPT-like stack, one thread; Inductor's gathers at a run-time
    offset are scalar loops); prefer the eager step there.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: AdamW coefficients (default (0.9, 0.999)).
        eps: AdamW's epsilon (default 1e-8).
        weight_decay: decoupled weight decay, on every parameter (default 0.01, as the authors'
            AdamW).
        density: fraction of the projected side kept in the state-full subspace (for
            ``"block"``: fraction of the group's projected tensors), in (0, 1] (default 0.25).
        update_gap: steps between projector rebuilds / block re-selections (default 200).
        proj_type: ``"svd"`` | ``"random"`` | ``"randperm"`` | ``"block"`` (whole tensors,
            see above) (default ``"svd"``).
        proj_side: ``"std"`` (smaller side, default) | ``"left"`` | ``"right"``.
        inactive_update_rule: ``"sign_sgd"`` | ``"sgd"`` | ``"no"`` (default ``"sign_sgd"``).
        inactive_lr_scale: scale of the residual step (default 1.0).
        proj_params_lr_scale: scale of all steps of projected matrices (default 1.0).
        reset_statistics: zero the AdamW state at every rebuild (default True).
        block_order: ``"random"`` | ``"ascending"`` | ``"descending"`` | ``"mirror"``, the order
            in which ``proj_type="block"`` activates tensors (see above; ignored by the other
            projectors) (default ``"random"``).
        seed: base seed of the random projectors (default 0).
        maximize: maximize the objective (default False).
        foreach: multi-tensor AdamW for non-projected parameters (None picks per device);
            projected matrices are a per-tensor loop.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).

    References:
        Philip Zmushko, Aleksandr Beznosikov, Martin Takáč, Samuel Horváth. "FRUGAL:
        Memory-Efficient Optimization by Reducing State Overhead for Scalable Training."
        arXiv:2411.07837, 2024 (ICML 2025). Reference code: github.com/fzmushko/FRUGAL
        (frugal/proj_optimizer_templates.py, galore_projector.py, adamw.py).

    Differences from the reference code:
        * SVD projectors get a canonical column sign (largest-magnitude entry positive) and
          random ones a positive-diagonal R, so that with ``reset_statistics=False`` (state kept
          across rebuilds, in the new basis' coordinates, as in the reference) the trajectory
          does not depend on the LAPACK build's sign choices.
        * The SVD runs in the parameter's dtype for float64 (the reference converts every
          non-float32 gradient to float32 first); float16/bfloat16 use float32 in both.
        * Random projectors draw from a per-parameter seeded generator (the reference uses the
          global RNG), and ``randperm`` stores indices instead of a 0/1 matrix.
        * The rebuild schedule is per parameter (the reference reads the first parameter of the
          group); the same for parameters that are stepped together.
        * When the kept subspace is the whole side (``r = dim``, e.g. ``density=1``) the residual
          is zero by definition and is skipped; the reference steps ``sign`` of its rounding noise
          (full ``±lr`` steps). With ``"svd"`` and ``r >= rank(G)`` the residual is rounding noise
          in both, and sign_sgd amplifies it to ``±lr``: prefer ``inactive_update_rule="sgd"``.
        * Block variant (reference: ``BlockOptimizer``/``BlockAdamW``, the same
          ``randperm(n)[:k]`` draw per group every ``update_gap`` steps for ``"random"``, and a
          cursor ``next_block_start`` in the group for the fixed orders, whose sets equal the
          closed forms above): the random draw comes from a seeded generator kept in the state
          (the reference uses the global RNG); ``k >= 1`` (the reference allows ``k = 0``); the
          reference always clears a block's moments at re-selection, whatever
          ``reset_statistics``, while here ``reset_statistics=False`` keeps them (frozen while
          inactive); ``"mirror"`` with odd ``k`` raises ``ValueError`` (an ``assert`` there).
          The coordinate variant's column/row choice equals ``proj_type="randperm"``.
        * ``r = max(1, round(density * dim))`` (the reference allows ``r = 0``); for ``"svd"`` at
          most ``min(m, n)`` (the reference truncates silently the same way).
    """

    _algo = "FRUGAL"
    _companion = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        density: float = 0.25,
        update_gap: int = 200,
        proj_type: str = "svd",
        proj_side: str = "std",
        inactive_update_rule: str = "sign_sgd",
        inactive_lr_scale: float = 1.0,
        proj_params_lr_scale: float = 1.0,
        reset_statistics: bool = True,
        *,
        block_order: str = "random",
        seed: int = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            update_gap=update_gap,
            proj_type=proj_type,
            proj_side=proj_side,
            inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale,
            proj_params_lr_scale=proj_params_lr_scale,
            reset_statistics=reset_statistics,
            block_order=block_order,
            seed=seed,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults, None)

    def _takes(self, p: Tensor, group: dict[str, Any]) -> bool:
        return p.ndim == 2

    def _check_hparams(self, group: dict[str, Any]) -> None:
        _check_hparams(group)

    def _check_params(self, group: dict[str, Any], gi: int) -> None:
        if group["proj_type"] != "block" or group["block_order"] != "mirror":
            return
        n = len(self._split(group)[0])
        k = _num_active(group["density"], n) if n else 0
        if n and k % 2:
            raise ValueError(
                f"param group {gi}: block_order='mirror' activates blocks in mirrored pairs "
                f"(i, n - 1 - i) and needs an even number k = max(1, round(density * n)) of "
                f"active blocks, got k={k} for n={n} projected tensors and "
                f"density={group['density']}; choose another density or another block_order "
                f"({', '.join(_BLOCK_ORDERS)})"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every state tensor to the parameter's dtype on load; restore the integral
        # ones (randperm indices, step count) and the generator state as saved
        integral = {
            pid: {
                k: v for k, v in st.items() if isinstance(v, Tensor) and not v.is_floating_point()
            }
            for pid, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for k, v in integral.get(pid, {}).items():
                self.state[p][k] = v.clone().cpu() if k == "rng_state" else v.to(p.device)

    def _seeds(self, group: dict[str, Any]) -> dict[int, int]:
        """Generator seed of each parameter of ``group`` (by id): ``seed`` plus the parameter's
        index in param-group order. One pass per group step, not one scan per parameter."""
        start = 0
        for g in self.param_groups:
            if g is group:
                break
            start += len(g["params"])
        return {id(q): group["seed"] + start + i for i, q in enumerate(group["params"])}

    def _matrix_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if group["proj_type"] == "block":
            self._block_step(group, params)
            return
        seeds = self._seeds(group)
        for p in self._with_grad(params):
            state = self.state[p]
            if len(state) == 0:
                init_frugal_state(
                    p, state, group["density"], group["proj_type"], group["proj_side"],
                    group["transposed"],
                )  # fmt: skip
            frugal(
                p,
                p.grad,
                state,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                update_gap=group["update_gap"],
                proj_type=group["proj_type"],
                proj_side=group["proj_side"],
                inactive_update_rule=group["inactive_update_rule"],
                inactive_lr_scale=group["inactive_lr_scale"],
                proj_params_lr_scale=group["proj_params_lr_scale"],
                reset_statistics=group["reset_statistics"],
                seed=seeds[id(p)],
                maximize=group["maximize"],
                transposed=group["transposed"],
            )

    def _block_step(self, group: dict[str, Any], blocks: list[Tensor]) -> None:
        """Block variant: re-select the active tensors every ``update_gap`` group steps, AdamW on
        the active ones, the residual rule on the others (see :func:`_block_pools`)."""
        owners, pool_of = _block_pools(blocks)
        head = self.state[blocks[0]]  # group-level counters and generator
        if "block_step" not in head:  # steps and re-selections so far; the generator is
            head["block_step"] = torch.tensor(0, dtype=torch.int64)  # seeded at the first one
            head["block_draws"] = torch.tensor(0, dtype=torch.int64)
            head["rng_state"] = torch.zeros(_RNG_STATE_BYTES, dtype=torch.uint8)
        numels = [p.numel() for p in blocks]
        k = _num_active(group["density"], len(blocks))
        if "offset" not in self.state[blocks[-1]]:
            if any("exp_avg" in self.state[p] for p in blocks):
                raise ValueError(
                    "this FRUGAL proj_type='block' state has per-block moments (saved before "
                    "the pooled layout): it cannot be continued; start the optimizer afresh"
                )
            _init_block_state(
                [self.state[p] for p in blocks], blocks, owners, pool_of, numels, k,
                group["reset_statistics"],
            )  # fmt: skip
        states = [self.state[p] for p in blocks]
        pools = [self.state[blocks[o]][key] for o in owners for key in _POOL_KEYS]
        reselect = _reselect_op if is_compiling() else _reselect
        reselect(
            head["block_step"], head["block_draws"], head["rng_state"],
            [st["active"] for st in states], [st["offset"] for st in states],
            [st["step"] for st in states], pools, pool_of, numels, group["update_gap"], k,
            group["block_order"], group["reset_statistics"],
            self._seeds(group)[id(blocks[0])],
        )  # fmt: skip
        head["block_step"] += 1

        lr, wd = scalar_lr(group["lr"]), group["weight_decay"]
        scale = lr * group["proj_params_lr_scale"]
        stepped = self._with_grad(blocks)
        if wd != 0:  # decay with the plain lr, as the projected variants
            for p in stepped:
                p.mul_(1 - lr * wd)
        index = {id(p): i for i, p in enumerate(blocks)}
        if is_compiling():
            for p in stepped:
                i = index[id(p)]
                owner = self.state[blocks[owners[pool_of[i]]]]
                _block_update_branch_free(
                    p, p.grad, states[i], owner["exp_avg_pool"], owner["exp_avg_sq_pool"],
                    scale=scale, betas=group["betas"], eps=group["eps"],
                    inactive_update_rule=group["inactive_update_rule"],
                    inactive_lr_scale=group["inactive_lr_scale"], maximize=group["maximize"],
                )  # fmt: skip
            return
        # eager: the active blocks' moments as views of the pools, the shared AdamW on them
        active = [p for p in stepped if int(self.state[p]["active"])]
        if active:
            moments = {key: [] for key in _POOL_KEYS}
            for p in active:
                i = index[id(p)]
                owner = self.state[blocks[owners[pool_of[i]]]]
                off = int(states[i]["offset"])
                for key in _POOL_KEYS:
                    moments[key].append(owner[key].narrow(0, off, numels[i]).view(p.shape))
            beta1, beta2 = group["betas"]
            adamw_fallback(
                active,
                [p.grad for p in active],
                moments["exp_avg_pool"],
                moments["exp_avg_sq_pool"],
                [self.state[p]["step"] for p in active],
                lr=scale,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=0.0,
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
        for p in stepped:
            if int(self.state[p]["active"]):
                continue
            g = -p.grad if group["maximize"] else p.grad
            step = _inactive_direction(g, group["inactive_update_rule"])
            if step is not None:
                p.sub_(step * (scale * group["inactive_lr_scale"]))


_POOL_KEYS = ("exp_avg_pool", "exp_avg_sq_pool")


def _block_pools(blocks: list[Tensor]) -> tuple[list[int], list[int]]:
    """The blocks' moment pools, one per (device, dtype) among them: (index of the block whose
    state holds each pool, the first block of that kind; pool index of every block)."""
    kinds: dict[tuple[torch.device, torch.dtype], int] = {}
    owners, pool_of = [], []
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


def _generator(rng_state: Tensor, seed: int, first: bool) -> torch.Generator:
    """The CPU generator of a random draw: seeded with ``seed`` at the first draw, else restored
    from ``rng_state`` (the caller writes ``get_state()`` back after drawing)."""
    gen = torch.Generator()
    if first:
        gen.manual_seed(seed)
    else:
        gen.set_state(rng_state.cpu())
    return gen


def _opaque_op(name: str, fn: Any, mutates_args: tuple[str, ...]) -> Any:
    """``fn`` (in place, returns None) as the custom op ``basin::<name>``: one extern call in a
    compiled graph, so no graph break and no recompile; its Python control flow reads the
    counters at run time, eagerly. Eager steps call ``fn`` itself."""
    op = torch.library.custom_op(f"basin::{name}", fn, mutates_args=mutates_args)
    op.register_fake(lambda *args: None)
    return op


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
    as :func:`_rebuild`: under ``torch.compile`` it is the opaque op ``basin::frugal_reselect``."""
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


_reselect_op = _opaque_op(
    "frugal_reselect",
    _reselect,
    ("block_draws", "rng_state", "active", "offset", "steps", "pools"),
)


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


def _inactive_direction(residual: Tensor, rule: str) -> Tensor | None:
    """The state-free step direction of the residual: its sign, itself, or none."""
    if rule == "no":
        return None
    return residual.sign() if rule == "sign_sgd" else residual


def _check_hparams(group: dict[str, Any]) -> None:
    check_fallback(group)  # lr, betas, eps, weight_decay: shared with the AdamW fallback
    check_range("density", group["density"], 0.0, 1.0, low_inclusive=False)
    check_nonnegative("inactive_lr_scale", group["inactive_lr_scale"])
    check_nonnegative("proj_params_lr_scale", group["proj_params_lr_scale"])
    check_bool("reset_statistics", group["reset_statistics"])
    for name, low in (("update_gap", 1), ("seed", 0)):
        check_int(name, group[name], low)
    for name, allowed in (
        ("proj_type", _PROJ_TYPES),
        ("proj_side", _PROJ_SIDES),
        ("inactive_update_rule", _INACTIVE_RULES),
        ("block_order", _BLOCK_ORDERS),
    ):
        if group[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {group[name]!r}")


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
    runs as the opaque custom op ``basin::frugal_rebuild`` (see :func:`frugal`)."""
    t = int(global_step)
    if t % update_gap:
        return
    rank = proj.numel() if proj.dtype == torch.int64 else proj.size(1)
    proj.copy_(_build_projector(G, side, rank, proj_type, rng_state, seed, t == 0))
    if reset_statistics or t == 0:
        step.zero_()
        exp_avg.zero_()
        exp_avg_sq.zero_()


_rebuild_op = _opaque_op(
    "frugal_rebuild", _rebuild, ("proj", "exp_avg", "exp_avg_sq", "step", "rng_state")
)


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
        state["rng_state"] = torch.zeros(_RNG_STATE_BYTES, dtype=torch.uint8)


def frugal(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float | Tensor,
    betas: tuple[float, float],
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
    beta1, beta2 = betas
    g = -grad if maximize else grad
    cd = compute_dtype(p.dtype)
    shape = matrix_shape(p, transposed)
    G = as_matrix(g, transposed).to(cd)
    side = _side(shape, proj_side)

    # rebuild phase (eager; one opaque op when compiled), then branch-free per-step math
    rebuild = _rebuild_op if is_compiling() else _rebuild
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
    if inactive_update_rule != "no" and not full_rank:
        residual = _inactive_direction(G - _up(low, proj, side, shape), inactive_update_rule)
        update = update + residual * (scale * inactive_lr_scale)
    p.sub_(from_matrix(update, p.shape, transposed).to(p.dtype))


register(
    OptimInfo(
        name="frugal",
        cls=FRUGAL,
        paper=Paper(
            "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable "
            "Training",
            "Zmushko et al.",
            "2411.07837",
            2024,
        ),
        state_memory=0.5,
        capabilities=frozenset({"maximize", "param_groups", "closure", "matrix", "fallback"}),
        state_note="projected matrices: 2*density (0.5) + the projector; other params: AdamW, 2",
        family="matrix",
        search_space=ADAM_SPACE,
        param_groups=matrix_groups,
    )
)
