"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_betas,
    check_bool,
    check_grad,
    check_int,
    check_lr,
    check_nonnegative,
    check_range,
    get_value,
    grad_of,
    scalar_lr,
)
from .param_groups import decay_groups
from .registry import ADAM_SPACE, OptimInfo, Paper, register

__all__ = ["SOAP", "soap"]


class SOAP(BasinOptimizer):
    r"""SOAP (Vyas et al., ICLR 2025, arXiv:2409.11321): Shampoo's left and right preconditioner
    factors supply an eigenbasis, and Adam runs in it. Per tensor (a matrix ``G`` of shape
    m x n here; every dimension of a higher-order tensor gets its own factor)::

        L = b_s L + (1 - b_s) G G^T,   R = b_s R + (1 - b_s) G^T G   (b_s = shampoo_beta)
        Q_L, Q_R: eigenvectors of L, R (eigh at the first gradient; then every
                  precondition_frequency steps one power-iteration step and QR: Q <- qr(L Q))
        G' = Q_L^T G Q_R
        m = b1 m + (1-b1) G',  v = b2 v + (1-b2) G'^2       (both in the eigenbasis)
        p <- p - lr sqrt(1-b2^t)/(1-b1^t) * Q_L (m / (sqrt(v) + eps)) Q_R^T
        p <- p - lr wd p                                      (decoupled, after the step)

    As in the authors' code: the first gradient of each tensor only seeds L, R and their
    eigenbases (no parameter update, no decay); L and R are updated after the step with the
    current gradient, so a step never projects with its own gradient; at a refresh the
    eigenvalue estimates ``diag(Q^T L Q)`` reorder the columns of Q (and ``v`` with them), and
    ``m`` is rotated into the new basis. A dimension above ``max_precond_dim`` is not rotated
    (identity); 1-D tensors are plain Adam unless ``precondition_1d``. ``merge_dims`` first
    merges consecutive dimensions while their product stays within ``max_precond_dim``.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 3e-3).
        betas: Adam's coefficients in the eigenbasis (default (0.95, 0.95)).
        shampoo_beta: EMA coefficient of L and R; negative means ``betas[1]`` (default -1).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay, applied after the step (default 0.01).
        precondition_frequency: steps between eigenbasis refreshes (default 10).
        max_precond_dim: largest dimension that gets a preconditioner factor (default 10000).
        merge_dims: merge dimensions before preconditioning (default False).
        precondition_1d: precondition 1-D tensors too (default False).
        normalize_grads: divide each tensor's update by its RMS (default False).
        correct_bias: Adam's bias correction (default True).
        maximize: maximize the objective (default False).
        foreach: accepted for API compatibility; the per-tensor eigenbasis work runs as a loop.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (see :class:`basin.optim._base.BasinOptimizer`).

    Differences from the reference code (github.com/nikhilvyas/SOAP):
        * L, R and Q in float64 for float64 parameters, float32 otherwise (bfloat16/float16 work).
        * No ``data_format="channels_last"``; adds ``maximize``, ``nonfinite``, tensor ``lr``.
        * The step is eager (no ``torch.compile``).

    Provenance and details: docs/optimizers.md#soap.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        correct_bias: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            correct_bias=correct_bias,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        sb = group["shampoo_beta"]
        if not (isinstance(sb, (int, float)) and not isinstance(sb, bool) and sb < 0):
            check_range("shampoo_beta", sb, 0.0, 1.0, high_inclusive=False)
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_int("precondition_frequency", group["precondition_frequency"], 1)
        check_int("max_precond_dim", group["max_precond_dim"], 1)
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
            check_bool(name, group[name])

    def _needs_snapshot(self) -> bool:
        """Only a step that factorizes can fail part-way: a parameter's first gradient (eigh)
        or an eigenbasis refresh (QR, every ``precondition_frequency`` steps); the other steps
        are matmuls and elementwise updates of checked gradients, so they skip the copy of the
        parameters and every state."""
        for group in self.param_groups:
            freq = group["precondition_frequency"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if not st or "Q" not in st or (get_value(st["step"]) + 1) % freq == 0:
                    return True
        return False

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(p, type(self).__name__)
            params.append(p)
            grads.append(grad_of(p))
            states.append(self.state[p])
        if params:
            soap(params, grads, states, **self._hyperparameters(group))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping L, R and Q in the dtype they were saved in
        (torch casts every floating-point state tensor to its parameter's dtype, which would
        round a bfloat16 parameter's float32 preconditioner to bfloat16)."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            saved = state_dict["state"].get(i, {})
            for key in ("GG", "Q"):
                if key in saved:
                    self.state[p][key] = [
                        None if t is None else t.detach().clone().to(p.device) for t in saved[key]
                    ]


def merged_shape(shape: torch.Size, max_precond_dim: int) -> list[int]:
    """The authors' ``merge_dims``: consecutive dimensions multiplied together while the
    product stays within ``max_precond_dim`` (a dimension above it stays alone)."""
    out: list[int] = []
    cur = 1
    for sh in shape:
        if cur * sh > max_precond_dim:
            if cur > 1:
                out.append(cur)
                cur = sh
            else:
                out.append(sh)
                cur = 1
        else:
            cur *= sh
    if cur > 1 or not out:
        out.append(cur)
    return out


def _rotate(x: Tensor, qs: list[Tensor | None], back: bool, merge: list[int] | None) -> Tensor:
    """``x`` in the eigenbasis (``back=False``: contract each dimension with Q) or back from it
    (``back=True``: with Q^T); an identity dimension is moved to the end unrotated, so after
    all dimensions the order is the original one."""
    shape = x.shape
    if merge is not None:
        x = x.reshape(merge)
    for q in qs:
        if q is None:
            x = x.permute([*range(1, x.dim()), 0])
        else:
            x = torch.tensordot(x, q, dims=[[0], [1 if back else 0]])
    return x.reshape(shape) if merge is not None else x


def _eigenbases(factors: list[Tensor | None]) -> list[Tensor | None]:
    """Eigenvectors by decreasing eigenvalue (the first basis of each factor)."""
    out: list[Tensor | None] = []
    for f in factors:
        if f is None:
            out.append(None)
            continue
        eye = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
        _, q = torch.linalg.eigh(f + 1e-30 * eye)
        out.append(torch.flip(q, [1]))
    return out


def _refresh(
    factors: list[Tensor | None], qs: list[Tensor | None], v: Tensor, merge: list[int] | None
) -> tuple[list[Tensor | None], Tensor]:
    """One power-iteration step and QR per factor, columns sorted by the eigenvalue estimates
    ``diag(Q^T F Q)``; ``v`` reordered along each dimension to follow its columns."""
    shape = v.shape
    if merge is not None:
        v = v.reshape(merge)
    out: list[Tensor | None] = []
    for dim, (f, q) in enumerate(zip(factors, qs)):
        if f is None:
            out.append(None)
            continue
        assert q is not None  # a factor always has its eigenbasis
        order = torch.argsort(torch.diag(q.T @ f @ q), descending=True)
        v = v.index_select(dim, order.to(v.device))
        new, _ = torch.linalg.qr(f @ q[:, order])
        out.append(new)
    return out, (v.reshape(shape) if merge is not None else v)


def _accumulate(factors: list[Tensor | None], g: Tensor, beta: float) -> None:
    """L, R (one factor per dimension) <- EMA with the gradient's outer products."""
    if g.dim() == 1:
        if factors[0] is not None:
            factors[0].lerp_(g.unsqueeze(1) @ g.unsqueeze(0), 1 - beta)
        return
    for dim, f in enumerate(factors):
        if f is not None:
            others = [*chain(range(dim), range(dim + 1, g.dim()))]
            f.lerp_(torch.tensordot(g, g, dims=[others, others]), 1 - beta)


def soap(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    shampoo_beta: float,
    eps: float,
    weight_decay: float,
    precondition_frequency: int,
    max_precond_dim: int,
    merge_dims: bool,
    precondition_1d: bool,
    normalize_grads: bool,
    correct_bias: bool,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional SOAP over a group's tensors and their state dicts (created on first use);
    see :class:`SOAP`. One path: the per-tensor loop (``foreach`` is accepted and ignored)."""
    _single_tensor_soap(
        params, grads, states, lr=scalar_lr(lr), beta1=beta1, beta2=beta2,
        shampoo_beta=shampoo_beta if shampoo_beta >= 0 else beta2, eps=eps,
        weight_decay=weight_decay, precondition_frequency=precondition_frequency,
        max_precond_dim=max_precond_dim, merge_dims=merge_dims,
        precondition_1d=precondition_1d, normalize_grads=normalize_grads,
        correct_bias=correct_bias, maximize=maximize,
    )  # fmt: skip


def _single_tensor_soap(
    params, grads, states, *, lr, beta1, beta2, shampoo_beta, eps, weight_decay,
    precondition_frequency, max_precond_dim, merge_dims, precondition_1d, normalize_grads,
    correct_bias, maximize,
):  # fmt: skip
    for p, grad, state in zip(params, grads, states):
        # the rotations in float64 for float64 tensors, float32 for every other dtype
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        g = (-grad if maximize else grad).to(work)
        merge = merged_shape(g.shape, max_precond_dim) if merge_dims and g.dim() > 1 else None
        gm = g.reshape(merge) if merge is not None else g

        if "Q" not in state:  # the first gradient seeds the preconditioner; no update
            state["step"] = torch.tensor(0.0, dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            dims = gm.shape if g.dim() > 1 else (g.shape[0] if precondition_1d else None,)
            state["GG"] = [
                torch.zeros(d, d, dtype=work, device=p.device)
                if d is not None and d <= max_precond_dim
                else None
                for d in dims
            ]
            _accumulate(state["GG"], gm, shampoo_beta)
            state["Q"] = _eigenbases(state["GG"])
            continue

        qs = state["Q"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"].add_(1)
        step = get_value(state["step"])
        g_rot = _rotate(g, qs, back=False, merge=merge).to(p.dtype)
        m.mul_(beta1).add_(g_rot, alpha=1 - beta1)
        v.mul_(beta2).add_(g_rot.square(), alpha=1 - beta2)
        denom = v.sqrt().add_(eps)
        step_size = lr
        if correct_bias:
            step_size = lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        update = _rotate((m / denom).to(work), qs, back=True, merge=merge).to(p.dtype)
        if normalize_grads:
            update = update / (1e-30 + torch.mean(update**2) ** 0.5)
        p.add_(update, alpha=-step_size)
        if weight_decay > 0:
            p.add_(p, alpha=-lr * weight_decay)

        # the preconditioner sees this gradient only after the step; m follows the basis
        m_orig = _rotate(m.to(work), qs, back=True, merge=merge)
        _accumulate(state["GG"], gm, shampoo_beta)
        if step % precondition_frequency == 0:
            qs, v_new = _refresh(state["GG"], qs, v, merge)
            state["Q"] = qs
            v.copy_(v_new)
        m.copy_(_rotate(m_orig, qs, back=False, merge=merge))


register(
    OptimInfo(
        name="soap",
        cls=SOAP,
        paper=Paper(
            "SOAP: Improving and Stabilizing Shampoo using Adam", "Vyas et al.", "2409.11321", 2024
        ),
        state_memory=2.0,
        state_note=(
            "+ per matrix m x n: L, R and their eigenbases, 2(m^2 + n^2) entries (dimensions "
            "above max_precond_dim excluded)"
        ),
        # eager only: see the class docstring (the refresh is a branch on the step count)
        capabilities=frozenset({"maximize", "param_groups", "closure", "preconditioned"}),
        search_space={
            **ADAM_SPACE,
            "precondition_frequency": {"type": "int", "low": 1, "high": 100, "log": True},
        },
        param_groups=decay_groups,
    )
)
