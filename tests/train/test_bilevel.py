"""Implicit hypergradients checked against ridge regression's closed form."""

from __future__ import annotations

import math

import pytest
import torch
from references import ridge_bilevel as rb

from basin.train import conjugate_gradient, implicit_hypergradient, neumann_series

D = torch.float64


def _closures(X, y, Xv, yv, lam_t, w):
    def lower():
        r = X @ w - y
        return r @ r / (2 * len(y)) + lam_t.sum() / 2 * (w @ w)

    def upper():
        r = Xv @ w - yv
        return r @ r / (2 * len(yv))

    return upper, lower


@pytest.mark.parametrize("method", ["cg", "neumann"])
@pytest.mark.parametrize("lam", [1e-2, 0.3, 2.0])
def test_ridge_hypergradient_matches_closed_form_and_finite_differences(method, lam):
    X, y, Xv, yv = rb.make_data()
    lam_t = torch.tensor([lam], dtype=D, requires_grad=True)
    w = rb.w_star(lam, X, y).clone().requires_grad_(True)
    upper, lower = _closures(X, y, Xv, yv, lam_t, w)
    H = X.T @ X / len(y) + lam * torch.eye(X.shape[1], dtype=D)
    lmax = float(torch.linalg.eigvalsh(H)[-1])
    kw = {"iters": 200} if method == "cg" else {"iters": 4000, "alpha": 1.0 / lmax}
    (g,) = implicit_hypergradient(upper, lower, [lam_t], [w], method=method, **kw)
    exact = rb.hypergrad(lam, X, y, Xv, yv)
    h = 1e-5 * lam
    fd = (rb.val_loss(lam + h, X, y, Xv, yv) - rb.val_loss(lam - h, X, y, Xv, yv)) / (2 * h)
    assert abs(float(g) - exact) <= 1e-10 * max(1.0, abs(exact))
    assert abs(fd - exact) <= 1e-8 * max(1.0, abs(exact))


def test_direct_upper_term_is_added():
    # F(x, y) = x * y  +  g(x, y) = (y - x)^2 / 2  ->  y* = x, F = x^2, dF/dx = 2x
    x = torch.tensor([1.5], dtype=D, requires_grad=True)
    y = torch.tensor([1.5], dtype=D, requires_grad=True)
    (g,) = implicit_hypergradient(lambda: (x * y).sum(), lambda: ((y - x) ** 2 / 2).sum(), [x], [y])
    assert float(g) == pytest.approx(3.0, abs=1e-12)


def test_solvers_against_dense_solve():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(12, 12, generator=gen, dtype=D)
    H = A @ A.T / 12 + 0.5 * torch.eye(12, dtype=D)
    b = torch.randn(12, generator=gen, dtype=D)
    ref = torch.linalg.solve(H, b)
    hvp = lambda v: [H @ v[0]]  # noqa: E731
    (z,) = conjugate_gradient(hvp, [b], iters=100, tol=1e-14)
    assert torch.allclose(z, ref, atol=1e-11, rtol=0)
    alpha = 1.0 / float(torch.linalg.eigvalsh(H)[-1])
    (z,) = neumann_series(hvp, [b], terms=3000, alpha=alpha)
    assert torch.allclose(z, ref, atol=1e-10, rtol=0)
    # a few terms: exactly the partial sum alpha * sum_q (I - alpha H)^q b
    (z3,) = neumann_series(hvp, [b], terms=3, alpha=alpha)
    M = torch.eye(12, dtype=D) - alpha * H
    assert torch.allclose(z3, alpha * (b + M @ b + M @ M @ b), atol=1e-14, rtol=0)


def test_gradient_descent_on_log_lambda_reaches_validation_optimum():
    X, y, Xv, yv = rb.make_data()
    t_star = rb.golden_log_lambda(X, y, Xv, yv)
    t = torch.tensor([math.log(1.0)], dtype=D, requires_grad=True)
    w = torch.zeros(X.shape[1], dtype=D, requires_grad=True)
    step = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / len(y))[-1] + 1.0)  # lam stays below 1
    for _ in range(100):
        lam = t.exp()
        upper, lower = _closures(X, y, Xv, yv, lam, w)
        for _ in range(2000):  # inner gradient descent, warm-started
            (gw,) = torch.autograd.grad(lower(), [w])
            with torch.no_grad():
                w -= step * gw
            if float(gw.norm()) < 1e-13:
                break
        (g,) = implicit_hypergradient(upper, lower, [t], [w])
        with torch.no_grad():
            t -= 1.0 * g
    t = float(t.detach())
    assert abs(t - t_star) <= 1e-4 * abs(t_star)
    lam_found, lam_star = math.exp(t), math.exp(t_star)
    assert abs(lam_found - lam_star) <= 1e-4 * lam_star


def test_invalid_arguments():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="method"):
        implicit_hypergradient(lambda: x.sum(), lambda: (x**2).sum(), [x], [x], method="lu")
    with pytest.raises(ValueError, match="iters"):
        conjugate_gradient(lambda v: v, [torch.ones(2)], iters=0)
    with pytest.raises(ValueError, match="alpha"):
        neumann_series(lambda v: v, [torch.ones(2)], alpha=0.0)
