"""``hessian_trace(method="gn-split")``: the exact Gauss-Newton trace against ``J^T H_L J``
formed explicitly, the residual operator against ``H - G`` formed densely, and the split
estimate against the dense Hessian's trace."""

from __future__ import annotations

import copy

import pytest
import torch
from landscape_helpers import dense_hessian, explicit_ggn, mnist1d_tensors
from torch import nn

from basin.landscape import CurvatureOperator, hessian_trace


def _ce_seq(out, y):  # (N, T, C) logits, (N, T) targets: a mean over every position
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class CumSum(nn.Module):
    """Mixes the positions of a sequence, so per-example gradients sum over positions."""

    def forward(self, x):
        return x.cumsum(1)


class Shared(nn.Module):
    """One Linear applied twice: its per-example gradient is the sum of two terms."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.norm = nn.LayerNorm(3 * 6)
        self.fc = nn.Linear(3 * 6, 4)

    def forward(self, x):
        return self.fc(self.norm(torch.tanh(self.conv(x)).flatten(1)))


def _case(name):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    ce = nn.functional.cross_entropy
    if name == "mlp":
        x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), ce, x, y, None
    if name == "mlp-mse-subset":  # only the first layer's weight and the last bias
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
        return m, nn.functional.mse_loss, x, y, ["0.weight", "2.bias"]
    if name == "sequence":  # (N, T, d) inputs: layer 0 per-example grads formed, layer 2 Gram
        x, y = torch.randn(10, 5, 2, generator=g), torch.randint(0, 13, (10, 5), generator=g)
        m = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), CumSum(), nn.Linear(2, 13))
        return m, _ce_seq, x, y, None
    if name == "shared":
        x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
        return Shared(), ce, x, y, None
    if name == "conv-layernorm":  # generic per-example path for conv and norm parameters
        x, y = torch.randn(12, 2, 8, generator=g), torch.randint(0, 4, (12,), generator=g)
        return ConvNet(), ce, x, y, None
    if name == "batchnorm-eval":
        x, y = torch.randn(20, 6, generator=g), torch.randint(0, 3, (20,), generator=g)
        m = nn.Sequential(nn.Linear(6, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))
        m.train()
        m(x)  # move the running statistics off their initial values
        return m.eval(), ce, x, y, None
    raise KeyError(name)


CASES = ["mlp", "mlp-mse-subset", "sequence", "shared", "conv-layernorm", "batchnorm-eval"]


@pytest.mark.parametrize("name", CASES)
def test_exact_ggn_trace_equals_explicit_jt_h_j(name):
    model, loss_fn, x, y, names = _case(name)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    want = float(explicit_ggn(model, loss_fn, x, y, names).trace())
    res = hessian_trace(model, loss_fn, (x, y), method="gn-split", kind="ggn", params=names)
    assert res.n_hvp == 0 and res.stderr == 0.0
    assert res.n_jacobian_passes == model(x)[0].numel()
    assert res.trace == pytest.approx(want, rel=1e-10, abs=1e-13)
    assert res.ggn_trace == res.trace
    # over two batches of different sizes: the size-weighted average
    k = 2 * x.shape[0] // 3
    g1 = float(explicit_ggn(model, loss_fn, x[:k], y[:k], names).trace())
    g2 = float(explicit_ggn(model, loss_fn, x[k:], y[k:], names).trace())
    batches = [(x[:k], y[:k]), (x[k:], y[k:])]
    res2 = hessian_trace(model, loss_fn, batches, method="gn-split", kind="ggn", params=names)
    n = x.shape[0]
    assert res2.trace == pytest.approx((k * g1 + (n - k) * g2) / n, rel=1e-10, abs=1e-13)


def test_residual_operator_is_hessian_minus_ggn():
    model, loss_fn, x, y, _ = _case("mlp")
    model, x = model.double(), x.double()
    h = dense_hessian(model, loss_fn, x, y)
    g = explicit_ggn(model, loss_fn, x, y)
    assert float((h - g).abs().max()) > 1e-3  # a network where the residual matters
    op = CurvatureOperator(model, loss_fn, (x, y), kind="residual")
    r = torch.stack([op.matvec(e) for e in torch.eye(op.n, dtype=torch.float64)])
    torch.testing.assert_close(r, h - g, rtol=0, atol=1e-12)
    # its gradient is the loss gradient
    _, grad = op.loss_and_gradient()
    _, want = CurvatureOperator(model, loss_fn, (x, y)).loss_and_gradient()
    torch.testing.assert_close(grad, want)


@pytest.fixture(scope="module")
def trained_mlp(mlp_setup):
    """The 1,642-parameter MNIST-1D MLP after 150 Adam steps, and its dense Hessian's trace."""
    model, loss_fn, data, _, _, _ = mlp_setup
    model = copy.deepcopy(model)
    x, y = mnist1d_tensors(256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, loss_fn, (x, y), float(dense_hessian(model, loss_fn, x, y).trace())


def test_gn_split_within_standard_error_and_more_accurate(trained_mlp):
    model, loss_fn, data, true = trained_mlp
    split, hutch = [], []
    for seed in range(10):
        r = hessian_trace(model, loss_fn, data, n_hvp=8, method="gn-split", seed=seed)
        assert r.n_hvp == 8 and r.n_jacobian_passes == 10
        assert abs(r.trace - true) <= 4 * r.stderr, (seed, r.trace, true, r.stderr)
        split.append(r.trace - true)
        # twice the products for plain Hutchinson
        hutch.append(
            hessian_trace(model, loss_fn, data, n_hvp=16, method="hutchinson", seed=seed).trace
            - true
        )
    rms = lambda e: (sum(v * v for v in e) / len(e)) ** 0.5  # noqa: E731
    assert rms(split) < 0.5 * rms(hutch), (rms(split), rms(hutch))
    assert rms(split) < 0.02 * abs(true)


def test_gn_split_accepts_an_operator_and_keeps_its_selection(trained_mlp):
    model, loss_fn, data, _ = trained_mlp
    op = CurvatureOperator(model, loss_fn, data, params="2")
    a = hessian_trace(op, n_hvp=4, method="gn-split", seed=3)
    b = hessian_trace(model, loss_fn, data, n_hvp=4, method="gn-split", params="2", seed=3)
    assert a.trace == b.trace and a.ggn_trace == b.ggn_trace


def test_gn_split_bad_input(bn_setup, mlp_setup):
    model, loss_fn, data, *_ = bn_setup
    with pytest.raises(ValueError, match="BatchNorm"):
        hessian_trace(model, loss_fn, data, method="gn-split")
    model, loss_fn, (x, y), *_ = mlp_setup
    coupled = lambda o, t: nn.functional.cross_entropy(o - o.mean(0), t)  # noqa: E731
    with pytest.raises(ValueError, match="per-example"):
        hessian_trace(model, coupled, (x, y), method="gn-split")
    with pytest.raises(ValueError, match="max_outputs=5"):
        hessian_trace(model, loss_fn, (x, y), method="gn-split", max_outputs=5)
    with pytest.raises(ValueError, match="kind"):
        hessian_trace(model, loss_fn, (x, y), method="gn-split", kind="residual")
    with pytest.raises(ValueError, match="n_hvp"):
        hessian_trace(model, loss_fn, (x, y), method="gn-split", n_hvp=1)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, loss_fn, (x, y), method="xtrace++")


class ReusedWeight(nn.Module):
    """A Linear whose weight is also used outside its forward (the per-layer formula would
    miss that use; the check sends it through the generic path)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + torch.tanh(x @ self.fc.weight.T)
        return self.head(h)


def test_weight_used_outside_its_layer_is_still_exact():
    torch.manual_seed(3)
    model = ReusedWeight().double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    loss_fn = nn.functional.cross_entropy
    want = float(explicit_ggn(model, loss_fn, x, y).trace())
    res = hessian_trace(model, loss_fn, (x, y), method="gn-split", kind="ggn")
    assert res.trace == pytest.approx(want, rel=1e-10)
