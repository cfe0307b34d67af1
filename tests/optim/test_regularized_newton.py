"""Gradient-regularized Newton with the adaptive search of arXiv:2506.13710 (Algorithm 1):
closed forms on quadratics, scikit-learn's logistic-regression optimum, and a float64 transcription of
the authors' ``grad_norm_smooth`` step for step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references.grad_norm_smooth_paper import algorithm1
from torch import nn

from basin.landscape import CurvatureOperator
from basin.optim.regularized_newton import RegularizedNewton

D = torch.float64


def _quadratic(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=D)
    q = m @ m.T + 0.5 * torch.eye(n, dtype=D)
    b = torch.randn(n, generator=g, dtype=D)
    return q, b


def _quad_closure(x, q, b):
    def closure():
        x.grad = None
        loss = 0.5 * x @ q @ x - b @ x
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("curv", ["operator", "fd"])
def test_quadratic_one_newton_step_reaches_the_minimizer(solver, curv):
    q, b = _quadratic()
    x = torch.zeros(8, dtype=D, requires_grad=True)
    curvature = (lambda: lambda v: q @ v) if curv == "operator" else None
    # gamma huge: lambda = ||g|| / gamma ~ 1e-30, the plain Newton step
    opt = RegularizedNewton(
        [x], gamma=1e30, adaptive=False, solver=solver, curvature=curvature, cg_iters=8
    )
    opt.step(_quad_closure(x, q, b))
    x_star = torch.linalg.solve(q, b)
    # fd: central differences are exact for a quadratic up to rounding (~eps^(2/3) relative)
    tol = 1e-12 if curv == "operator" else 1e-8
    torch.testing.assert_close(x.detach(), x_star, rtol=tol, atol=tol)


def test_least_squares_one_step_with_landscape_hessian():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 5, generator=g, dtype=D)
    Y = torch.randn(40, 2, generator=g, dtype=D)
    torch.manual_seed(0)
    model = nn.Linear(5, 2).double()
    loss_fn = nn.MSELoss()

    def closure():
        model.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        return loss

    opt = RegularizedNewton(
        model.parameters(),
        gamma=1e30,
        adaptive=False,
        solver="exact",
        curvature=lambda: CurvatureOperator(model, loss_fn, (X, Y)),
    )
    opt.step(closure)
    Xa = torch.cat([X, torch.ones(40, 1, dtype=D)], 1)
    sol = torch.linalg.lstsq(Xa, Y).solution  # (6, 2): weight^T then bias
    torch.testing.assert_close(model.weight.detach(), sol[:5].T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), sol[5], rtol=1e-10, atol=1e-12)


def _logistic_data(n=200, d=4, seed=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    p = 1 / (1 + np.exp(-(X @ w + 0.3)))
    y = (rng.random(n) < p).astype(np.float64)  # noisy labels: a finite optimum
    return X, y


def _np_logistic(X, y):
    Xa = np.hstack([X, np.ones((len(X), 1))])

    def func(x):
        z = Xa @ x
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    def grad(x):
        s = 1 / (1 + np.exp(-(Xa @ x)))
        return Xa.T @ (s - y) / len(y)

    def hess(x):
        s = 1 / (1 + np.exp(-(Xa @ x)))
        return (Xa * (s * (1 - s))[:, None]).T @ Xa / len(y)

    return func, grad, hess


def _torch_logistic(X, y, x0):
    Xt, yt = torch.tensor(X), torch.tensor(y)[:, None]
    model = nn.Linear(X.shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(x0[:-1])[None])
        model.bias.copy_(torch.tensor(x0[-1:]))
    loss_fn = nn.BCEWithLogitsLoss()

    def closure():
        model.zero_grad()
        loss = loss_fn(model(Xt), yt)
        loss.backward()
        return loss

    return model, closure, lambda: CurvatureOperator(model, loss_fn, (Xt, yt))


def _flat(model):
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]).numpy()


@pytest.mark.parametrize(
    ("adaptive", "gamma0", "start", "solver"),
    [
        (True, 1.0, 2.0, "exact"),
        (True, 50.0, 2.0, "exact"),  # the search rejects and halves gamma
        (True, 50.0, 1.0, "exact"),  # a step the constant 8 of the test accepts and 4 would not
        (True, 50.0, 1.0, "cg"),
        (False, 0.5, 2.0, "exact"),
        (False, 0.5, 2.0, "cg"),
    ],
)
def test_matches_transcription_step_for_step(adaptive, gamma0, start, solver):
    X, y = _logistic_data()
    func, grad, hess = _np_logistic(X, y)
    x0 = np.full(5, start)  # far from the optimum
    xs, gammas = algorithm1(func, grad, hess, x0, 8, gamma0=gamma0, adaptive=adaptive)
    model, closure, curv = _torch_logistic(X, y, x0)
    opt = RegularizedNewton(
        model.parameters(),
        gamma=gamma0,
        adaptive=adaptive,
        solver=solver,
        curvature=curv,
        cg_iters=20,
        cg_tol=1e-15,
    )
    for k in range(8):
        opt.step(closure)
        np.testing.assert_allclose(_flat(model), xs[k + 1], rtol=1e-10, atol=1e-12)
        if adaptive and k < 6:  # later ||g|| ~ 1e-13: the test compares f at rounding level
            assert opt.state[model.weight]["gamma"] == pytest.approx(gammas[k], rel=1e-12)
    if adaptive and gamma0 == 50.0:
        assert min(gammas) < 50.0  # the search did reject a step on this path


def _sklearn_optimum(X, y):
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=np.inf, tol=1e-12, solver="newton-cholesky", max_iter=100)
    m.fit(X, y)
    x = np.r_[m.coef_[0], m.intercept_]
    assert np.linalg.norm(_np_logistic(X, y)[1](x)) < 1e-12
    return x


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_logistic_regression_reaches_sklearn_optimum(solver):
    X, y = _logistic_data()
    x_star = _sklearn_optimum(X, y)
    model, closure, curv = _torch_logistic(X, y, np.zeros(5))
    opt = RegularizedNewton(model.parameters(), solver=solver, curvature=curv)
    for _ in range(12):
        opt.step(closure)
    np.testing.assert_allclose(_flat(model), x_star, rtol=0, atol=1e-6)


def test_finite_difference_hessian_reaches_sklearn_optimum():
    X, y = _logistic_data(seed=3)
    x_star = _sklearn_optimum(X, y)
    model, closure, _ = _torch_logistic(X, y, np.zeros(5))
    opt = RegularizedNewton(model.parameters(), cg_iters=5)
    for _ in range(12):
        opt.step(closure)
    np.testing.assert_allclose(_flat(model), x_star, rtol=0, atol=1e-6)


def test_noisy_hessian_still_converges_with_monotone_loss():
    # A_k = H + E, E a fixed symmetric perturbation of 30% of ||H||: the paper's theory keeps
    # the global linear rate on logistic regression (the search enlarges lambda as needed)
    X, y = _logistic_data(seed=4)
    x_star = _sklearn_optimum(X, y)
    model, closure, curv = _torch_logistic(X, y, np.zeros(5))
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 5, generator=g, dtype=D)
    e = 0.5 * (e + e.T)

    def noisy():
        op = curv()
        h = torch.stack([op.matvec(c) for c in torch.eye(5, dtype=D)], 1)
        pert = 0.3 * torch.linalg.matrix_norm(h, 2) / torch.linalg.matrix_norm(e, 2) * e
        return lambda v: h @ v + pert @ v

    opt = RegularizedNewton(model.parameters(), solver="exact", curvature=noisy)
    losses = [float(closure().detach())]
    for _ in range(25):
        opt.step(closure)
        losses.append(float(closure().detach()))
    assert all(b <= a + 1e-15 for a, b in zip(losses, losses[1:]))
    np.testing.assert_allclose(_flat(model), x_star, rtol=0, atol=1e-6)


def test_ggn_on_a_nonconvex_network_drives_the_gradient_to_zero():
    # the GGN (PSD, not the Hessian) of a tanh network fitting a teacher of its own shape
    g = torch.Generator().manual_seed(5)
    X = torch.randn(32, 3, generator=g, dtype=D)
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    Y = teacher(X).detach()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    loss_fn = nn.MSELoss()

    def closure():
        model.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        return loss

    def gnorm():
        closure()
        return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())

    g0 = gnorm()
    opt = RegularizedNewton(
        model.parameters(),
        solver="exact",
        curvature=lambda: CurvatureOperator(model, loss_fn, (X, Y), kind="ggn"),
    )
    losses = [float(closure().detach())]
    for _ in range(10):
        opt.step(closure)
        losses.append(float(closure().detach()))
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # accepted steps decrease f
    assert gnorm() < 1e-3 * g0


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma_min": -1.0}, "gamma_min"),
        ({"eps": -1e-3}, "eps"),
        ({"max_search": 0}, "max_search"),
        ({"solver": "lu"}, "solver"),
        ({"cg_iters": 0}, "cg_iters"),
        ({"cg_tol": -1.0}, "cg_tol"),
        ({"adaptive": 1}, "adaptive"),
        ({"curvature": 3}, "curvature"),
    ],
)
def test_invalid_hyperparameters(kw, name):
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        RegularizedNewton([x], **kw)


def test_invalid_use():
    x = torch.zeros(2, dtype=D, requires_grad=True)
    y = torch.zeros(2, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="one parameter group"):
        RegularizedNewton([{"params": [x]}, {"params": [y]}])
    opt = RegularizedNewton([x])
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    model = nn.Linear(2, 1).double()
    X, Y = torch.randn(4, 2, dtype=D), torch.randn(4, 1, dtype=D)
    wrong = RegularizedNewton(
        list(model.parameters())[::-1],
        curvature=lambda: CurvatureOperator(model, nn.MSELoss(), (X, Y)),
    )

    def closure():
        model.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="same order"):
        wrong.step(closure)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_negative_curvature_regularizes_more_and_reaches_a_local_minimum(solver):
    # f = sum(x^4 / 4 - x^2 / 2): the Hessian 3 x^2 - 1 is negative definite near 0, so the
    # first systems are indefinite; the minima are x_i = +-1
    x = torch.tensor([0.2, -0.3, 0.1], dtype=D, requires_grad=True)

    def closure():
        x.grad = None
        loss = (x**4 / 4 - x**2 / 2).sum()
        loss.backward()
        return loss

    opt = RegularizedNewton([x], solver=solver, cg_iters=3)
    losses = [float(closure().detach())]
    for _ in range(15):
        opt.step(closure)
        losses.append(float(closure().detach()))
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    torch.testing.assert_close(x.detach().abs(), torch.ones(3, dtype=D), rtol=0, atol=1e-8)


def test_step_returns_the_closure_loss_at_the_start():
    q, b = _quadratic(n=3)
    x = torch.ones(3, dtype=D, requires_grad=True)
    closure = _quad_closure(x, q, b)
    before = float(closure().detach())
    opt = RegularizedNewton([x])
    out = opt.step(closure)
    assert isinstance(out, torch.Tensor) and float(out.detach()) == before
    assert float(closure().detach()) < before


def test_table_softmax_model_exact_hessian():
    # the exact Hessian that the optimizer table's reference check gives the adaptive variants
    # (tests/optim_db.py): equal to the double-backward Hessian of the batch's cross-entropy
    from optim_db import _SoftmaxRegression

    torch.manual_seed(0)
    model = _SoftmaxRegression().double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 8, generator=g, dtype=D), torch.randint(0, 4, (32,), generator=g)
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grad = torch.cat([a.reshape(-1) for a in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(grad[i], params, retain_graph=True) for i in range(27)]
    expected = torch.stack([torch.cat([a.reshape(-1) for a in row]) for row in rows])
    torch.testing.assert_close(model.exact_hessian(), expected, rtol=1e-12, atol=1e-14)
