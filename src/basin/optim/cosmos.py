"""COSMOS: SOAP-like adaptivity on a tracked low-rank eigen-subspace, Muon on the rest."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    check_adam_hparams,
    check_bool,
    check_int,
    check_nonnegative,
    get_value,
    grad_of,
    scalar_lr,
)
from ._kernels import newton_schulz5
from ._matrix import (
    MatrixOptimizer,
    as_matrix,
    compute_dtype,
    from_matrix,
    matrix_shape,
)
from .param_groups import matrix_groups
from .registry import ADAM_SPACE, OptimInfo, Paper, register

__all__ = ["COSMOS", "cosmos"]

VARIANTS = ("code", "paper")


class COSMOS(MatrixOptimizer):
    r"""COSMOS (Liu et al., 2025, arXiv:2502.17410): for a weight matrix ``W`` (``m x n`` as
    ``(out, in)``) an Adam-like (SOAP-style) update inside a rank-``r`` subspace ``P`` tracking
    the top eigenvectors of the EMA of ``G^T G``, plus a Muon (Newton-Schulz) update of the
    residual; per step ``t`` (``bc1 = (1-b1^t)/(1-b1)``, ``bc2 = 1-b2^t``; ``variant="code"``)::

        M <- b1 M + G
        t = 1:  P = top-r right singular vectors of G,  S = (1-b2) P^T G^T G P
        t > 1:  P' = QR(b2 P S + (1-b2) G^T G P).Q,  R = P^T P',
                S = b2 R^T S R + (1-b2) (G P')^T (G P'),  P <- P'
        V <- b2 V + (1-b2) (G P)^2
        G~ = (G + b1 M) / (1 + b1 bc1)   if nesterov   else   M / bc1
        A  = [(G~ P) / (sqrt(V / bc2) + eps)] P^T
        B  = NS5(G~ - G~ P P^T);  B <- sqrt(mn) B / (||B||_F + eps)
        W <- W (1 - lr wd) - lr lr_ratio sqrt(mn) (A + gamma B) / (||A + gamma B||_F + eps)

    ``matrix_rule=None`` (default): the matrix rule for 2-D parameters with at most ``max_rows``
    rows, the AdamW fallback for the rest; ``True`` forces it, ``False`` gives AdamW.
    ``transposed=True`` groups (e.g. GPT-2 ``Conv1D``) get the ``nn.Linear`` update, transposed.
    Keep ``rank`` below the gradients' rank.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3; the matrix step is ``lr * lr_ratio * sqrt(mn)``).
        betas: momentum and second-moment coefficients (default (0.9, 0.999)).
        eps: denominator term (default 1e-8).
        lr_ratio: scale of the matrix step relative to ``lr`` (default 0.1).
        rank: subspace rank ``r`` (default 64), clipped per matrix to ``min(m, n)``.
        weight_decay: decoupled weight decay (default 0).
        gamma: weight of the Muon part ``B`` (default 0.2).
        nesterov: Nesterov-style momentum (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: compute dtype of Newton-Schulz (default bfloat16 as the authors; None keeps
            the gradient's dtype, for exact float64 checks).
        variant: ``"code"`` (default, the authors' ``COSMOS_optim.py``) or ``"paper"`` (the
            algorithm box as read through third-party renderings: EMA momentum, ``eps`` inside
            the square root, Muon part on the momentum's residual).
        max_rows: matrices with more rows use AdamW (default 10000, as the authors).
        maximize: maximize the objective (default False).
        foreach: multi-tensor AdamW fallback (None picks per device); the matrix rule is a loop.
        fused: True runs the AdamW fallback's step as one compiled kernel over flat state
            buffers (:mod:`basin.optim._fused`; the first step compiles it); the matrix rule
            is unchanged. None (default) and False use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; nothing changes (eager steps).

    Differences from the paper / reference code (github.com/lliu606/COSMOS):
        * The AdamW fallback uses ``beta1`` (the reference hard-codes 0.9).
        * At ``t = 1`` the subspace comes from the SVD of ``G``, not the eigenvectors of ``G^T G``.
        * ``nesterov=False`` uses ``M / bc1`` (the reference uses ``G / bc1``: no momentum).
        * ``variant="paper"`` exists; the default is the code, since the paper's text was not read.
        * ``p.grad`` is not modified (the reference overwrites it with ``G~``).
        * ``rank`` is clipped to ``min(m, n)``; at ``r = n`` the Muon part is dropped.
        * bfloat16/float16: matrix math in float32, state in the parameter's dtype.

    Provenance and details: docs/optimizers.md#cosmos.
    """

    _algo = "COSMOS"
    _separate_fallback_group = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_ratio: float = 0.1,
        rank: int = 64,
        weight_decay: float = 0.0,
        gamma: float = 0.2,
        nesterov: bool = True,
        *,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        variant: str = "code",
        max_rows: int = 10000,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            lr_ratio=lr_ratio,
            rank=rank,
            weight_decay=weight_decay,
            gamma=gamma,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            variant=variant,
            max_rows=max_rows,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        super().__init__(params, defaults, None)

    def _uses_matrix_rule(self, p: Tensor, group: dict[str, Any]) -> bool:
        return p.ndim == 2 and matrix_shape(p, group["transposed"])[0] <= group["max_rows"]

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_group_hparams(group)

    def _needs_snapshot(self) -> bool:
        return True  # every step takes a QR (and the first an SVD) of each matrix

    def _matrix_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in self._with_grad(params):
            state = self.state[p]
            first = len(state) == 0
            if first:
                m, n = matrix_shape(p, group["transposed"])
                r = min(group["rank"], m, n)  # the rank a small matrix allows
                kw: dict[str, Any] = dict(dtype=p.dtype, device=p.device)
                state["step"] = self._new_step()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros(m, r, **kw)
                state["subspace"] = torch.zeros(n, r, **kw)
                state["subspace_cov"] = torch.zeros(r, r, **kw)
            cosmos(
                p,
                grad_of(p),
                state,
                first=first,
                **self._hyperparameters(group, exclude=("rank", "max_rows", "foreach")),
            )


def check_group_hparams(group: dict[str, Any]) -> None:
    check_adam_hparams(group)  # lr, betas, eps, weight_decay: shared with the AdamW fallback
    check_nonnegative("lr_ratio", group["lr_ratio"])
    check_nonnegative("gamma", group["gamma"])
    check_bool("nesterov", group["nesterov"])
    for name, low in (("rank", 1), ("ns_steps", 0), ("max_rows", 1)):
        check_int(name, group[name], low)
    if group["variant"] not in VARIANTS:
        raise ValueError(
            f"variant must be one of {', '.join(map(repr, VARIANTS))}, got {group['variant']!r}"
        )
    dt = group["ns_dtype"]
    if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ValueError(f"ns_dtype must be None or a floating torch.dtype, got {dt!r}")


def cosmos(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    first: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    lr_ratio: float,
    weight_decay: float,
    gamma: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
    maximize: bool,
    variant: str = "code",
    transposed: bool = False,
) -> None:
    """Functional COSMOS step of one matrix parameter; see :class:`COSMOS`. ``transposed``:
    ``p`` is stored ``(in, out)`` (``M`` in its layout, ``V``, ``P``, ``S`` as ``(out, in)``)."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    g = -grad if maximize else grad
    state["step"] += 1
    step = get_value(state["step"])
    M, V, P, S = state["exp_avg"], state["exp_avg_sq"], state["subspace"], state["subspace_cov"]
    cd = compute_dtype(p.dtype)
    G = as_matrix(g, transposed).to(cd)
    paper = variant == "paper"
    if paper:
        M.lerp_(g, 1 - beta1)  # M <- b1 M + (1 - b1) G
    else:
        M.mul_(beta1).add_(g)  # M <- b1 M + G

    if first:
        # right singular vectors of G = eigenvectors of G^T G, in descending order
        _, _, Vh = torch.linalg.svd(G, full_matrices=False)
        P_new = Vh[: P.size(1)].mT
        GP = G @ P_new
        S_new = (1 - beta2) * (GP.mT @ GP)
    else:
        P_old, S_old = P.to(cd), S.to(cd)
        P_new, _ = torch.linalg.qr(beta2 * (P_old @ S_old) + (1 - beta2) * (G.mT @ (G @ P_old)))
        R = P_old.mT @ P_new
        GP = G @ P_new
        S_new = beta2 * (R.mT @ S_old @ R) + (1 - beta2) * (GP.mT @ GP)
    P.copy_(P_new)
    S.copy_(S_new)
    V.mul_(beta2).addcmul_(GP.to(V.dtype), GP.to(V.dtype), value=1 - beta2)

    bc2 = 1 - beta2**step
    Mc = as_matrix(M, transposed).to(cd)
    if paper:
        # normalised momentum: the same G~ as below, i.e. a reparametrisation of M
        bc1 = 1 - beta1**step
        G_t = ((1 - beta1) * G + beta1 * Mc) / (1 - beta1 * beta1**step) if nesterov else Mc / bc1
    else:
        bc1 = (1 - beta1**step) / (1 - beta1)
        G_t = (G + beta1 * Mc) / (1 + beta1 * bc1) if nesterov else Mc / bc1
    coef = G_t @ P_new
    if paper:
        A = (coef / ((V.to(cd) + eps) / bc2).sqrt()) @ P_new.mT  # eps inside the square root
    else:
        A = (coef / (V.to(cd).sqrt() / bc2**0.5 + eps)) @ P_new.mT
    scale = math.sqrt(G.size(0) * G.size(1))
    update = A
    if P_new.size(1) < G.size(1):  # else P P^T = I: the residual is exactly zero
        # paper: the Muon part from the momentum residual (NS5 and NORM are scale-invariant,
        # so M = M^); code: from the residual of G~
        R = Mc - (Mc @ P_new) @ P_new.mT if paper else G_t - coef @ P_new.mT
        B = newton_schulz5(R, ns_steps, dtype=ns_dtype).to(cd)
        update = A + (gamma * scale) * B / (B.norm() + eps)
    update = update / (update.norm() + eps)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    p.sub_(from_matrix(update * (lr * lr_ratio * scale), p.shape, transposed).to(p.dtype))


register(
    OptimInfo(
        name="cosmos",
        cls=COSMOS,
        paper=Paper(
            "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of LLMs",
            "Liu et al.",
            "2502.17410",
            2025,
        ),
        state_memory=1.13,
        capabilities=frozenset(
            {"compile", "maximize", "param_groups", "closure", "matrix", "fallback", "fused"}
        ),
        state_note="matrices: 1 + r/n + r/m + r^2/(mn) (1.13 for 1024x1024, r=64); "
        "AdamW fallback params: 2",
        family="matrix",
        search_space=ADAM_SPACE,
        param_groups=matrix_groups,
    )
)
