"""TrAct (basin.train.tract) against the authors' package torch-tract 1.0.0 on its default
settings, against a dense float64 transcription of the paper's formula (A built patch by patch,
explicit inverse) where the package is wrong, and in the harness."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import basin.train as bt
from basin.bench import make_config, run
from basin.train.tract import tract_weight_grad

torch_tract = pytest.importorskip("torch_tract")

RTOL, ATOL = 1e-10, 1e-13


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=ATOL * max(1.0, float(b.abs().max())))


def _grads(layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    ((layer(x) - target) ** 2).mean().backward()
    return [p.grad.clone() for p in layer.parameters()]


# ---------------------------------------------------------------- the dense transcription
def _patches(x: torch.Tensor, conv: nn.Module) -> list[torch.Tensor]:
    """Per group, ``A`` [b, C/g * prod(k)] built by hand: pad the input as the layer does, then
    for every sample and output position gather the receptive field (channel-major)."""
    nd = x.ndim - 2
    if conv.padding_mode == "zeros":
        xp = F.pad(x, list(conv._reversed_padding_repeated_twice))
    else:
        xp = F.pad(x, list(conv._reversed_padding_repeated_twice), mode=conv.padding_mode)
    k, s, d, g = conv.kernel_size, conv.stride, conv.dilation, conv.groups
    out_size = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    cg = x.shape[1] // g
    rows: list[list[torch.Tensor]] = [[] for _ in range(g)]
    for n in range(x.shape[0]):
        for pos in itertools.product(*[range(o) for o in out_size]):
            for gi in range(g):
                vals = []
                for c in range(gi * cg, (gi + 1) * cg):
                    for kk in itertools.product(*[range(ki) for ki in k]):
                        idx = tuple(pos[i] * s[i] + kk[i] * d[i] for i in range(nd))
                        vals.append(xp[(n, c, *idx)])
                rows[gi].append(torch.stack(vals))
    return [torch.stack(r) for r in rows]


def _dense_tract_grad(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, lam: float):
    """``G^T A inv(A^T A / b + lam I)`` with ``G = dL/d(output)`` of the plain layer."""
    out = layer(x)
    out.retain_grad()
    ((out - target) ** 2).mean().backward()
    g_out = out.grad
    if isinstance(layer, nn.Linear):
        a_groups = [x.reshape(-1, x.shape[-1])]
        gs = [g_out.reshape(-1, g_out.shape[-1])]
    else:
        a_groups = _patches(x, layer)
        co = g_out.shape[1] // layer.groups
        flat = g_out.movedim(1, -1).reshape(-1, g_out.shape[1])  # [b, out], same row order
        gs = [flat[:, i * co : (i + 1) * co] for i in range(layer.groups)]
    blocks = []
    for a, gg in zip(a_groups, gs):
        b, d = a.shape
        m = a.T @ a / b + lam * torch.eye(d, dtype=a.dtype)
        blocks.append(gg.T @ a @ torch.linalg.inv(m))
    return torch.cat(blocks).reshape(layer.weight.shape)


# ---------------------------------------------------------------- against torch-tract
@pytest.mark.parametrize("shape", [(30, 8), (5, 8), (3, 4, 8)], ids=["b>d", "b<d", "3d"])
def test_linear_matches_torch_tract(shape) -> None:
    torch.manual_seed(0)
    ref = torch_tract.TrActLinear(8, 5, 0.1).double()
    ours = bt.TrActLinear(8, 5, lambda_=0.1).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape[:-1], 5, dtype=torch.float64)
    for r, o in zip(_grads(ref, x, y), _grads(ours, x, y)):
        _close(o, r)
    assert torch.equal(ours(x), F.linear(x, ours.weight, ours.bias))


@pytest.mark.parametrize("n,c,hw", [(30, 2, (6, 4)), (1, 8, (4, 4))], ids=["b>d", "b<d"])
def test_conv2d_matches_torch_tract(n, c, hw) -> None:
    torch.manual_seed(1)
    ref = torch_tract.TrActConv2d(c, 5, 3, 1, 1, 0.1).double()
    ours = bt.TrActConv2d(c, 5, 3, 1, 1, lambda_=0.1).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(n, c, *hw, dtype=torch.float64)
    y = torch.randn(n, 5, *hw, dtype=torch.float64)
    for r, o in zip(_grads(ref, x, y), _grads(ours, x, y)):
        _close(o, r)
    plain = nn.Conv2d(c, 5, 3, 1, 1).double()
    plain.load_state_dict(ours.state_dict())
    assert torch.equal(ours(x), plain(x))


@pytest.mark.parametrize("b", [3, 40])
def test_woodbury_and_direct_agree(b) -> None:
    g = torch.Generator().manual_seed(b)
    grad = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    a = torch.randn(2, b, 12, generator=g, dtype=torch.float64)
    direct = tract_weight_grad(grad, a, 0.05, "direct")
    _close(tract_weight_grad(grad, a, 0.05, "woodbury"), direct)
    dense = grad @ torch.linalg.inv(a.mT @ a / b + 0.05 * torch.eye(12, dtype=a.dtype))
    _close(direct, dense)


# ---------------------------------------------------------------- where torch-tract is wrong
@pytest.mark.parametrize("n", [30, 5], ids=["b>d", "b<d"])
def test_cholesky_inverse_option_of_the_reference_is_wrong_ours_exact(n) -> None:
    torch.manual_seed(2)
    x = torch.randn(n, 8, dtype=torch.float64)
    y = torch.randn(n, 5, dtype=torch.float64)
    ref = torch_tract.TrActLinear(8, 5, 0.1, inv_type="cholesky_inverse").double()
    plain = nn.Linear(8, 5).double()
    plain.load_state_dict(ref.state_dict())
    dense = _dense_tract_grad(plain, x, y, 0.1)
    ref_grad = _grads(ref, x, y)[0]
    assert (ref_grad - dense).abs().max() > 1e-3 * dense.abs().max()  # the package's bug
    for solver in ("auto", "direct", "woodbury"):
        ours = bt.TrActLinear.from_module(plain, 0.1, solver)
        _close(_grads(ours, x, y)[0], dense)


CONVS = [
    ("dilation", lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2)),
    ("groups", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2)),
    ("reflect", lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")),
    (
        "circular+stride",
        lambda: nn.Conv2d(
            4, 6, (3, 2), stride=(2, 1), padding=(1, 1), padding_mode="circular", bias=False
        ),
    ),  # fmt: skip
    ("same", lambda: nn.Conv2d(4, 6, 4, padding="same", dilation=1)),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("n", [3, 1], ids=["b>d", "b<d"])
@pytest.mark.parametrize("name,make", CONVS, ids=[c[0] for c in CONVS])
def test_conv_settings_the_reference_drops_match_the_dense_formula(name, make, n) -> None:
    torch.manual_seed(3)
    plain = make().double()
    x = torch.randn(n, 4, 5, 5, dtype=torch.float64)
    y = torch.randn_like(plain(x))
    dense = _dense_tract_grad(plain, x, y, 0.1)
    ours = bt.TrActConv2d.from_module(plain, 0.1)
    assert torch.equal(ours(x), plain(x))
    _close(_grads(ours, x, y)[0], dense)
    if plain.bias is not None:  # the bias gradient is the plain one
        plain.zero_grad()
        ((plain(x) - y) ** 2).mean().backward()
        _close(ours.bias.grad, plain.bias.grad)
    if name != "same":  # the package's wrapper rebuilds the layer without these settings:
        wrapped = torch_tract.TrAct(plain, 0.1)  # its forward is another layer's, or fails
        try:
            got = wrapped(x)
        except RuntimeError:
            return
        assert got.shape != plain(x).shape or not torch.allclose(got, plain(x))


def test_conv1d_matches_the_dense_formula() -> None:
    torch.manual_seed(4)
    plain = nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    x = torch.randn(3, 4, 11, dtype=torch.float64)
    y = torch.randn_like(plain(x))
    ours = bt.TrActConv1d.from_module(plain, 0.2)
    assert torch.equal(ours(x), plain(x))
    _close(_grads(ours, x, y)[0], _dense_tract_grad(plain, x, y, 0.2))


def test_bfloat16_parameters_train() -> None:
    torch.manual_seed(5)
    x64 = torch.randn(16, 8, dtype=torch.float64)
    y64 = torch.randn(16, 5, dtype=torch.float64)
    ref = torch_tract.TrActLinear(8, 5, 0.1).to(torch.bfloat16)
    with pytest.raises(RuntimeError):  # the package's inverse has no bfloat16 kernel
        ((ref(x64.bfloat16()) - y64.bfloat16()) ** 2).mean().backward()
    plain = nn.Linear(8, 5).double()
    dense = _dense_tract_grad(plain, x64, y64, 0.1)
    ours = bt.TrActLinear.from_module(copy_to(plain, torch.bfloat16), 0.1)
    g = _grads(ours, x64.bfloat16(), y64.bfloat16())[0]
    assert g.dtype == torch.bfloat16
    # bfloat16 carries ~3 significant digits
    torch.testing.assert_close(g.double(), dense, rtol=0.05, atol=0.02 * float(dense.abs().max()))


def copy_to(layer: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(layer).to(dtype)


# ---------------------------------------------------------------- behaviour
def test_graph_building_backward_gives_the_plain_gradient() -> None:
    torch.manual_seed(6)
    plain = nn.Linear(8, 5).double()
    ours = bt.TrActLinear.from_module(plain)
    x = torch.randn(10, 8, dtype=torch.float64)
    (gp,) = torch.autograd.grad(plain(x).square().sum(), plain.weight)
    (go,) = torch.autograd.grad(ours(x).square().sum(), ours.weight, create_graph=True)
    _close(go, gp)


def test_tract_helper_swaps_the_first_layer_sharing_parameters() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bt.tract(model, 0.3)
    assert isinstance(model[0], bt.TrActLinear) and model[0].lambda_ == 0.3
    assert type(model[2]) is nn.Linear
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # the optimizer built before the swap trains the same tensors
    assert bt.tract(model) is model and isinstance(model[0], bt.TrActLinear)  # idempotent
    conv = nn.Conv2d(1, 2, 3)
    assert isinstance(bt.tract(conv), bt.TrActConv2d)

    # the first layer to run, not the first registered
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.stem = nn.Linear(6, 2), nn.Conv1d(1, 6, 3)

        def forward(self, x):
            return self.head(self.stem(x.unsqueeze(1)).mean(-1))

    net = bt.tract(Net(), example_input=torch.randn(2, 9))
    assert isinstance(net.stem, bt.TrActConv1d) and type(net.head) is nn.Linear
    with pytest.raises(ValueError, match="first layer to be nn.Linear"):
        bt.tract(nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2)))


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"lambda_": 0.0}, "lambda_"),
        ({"lambda_": -1}, "lambda_"),
        ({"solver": "qr"}, "solver"),
    ],  # fmt: skip
)
def test_invalid_hyperparameters_raise(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        bt.TrActLinear(3, 2, **kw)
    with pytest.raises(ValueError, match=msg):
        bt.tract(nn.Linear(3, 2), **kw)


# ---------------------------------------------------------------- in the harness
@pytest.mark.parametrize("name", ["tract", "tract_adamw"])
def test_bench_runs_tract_and_refuses_what_it_cannot_take(name) -> None:
    r = run(make_config("digits_cnn", name, steps=30, eval_every=30))
    assert r.status == "ok" and r.final["metric"] > 0.3
    assert isinstance(r.model.conv1, bt.TrActConv2d) and type(r.model.conv2) is nn.Conv2d
    for w in ("charlm", "rosenbrock"):
        with pytest.raises(ValueError, match=rf"^{name} needs the model's first layer"):
            make_config(w, name, steps=2)


def test_converted_layer_owns_its_containers() -> None:
    conv = nn.Conv2d(2, 3, 3)
    conv.register_buffer("extra", torch.zeros(1), persistent=False)
    new = bt.TrActConv2d.from_module(conv)
    assert new.weight is conv.weight and new.extra is conv.extra
    new.register_buffer("more", torch.zeros(1), persistent=False)
    new.register_forward_hook(lambda *a: None)
    assert "more" not in conv._buffers and "more" not in conv._non_persistent_buffers_set
    assert not conv._forward_hooks and type(conv) is nn.Conv2d
    with pytest.raises(ValueError, match="needs an nn.Conv2d"):
        bt.TrActConv2d.from_module(nn.Linear(2, 2))
