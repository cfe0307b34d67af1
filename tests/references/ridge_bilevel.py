"""Ridge regression as a bilevel problem with a closed form, shared by the bilevel tests.

Lower: g(w, lam) = ||X w - y||^2 / (2 n) + lam/2 ||w||^2, so w*(lam) = (X^T X / n + lam I)^{-1}
X^T y / n. Upper: F(lam) = ||Xv w*(lam) - yv||^2 / (2 m). dw*/dlam = -(H)^{-1} w*, H = X^T X/n + lam I.
"""

from __future__ import annotations

import math

import torch

D = torch.float64


def make_data(n: int = 20, m: int = 60, d: int = 8, seed: int = 0, noise: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=D)
    X = torch.randn(n, d, generator=g, dtype=D)
    Xv = torch.randn(m, d, generator=g, dtype=D)
    y = X @ w_true + noise * torch.randn(n, generator=g, dtype=D)
    yv = Xv @ w_true + noise * torch.randn(m, generator=g, dtype=D)
    return X, y, Xv, yv


def w_star(lam: float, X, y):
    n, d = X.shape
    return torch.linalg.solve(X.T @ X / n + lam * torch.eye(d, dtype=D), X.T @ y / n)


def val_loss(lam: float, X, y, Xv, yv) -> float:
    r = Xv @ w_star(lam, X, y) - yv
    return float(r @ r / (2 * len(yv)))


def hypergrad(lam: float, X, y, Xv, yv) -> float:
    n, d = X.shape
    H = X.T @ X / n + lam * torch.eye(d, dtype=D)
    w = w_star(lam, X, y)
    dw = -torch.linalg.solve(H, w)
    gF = Xv.T @ (Xv @ w - yv) / len(yv)
    return float(gF @ dw)


def golden_log_lambda(X, y, Xv, yv, lo: float = -8.0, hi: float = 4.0, tol: float = 1e-12) -> float:
    """argmin over log(lam) of the closed-form validation loss: a dense grid, then golden section."""
    grid = torch.linspace(lo, hi, 2001, dtype=D)
    vals = [val_loss(math.exp(float(t)), X, y, Xv, yv) for t in grid]
    i = min(range(len(vals)), key=vals.__getitem__)
    assert 0 < i < len(vals) - 1, "optimum on the grid's edge"
    a, b = float(grid[i - 1]), float(grid[i + 1])
    r = (math.sqrt(5) - 1) / 2
    c, e = b - r * (b - a), a + r * (b - a)
    fc, fe = val_loss(math.exp(c), X, y, Xv, yv), val_loss(math.exp(e), X, y, Xv, yv)
    while b - a > tol:
        if fc < fe:
            b, e, fe = e, c, fc
            c = b - r * (b - a)
            fc = val_loss(math.exp(c), X, y, Xv, yv)
        else:
            a, c, fc = c, e, fe
            e = a + r * (b - a)
            fe = val_loss(math.exp(e), X, y, Xv, yv)
    return (a + b) / 2
