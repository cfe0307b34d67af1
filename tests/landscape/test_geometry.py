"""Directions (filter normalisation), loss-surface slices and linear mode connectivity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from landscape_helpers import Quadratic, quad_loss
from torch import nn

from basin.landscape import (
    direction_to,
    eigenvector_direction,
    filter_normalize,
    hessian_eigenvalues,
    lmc_barrier,
    loss_surface,
    random_direction,
)


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    ).double()


def test_filter_normalised_directions_have_the_weights_filter_norms():
    model = _convnet()
    d = random_direction(model, seed=1)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if p.ndim <= 1:  # biases and BatchNorm scale/shift: zero direction
            assert torch.count_nonzero(d[name]) == 0, name
            continue
        dn = d[name].reshape(p.shape[0], -1).norm(dim=1)
        wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(dn, wn, rtol=1e-12, atol=0)
    # different seeds give different directions, the same seed the same one
    assert not torch.equal(d["0.weight"], random_direction(model, seed=2)["0.weight"])
    assert torch.equal(d["0.weight"], random_direction(model, seed=1)["0.weight"])
    # normalising keeps the direction of each filter
    raw = random_direction(model, seed=1, normalization=None)
    fn = filter_normalize(raw, model)
    cos = torch.nn.functional.cosine_similarity(raw["4.weight"], fn["4.weight"], dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_surface_1d_and_2d_values_and_model_untouched():
    model = _convnet()
    model.train()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    loss_fn = nn.functional.cross_entropy
    state = copy.deepcopy(model.state_dict())
    res = loss_surface(model, loss_fn, (x, y), steps=5, span=(-0.5, 0.5), seed=3)
    d = res.directions[0]
    for a, val in zip(res.alphas, res.losses):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(a * d[n])
        assert abs(float(loss_fn(m(x), y).detach()) - val) < 1e-12
    assert res.losses[2] == pytest.approx(
        float(loss_fn(copy.deepcopy(model)(x), y).detach()), abs=1e-12
    )
    res2 = loss_surface(model, loss_fn, (x, y), dim=2, steps=3)
    assert res2.losses.shape == (3, 3) and res2.n_evals == 9
    assert res2.losses[1, 1] == pytest.approx(res.losses[2], abs=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running stats untouched
    assert model.training


def test_surface_along_eigenvector_of_a_quadratic_is_the_parabola():
    eigs = torch.tensor([9.0, 4.0, 1.0, 0.5, -0.25], dtype=torch.float64)
    model = Quadratic(eigs)
    x = torch.zeros(1, 1, dtype=torch.float64)
    eig = hessian_eigenvalues(model, quad_loss, (x, x), k=1, tol=1e-12)
    d = eigenvector_direction(eig, 0, model)
    res = loss_surface(model, quad_loss, (x, x), [d], steps=7, span=(-1, 1))
    # L(w + a u) = L(w) + a g.u + 0.5 lambda a^2 exactly for a quadratic
    a = res.alphas
    second_diff = (res.losses[2:] - 2 * res.losses[1:-1] + res.losses[:-2]) / (a[1] - a[0]) ** 2
    np.testing.assert_allclose(second_diff, 9.0, rtol=1e-9)


def test_lmc_barrier_self_convex_and_known_double_well():
    torch.manual_seed(0)
    x = torch.randn(50, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    lin = nn.Linear(4, 2).double()
    res = lmc_barrier(lin, lin, nn.functional.cross_entropy, (x, y), n_points=7)
    assert abs(res.barrier) <= 1e-12 and np.ptp(res.losses) <= 1e-12
    # logistic regression is convex in the weights: the loss lies below the chord
    other = nn.Linear(4, 2).double()
    res = lmc_barrier(lin, other, nn.functional.cross_entropy, (x, y), n_points=11)
    assert res.barrier <= 1e-12
    assert np.all(res.losses - res.linear <= 1e-12)
    assert np.all(res.losses[1:-1] - res.linear[1:-1] < 0)  # strictly convex along this line

    # loss (w^2 - 1)^2 between w = -1 and w = +1: barrier 1 at the midpoint
    class W(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

        def forward(self, x):
            return self.w + 0 * x.sum()

    res = lmc_barrier(
        W(-1.0),
        W(1.0),
        lambda o, t: ((o**2 - 1) ** 2).sum(),
        (x, y),
        n_points=5,
        metric=lambda o, t: o.sum(),
    )
    assert res.barrier == pytest.approx(1.0, abs=1e-14) and res.barrier_alpha == 0.5
    np.testing.assert_allclose(res.metrics, [-1, -0.5, 0, 0.5, 1], atol=1e-14)


def test_lmc_recomputes_batchnorm_statistics():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5 * torch.randn_like(p))
        b[1].running_mean.fill_(7.0)
    a.eval()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    state_a, state_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    seen = {}

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out, t)

    res = lmc_barrier(a, b, loss_fn, (x, y), n_points=3, recompute_bn=True)
    # reproduce the midpoint by hand: interpolate, set the BN stats to the batch statistics
    mid = copy.deepcopy(a)
    with torch.no_grad():
        for (n, p), q in zip(mid.named_parameters(), b.parameters()):
            p.copy_(0.5 * dict(a.named_parameters())[n] + 0.5 * q)
        h = mid[0](x)
        mid[1].running_mean.copy_(h.mean(0))
        mid[1].running_var.copy_(h.var(0, unbiased=True))
        seen["mid"] = float(loss_fn(mid(x), y))
    assert res.losses[1] == pytest.approx(seen["mid"], abs=1e-12)
    plain = lmc_barrier(a, b, loss_fn, (x, y), n_points=3)
    assert abs(plain.losses[1] - res.losses[1]) > 1e-3  # interpolated stats differ
    for k in state_a:
        assert torch.equal(a.state_dict()[k], state_a[k]) and torch.equal(
            b.state_dict()[k], state_b[k]
        )
    assert not a.training and b.training


def test_lmc_recompute_bn_keeps_every_submodule_mode():
    # model_a evaluated in train mode (batch statistics) with its Dropout switched off: the
    # BatchNorm re-estimation must not switch that Dropout back on for the evaluation
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    a = a.double().train()
    a[2].eval()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    res = lmc_barrier(a, a, nn.functional.cross_entropy, (x, y), n_points=3, recompute_bn=True)
    with torch.no_grad():  # train-mode BN uses batch statistics: every point is model_a's loss
        want = float(nn.functional.cross_entropy(a(x), y))
    np.testing.assert_allclose(res.losses, want, rtol=0, atol=1e-12)
    assert a.training and not a[2].training


def test_direction_to_and_errors():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    d = direction_to(a, b)
    torch.testing.assert_close(d["weight"], b.weight.detach() - a.weight.detach())
    with pytest.raises(ValueError, match="same"):
        direction_to(a, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="architecture"):
        lmc_barrier(
            a, nn.Linear(3, 3), nn.functional.mse_loss, (torch.zeros(2, 3), torch.zeros(2, 2))
        )
    with pytest.raises(ValueError, match="empty"):
        lmc_barrier(a, b, nn.functional.mse_loss, [])
    with pytest.raises(ValueError, match="dim"):
        loss_surface(a, nn.functional.mse_loss, (torch.zeros(2, 3), torch.zeros(2, 2)), dim=3)


class _SignNet(nn.Module):
    """logits [0, w2 tanh(w1 x)]: (w1, w2) and (-w1, -w2) are the same function, and the
    midpoint w1 = w2 = 0 has logits [0, 0] (arg-max 0 for every example)."""

    def __init__(self, w1, w2):
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(w1, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor(w2, dtype=torch.float64))

    def forward(self, x):
        z = self.w2 * torch.tanh(self.w1 * x[:, 0])
        return torch.stack([torch.zeros_like(z), z], 1)


def test_lmc_error_barrier_is_frankles_mean_endpoint_form():
    x = torch.linspace(-1, 1, 40, dtype=torch.float64)[:, None]
    y = (x[:, 0] > 0).long()  # 20 of each class
    a, b = _SignNet(1.0, 5.0), _SignNet(-1.0, -5.0)
    acc = lambda o, t: (o.argmax(1) == t).double().mean()  # noqa: E731
    res = lmc_barrier(a, b, nn.functional.cross_entropy, (x, y), n_points=5, metric=acc)
    # both endpoints classify everything right; the midpoint predicts class 0 everywhere
    np.testing.assert_allclose(res.errors, [0, 0, 0.5, 0, 0], atol=1e-15)
    assert res.error_barrier == 0.5 and res.error_barrier_alpha == 0.5
    assert res.metric_barrier == pytest.approx(0.5) and res.metric_barrier_alpha == 0.5
    # the errors are those of the interpolated models evaluated by hand, and the barrier uses
    # the mean of the endpoint errors (not the chord) when the endpoints differ
    c = _SignNet(-1.0, 5.0)  # misclassifies every example: error 1
    res = lmc_barrier(a, c, nn.functional.cross_entropy, [(x[:15], y[:15]), (x[15:], y[15:])])
    want = []
    for t in res.alphas:
        m = _SignNet(1.0 - 2.0 * t, 5.0)
        want.append(float((m(x).argmax(1) != y).double().mean()))
    np.testing.assert_allclose(res.errors, want, atol=1e-15)
    assert res.errors[0] == 0 and res.errors[-1] == 1
    j = int(np.argmax(np.asarray(want) - 0.5))
    assert res.error_barrier == pytest.approx(want[j] - 0.5, abs=1e-15)
    # an error-like metric counts increases, not decreases
    err = lambda o, t: (o.argmax(1) != t).double().mean()  # noqa: E731
    r2 = lmc_barrier(
        a, b, nn.functional.cross_entropy, (x, y), n_points=5, metric=err, higher_is_better=False
    )
    assert r2.metric_barrier == pytest.approx(0.5)
    # regression outputs: no classification error, fields stay None
    lin = nn.Linear(1, 1).double()
    r3 = lmc_barrier(lin, lin, nn.functional.mse_loss, (x, x), n_points=3)
    assert r3.errors is None and r3.error_barrier is None and r3.metric_barrier is None
    with pytest.raises(ValueError, match="higher_is_better"):
        lmc_barrier(a, b, nn.functional.cross_entropy, (x, y), higher_is_better="yes")
