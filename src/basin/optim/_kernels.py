"""Small pure math functions shared by several optimizers. Each is a natural torch.compile
boundary: no Python branching on tensor values, no ``.item()``."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["MUON_NS_COEFFICIENTS", "adamw_step_", "newton_schulz5"]

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


def adamw_step_(
    p: Tensor,
    g: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One in-place AdamW step (Loshchilov & Hutter, arXiv:1711.05101) of ``p`` with gradient
    ``g``; ``step`` is the already-incremented count (Python number or tensor under compile).
    The element-wise fallback that the matrix optimizers use for non-matrix parameters."""
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    denom = (exp_avg_sq.sqrt() / bc2**0.5).add_(eps)
    if isinstance(bc1, Tensor) or isinstance(lr, Tensor):  # compiled: tensor step size
        p.sub_(exp_avg / denom * (lr / bc1))
    else:
        p.addcdiv_(exp_avg, denom, value=-lr / bc1)
