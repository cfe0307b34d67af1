"""BO-REP against a float64 transcription of its equations, and convergence on ridge."""

from __future__ import annotations

import pytest
import torch
from references import borep_paper as ref
from references import ridge_bilevel as rb

from basin.train import BOREP

D = torch.float64


def _problem(X, y, Xv, yv, t0):
    t = torch.tensor([t0], dtype=D, requires_grad=True)
    w = torch.zeros(X.shape[1], dtype=D, requires_grad=True)

    def lower(S):
        r = X[S] @ w - y[S]
        return r @ r / (2 * len(S)) + t.exp().sum() / 2 * (w @ w)

    def upper(S):
        r = Xv[S] @ w - yv[S]
        return r @ r / (2 * len(S))

    return t, w, upper, lower


def _batches(n, size, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:size] for _ in range(count)]


HP = dict(
    lr=0.05,
    beta=0.9,
    lower_lr=0.1,
    period=3,
    lower_steps=4,
    neumann_terms=6,
    neumann_alpha=0.1,
    refine_epochs=3,
    refine_steps=5,
    refine_lr=0.2,
)


def test_matches_float64_transcription_on_same_batches():
    # one penalty per weight, and a direct upper term: the normalized step then depends on
    # the whole hypergradient vector, not only on its sign
    X, y, Xv, yv = rb.make_data()
    d, K, rho = X.shape[1], 25, 0.3
    up = _batches(len(yv), 16, K, 1)
    low = _batches(len(y), 8, 2000, 2)
    t0 = torch.linspace(-1.0, 0.5, d, dtype=D)
    t = t0.clone().requires_grad_(True)
    w = torch.zeros(d, dtype=D, requires_grad=True)

    def lower(S):
        r = X[S] @ w - y[S]
        return r @ r / (2 * len(S)) + (t.exp() * w * w).sum() / 2

    def upper(S):
        r = Xv[S] @ w - yv[S]
        return r @ r / (2 * len(S)) + rho / 2 * (t @ t)

    opt = BOREP([t], [w], upper, lower, **HP)
    drawn = []

    def counted():
        for b in low:
            drawn.append(1)
            yield b

    it = counted()
    got = []
    for S in up:
        opt.step(S, it)
        got.append(t.detach().clone())
    want = ref.borep_ridge(X, y, Xv, yv, t0, torch.zeros(d, dtype=D), up, iter(low), rho=rho, **HP)
    assert float((got[-1] - t0).norm()) > 0.3  # the upper variable moved
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    # the batches consumed: refinement 5+10+20, then 4 per periodic step, Q per hypergradient
    n_periodic = len([k for k in range(1, K) if k % 3 == 0])
    assert len(drawn) == 35 + 4 * n_periodic + 6 * K


def test_converges_to_ridge_validation_optimum():
    X, y, Xv, yv = rb.make_data()
    t_star = rb.golden_log_lambda(X, y, Xv, yv)
    t, w, upper, lower = _problem(X, y, Xv, yv, 0.0)
    full_val, full_train = torch.arange(len(yv)), torch.arange(len(y))
    # 0.45 < 2 / lambda_max of the lower Hessian for every lambda <= 1 (lambda_max <= 3.1)
    opt = BOREP(
        [t],
        [w],
        upper,
        lower,
        lr=0.05,
        beta=0.5,
        lower_lr=0.45,
        period=2,
        lower_steps=20,
        neumann_terms=40,
        neumann_alpha=0.45,
        refine_epochs=4,
        refine_steps=20,
        refine_lr=0.45,
    )
    forever = iter(lambda: full_train, None)
    for k in range(200):
        opt.lr = 0.05 * 0.97**k  # a decaying step: normalized steps otherwise keep size lr
        opt.step(full_val, forever)
    assert abs(float(t.detach()) - t_star) <= 1e-3 * abs(t_star)  # measured 1.1e-4


def test_stochastic_batches_get_near_the_optimum():
    X, y, Xv, yv = rb.make_data()
    t_star = rb.golden_log_lambda(X, y, Xv, yv)
    t, w, upper, lower = _problem(X, y, Xv, yv, 0.0)
    g = torch.Generator().manual_seed(3)
    low = iter(lambda: torch.randperm(len(y), generator=g)[:10], None)
    opt = BOREP(
        [t],
        [w],
        upper,
        lower,
        lr=0.05,
        beta=0.9,
        lower_lr=0.05,
        period=2,
        lower_steps=10,
        neumann_terms=20,
        neumann_alpha=0.2,
        refine_epochs=5,
        refine_steps=20,
        refine_lr=0.1,
    )
    for k in range(150):
        opt.lr = 0.05 * 0.98**k
        opt.step(torch.randperm(len(yv), generator=g)[:30], low)
    assert abs(float(t.detach()) - t_star) <= 0.05 * abs(t_star)  # measured 0.010


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"lr": 0.0}, "lr"),
        ({"beta": 1.0}, "beta"),
        ({"period": 0}, "period"),
        ({"neumann_terms": 0}, "neumann_terms"),
        ({"neumann_alpha": -1.0}, "neumann_alpha"),
        ({"refine_epochs": -1}, "refine_epochs"),
        ({"lower_steps": 0}, "lower_steps"),
    ],
)
def test_invalid_hyperparameters(kw, name):
    t = torch.zeros(1, requires_grad=True)
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        BOREP([t], [w], lambda b: w.sum(), lambda b: (w**2).sum(), **kw)
