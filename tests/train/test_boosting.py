"""Gradient-boosted sequential training: each stage's target against a float64 transcription
of the pseudo-residual (autograd of the loss), the exact line search, non-increasing loss,
one stage = ordinary training, a comparable loss to joint training; argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from basin.train import fit_boosted, pseudo_residual
from basin.train.boosting import _line_search

D64 = torch.float64


def data(n=128, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D64)
    y = torch.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * torch.randn(n, generator=g, dtype=D64)
    return X, y


def reference_residual(y, F, loss):
    """-dL/dF by autograd of the per-sample loss written out (float64)."""
    F = F.detach().double().requires_grad_()
    y = y.double()
    if loss == "squared":
        L = 0.5 * (y - F) ** 2
    else:
        L = torch.log1p(torch.exp(F)) - y * F
    (g,) = torch.autograd.grad(L.sum(), F)
    return -g


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_stage_targets_are_pseudo_residuals(loss):
    X, y = data()
    if loss == "logistic":
        y = (y > 0).to(D64)
    targets = {}
    net = fit_boosted(
        X,
        y,
        4,
        nu=0.5,
        loss=loss,
        epochs=30,
        seed=1,
        on_stage=lambda t, r: targets.__setitem__(t, r),
    )
    Y = y.reshape(-1, 1)
    for t in range(4):
        with torch.no_grad():
            F = net(X, n_stages=t)  # the ensemble before stage t
        torch.testing.assert_close(
            targets[t], reference_residual(Y, F, loss), rtol=1e-12, atol=1e-12
        )
    if loss == "squared":  # y - F exactly
        F = net(X, n_stages=2).detach()
        assert torch.equal(pseudo_residual(Y, F), Y - F)
        assert torch.equal(targets[2], Y - F)
    # F_0 minimizes the mean loss over constants: mean / log-odds
    p = y.mean()
    want = p if loss == "squared" else torch.log(p / (1 - p))
    torch.testing.assert_close(net.bias, want.reshape(1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_line_search_is_the_minimizer(loss):
    g = torch.Generator().manual_seed(0)
    F, h = torch.randn(50, 1, generator=g, dtype=D64), torch.randn(50, 1, generator=g, dtype=D64)
    y = torch.randn(50, 1, generator=g, dtype=D64)
    if loss == "logistic":
        y = (y > 0).to(D64)
    rho = _line_search(y, F, h, loss)

    def total(r):
        Fr = F + r * h
        return float(
            (0.5 * (y - Fr) ** 2).sum()
            if loss == "squared"
            else (torch.nn.functional.softplus(Fr) - y * Fr).sum()
        )

    # the derivative vanishes at rho (central difference), and rho beats its neighbours
    eps = 1e-5
    assert abs(total(rho + eps) - total(rho - eps)) / (2 * eps) < 1e-6
    assert total(rho) <= min(total(rho + 1e-3), total(rho - 1e-3))


@pytest.mark.parametrize("loss", ["squared", "logistic"])
def test_training_loss_non_increasing(loss):
    X, y = data(seed=2)
    if loss == "logistic":
        y = (y > 0).to(D64)
    net = fit_boosted(X, y, 6, nu=0.3, loss=loss, epochs=40, seed=0)
    L = net.train_losses
    assert len(L) == 7 and all(b <= a for a, b in zip(L, L[1:]))
    assert L[-1] < 0.9 * L[0]
    # the recorded losses are those of the returned network
    with torch.no_grad():
        F = net(X)
    Y = y.reshape(-1, 1)
    got = (
        0.5 * ((Y - F) ** 2).mean()
        if loss == "squared"
        else (torch.nn.functional.softplus(F) - Y * F).mean()
    )
    assert float(got) == pytest.approx(L[-1], rel=1e-12)


def test_one_stage_is_ordinary_training():
    X, y = data(seed=3)
    net = fit_boosted(X, y, 1, nu=1.0, line_search=False, hidden=8, epochs=50, lr=1e-2, seed=5)
    # the same block trained on its own, by the same recipe: mean offset + block, MSE/2
    torch.manual_seed(5)
    block = nn.Sequential(nn.Linear(3, 8, dtype=D64), nn.ReLU(), nn.Linear(8, 1, dtype=D64))
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    Y, c = y.reshape(-1, 1), y.mean()
    for _ in range(50):
        opt.zero_grad()
        (0.5 * ((c + block(X) - Y) ** 2).mean()).backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(net(X), c + block(X), rtol=1e-9, atol=1e-9)


def test_comparable_to_joint_training():
    """8 stages of 4 units against one 32-unit network trained jointly for as many Adam steps
    (8 x 150), on held-out data. Measured: boosted ~0.058, joint ~0.024 (constant ~0.8): joint
    training wins here by ~2.4x; the bound is a factor 3, so this guards against a regression,
    not a claim that boosting is better."""
    X, y = data(n=512, seed=4)
    Xte, Yte, X, y = X[256:], y[256:].reshape(-1, 1), X[:256], y[:256]
    boosted = fit_boosted(X, y, 8, hidden=4, nu=0.5, epochs=150, lr=2e-2, seed=0)
    torch.manual_seed(0)
    joint = nn.Sequential(nn.Linear(3, 32, dtype=D64), nn.ReLU(), nn.Linear(32, 1, dtype=D64))
    opt = torch.optim.Adam(joint.parameters(), lr=2e-2)
    Y = y.reshape(-1, 1)
    for _ in range(8 * 150):
        opt.zero_grad()
        (0.5 * ((joint(X) - Y) ** 2).mean()).backward()
        opt.step()
    with torch.no_grad():
        lj = float(0.5 * ((joint(Xte) - Yte) ** 2).mean())
        lb = float(0.5 * ((boosted(Xte) - Yte) ** 2).mean())
        l0 = float(0.5 * ((Yte - Y.mean()) ** 2).mean())
    print(f"held-out: boosted 8x4 {lb:.4f}  joint 32 {lj:.4f}  constant {l0:.4f}")
    assert lb < 0.1 * l0
    assert lb < 3.0 * lj
    assert sum(p.numel() for p in boosted.parameters()) == 8 * (3 * 4 + 4 + 4 + 1)


def test_integrated_network():
    X, y = data(n=64, seed=6)
    net = fit_boosted(X, y.reshape(-1, 1).repeat(1, 2), 3, hidden=5, nu=0.4, epochs=20, seed=0)
    seq = net.to_sequential()
    assert seq[0].out_features == 15 and seq[2].out_features == 2
    with torch.no_grad():
        torch.testing.assert_close(seq(X), net(X), rtol=1e-12, atol=1e-12)
    other = fit_boosted(X, y, 2, block=lambda: nn.Linear(3, 1, dtype=D64), epochs=2)
    with pytest.raises(ValueError, match="to_sequential"):
        other.to_sequential()


def test_custom_block_and_float32():
    X, y = data(n=64)
    X32, y32 = X.float(), y.float()
    net = fit_boosted(X32, y32, 2, block=lambda: nn.Linear(3, 1), epochs=10, seed=0)
    assert net(X32).dtype == torch.float32 and net(X32).shape == (64, 1)
    state = copy.deepcopy(net.state_dict())
    assert "weights" in state and "bias" in state


def test_invalid_arguments():
    X, y = data(n=16)
    for kw, name in [
        ({"nu": 0.0}, "nu"),
        ({"nu": 1.5}, "nu"),
        ({"hidden": 0}, "hidden"),
        ({"epochs": -1}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"loss": "hinge"}, "loss"),
    ]:
        with pytest.raises(ValueError, match=name):
            fit_boosted(X, y, 2, **kw)
    with pytest.raises(ValueError, match="n_stages"):
        fit_boosted(X, y, 0)
    with pytest.raises(ValueError, match="y must"):
        fit_boosted(X, y[:5], 2)
    with pytest.raises(ValueError, match="0/1"):
        fit_boosted(X, y, 2, loss="logistic")
    with pytest.raises(ValueError, match="both labels"):
        fit_boosted(X, torch.ones(16, dtype=D64), 2, loss="logistic")
    with pytest.raises(ValueError, match="loss"):
        pseudo_residual(y, y, "hinge")
    net = fit_boosted(X, y, 2, epochs=1)
    with pytest.raises(ValueError, match="n_stages"):
        net(X, n_stages=3)
