"""ODICE orthogonal-gradient update (arXiv:2402.00348) against a float64 transcription of the
authors' ``orthogonal_true_g_update`` (github.com/maoliyuan/ODICE-Pytorch, odice.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from basin.train.odice import orthogonal_gradient, orthogonal_gradient_


def _pearson_f_star(r):
    w = torch.clamp(r / 2 + 1, min=0.0)
    return r * w - (w - 1) ** 2


def _setup(seed=0, n=32, d=5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vf = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    vf = vf.double()
    target = copy.deepcopy(vf).requires_grad_(False)
    with torch.no_grad():  # the target net lags behind the online one
        for p in target.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = {
        "s": torch.randn(n, d, generator=g, dtype=torch.float64),
        "s2": torch.randn(n, d, generator=g, dtype=torch.float64),
        "r": torch.randn(n, generator=g, dtype=torch.float64),
        "done": torch.rand(n, generator=g, dtype=torch.float64) < 0.2,
    }
    return vf, target, batch


def _terms(vf, target, b, lam=0.8, gamma=0.99):
    with torch.no_grad():
        tv, tv2 = target(b["s"]).squeeze(-1), target(b["s2"]).squeeze(-1)
    v, v2 = vf(b["s"]).squeeze(-1), vf(b["s2"]).squeeze(-1)
    nd = 1.0 - b["done"].double()
    fwd = torch.mean(lam * _pearson_f_star(b["r"] + nd * gamma * tv2 - v))
    bwd = torch.mean(lam * _pearson_f_star(b["r"] + nd * gamma * v2 - tv))
    return v, fwd, bwd


def _authors_value_grad(vf, target, b, lam=0.8, eta=1.0, gamma=0.99):
    """Their procedure: eta folded into the backward loss; the backward gradient read as the
    difference of accumulated .grad; one projection on the flattened gradient with the norm
    floored at 1e-10; then (1 - lam) * mean V(s) backpropagated and the projected sum added."""
    v, fwd, bwd = _terms(vf, target, b, lam, gamma)
    bwd = eta * bwd
    params = list(vf.parameters())
    for p in params:
        p.grad = None
    fwd.backward(retain_graph=True)
    gf = [p.grad.clone().reshape(-1) for p in params]
    bwd.backward(retain_graph=True)
    gb = [p.grad.clone().reshape(-1) - f for p, f in zip(params, gf)]
    f, bb = torch.cat(gf), torch.cat(gb)
    c = (torch.dot(f, bb) / max(torch.dot(f, f), 1e-10)).item()
    comb = (1 - c) * f + bb
    for p in params:
        p.grad = None
    torch.mean((1 - lam) * v).backward()
    out, i = [], 0
    for p in params:
        out.append(p.grad + comb[i : i + p.numel()].reshape(p.shape))
        i += p.numel()
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_matches_authors_update(eta):
    vf, target, b = _setup()
    ref = _authors_value_grad(vf, target, b, eta=eta)
    v, fwd, bwd = _terms(vf, target, b)
    torch.mean(0.2 * v).backward(retain_graph=True)
    orthogonal_gradient_(fwd, bwd, vf.parameters(), eta)
    for p, r in zip(vf.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)


def _flat(gs):
    return torch.cat([g.reshape(-1) for g in gs])


def test_geometry():
    vf, target, b = _setup(seed=1)
    params = list(vf.parameters())
    _, fwd, bwd = _terms(vf, target, b)
    gf = _flat(torch.autograd.grad(fwd, params, retain_graph=True))
    gb = _flat(torch.autograd.grad(bwd, params, retain_graph=True))
    assert abs(float(torch.dot(gf, gb))) > 1e-6 * float(gf.norm() * gb.norm())  # not trivial
    eta = 0.7
    g = _flat(orthogonal_gradient(fwd, bwd, params, eta, retain_graph=True))
    added = g - gf
    assert abs(float(torch.dot(added, gf))) < 1e-12 * float(added.norm() * gf.norm())
    # the added part is eta times gb minus its gf component: closed form
    torch.testing.assert_close(added, eta * (gb - torch.dot(gb, gf) / torch.dot(gf, gf) * gf))
    # eta = 0 gives g_f
    g0 = _flat(orthogonal_gradient(fwd, bwd, params, 0.0, retain_graph=True))
    torch.testing.assert_close(g0, gf, rtol=0, atol=0)
    # a backward gradient parallel to the forward one is projected away entirely
    gpar = _flat(orthogonal_gradient(fwd, -3.0 * fwd, params, 1.0, retain_graph=True))
    torch.testing.assert_close(gpar, gf, rtol=1e-12, atol=1e-14)


def test_plain_sum_is_not_the_update():
    # a wrong (absent) projection is detected: g_f + eta g_b differs from the update
    vf, target, b = _setup(seed=2)
    params = list(vf.parameters())
    _, fwd, bwd = _terms(vf, target, b)
    gf = _flat(torch.autograd.grad(fwd, params, retain_graph=True))
    gb = _flat(torch.autograd.grad(bwd, params, retain_graph=True))
    g = _flat(orthogonal_gradient(fwd, bwd, params, 1.0))
    assert (g - (gf + gb)).norm() > 1e-3 * g.norm()


def test_unused_params_and_zero_forward():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    # g_f = 0: the floor keeps the coefficient finite and g = eta g_b
    out = orthogonal_gradient(0.0 * a.sum(), (a * a).sum(), [a, c], 0.5)
    torch.testing.assert_close(out[0], 0.5 * 2 * a.detach())
    torch.testing.assert_close(out[1], torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"eta": -0.1}, "eta"), ({"eta": float("nan")}, "eta"), ({"eps": 0.0}, "eps")],
)
def test_invalid(kw, name):
    a = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        orthogonal_gradient(a.sum(), (a * a).sum(), [a], **kw)
    with pytest.raises(ValueError, match="params"):
        orthogonal_gradient(a.sum(), a.sum(), [])
    with pytest.raises(ValueError, match="loss_backward"):
        orthogonal_gradient(a.sum(), a * a, [a])
