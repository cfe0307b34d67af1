"""The :class:`FRUGAL` optimizer: hyperparameters, routing of its parameter groups to the
projected step (:mod:`.step`) or the block variant (:mod:`.block_step`), and its registry entry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .._base import check_bool, check_int, check_nonnegative, check_range, grad_of
from .._matrix import MatrixOptimizer, check_fallback
from ..param_groups import matrix_groups
from ..registry import ADAM_SPACE, OptimInfo, Paper, register
from .block_step import block_step
from .blocks import _num_active
from .step import frugal, init_frugal_state

__all__ = ["FRUGAL"]

_PROJ_TYPES = ("svd", "random", "randperm", "block")
_INACTIVE_RULES = ("sign_sgd", "sgd", "no")
_PROJ_SIDES = ("std", "left", "right")
_BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")


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
    allocated once at its final size; each step is a rebuild phase
    (:func:`.projectors._rebuild`), eager Python (a branch on the CPU step counter, the SVD or
    seeded draw, in-place overwrite of projector, moments and generator state), then
    branch-free per-step math. Under compile the
    rebuild phase is the opaque custom op ``basin::frugal_rebuild`` (``torch.library``, with its
    in-place mutations declared): one extern call in the graph that decides at run time, while
    Inductor compiles the rest. Eager and compiled steps run the same rebuild code. The block
    variant compiles the same way: its re-selection (the draw, the ``active`` flags, the
    offsets, zeroing the pools) is the opaque op ``basin::frugal_reselect``, and under
    compile each block's step gathers its moments from the pool at its run-time offset,
    computes both the AdamW and the residual step and keeps one with ``torch.where`` on its
    flag (:func:`.blocks._block_update_branch_free`: the inactive blocks' AdamW is wasted
    work); eagerly only the active blocks' AdamW runs, on views of the pool. So the compiled block
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
    _separate_fallback_group = False

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

    def _uses_matrix_rule(self, p: Tensor, group: dict[str, Any]) -> bool:
        return p.ndim == 2

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_group_hparams(group)

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

    def _needs_snapshot(self) -> bool:
        """A projector is built this step (first step, or every ``update_gap``): SVD / QR."""
        for group in self.param_groups:
            if group["proj_type"] == "block":
                continue  # re-selection draws indices: nothing to fail
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if not st:
                    return True
                if "global_step" in st and int(st["global_step"]) % group["update_gap"] == 0:
                    return True
        return False

    def _matrix_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if group["proj_type"] == "block":
            block_step(self, group, params)
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
                grad_of(p),
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


def check_group_hparams(group: dict[str, Any]) -> None:
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
