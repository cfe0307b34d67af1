"""Implicit-function hypergradients for bilevel problems (hyperparameter optimization).

For ``min_x F(x, y*(x))`` with ``y*(x) = argmin_y g(x, y)`` (``g`` strongly convex in ``y``)::

    dF/dx = grad_x F - grad2_xy g  [grad2_yy g]^{-1}  grad_y F

the inverse-Hessian-vector product by conjugate gradient or a truncated Neumann series, every
Hessian product by double backward (see e.g. Pedregosa, ICML 2016, arXiv:1602.02355; Lorraine,
Vicol, Duvenaud, AISTATS 2020, arXiv:1911.02590; Ghadimi & Wang 2018, arXiv:1802.02246).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from basin.optim._base import check_int, check_range

__all__ = ["conjugate_gradient", "implicit_hypergradient", "neumann_series"]

Vec = list[Tensor]
HVP = Callable[[Vec], Vec]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    out = torch.sum(a[0] * b[0])
    for u, v in zip(a[1:], b[1:], strict=True):
        out = out + torch.sum(u * v)
    return out


def conjugate_gradient(
    hvp: HVP, b: Sequence[Tensor], *, iters: int = 100, tol: float = 1e-10
) -> Vec:
    """Solve ``H z = b`` for symmetric positive-definite ``H`` given by ``hvp`` (from ``z = 0``);
    stops when ``||r|| <= tol * ||b||`` or after ``iters`` products."""
    check_int("iters", iters, 1)
    check_range("tol", tol, 0.0, math.inf, high_inclusive=False)
    b = [t.detach() for t in b]
    z = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rr = _dot(r, r)
    stop = (tol**2) * float(rr)
    for _ in range(iters):
        if float(rr) <= stop or float(rr) == 0.0:
            break
        hp = [t.detach() for t in hvp(p)]
        alpha = rr / _dot(p, hp)
        z = [zi + alpha * pi for zi, pi in zip(z, p)]
        r = [ri - alpha * hi for ri, hi in zip(r, hp)]
        rr_new = _dot(r, r)
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return z


def neumann_series(hvp: HVP, b: Sequence[Tensor], *, terms: int = 50, alpha: float = 1.0) -> Vec:
    """``alpha * sum_{q=0}^{terms-1} (I - alpha H)^q b``, the truncated Neumann series for
    ``H^{-1} b`` (converges when ``0 < alpha < 2 / lambda_max(H)``)."""
    check_int("terms", terms, 1)
    check_range("alpha", alpha, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    v = [t.detach().clone() for t in b]
    acc = [t.clone() for t in v]
    for _ in range(terms - 1):
        hv = hvp(v)
        v = [vi - alpha * hi.detach() for vi, hi in zip(v, hv)]
        acc = [a + vi for a, vi in zip(acc, v)]
    return [alpha * a for a in acc]


def implicit_hypergradient(
    upper_loss: Callable[[], Tensor],
    lower_loss: Callable[[], Tensor],
    upper_params: Sequence[Tensor],
    lower_params: Sequence[Tensor],
    *,
    method: str = "cg",
    iters: int = 100,
    tol: float = 1e-10,
    alpha: float = 1.0,
) -> Vec:
    r"""The implicit-function hypergradient ``dF/dx`` at the current ``(x, y)``, one tensor per
    upper parameter (``y`` should be at, or near, ``argmin_y g``).

    ``upper_loss()`` and ``lower_loss()`` are closures computing ``F(x, y)`` and ``g(x, y)`` from
    the current tensors ``upper_params`` (``x``) and ``lower_params`` (``y``), all with
    ``requires_grad``. ``method`` ``"cg"`` (``iters`` products at most, relative residual
    ``tol``) or ``"neumann"`` (``iters`` terms, step ``alpha``).
    """
    if method not in ("cg", "neumann"):
        raise ValueError(f"method must be 'cg' or 'neumann', got {method!r}")
    xs, ys = list(upper_params), list(lower_params)
    f = upper_loss()
    fx_fy = torch.autograd.grad(f, xs + ys, allow_unused=True)
    fx = [torch.zeros_like(x) if g is None else g for g, x in zip(fx_fy[: len(xs)], xs)]
    fy = [torch.zeros_like(y) if g is None else g for g, y in zip(fx_fy[len(xs) :], ys)]
    gy = torch.autograd.grad(lower_loss(), ys, create_graph=True)

    def hvp(v: Vec) -> Vec:
        out = torch.autograd.grad(gy, ys, grad_outputs=v, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(y) if o is None else o for o, y in zip(out, ys)]

    if method == "cg":
        z = conjugate_gradient(hvp, fy, iters=iters, tol=tol)
    else:
        z = neumann_series(hvp, fy, terms=iters, alpha=alpha)
    mixed = torch.autograd.grad(gy, xs, grad_outputs=z, allow_unused=True)
    return [a.detach() if m is None else (a - m).detach() for a, m in zip(fx, mixed, strict=True)]
