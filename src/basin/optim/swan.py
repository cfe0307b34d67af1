"""SWAN: stateless SGD on normalized and whitened gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    check_bool,
    check_lr,
    check_nonnegative,
    group_by_device_and_dtype,
    use_foreach,
)
from ._kernels import whiten_newton_schulz
from ._matrix import MatrixOptimizer, _decay_and_add, _foreach_decay_and_add, check_int

__all__ = ["SWAN", "swan"]


class SWAN(MatrixOptimizer):
    r"""SWAN (Ma et al., 2024): SGD on the current gradient of each weight matrix after row
    standardisation (GradNorm) and whitening (GradWhitening). Keeps no state for matrices;
    embeddings, the output head, biases and gains use the built-in AdamW fallback.

    Update of a matrix group (``G`` is ``m x n``; kernels of ``ndim > 2`` viewed as
    ``(size(0), -1)``; computed in float32, or float64 for float64 parameters)::

        G~ = (G - mean_row(G)) / (std_row(G) + eps)      per row, population std over n columns
        W  = (G~ G~^T)^(-1/2) G~                          coupled Newton-Schulz, ns_steps
        W <- W * ||G~||_F / (||W||_F + eps)               if rescale
        p <- p (1 - lr wd) - lr W

    Routing works as in :class:`Muon` (shared, :mod:`basin.optim._matrix`): a group's
    ``matrix_rule`` is ``True`` (default: SWAN; an ``ndim < 2`` parameter raises ``ValueError``
    naming it), ``False`` (AdamW) or ``None`` (``ndim >= 2`` to SWAN, the rest to a companion
    AdamW group); :func:`basin.optim.matrix_param_groups` builds the groups, and
    ``adam_fallback=True`` makes ``None`` the default. ``matrix_rule=False`` groups take missing
    hyperparameters from the ``adam_*`` fallback defaults (lr 1e-3, betas (0.9, 0.999), eps
    1e-8, decoupled weight decay 0).

    Args:
        params: parameters or parameter groups.
        lr: learning rate of SWAN groups (default 1e-3).
        weight_decay: decoupled weight decay of SWAN groups (default 0).
        ns_steps: coupled Newton-Schulz iterations of the whitening (default 10).
        eps: added to the row std and to the norm in the rescaling (default 1e-8).
        rescale: rescale the whitened matrix to the Frobenius norm of ``G~`` (default True).
        adam_lr, adam_betas, adam_eps, adam_weight_decay: fallback defaults.
        adam_fallback: default ``matrix_rule=None`` (automatic routing) instead of True
            (default False).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).

    References:
        Chao Ma, Wenbo Gong, Meyer Scetbon, Edward Meeds. "SWAN: SGD with Normalization and
        Whitening Enables Stateless LLM Training." arXiv:2412.13148, 2024. No official code;
        verified against a float64 transcription with an exact eigendecomposition-based inverse
        square root (tests/references/swan_paper.py).

    UNVERIFIED choices (no authors' code to check against):
        * ``ns_steps=10`` (ports use 6-10); the iteration converges only for eigenvalues of the
          normalised Gram matrix above about ``2.25**-ns_steps``, smaller directions are damped.
          Row centering makes square and tall gradients rank-deficient; there rounding noise
          in the null space grows ~1.5x per iteration, so do not raise ``ns_steps`` far beyond
          ~20 in float32 (at 40 it overflows to NaN on such layers).
        * ``eps`` in the row std (the paper divides by the std alone) and in the rescaling.
        * ``rescale=True`` (the norm-restoring step, so that ``lr`` is on Adam's scale), the
          default ``lr`` 1e-3 and the Adam fallback defaults.
        * Whitening on the smaller Gram matrix (``G~ (G~^T G~)^(-1/2)`` when ``m > n``), equal to
          the paper's form where that is defined; float32 whitening for low-precision
          parameters (the paper whitens in FP32).
    """

    _algo = "SWAN"
    _fallback_kw = "adam_fallback"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.0,
        ns_steps: int = 10,
        eps: float = 1e-8,
        rescale: bool = True,
        *,
        adam_lr: float | Tensor = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adam_weight_decay: float = 0.0,
        adam_fallback: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_bool("adam_fallback", adam_fallback)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            eps=eps,
            rescale=rescale,
            maximize=maximize,
            foreach=foreach,
        )
        fallback = dict(lr=adam_lr, betas=adam_betas, eps=adam_eps, weight_decay=adam_weight_decay)
        super().__init__(params, defaults, None if adam_fallback else True, fallback, "adam_")

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_nonnegative("eps", group["eps"])
        check_bool("rescale", group["rescale"])

    def _matrix_step(self, group: dict[str, Any], group_params: list[Tensor]) -> None:
        params = self._with_grad(group_params)
        if not params:
            return
        grads = [p.grad for p in params]
        swan(
            params,
            grads,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            ns_steps=group["ns_steps"],
            eps=group["eps"],
            rescale=group["rescale"],
            maximize=group["maximize"],
            foreach=group["foreach"],
        )


def _swan_direction(g: Tensor, ns_steps: int, eps: float, rescale: bool) -> Tensor:
    """GradNorm then GradWhitening (then rescaling) of one gradient, in ``g``'s shape."""
    mat = g.reshape(g.size(0), -1) if g.ndim > 2 else g
    mat = mat.to(torch.promote_types(mat.dtype, torch.float32))
    mean = mat.mean(dim=1, keepdim=True)
    std = mat.std(dim=1, keepdim=True, correction=0)
    normed = (mat - mean) / (std + eps)
    white = whiten_newton_schulz(normed, ns_steps)
    if rescale:
        white = white * (normed.norm() / (white.norm() + eps))
    return white.reshape(g.shape)


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
) -> None:
    """Functional SWAN (matrix parameters only); see :class:`SWAN`."""
    fn = _multi_tensor_swan if use_foreach(foreach, params) else _single_tensor_swan
    fn(
        params, grads, lr=lr, weight_decay=weight_decay, ns_steps=ns_steps, eps=eps,
        rescale=rescale, maximize=maximize,
    )  # fmt: skip


def _single_tensor_swan(params, grads, *, lr, weight_decay, ns_steps, eps, rescale, maximize):
    for p, g in zip(params, grads):
        g = -g if maximize else g
        update = _swan_direction(g, ns_steps, eps, rescale).to(p.dtype)
        _decay_and_add(p, update, lr, weight_decay)


def _multi_tensor_swan(params, grads, *, lr, weight_decay, ns_steps, eps, rescale, maximize):
    for ps, gs in group_by_device_and_dtype([params, grads]).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        # the whitening is a chain of matmuls per matrix: no foreach form
        updates = [_swan_direction(g, ns_steps, eps, rescale).to(p.dtype) for g, p in zip(gs, ps)]
        _foreach_decay_and_add(ps, updates, lr, weight_decay)
