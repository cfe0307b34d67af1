"""Convex training of two-layer ReLU networks: on an instance small enough to enumerate every
activation pattern, the convex optimum is the non-convex objective of the recovered network
and no Adam run from random inits goes below it; the recovered network's predictions are the
convex model's; argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("cvxpy")

from basin.train import activation_patterns, fit_convex_relu, relu_objective  # noqa: E402


def all_patterns_2d(X: np.ndarray) -> np.ndarray:
    """Every pattern ``1[X u >= 0]``, ``u`` in R^2, exactly: the sign of ``x_j . u`` only
    changes at the angles perpendicular to some ``x_j``, so evaluating at each such angle and
    between consecutive ones visits every cell of the arrangement and every boundary."""
    crit = []
    for x in X:
        t = math.atan2(x[1], x[0])
        crit += [(t + math.pi / 2) % (2 * math.pi), (t - math.pi / 2) % (2 * math.pi)]
    crit = sorted(crit)
    mids = [(a + b) / 2 for a, b in zip(crit, crit[1:] + [crit[0] + 2 * math.pi])]
    angles = np.array(crit + mids)
    U = np.stack([np.cos(angles), np.sin(angles)])
    # at a critical angle x_j . u is zero up to rounding; decide it as exactly zero (>= 0)
    Z = X @ U
    Z[np.abs(Z) < 1e-12] = 0.0
    D = np.unique((Z >= 0).astype(float), axis=1)
    return D[:, D.any(axis=0)]


def tiny(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((6, 2)), rng.standard_normal(6)


def adam_runs(X, y, beta, m, runs, steps, seed=0):
    """``runs`` independent Adam trainings of the non-convex objective at once (Adam is
    elementwise, so one summed loss over stacked runs is ``runs`` separate trainings); the
    final objective of each run, float64."""
    g = torch.Generator().manual_seed(seed)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    U = (torch.randn(runs, m, X.shape[1], generator=g, dtype=torch.float64)).requires_grad_()
    a = (torch.randn(runs, m, generator=g, dtype=torch.float64) / math.sqrt(m)).requires_grad_()

    def objs():
        f = (torch.relu(torch.einsum("nd,rmd->rnm", Xt, U)) * a[:, None, :]).sum(-1)
        reg = (U**2).sum((1, 2)) + (a**2).sum(1)
        return 0.5 * ((f - yt) ** 2).sum(1) + 0.5 * beta * reg

    opt = torch.optim.Adam([U, a], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        objs().sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return objs().numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_global_optimum_certificate(seed):
    X, y = tiny(seed)
    beta = 0.1
    D = all_patterns_2d(X)
    res = fit_convex_relu(X, y, beta, patterns=D)
    assert res.status == "optimal"
    # the convex optimum is the non-convex objective of the recovered network
    assert relu_objective(res.model, X, y, beta) == pytest.approx(res.objective, rel=1e-6)
    # ... and no Adam run of the non-convex problem (16 neurons >= n + 1) goes below it,
    # while the best of them reaches it: the convex value is the global optimum
    final = adam_runs(X, y, beta, m=16, runs=16, steps=1000, seed=seed)
    assert final.min() >= res.objective - 1e-6
    assert final.min() <= res.objective * (1 + 1e-3)
    # sampled patterns are a subset of all of them: never a lower optimum
    sub = fit_convex_relu(X, y, beta, n_patterns=3, seed=seed)
    assert set(map(tuple, sub.patterns.T)) <= set(map(tuple, D.T))
    assert sub.objective >= res.objective - 1e-7


def test_recovered_predictions_are_the_convex_model():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((25, 4)), rng.standard_normal(25)
    res = fit_convex_relu(X, y, 0.05, n_patterns=30, seed=1)
    convex_pred = (res.patterns * (X @ (res.v - res.w))).sum(axis=1)
    with torch.no_grad():
        net_pred = res.model(torch.as_tensor(X)).reshape(-1).numpy()
    scale = np.abs(convex_pred).max()
    np.testing.assert_allclose(net_pred, convex_pred, rtol=0, atol=1e-7 * scale)
    assert res.n_neurons == res.model[0].weight.shape[0] >= 1
    # the recovered neurons are balanced: ||u_j||^2 = alpha_j^2 = ||v_i||
    u2 = (res.model[0].weight ** 2).sum(1)
    a2 = res.model[2].weight.reshape(-1) ** 2
    torch.testing.assert_close(u2, a2, rtol=1e-12, atol=0)
    assert relu_objective(res.model, X, y, 0.05) == pytest.approx(res.objective, rel=1e-6)


def test_activation_patterns_are_realized():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10, 3))
    D = activation_patterns(X, 50, seed=2)
    assert D.shape[0] == 10 and 1 <= D.shape[1] <= 50
    assert len(set(map(tuple, D.T))) == D.shape[1] and D.any(axis=0).all()
    U = np.random.default_rng(2).standard_normal((3, 50))
    assert set(map(tuple, D.T)) <= set(map(tuple, (X @ U >= 0).astype(float).T))


def test_invalid_arguments():
    X, y = tiny()
    with pytest.raises(ValueError, match="beta"):
        fit_convex_relu(X, y, 0.0)
    with pytest.raises(ValueError, match="beta"):
        fit_convex_relu(X, y, float("nan"))
    with pytest.raises(ValueError, match="n_patterns"):
        fit_convex_relu(X, y, 0.1, n_patterns=0)
    with pytest.raises(ValueError, match="tol"):
        fit_convex_relu(X, y, 0.1, tol=-1.0)
    with pytest.raises(ValueError, match="y must have"):
        fit_convex_relu(X, y[:3], 0.1)
    with pytest.raises(ValueError, match="X must"):
        fit_convex_relu(X[:, 0], y, 0.1)
    with pytest.raises(ValueError, match="patterns"):
        fit_convex_relu(X, y, 0.1, patterns=np.full((6, 2), 0.5))
    with pytest.raises(ValueError, match="finite"):
        fit_convex_relu(np.full((6, 2), np.inf), y, 0.1)
