"""Small pure math functions shared by several optimizers. Each is a natural torch.compile
boundary: no Python branching on tensor values, no ``.item()``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MUON_NS_COEFFICIENTS",
    "newton_schulz5",
    "scale_invariant_projection",
    "whiten_newton_schulz",
]

# Quintic Newton-Schulz coefficients (a, b, c) of Muon (Jordan et al., 2024): chosen to maximise
# the slope at zero, so singular values land in roughly [0.7, 1.2] after 5 steps, not exactly 1.
MUON_NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def newton_schulz5(
    G: Tensor,
    steps: int = 5,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
) -> Tensor:
    """Approximate orthogonalisation ``U V^T`` of ``G = U S V^T`` (last two dims) by the quintic
    iteration ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, started from ``G / ||G||_F``.

    Works on the wide orientation (transposes when rows > cols, so ``A`` is the small Gram
    matrix). ``dtype`` is the compute dtype (bfloat16 as in Muon; None keeps ``G``'s dtype); the
    result is returned in the compute dtype."""
    if G.ndim < 2:
        raise ValueError(f"newton_schulz5 needs a matrix (ndim >= 2), got shape {tuple(G.shape)}")
    a, b, c = coefficients
    X = G if dtype is None else G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = X @ X.mT
        poly = b * gram + c * gram @ gram
        X = a * X + poly @ X
    return X.mT if tall else X


def scale_invariant_projection(
    param: Tensor, grad: Tensor, update: Tensor, *, delta: float, wd_ratio: float, eps: float
) -> tuple[Tensor, float | Tensor]:
    """AdamP/SGDP projection (Heo et al., 2021, arXiv:2006.08217): if ``param`` looks
    scale-invariant, remove the radial component of ``update``.

    For ``param.ndim > 1`` only. Scale invariance is tested first per output channel (rows of
    ``param.reshape(out, -1)``), then for the whole tensor: the view is taken when
    ``max |cos(grad_row, param_row)| < delta / sqrt(row length)`` (cosine with the raw gradient,
    each norm clamped below at ``eps``). Then, per row of that view,
    ``update <- update - p_hat <p_hat, update>`` with ``p_hat = p_row / (||p_row|| + eps)``.

    Returns ``(update, wd_factor)``; ``update`` is a new tensor when projected (the input is never
    written) and ``wd_factor`` is ``wd_ratio`` if projected, else 1. Eager: branches and returns
    a Python float. Under ``torch.compile``: computes both views and selects with
    ``torch.where`` (no graph break, no data-dependent control flow) and returns a tensor."""
    rows = param.shape[0]
    pv = param.reshape(rows, -1)
    gv = grad.reshape(rows, -1)
    uv = update.reshape(rows, -1)
    p_norm = torch.linalg.vector_norm(pv, dim=1)
    g_norm = torch.linalg.vector_norm(gv, dim=1)
    pg = torch.linalg.vecdot(pv, gv, dim=1)
    cos_rows = pg.abs() / (p_norm.clamp_min(eps) * g_norm.clamp_min(eps))
    thr_rows = delta / math.sqrt(pv.shape[1])
    thr_layer = delta / math.sqrt(param.numel())
    # layer view from the row statistics: ||p||^2 = sum ||p_row||^2, <p, g> = sum <p_row, g_row>
    p_norm_layer = torch.linalg.vector_norm(p_norm)

    def layer_cos() -> Tensor:
        g_norm_layer = torch.linalg.vector_norm(g_norm)
        return pg.sum().abs() / (p_norm_layer.clamp_min(eps) * g_norm_layer.clamp_min(eps))

    if not torch.compiler.is_compiling():
        if cos_rows.max() < thr_rows:
            coef = torch.linalg.vecdot(pv, uv, dim=1).div_((p_norm + eps).square_())
            return torch.addcmul(uv, pv, coef.unsqueeze(1), value=-1).view_as(update), wd_ratio
        if layer_cos() < thr_layer:
            coef = torch.linalg.vecdot(pv, uv, dim=1).sum() / (p_norm_layer + eps) ** 2
            return torch.addcmul(uv, pv, coef, value=-1).view_as(update), wd_ratio
        return update, 1.0

    by_rows = cos_rows.max() < thr_rows
    by_layer = layer_cos() < thr_layer
    pu = torch.linalg.vecdot(pv, uv, dim=1)
    coef = torch.where(
        by_rows,
        pu / (p_norm + eps) ** 2,
        torch.where(by_layer, pu.sum() / (p_norm_layer + eps) ** 2, 0.0),
    )
    projected = torch.addcmul(uv, pv, coef.unsqueeze(1), value=-1).view_as(update)
    fired = (by_rows | by_layer).to(param.dtype)
    return projected, 1 + fired * (wd_ratio - 1)


def whiten_newton_schulz(
    G: Tensor, steps: int = 10, *, beta: float = 0.5, eps: float = 1e-12
) -> Tensor:
    """Whitening ``(G G^T)^(-1/2) G`` (= ``G (G^T G)^(-1/2)``, the polar factor ``U V^T`` of a
    full-rank ``G``) by the coupled Newton-Schulz iteration for the inverse square root, on the
    smaller Gram matrix (last two dims), in ``G``'s dtype.

    With ``A = X X^T / ||X X^T||_F`` (``X = G``, or ``G^T`` when rows > cols; the Frobenius
    normalisation of Gong, Scetbon, Ma & Meeds, arXiv:2502.07752, App. B.8, the NS form the
    SWAN authors describe), whose eigenvalues lie in (0, 1]: ``Y_0 = A``, ``Z_0 = I``;
    ``T = 3I - Z Y``; ``Y <- Y T / 2``, ``Z <- T Z / 2``; ``Y -> A^(1/2)``, ``Z -> A^(-1/2)``; the
    result is ``Z X / ||X X^T||_F^(1/2)`` (transposed back when rows > cols).
    Convergence is quadratic once an eigenvalue is near 1; an eigenvalue ``l`` far below 1 first
    grows by about 2.25x per step, so ``steps`` must exceed ``log(1/l)/log(2.25)`` for it.

    ``beta`` generalises the two halvings (``Y <- beta Y T``, ``Z <- beta T Z``; the step size of
    Ma et al.'s GradWhitening box). ``Y Z^-1 = A`` stays invariant, so with ``p = l z^2`` per
    eigenvalue ``p <- beta^2 p (3 - p)^2``: for ``1/3 < beta < 2/3`` it converges (linearly
    unless ``beta = 1/2``) to ``p* = 3 - 1/beta``, i.e. the result tends to
    ``sqrt(3 - 1/beta)`` times the whitening; small eigenvalues grow ``9 beta^2`` per step. For
    ``2/3 <= beta < sqrt(3)/2`` ``p`` stays bounded in (0, 3) but does not settle: an
    approximate whitening, as with Muon's quintic."""
    if G.ndim < 2:
        raise ValueError(
            f"whiten_newton_schulz needs a matrix (ndim >= 2), got shape {tuple(G.shape)}"
        )
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)  # no overflow in the Gram matrix
    Y = X @ X.mT
    c = Y.norm(dim=(-2, -1), keepdim=True)  # in [1/n, 1]
    Y = Y / (c + eps)
    X = X / (c + eps).sqrt()
    n = X.size(-2)
    eye = torch.eye(n, dtype=X.dtype, device=X.device).expand(*X.shape[:-2], n, n)
    Z = eye
    for _ in range(steps):
        T = 3 * eye - Z @ Y
        Y = beta * (Y @ T)
        Z = beta * (T @ Z)
    out = Z @ X
    return out.mT if tall else out
