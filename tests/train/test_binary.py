"""ReSTE and BiPer (basin.train.reste / biper): backward slopes against elementwise float64
transcriptions of the authors' estimators (tests/references/binary_paper.py), gradcheck on the
smooth parts, exact binary forwards, and a short training run of a binary MLP on MNIST-1D."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from references import binary_paper as ref
from torch import nn

import basin.train as bt
from basin.train.biper import biper_activation_grad

# the thresholds' edges and both sides of them, then random points over the whole range
EDGES = [0.0, 0.1, -0.1, 1.5, -1.5, 1.0, -1.0, 0.5, -0.5]
EDGES += [e + d for e in EDGES for d in (1e-9, -1e-9)]


def _points(seed: int, n: int = 2000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rnd = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 4.0  # [-2, 2)
    return torch.cat([torch.tensor(EDGES, dtype=torch.float64), rnd])


def _upstream(x: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-2.0, 3.0, x.numel(), dtype=torch.float64)


# ---------------------------------------------------------------- ReSTE
@pytest.mark.parametrize("o", [1.0, 1.37, 2.0, 3.0])
def test_reste_backward_equals_the_authors_estimator(o) -> None:
    x = _points(int(o * 100)).requires_grad_()
    g = _upstream(x)
    (got,) = torch.autograd.grad(bt.reste_sign(x, o), x, g)
    want = torch.tensor([gi * ref.reste_slope(xi, o) for xi, gi in zip(x.tolist(), g.tolist())],
                        dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_reste_schedule_equals_the_authors() -> None:
    for epochs in (1, 7, 200):
        for epoch in range(epochs + 1):
            want = ref.reste_o(epoch, epochs, 3.0)
            assert math.isclose(bt.reste_o(epoch, epochs), want, rel_tol=1e-15)
            assert math.isclose(bt.reste_o(epoch, epochs, 2.5), ref.reste_o(epoch, epochs, 2.5))
    model = nn.Sequential(bt.ReSTELinear(4, 4), nn.Linear(4, 4), bt.ReSTEConv2d(1, 2, 3))
    sched = bt.ReSTESchedule(model, epochs=10)
    o = sched.step(5)
    assert o == bt.reste_o(5, 10) and model[0].o == model[2].o_a == o


class _RectifiedPower(torch.autograd.Function):
    """``sign(x) |x|^(1/o)`` forward, ReSTE's slope backward: where ReSTE's estimator is the
    exact derivative (``0.1 < |x| <= 1.5``) gradcheck must accept it."""

    @staticmethod
    def forward(ctx, x, o):
        ctx.save_for_backward(x)
        ctx.o = o
        return torch.sign(x) * x.abs() ** (1.0 / o)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * bt.reste_grad(x, ctx.o), None


@pytest.mark.parametrize("o", [1.0, 1.5, 3.0])
def test_reste_slope_is_the_derivative_of_the_rectified_power(o) -> None:
    g = torch.Generator().manual_seed(1)
    mag = 0.11 + 1.38 * torch.rand(64, generator=g, dtype=torch.float64)
    sgn = torch.where(torch.rand(64, generator=g) < 0.5, -1.0, 1.0).double()
    x = (mag * sgn).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _RectifiedPower.apply(t, o), (x,))


def test_reste_layers_forward_is_binary_and_weight_gradient_is_the_authors() -> None:
    torch.manual_seed(2)
    lin = bt.ReSTELinear(7, 5, bias=False).double()
    lin.o = lin.o_a = 2.0
    x = torch.randn(9, 7, dtype=torch.float64)
    w = lin.weight
    bw = lin.binary_weight()
    scale = w.abs().mean()
    assert torch.equal(bw / scale, torch.sign(w)) and set(torch.sign(w).unique().tolist()) <= {
        -1,
        1,
    }
    assert torch.equal(lin(x), F.linear(torch.sign(x), torch.sign(w) * scale))
    # weight gradient: the authors' scaled binarization, written out elementwise
    c = torch.randn(9, 5, dtype=torch.float64)
    (lin(x) * c).sum().backward()
    dbw = (c.T @ torch.sign(x)).flatten().tolist()  # d loss / d (scale * sign(W))
    wl = w.detach().flatten().tolist()
    n = len(wl)
    sum_sign = sum(d * math.copysign(1.0, v) for d, v in zip(dbw, wl))
    want = [d * scale.item() * ref.reste_slope(v, 2.0) + sum_sign * math.copysign(1.0, v) / n
            for d, v in zip(dbw, wl)]  # fmt: skip
    torch.testing.assert_close(w.grad.flatten(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)  # fmt: skip
    conv = bt.ReSTEConv2d(2, 3, 3, padding=1, dilation=2, groups=1).double()
    xi = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    want_out = F.conv2d(torch.sign(xi), torch.sign(conv.weight) * conv.weight.abs().mean(),
                        conv.bias, 1, 1, 2)  # fmt: skip
    assert torch.equal(conv(xi), want_out)


# ---------------------------------------------------------------- BiPer
def test_biper_activation_backward_equals_the_authors_estimator() -> None:
    x = _points(3).requires_grad_()
    g = _upstream(x)
    (got,) = torch.autograd.grad(bt.biper_sign(x), x, g)
    want = torch.tensor([gi * ref.biper_activation_slope(xi) for xi, gi in zip(x.tolist(), g.tolist())],
                        dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert set(torch.sign(x[x != 0]).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("w0", [20.0, 30.0])
def test_biper_stage2_weight_backward_equals_the_authors(w0) -> None:
    w = (_points(4) / 10).requires_grad_()
    g = _upstream(w)
    q = bt.biper_weight(w, w0, stage=2)
    assert set(q[torch.sin(w0 * w) != 0].unique().tolist()) == {-1.0, 1.0}
    (got,) = torch.autograd.grad(q, w, g)
    want = torch.tensor([gi * ref.biper_weight_slope(wi, w0) for wi, gi in zip(w.tolist(), g.tolist())],
                        dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class _BiRealPoly(torch.autograd.Function):
    """The approximate sign ``2x - x|x|`` (``|x| < 1``, ``sign(x)`` beyond), whose derivative is
    BiPer's activation slope: gradcheck must accept the slope as its backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x.abs() < 1, 2 * x - x * x.abs(), torch.sign(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * biper_activation_grad(x)


def test_biper_smooth_parts_gradcheck() -> None:
    g = torch.Generator().manual_seed(5)
    x = ((torch.rand(64, generator=g, dtype=torch.float64) - 0.5) * 3.6).requires_grad_()
    x.data[(x.data.abs() - 1).abs() < 1e-3] += 0.01
    assert torch.autograd.gradcheck(_BiRealPoly.apply, (x,))
    # stage 1: the layer is smooth in its weight, alpha and bias (inputs already binary)
    torch.manual_seed(6)
    for layer, shape in [(bt.BiPerLinear(6, 4, w0=20.0), (5, 6)),
                         (bt.BiPerConv2d(2, 3, 3, padding=1), (2, 2, 4, 4))]:  # fmt: skip
        layer = layer.double()
        xin = torch.randn(*shape, dtype=torch.float64)
        for p in layer.parameters():
            p.data.mul_(0.1)

        args = tuple(p.detach().clone().requires_grad_() for p in
                     (layer.weight, layer.alpha, layer.bias))  # fmt: skip
        assert torch.autograd.gradcheck(
            lambda w, a, b, m=layer, i=xin: _functional(m, i, w, a, b), args
        )


def _functional(layer, xin, w, a, b):
    return torch.func.functional_call(layer, {"weight": w, "alpha": a, "bias": b}, (xin,))


def test_biper_layers_forward_and_the_authors_input_scaling() -> None:
    torch.manual_seed(7)
    conv = bt.BiPerConv2d(3, 4, 3, padding=1, stride=2, stage=2, w0=20.0).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    bw = torch.sign(torch.sin(20.0 * conv.weight))
    want = F.conv2d(torch.sign(x), bw, conv.bias, 2, 1) * conv.alpha.view(-1, 1, 1)
    assert torch.equal(out.detach(), want.detach())
    assert set(conv.binary_weight().unique().tolist()) == {-1.0, 1.0}
    # input gradient: through the per-sample scaling a0 = a / sqrt(var + 1e-5), then the slope
    c = torch.randn_like(out)
    (gx,) = torch.autograd.grad((out * c).sum(), x)
    x2 = x.detach().clone().requires_grad_()
    a0 = x2 / torch.sqrt(x2.var((1, 2, 3), keepdim=True) + 1e-5)
    # d out / d a0 is the plain conv's input gradient times the slope at a0
    a0d = a0.detach().requires_grad_()
    surrogate = F.conv2d(a0d, bw.detach(), None, 2, 1) * conv.alpha.detach().view(-1, 1, 1)
    (gconv,) = torch.autograd.grad((surrogate * c).sum(), a0d)
    slopes = torch.tensor([ref.biper_activation_slope(v) for v in a0.detach().flatten().tolist()],
                          dtype=torch.float64).view_as(a0)  # fmt: skip
    (want_gx,) = torch.autograd.grad(a0, x2, gconv * slopes)
    torch.testing.assert_close(gx, want_gx, rtol=1e-12, atol=1e-14)
    assert bt.set_biper_stage(nn.Sequential(conv, bt.BiPerLinear(2, 2)), 1) == 2 and conv.stage == 1
    with pytest.raises(ValueError, match="stage"):
        bt.set_biper_stage(conv, 3)


def test_invalid_hyperparameters_raise() -> None:
    for kw, msg in [
        ({"w0": 0}, "w0"),
        ({"stage": 0}, "stage"),
        ({"binarize_input": 1}, "binarize"),
    ]:
        with pytest.raises(ValueError, match=msg):
            bt.BiPerLinear(3, 2, **kw)
    with pytest.raises(ValueError, match="t must"):
        bt.ReSTELinear(3, 2, t=0)
    with pytest.raises(ValueError, match="o must"):
        bt.reste_sign(torch.ones(2), o=0.5)
    with pytest.raises(ValueError, match="epochs"):
        bt.reste_o(1, 0)
    with pytest.raises(ValueError, match="no ReSTE layer"):
        bt.ReSTESchedule(nn.Linear(2, 2), 3)


# ---------------------------------------------------------------- training
def _binary_mlp(kind: str) -> nn.Module:
    layer = bt.ReSTELinear if kind == "reste" else bt.BiPerLinear
    kw = {} if kind == "reste" else {"w0": 20.0}
    return nn.Sequential(
        nn.Linear(40, 128), nn.BatchNorm1d(128),
        layer(128, 128, **kw), nn.BatchNorm1d(128),
        layer(128, 10, **kw),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["reste", "biper"])
def test_binary_mlp_trains_above_chance_on_mnist1d(kind) -> None:
    from basin.bench.workloads.mnist1d import data

    torch.manual_seed(0)
    x, y, xt, yt = data()
    model = _binary_mlp(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    epochs, steps_per_epoch, bs = 6, 40, 128
    sched = bt.ReSTESchedule(model, epochs) if kind == "reste" else None
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        if sched is not None:
            sched.step(epoch)
        if kind == "biper" and epoch == epochs // 2:
            bt.set_biper_stage(model, 2)
        for _ in range(steps_per_epoch):
            idx = torch.randint(0, len(x), (bs,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(-1) == yt).float().mean().item()
    assert acc > 0.3, acc  # chance is 0.1; these runs reach 0.42-0.45 over seeds 0 and 1
