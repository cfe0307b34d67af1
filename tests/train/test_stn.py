"""Self-Tuning Networks against a float64 transcription of one cycle, and on ridge regression
against the validation optimum of the closed-form ridge solution."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import ridge_bilevel as rb
from references import stn_paper as ref

from basin.train import STN, STNConv2d, STNLinear

D = torch.float64


class Net(torch.nn.Module):
    def __init__(self, d_in=3, hidden=4, d_out=2, n_hparams=2):
        super().__init__()
        self.l1 = STNLinear(d_in, hidden, n_hparams, dtype=D)
        self.l2 = STNLinear(hidden, d_out, n_hparams, dtype=D)

    def forward(self, x, h):
        return self.l2(torch.tanh(self.l1(x, h)), h)

    def penalty(self, h):
        # exp(h_0)/2 ||W1(h)||^2 + exp(h_1)/2 ||W2(h)||^2, averaged over rows of a 2-D h
        w1, w2 = self.l1.weight(h), self.l2.weight(h)
        p = h[..., 0].exp() / 2 * w1.pow(2).sum((-2, -1)) + h[..., 1].exp() / 2 * w2.pow(2).sum(
            (-2, -1)
        )
        return p.mean()


def _params(net):
    return {
        "We1": net.l1.weight_elem, "Wh1": net.l1.weight_hyper, "be1": net.l1.bias_elem,
        "bh1": net.l1.bias_hyper, "V1": net.l1.hnet, "We2": net.l2.weight_elem,
        "Wh2": net.l2.weight_hyper, "be2": net.l2.bias_elem, "bh2": net.l2.bias_hyper,
        "V2": net.l2.hnet,
    }  # fmt: skip


def _data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(n, 3, generator=g, dtype=D), torch.randn(n, 3, generator=g, dtype=D)
    Y, Yv = torch.randn(n, 2, generator=g, dtype=D), torch.randn(n, 2, generator=g, dtype=D)
    return X, Y, Xv, Yv


def _stn(net, data, cfg, lam0, sigma, seed):
    X, Y, Xv, Yv = data

    def train_loss(batch, h):
        return ((net(X, h) - Y) ** 2).sum() / (2 * len(X)) + net.penalty(h)

    def val_loss(batch, h):
        return ((net(Xv, h) - Yv) ** 2).sum() / (2 * len(Xv))

    return STN(
        net.parameters(), train_loss, val_loss, lam0, sigma=sigma, learn_sigma=True,
        tau=cfg["tau"], train_steps=cfg["train_steps"], val_steps=cfg["val_steps"],
        samples=cfg["samples"], model=net, seed=seed,
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=cfg["lr"], momentum=cfg["momentum"]),
        hyper_optimizer=lambda p: torch.optim.Adam(p, lr=cfg["hyper_lr"]),
        scale_optimizer=lambda p: torch.optim.Adam(p, lr=cfg["scale_lr"]),
    )  # fmt: skip


@pytest.mark.parametrize("samples", [None, 6])
def test_cycles_match_float64_transcription(samples):
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # hypernet scales large enough that the hyper path matters
        net.l1.hnet.normal_(0.0, 0.5)
        net.l2.hnet.normal_(0.0, 0.5)
    data = _data()
    cfg = dict(train_steps=2, val_steps=2, samples=samples, lr=0.1, momentum=0.9,
               hyper_lr=0.05, scale_lr=0.03, tau=0.1)  # fmt: skip
    lam0, sigma = [-1.0, 0.5], [0.3, 0.6]
    P = {k: v.detach().clone() for k, v in _params(net).items()}
    stn = _stn(net, data, cfg, lam0, sigma, seed=7)
    lam = torch.tensor(lam0, dtype=D)
    rho = torch.log(torch.expm1(torch.tensor(sigma, dtype=D)))
    gen = torch.Generator().manual_seed(7)
    state = {"buf": {}, "adam_lam": {}, "adam_rho": {}}
    for _ in range(2):
        stn.step([None] * 2, [None] * 2)
        P, lam, rho = ref.cycle(P, lam, rho, data, gen, cfg, state)
    assert stn.n_train == 4 and stn.n_hyper == 4
    got = _params(net)
    for k in ref.NAMES:
        assert torch.allclose(got[k].detach(), P[k], rtol=0, atol=1e-12), k
    assert torch.allclose(stn.hparams.detach(), lam, rtol=0, atol=1e-12)
    assert torch.allclose(stn.raw_scale.detach(), rho, rtol=0, atol=1e-12)
    assert (stn.hparams.detach() - torch.tensor(lam0, dtype=D)).abs().min() > 1e-3  # it moved
    assert net.training  # hyper steps restore the mode


def test_layers_equal_their_weight_matrices():
    torch.manual_seed(1)
    lin = STNLinear(5, 3, 2, dtype=D)
    conv = STNConv2d(2, 3, 3, 2, padding=1, dtype=D)
    for m in (lin, conv):
        m.hnet.data.normal_()
    x, xc = torch.randn(4, 5, dtype=D), torch.randn(4, 2, 6, 6, dtype=D)
    h1, hB = torch.randn(2, dtype=D), torch.randn(4, 2, dtype=D)
    assert torch.allclose(lin(x, h1), x @ lin.weight(h1).T + lin.bias(h1), atol=1e-12, rtol=0)
    per = torch.stack([lin.weight(hB[i]) @ x[i] + lin.bias(hB[i]) for i in range(4)])
    assert torch.allclose(lin(x, hB), per, atol=1e-12, rtol=0)
    assert torch.allclose(lin.weight(hB)[2], lin.weight(hB[2]), atol=0, rtol=0)
    full = F.conv2d(xc, conv.weight(h1), conv.bias(h1), padding=1)
    assert torch.allclose(conv(xc, h1), full, atol=1e-12, rtol=0)
    per = torch.cat(
        [F.conv2d(xc[i : i + 1], conv.weight(hB[i]), conv.bias(hB[i]), padding=1) for i in range(4)]
    )
    assert torch.allclose(conv(xc, hB), per, atol=1e-12, rtol=0)
    nob = STNLinear(5, 3, 2, bias=False, dtype=D)
    assert nob.bias(h1) is None and nob.hnet.shape == (3, 2)
    assert torch.allclose(nob(x, h1), x @ nob.weight(h1).T, atol=1e-12, rtol=0)


def _ridge_sigma_fixed_point(X, y, Xv, yv, sigma, t_star):
    """The stationary log-lambda of STN on ridge when the weights are at the exact minimizer of
    the perturbed training objective over the affine family w(t) = u + t v (what one STNLinear
    without bias represents), in closed form (Gaussian and log-normal moments), then bisection
    on the hypergradient grad F(u + t v) . v."""
    n, d = X.shape
    A, c, eye = X.T @ X / n, X.T @ y / n, torch.eye(d, dtype=D)

    def hypergrad(t):
        s2 = sigma * sigma
        m1, m2 = t, t * t + s2
        k0 = math.exp(t + s2 / 2)
        k1, k2 = k0 * (t + s2), k0 * ((t + s2) ** 2 + s2)
        M = torch.cat(
            [torch.cat([A + k0 * eye, m1 * A + k1 * eye], 1),
             torch.cat([m1 * A + k1 * eye, m2 * A + k2 * eye], 1)]
        )  # fmt: skip
        uv = torch.linalg.solve(M, torch.cat([c, m1 * c]))
        u, v = uv[:d], uv[d:]
        return float((Xv.T @ (Xv @ (u + t * v) - yv) / len(yv)) @ v)

    a, b = t_star - 1.0, t_star + 1.0
    ga = hypergrad(a)
    assert ga * hypergrad(b) < 0
    for _ in range(100):
        mid = (a + b) / 2
        if (hypergrad(mid) > 0) == (ga > 0):
            a = mid
        else:
            b = mid
    return (a + b) / 2


def _ridge_run(X, y, Xv, yv, sigma, cycles, seed):
    n = X.shape[0]
    torch.manual_seed(seed)
    layer = STNLinear(X.shape[1], 1, 1, bias=False, dtype=D)

    def train_loss(batch, h):
        r = layer(X, h).squeeze(-1) - y
        return r @ r / (2 * n) + h[0].exp() / 2 * layer.weight(h).pow(2).sum()

    def val_loss(batch, h):
        r = layer(Xv, h).squeeze(-1) - yv
        return r @ r / (2 * len(yv))

    stn = STN(
        layer.parameters(), train_loss, val_loss, [0.0], sigma=sigma, train_steps=3,
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        hyper_optimizer=lambda p: torch.optim.SGD(p, lr=1.0), seed=seed,
    )  # fmt: skip
    scheds = [
        torch.optim.lr_scheduler.CosineAnnealingLR(o, cycles)
        for o in (stn.weight_optimizer, stn.hyper_optimizer)
    ]
    batches = [None] * 3
    for _ in range(cycles):
        stn.step(batches, batches)
        for s in scheds:
            s.step()
    return float(stn.hparams.detach()[0])


def test_ridge_reaches_validation_optimum():
    X, y, Xv, yv = rb.make_data()
    t_star = rb.golden_log_lambda(X, y, Xv, yv)
    sigma = 0.3
    t_sigma = _ridge_sigma_fixed_point(X, y, Xv, yv, sigma, t_star)
    # the best-response family's own bias, O(sigma^2): 7.2e-3 at sigma = 0.3
    assert 0 < t_star - t_sigma < 1e-2
    # 500 cycles from log(1) = 0 (t* = -1.254); seeds 0, 1, 2 end 7e-4, 7e-4, 1.7e-3 from
    # t_sigma: the bound leaves the stochastic error a factor ~6, and 0.01 + 7.2e-3 < 0.02
    t = _ridge_run(X, y, Xv, yv, sigma, 500, seed=0)
    assert abs(t - t_sigma) < 1e-2
    assert abs(t - t_star) < 2e-2


def test_state_dict_round_trip_continues_identically():
    data = _data()
    cfg = dict(train_steps=2, val_steps=1, samples=None, lr=0.1, momentum=0.9,
               hyper_lr=0.05, scale_lr=0.03, tau=0.1)  # fmt: skip
    torch.manual_seed(3)
    net = Net()
    stn = _stn(net, data, cfg, [-1.0, 0.5], 0.4, seed=5)
    for _ in range(3):
        stn.step([None] * 2, [None])
    state = stn.state_dict()
    for _ in range(3):
        stn.step([None] * 2, [None])
    torch.manual_seed(4)
    net2 = Net()  # other weights, other seed: everything comes from the state
    stn2 = _stn(net2, data, cfg, [0.0, 0.0], 1.0, seed=9)
    stn2.load_state_dict(state)
    for _ in range(3):
        stn2.step([None] * 2, [None])
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(stn.hparams, stn2.hparams) and torch.equal(stn.raw_scale, stn2.raw_scale)
    assert (stn2.n_train, stn2.n_hyper) == (12, 6)


def test_train_step_moves_only_weights_and_hyper_step_only_hyperparameters():
    data = _data()
    cfg = dict(train_steps=1, val_steps=1, samples=None, lr=0.1, momentum=0.0,
               hyper_lr=0.05, scale_lr=0.03, tau=0.1)  # fmt: skip
    torch.manual_seed(2)
    net = Net()
    stn = _stn(net, data, cfg, [-1.0, 0.5], 0.4, seed=1)
    w0 = [p.detach().clone() for p in net.parameters()]
    lam0, rho0 = stn.hparams.detach().clone(), stn.raw_scale.detach().clone()
    stn.train_step(None)
    assert torch.equal(stn.hparams, lam0) and torch.equal(stn.raw_scale, rho0)
    assert all(not torch.equal(a, b) for a, b in zip(net.parameters(), w0))
    w1 = [p.detach().clone() for p in net.parameters()]
    stn.hyper_step(None)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), w1))
    assert not torch.equal(stn.hparams, lam0) and not torch.equal(stn.raw_scale, rho0)


def test_invalid_arguments():
    lin = STNLinear(2, 2, 1)
    loss = lambda b, h: lin(torch.ones(1, 2), h).sum()  # noqa: E731
    ok = dict(weights=list(lin.parameters()), train_loss=loss, val_loss=loss, hparams=[0.0])
    bad = [
        ({"train_steps": 0}, "train_steps"),
        ({"train_steps": -1}, "train_steps"),
        ({"val_steps": 0}, "val_steps"),
        ({"val_steps": 1.5}, "val_steps"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": [0.1, 0.2]}, "sigma"),
        ({"sigma": math.inf}, "sigma"),
        ({"tau": -1.0}, "tau"),
        ({"samples": 0}, "samples"),
        ({"learn_sigma": 1}, "learn_sigma"),
        ({"learn_sigma": True, "perturb_val": False}, "perturb_val"),
        ({"hparams": []}, "hparams"),
        ({"hparams": [[0.0]]}, "hparams"),
        ({"hparams": [math.nan]}, "hparams"),
        ({"hparams": "abc"}, "hparams"),
        ({"sigma": "abc"}, "sigma"),
        ({"weights": []}, "weights"),
        ({"weights": [torch.zeros(2)]}, "weights"),
        ({"train_loss": 3}, "train_loss"),
        ({"weight_optimizer": "sgd"}, "weight_optimizer"),
        ({"model": 3}, "model"),
        ({"seed": -1}, "seed"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            STN(**{**ok, **kw})
    with pytest.raises(ValueError, match="n_hparams"):
        STNLinear(2, 2, 0)
    with pytest.raises(ValueError, match="in_features"):
        STNLinear(0, 2, 1)
    with pytest.raises(ValueError, match="kernel_size"):
        STNConv2d(2, 2, 0, 1)
    with pytest.raises(ValueError, match="groups"):
        STNConv2d(3, 2, 3, 1, groups=2)
    with pytest.raises(ValueError, match="h must have shape"):
        lin(torch.ones(1, 2), torch.zeros(2))
