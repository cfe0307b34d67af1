"""The :class:`FRUGAL` optimizer: hyperparameters, routing of its parameter groups to the
projected step (:mod:`.step`) or the block variant (:mod:`.block_step`), and its registry entry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .._base import (
    check_adam_hparams,
    check_bool,
    check_int,
    check_nonnegative,
    check_range,
    grad_of,
)
from .._matrix import MatrixOptimizer
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
    r"""FRUGAL (Zmushko et al., 2024, arXiv:2411.07837): gradient splitting. Each weight matrix's
    gradient ``G`` (as ``(out, in)``) is split by an orthogonal projector ``Q Q^T`` into a
    state-full part, stepped by AdamW in the ``r``-dimensional coordinates
    (``r = max(1, round(density * dim))``, on the smaller side by default), and the residual,
    stepped by a state-free rule (signSGD by default)::

        every update_gap steps (first included): rebuild Q from G (zero moments if reset_statistics)
        W <- W (1 - lr wd);  g_low = Q^T G  (G Q on the right);  u = AdamW direction of g_low
        W <- W - lr proj_params_lr_scale (Q u + inactive_lr_scale rule(G - Q g_low))

    with ``rule`` = ``sign`` (sign_sgd), identity (sgd) or zero (no). ``proj_type="block"``
    (the paper's BlockAdamW) instead gives AdamW to ``max(1, round(density * n))`` of a group's
    ``n`` projected tensors at a time, in ``block_order``, and the residual rule to the others.
    ``matrix_rule`` ``None`` (default) projects every 2-D parameter, ``True`` forces it,
    ``False`` gives AdamW (:func:`basin.optim.matrix_param_groups` builds the paper's split).
    Seeded per parameter; compiles without graph breaks (block variant: slower than eager on CPU).

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: AdamW coefficients (default (0.9, 0.999)).
        eps: AdamW's epsilon (default 1e-8).
        weight_decay: decoupled weight decay, on every parameter (default 0.01).
        density: kept fraction of the projected side (for ``"block"``: of the group's projected
            tensors), in (0, 1] (default 0.25).
        update_gap: steps between projector rebuilds / block re-selections (default 200).
        proj_type: ``"svd"`` | ``"random"`` | ``"randperm"`` | ``"block"`` (default ``"svd"``).
        proj_side: ``"std"`` (smaller side, default) | ``"left"`` | ``"right"``; ignored by
            ``"block"``.
        inactive_update_rule: ``"sign_sgd"`` | ``"sgd"`` | ``"no"`` (default ``"sign_sgd"``).
        inactive_lr_scale: scale of the residual step (default 1.0).
        proj_params_lr_scale: scale of all steps of projected matrices (default 1.0).
        reset_statistics: zero the AdamW state at every rebuild (default True).
        block_order: ``"random"`` | ``"ascending"`` | ``"descending"`` | ``"mirror"`` (needs an
            even count) for ``"block"`` (default ``"random"``).
        seed: base seed of the random projectors and block draws (default 0).
        maximize: maximize the objective (default False).
        foreach: multi-tensor AdamW for non-projected parameters (None picks per device);
            projected matrices are a per-tensor loop.
        fused: True runs the AdamW fallback's step as one compiled kernel over flat state
            buffers (:mod:`basin.optim._fused`; the first step compiles it); the matrix rule
            is unchanged. None (default) and False use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; nothing changes (eager steps).

    Differences from the reference code (github.com/fzmushko/FRUGAL):
        * Canonical signs for SVD/random projectors (no dependence on LAPACK's sign choices).
        * float64 SVD for float64 parameters (the reference converts to float32).
        * Per-parameter seeded generators (the reference: global RNG); randperm stores indices.
        * The rebuild schedule is per parameter (the reference reads the group's first one).
        * At ``r = dim`` the residual is skipped (the reference steps the sign of rounding noise).
        * Block variant: seeded draws, ``k >= 1``, ``reset_statistics=False`` keeps moments,
          ``"mirror"`` with odd ``k`` raises ``ValueError``.
        * ``r >= 1`` (the reference allows ``r = 0``).

    Provenance and details: docs/optimizers.md#frugal.
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
        fused: bool | None = None,
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
            fused=fused,
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
        hp = self._hyperparameters(group, exclude=("density", "block_order", "foreach"))
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
                **{**hp, "seed": seeds[id(p)]},  # the parameter's own generator seed
            )


def check_group_hparams(group: dict[str, Any]) -> None:
    check_adam_hparams(group)  # lr, betas, eps, weight_decay: shared with the AdamW fallback
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
        capabilities=frozenset(
            {"maximize", "param_groups", "closure", "matrix", "fallback", "fused"}
        ),
        state_note="projected matrices: 2*density (0.5) + the projector; other params: AdamW, 2",
        family="matrix",
        search_space=ADAM_SPACE,
        param_groups=matrix_groups,
    )
)
