"""Small pure math functions shared by several optimizers. Each is a natural torch.compile
boundary: no Python branching on tensor values, no ``.item()``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MUON_NS_COEFFICIENTS", "newton_schulz5", "whiten_newton_schulz"]

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


def whiten_newton_schulz(G: Tensor, steps: int = 10, *, eps: float = 1e-12) -> Tensor:
    """Whitening ``(G G^T)^(-1/2) G`` (= ``G (G^T G)^(-1/2)``, the polar factor ``U V^T`` of a
    full-rank ``G``) by the coupled Newton-Schulz iteration for the inverse square root, on the
    smaller Gram matrix (last two dims), in ``G``'s dtype.

    With ``X = G / ||G||_F`` and ``A = X X^T`` (``X^T X`` when rows > cols), whose eigenvalues
    lie in (0, 1]: ``Y_0 = A``, ``Z_0 = I``; ``T = 3I - Z Y``; ``Y <- Y T / 2``, ``Z <- T Z / 2``;
    ``Y -> A^(1/2)``, ``Z -> A^(-1/2)``; the result is ``Z X`` (``X Z`` when rows > cols).
    Convergence is quadratic once an eigenvalue is near 1; an eigenvalue ``l`` far below 1 first
    grows by about 2.25x per step, so ``steps`` must exceed ``log(1/l)/log(2.25)`` for it."""
    if G.ndim < 2:
        raise ValueError(
            f"whiten_newton_schulz needs a matrix (ndim >= 2), got shape {tuple(G.shape)}"
        )
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    n = X.size(-2)
    eye = torch.eye(n, dtype=X.dtype, device=X.device).expand(*X.shape[:-2], n, n)
    Y = X @ X.mT
    Z = eye
    for _ in range(steps):
        T = 3 * eye - Z @ Y
        Y = 0.5 * (Y @ T)
        Z = 0.5 * (T @ Z)
    out = Z @ X
    return out.mT if tall else out
