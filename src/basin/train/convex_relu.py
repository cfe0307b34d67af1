"""Convex training of two-layer ReLU networks (Pilanci & Ergen, arXiv:2002.10553; Bai, Gautam
& Sojoudi, "Efficient Global Optimization of Two-layer ReLU Networks")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from basin.optim._base import check_int, check_range

__all__ = ["ConvexReLUResult", "activation_patterns", "fit_convex_relu", "relu_objective"]


@dataclass
class ConvexReLUResult:
    """What :func:`fit_convex_relu` returns.

    ``model`` is ``Linear(d, m, bias=False) -> ReLU -> Linear(m, 1, bias=False)`` (float64) with
    the ``m = n_neurons`` recovered neurons; ``objective`` is the convex program's value at the
    solution (equal to :func:`relu_objective` of ``model`` at a global optimum); ``patterns`` is
    the ``n x P`` 0/1 matrix of the ``D_i`` used; ``v`` and ``w`` are the ``d x P`` solutions;
    ``status`` is the solver's."""

    model: nn.Sequential
    objective: float
    n_neurons: int
    patterns: np.ndarray
    v: np.ndarray
    w: np.ndarray
    status: str


def _as_numpy(a: Any, name: str) -> np.ndarray:
    arr = a.detach().cpu().double().numpy() if isinstance(a, Tensor) else np.asarray(a, float)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def activation_patterns(X: Any, n_patterns: int, seed: int = 0) -> np.ndarray:
    """``n_patterns`` sampled arrangements ``1[X u >= 0]``, ``u ~ N(0, I)``, as the distinct,
    nonzero columns of an ``n x P`` 0/1 matrix (``P <= n_patterns``)."""
    Xn = _as_numpy(X, "X")
    if Xn.ndim != 2:
        raise ValueError(f"X must be a 2-D (n, d) array, got shape {Xn.shape}")
    check_int("n_patterns", n_patterns, 1)
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((Xn.shape[1], n_patterns))
    D = (Xn @ U >= 0).astype(float)
    D = np.unique(D, axis=1)
    return D[:, D.any(axis=0)]


def relu_objective(model: nn.Sequential, X: Any, y: Any, beta: float) -> float:
    """The non-convex training objective of a bias-free Linear-ReLU-Linear ``model``:
    ``1/2 ||f(X) - y||^2 + beta/2 (||U||_F^2 + ||alpha||^2)``, in float64."""
    Xt = torch.as_tensor(_as_numpy(X, "X"))
    yt = torch.as_tensor(_as_numpy(y, "y")).reshape(-1)
    first, last = model[0], model[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    with torch.no_grad():
        U = first.weight.double()
        a = last.weight.double()
        f = torch.relu(Xt @ U.T) @ a.T
        fit = 0.5 * float(((f.reshape(-1) - yt) ** 2).sum())
        return fit + 0.5 * beta * float((U**2).sum() + (a**2).sum())


def fit_convex_relu(
    X: Any,
    y: Any,
    beta: float,
    n_patterns: int = 100,
    seed: int = 0,
    *,
    patterns: Any = None,
    solver: str | None = None,
    tol: float = 1e-5,
) -> ConvexReLUResult:
    r"""Globally optimal two-layer ReLU network for squared loss with weight decay, by the
    convex reformulation of Pilanci & Ergen (arXiv:2002.10553)::

        min_{v_i, w_i}  1/2 || sum_i D_i X (v_i - w_i) - y ||^2 + beta sum_i (||v_i|| + ||w_i||)
        s.t.            (2 D_i - I) X v_i >= 0,   (2 D_i - I) X w_i >= 0

    over the activation patterns ``D_i = diag(1[X u_i >= 0])`` (``n_patterns`` sampled ones, or
    your own ``patterns``, an ``n x P`` 0/1 matrix: with all of them it is the global optimum of
    ``1/2 ||f(X) - y||^2 + beta/2 (||U||_F^2 + ||alpha||^2)`` for enough neurons), solved by
    cvxpy (``pip install basin-optim[convex]``; ``solver`` names a cvxpy solver). Neurons are
    recovered as ``u = v_i / sqrt(||v_i||)``, ``alpha = sqrt(||v_i||)`` and ``u = w_i /
    sqrt(||w_i||)``, ``alpha = -sqrt(||w_i||)``, for the ``v_i, w_i`` with norm above ``tol``
    times the largest (the others, an interior-point solver's near-zeros, are set to zero in
    the returned ``v``, ``w`` and ``objective``, so that those are the network's). No biases: append a column of ones to ``X`` for one (it is then
    regularized like the other weights)."""
    try:
        import cvxpy as cp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fit_convex_relu needs cvxpy: pip install basin-optim[convex]") from e
    Xn = _as_numpy(X, "X")
    if Xn.ndim != 2 or Xn.shape[0] < 1 or Xn.shape[1] < 1:
        raise ValueError(f"X must be a non-empty 2-D (n, d) array, got shape {Xn.shape}")
    yn = _as_numpy(y, "y").reshape(-1)
    if yn.shape[0] != Xn.shape[0]:
        raise ValueError(f"y must have n = {Xn.shape[0]} entries, got {yn.shape[0]}")
    beta = check_range("beta", beta, 0.0, float("inf"), low_inclusive=False)
    check_int("n_patterns", n_patterns, 1)
    tol = check_range("tol", tol, 0.0, 1.0, high_inclusive=False)
    if patterns is None:
        D = activation_patterns(Xn, n_patterns, seed)
    else:
        D = _as_numpy(patterns, "patterns")
        if D.ndim != 2 or D.shape[0] != Xn.shape[0] or not np.isin(D, (0.0, 1.0)).all():
            raise ValueError(f"patterns must be an (n={Xn.shape[0]}, P) matrix of 0/1 entries")
    n, d = Xn.shape
    P = D.shape[1]
    S = 2.0 * D - 1.0
    V = cp.Variable((d, P))
    W = cp.Variable((d, P))
    pred = cp.sum(cp.multiply(D, Xn @ (V - W)), axis=1)
    obj = 0.5 * cp.sum_squares(pred - yn) + beta * (
        cp.sum(cp.norm(V, 2, axis=0)) + cp.sum(cp.norm(W, 2, axis=0))
    )
    cons = [cp.multiply(S, Xn @ V) >= 0, cp.multiply(S, Xn @ W) >= 0]
    prob = cp.Problem(cp.Minimize(obj), cons)
    prob.solve(solver=solver)
    if V.value is None or W.value is None:
        raise RuntimeError(f"the convex program was not solved (status {prob.status})")
    v, w = np.asarray(V.value), np.asarray(W.value)
    nv, nw = np.linalg.norm(v, axis=0), np.linalg.norm(w, axis=0)
    scale = max(float(nv.max(initial=0.0)), float(nw.max(initial=0.0)))
    v[:, nv <= tol * scale], nv[nv <= tol * scale] = 0.0, 0.0
    w[:, nw <= tol * scale], nw[nw <= tol * scale] = 0.0, 0.0
    us, alphas = [], []
    for cols, norms, sign in ((v, nv, 1.0), (w, nw, -1.0)):
        for i in np.nonzero(norms)[0]:
            r = np.sqrt(norms[i])
            us.append(cols[:, i] / r)
            alphas.append(sign * r)
    m = len(us)
    hidden = nn.Linear(d, m, bias=False, dtype=torch.float64)
    out = nn.Linear(m, 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        hidden.weight.copy_(torch.as_tensor(np.array(us).reshape(m, d)))
        out.weight.copy_(torch.as_tensor(np.array(alphas).reshape(1, m)))
    model = nn.Sequential(hidden, nn.ReLU(), out)
    resid = (D * (Xn @ (v - w))).sum(axis=1) - yn
    objective = 0.5 * float(resid @ resid) + beta * float(nv.sum() + nw.sum())
    return ConvexReLUResult(model, objective, m, D, v, w, str(prob.status))
