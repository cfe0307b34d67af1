"""SWAN: stateless SGD on normalized and whitened gradients."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    check_bool,
    check_int,
    check_lr,
    check_nonnegative,
    check_range,
    grad_of,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._kernels import whiten_newton_schulz
from ._matrix import (
    MatrixOptimizer,
    _decay_and_add,
    _foreach_decay_and_add,
    as_matrix,
    from_matrix,
)
from .param_groups import matrix_groups
from .registry import ELEMENTWISE_CAPS, LR_ADAPTIVE, WEIGHT_DECAY, OptimInfo, Paper, register

__all__ = ["SWAN", "swan"]


class SWAN(MatrixOptimizer):
    r"""SWAN (Ma et al., 2024, arXiv:2412.13148): stateless SGD on each weight matrix's current
    gradient after row standardisation (GradNorm) and whitening (GradWhitening); per matrix
    (``G`` is ``m x n`` as ``(out, in)``, ``ndim > 2`` viewed as ``(size(0), -1)``; float32,
    or float64 for float64 parameters)::

        G~ = (G - mean_row(G)) / (std_row(G) + eps)      per row, population std over n columns
        W  = (G~ G~^T)^(-1/2) G~                          coupled Newton-Schulz (ns_steps, ns_beta)
        W <- W * ||G~||_F / (||W||_F + eps)               if rescale
        p <- p (1 - lr wd) - lr W

    ``transposed=True`` groups (weights stored ``(in, out)``, e.g. GPT-2 ``Conv1D``) get the
    update of the same ``nn.Linear``, transposed. Routing as in :class:`Muon`: ``matrix_rule``
    ``True`` (default; ``ndim < 2`` raises ``ValueError``), ``False`` (AdamW) or ``None``
    (``ndim >= 2`` to SWAN, the rest to a companion AdamW group); see
    :func:`basin.optim.matrix_param_groups`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate of SWAN groups (default 1e-3).
        weight_decay: decoupled weight decay of SWAN groups (default 0).
        ns_steps: coupled Newton-Schulz iterations of the whitening (default 10).
        ns_beta: step size of the iteration, in (1/3, sqrt(3)/2) (default 0.5, the classical
            coupled iteration; see :func:`basin.optim._kernels.whiten_newton_schulz`).
        eps: added to the row std and to the norm in the rescaling (default 1e-8).
        rescale: rescale the whitened matrix to the Frobenius norm of ``G~`` (default True).
        adamw_lr: the AdamW fallback's learning rate (default 1e-3).
        adamw_betas: the fallback's betas (default (0.9, 0.999)).
        adamw_eps: the fallback's epsilon (default 1e-8).
        adamw_weight_decay: the fallback's decoupled weight decay (default 0).
        adamw_fallback: default ``matrix_rule=None`` (automatic routing) instead of True
            (default False). The former spellings ``adam_lr``, ``adam_betas``, ``adam_eps``,
            ``adam_weight_decay``, ``adam_fallback`` still work and warn (``DeprecationWarning``).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        fused: True runs the AdamW fallback's step as one compiled kernel over flat state
            buffers (:mod:`basin.optim._fused`; the first step compiles it); the matrix rule
            is unchanged. None (default) and False use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; nothing changes (eager steps).

    Differences from the paper (there is no authors' code):
        * ``eps`` in the row std and in the rescaling (the paper divides by the std alone).
        * ``ns_steps=10``, ``ns_beta=0.5`` (one port uses 0.8: pass ``ns_beta=0.8``); keep
          ``ns_steps`` below ~20 in float32.
        * ``rescale=True``, ``lr`` 1e-3 and the AdamW fallback with its defaults are basin's.
        * Whitening on the smaller Gram matrix when ``m > n`` (the paper assumes ``m <= n``).

    Provenance and details: docs/optimizers.md#swan.
    """

    _algo = "SWAN"
    _fallback_kw = "adamw_fallback"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.0,
        ns_steps: int = 10,
        eps: float = 1e-8,
        rescale: bool = True,
        *,
        ns_beta: float = 0.5,
        adamw_lr: float | Tensor = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        adamw_fallback: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = None,
        # deprecated spellings of the adamw_* options (before 0.2)
        adam_lr: float | Tensor | None = None,
        adam_betas: tuple[float, float] | None = None,
        adam_eps: float | None = None,
        adam_weight_decay: float | None = None,
        adam_fallback: bool | None = None,
    ) -> None:
        old = dict(lr=adam_lr, betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay,
                   fallback=adam_fallback)  # fmt: skip
        new = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay,
                   fallback=adamw_fallback)  # fmt: skip
        for key, value in old.items():
            if value is not None:
                warnings.warn(
                    f"SWAN: adam_{key} is deprecated, use adamw_{key} (as Muon does)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                new[key] = value
        check_bool("adamw_fallback", new["fallback"])
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_beta=ns_beta,
            eps=eps,
            rescale=rescale,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        fallback = {k: new[k] for k in ("lr", "betas", "eps", "weight_decay")}
        super().__init__(params, defaults, None if new["fallback"] else True, fallback, "adamw_")

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_range("ns_beta", group["ns_beta"], 1 / 3, 3**0.5 / 2, low_inclusive=False, high_inclusive=False)  # fmt: skip
        check_nonnegative("eps", group["eps"])
        check_bool("rescale", group["rescale"])

    def _matrix_step(self, group: dict[str, Any], group_params: list[Tensor]) -> None:
        params = self._with_grad(group_params)
        if not params:
            return
        grads = [grad_of(p) for p in params]
        swan(params, grads, **self._hyperparameters(group))


def _swan_direction(
    g: Tensor,
    ns_steps: int,
    eps: float,
    rescale: bool,
    ns_beta: float = 0.5,
    transposed: bool = False,
) -> Tensor:
    """GradNorm then GradWhitening (then rescaling) of one gradient viewed as ``(out, in)``
    (:func:`basin.optim._matrix.as_matrix`), in ``g``'s layout."""
    mat = as_matrix(g, transposed)
    mat = mat.to(torch.promote_types(mat.dtype, torch.float32))
    mean = mat.mean(dim=1, keepdim=True)
    std = mat.std(dim=1, keepdim=True, correction=0)
    normed = (mat - mean) / (std + eps)
    white = whiten_newton_schulz(normed, ns_steps, beta=ns_beta)
    if rescale:
        white = white * (normed.norm() / (white.norm() + eps))
    return from_matrix(white, g.shape, transposed)


def swan(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    ns_steps: int,
    eps: float,
    rescale: bool,
    maximize: bool,
    foreach: bool | None = None,
    ns_beta: float = 0.5,
    transposed: bool = False,
) -> None:
    """Functional SWAN (matrix parameters only); see :class:`SWAN`. ``transposed``: the
    parameters are stored ``(in, out)``."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_swan if use_foreach(foreach, params) else _single_tensor_swan
    fn(
        params, grads, lr=lr, weight_decay=weight_decay, ns_steps=ns_steps, ns_beta=ns_beta,
        eps=eps, rescale=rescale, maximize=maximize, transposed=transposed,
    )  # fmt: skip


def _single_tensor_swan(
    params, grads, *, lr, weight_decay, ns_steps, ns_beta, eps, rescale, maximize, transposed=False
):
    for p, g in zip(params, grads):
        g = -g if maximize else g
        update = _swan_direction(g, ns_steps, eps, rescale, ns_beta, transposed).to(p.dtype)
        _decay_and_add(p, update, lr, weight_decay)


def _multi_tensor_swan(
    params, grads, *, lr, weight_decay, ns_steps, ns_beta, eps, rescale, maximize, transposed=False
):
    for ps, gs in group_by_device_and_dtype([params, grads]).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        # the whitening is a chain of matmuls per matrix: no foreach form
        updates = [
            _swan_direction(g, ns_steps, eps, rescale, ns_beta, transposed).to(p.dtype)
            for g, p in zip(gs, ps)
        ]
        _foreach_decay_and_add(ps, updates, lr, weight_decay)


register(
    OptimInfo(
        name="swan",
        cls=SWAN,
        paper=Paper(
            "SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training",
            "Ma et al.",
            "2412.13148",
            2024,
        ),
        state_memory=0.0,
        capabilities=ELEMENTWISE_CAPS | {"matrix", "fallback", "stateless", "fused"},
        state_note="matrices: stateless (0.0); Adam fallback params (embeddings, head, ndim<2): 2.0",
        family="matrix",
        lr_from={"lr": ("adaptive",), "adamw_lr": ("adaptive",)},
        search_space={"lr": LR_ADAPTIVE, "adamw_lr": LR_ADAPTIVE, "weight_decay": WEIGHT_DECAY},
        param_groups=matrix_groups,
    )
)
