"""Matrix optimizers and weights stored (in, out): HF's GPT-2 ``Conv1D`` and ``nn.ConvTranspose``
get exactly the update of the same layer stored as ``nn.Linear`` / ``nn.Conv``, transposed.

Before the orientation fix a Conv1D c_fc (32 -> 128, stored (32, 128)) got a Muon update of
spectral norm ~1.13 against ~2.24 as ``nn.Linear``: the scale sqrt(max(1, rows/cols)) was taken
on the transposed matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import basin.optim as bo
from basin.optim.param_groups import stores_in_out

# every shape-dependent matrix rule, with settings that make the shape matter (COSMOS: a rank
# below both sides; FRUGAL: both projector kinds)
CASES = {
    "muon": {"ns_dtype": torch.float32},
    "muon_bf16": {"ns_dtype": torch.bfloat16},
    "swan": {},
    "cosmos": {"rank": 4, "ns_dtype": None},
    "frugal_svd": {"proj_type": "svd", "update_gap": 2},
    "frugal_random": {"proj_type": "random", "update_gap": 2},
}


def _name(case: str) -> str:
    return case.split("_")[0]


class Conv1D(nn.Module):
    """HF transformers' Conv1D without transformers: weight (in, out), ``x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)


class InOut(nn.Module):
    """A custom (in, out) layer basin cannot recognise: routed by ``transposed=[...]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def _pair(n_in: int = 32, n_out: int = 128, dtype=torch.float32, layer=Conv1D):
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out).to(dtype)
    conv = layer(n_out, n_in) if layer is Conv1D else layer(n_in, n_out)
    conv = conv.to(dtype)
    w = next(p for p in conv.parameters() if p.ndim == 2)
    with torch.no_grad():
        w.copy_(lin.weight.T)
    return lin, conv, w


def _step_both(opt_a, pa, opt_b, pb, steps: int, seed: int = 1) -> None:
    """Same gradients (pb's is pa's transpose, contiguous, as autograd gives it), then compare."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        g = torch.randn(pa.shape, generator=gen, dtype=torch.float64).to(pa.dtype)
        pa.grad, pb.grad = g.clone(), g.T.contiguous()
        before_a, before_b = pa.detach().clone(), pb.detach().clone()
        opt_a.step()
        opt_b.step()
        ua, ub = pa.detach() - before_a, pb.detach() - before_b
        assert torch.equal(ua, ub.T), f"step {t}: updates differ"
        assert torch.equal(pa.detach(), pb.detach().T), f"step {t}: weights differ"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("foreach", [False, True])
def test_conv1d_update_is_the_linear_update_transposed(case: str, foreach: bool) -> None:
    if foreach and _name(case) in ("cosmos", "frugal"):
        pytest.skip("the matrix rule of COSMOS/FRUGAL is a per-tensor loop either way")
    lin, conv, w = _pair()
    g_lin = bo.matrix_param_groups(lin, head=None)
    g_conv = bo.matrix_param_groups(conv, head=None)
    assert g_conv[0].get("transposed") is True and g_conv[0]["params"] == [w]
    assert "transposed" not in g_lin[0]
    hp = {**CASES[case], "foreach": foreach}
    opt_a = bo.create(_name(case), g_lin, **hp)
    opt_b = bo.create(_name(case), g_conv, **hp)
    _step_both(opt_a, lin.weight, opt_b, w, steps=5)


def test_bfloat16_weights() -> None:
    lin, conv, w = _pair(dtype=torch.bfloat16)
    opt_a = bo.Muon(bo.matrix_param_groups(lin, head=None))
    opt_b = bo.Muon(bo.matrix_param_groups(conv, head=None))
    _step_both(opt_a, lin.weight, opt_b, w, steps=3)


def test_square_and_wide_layers() -> None:
    for n_in, n_out in ((16, 16), (48, 16)):
        lin, conv, w = _pair(n_in, n_out)
        opt_a = bo.SWAN(bo.matrix_param_groups(lin, head=None))
        opt_b = bo.SWAN(bo.matrix_param_groups(conv, head=None))
        _step_both(opt_a, lin.weight, opt_b, w, steps=2)


def test_muon_spectral_norm_before_and_after() -> None:
    """The measurement of the issue: one Muon step (lr=1, fresh momentum) of a 32 -> 128 layer."""
    lin, conv, w = _pair()
    g = torch.ones(128, 32) + torch.randn(128, 32, generator=torch.Generator().manual_seed(3))
    norms = {}
    for key, model, p, grad, kw in (
        ("linear", lin, lin.weight, g, {}),
        ("conv1d", conv, w, g.T.contiguous(), {}),
        ("conv1d_as_stored", conv, w, g.T.contiguous(), {"transposed": {"": False}}),
    ):
        groups = bo.matrix_param_groups(model, head=None, **kw)
        opt = bo.Muon(groups, lr=1.0, ns_dtype=torch.float32)
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        norms[key] = torch.linalg.matrix_norm(p.detach() - before, ord=2).item()
        with torch.no_grad():
            p.copy_(before)
    assert norms["conv1d"] == pytest.approx(norms["linear"], rel=1e-5)
    assert 2.0 < norms["linear"] < 2.6  # sqrt(128/32) = 2 times NS5's ~[0.7, 1.2]
    assert norms["conv1d_as_stored"] == pytest.approx(norms["linear"] / 2, rel=1e-4)
    print(norms)


def test_explicit_override_for_an_unrecognised_layer() -> None:
    lin, layer, w = _pair(layer=InOut)
    (group,) = bo.matrix_param_groups(layer, head=None)
    assert "transposed" not in group  # not recognised: the override is needed
    groups = bo.matrix_param_groups(layer, head=None, transposed=["w"])
    assert groups[0]["transposed"] is True
    assert bo.matrix_param_groups(layer, head=None, transposed=[""])[0]["transposed"] is True
    opt_a = bo.Muon(bo.matrix_param_groups(lin, head=None), ns_dtype=torch.float32)
    opt_b = bo.Muon(groups, ns_dtype=torch.float32)
    _step_both(opt_a, lin.weight, opt_b, w, steps=3)
    # a hand-built group says the same
    lin, layer, w = _pair(layer=InOut)
    opt_a = bo.COSMOS([lin.weight], rank=4, ns_dtype=None)
    opt_b = bo.COSMOS([{"params": [w], "transposed": True}], rank=4, ns_dtype=None)
    _step_both(opt_a, lin.weight, opt_b, w, steps=3)


def test_override_errors() -> None:
    layer = InOut(4, 8)
    with pytest.raises(ValueError, match="transposed: no module or parameter named 'nope'"):
        bo.matrix_param_groups(layer, transposed=["nope"])
    with pytest.raises(ValueError, match="transposed must be True"):
        bo.Muon([{"params": [layer.w], "transposed": 1}])


def test_conv_transpose_is_the_conv_update_transposed() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    convt = nn.ConvTranspose2d(4, 6, 3)  # weight (4, 6, 3, 3): (in, out, kh, kw)
    with torch.no_grad():
        convt.weight.copy_(conv.weight.transpose(0, 1))
    groups = bo.matrix_param_groups(convt, head=None)
    assert groups[0]["transposed"] is True and groups[0]["params"] == [convt.weight]
    opt_a = bo.Muon(bo.matrix_param_groups(conv, head=None), ns_dtype=torch.float32)
    opt_b = bo.Muon(groups, ns_dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        g = torch.randn(conv.weight.shape, generator=gen)
        conv.weight.grad = g.clone()
        convt.weight.grad = g.transpose(0, 1).contiguous()
        opt_a.step()
        opt_b.step()
        assert torch.equal(conv.weight.detach(), convt.weight.detach().transpose(0, 1))


def test_model_as_params_routes_and_orients() -> None:
    model = nn.Sequential(nn.Embedding(11, 8), Conv1D(24, 8), nn.Linear(24, 11))
    opt = bo.Muon(model)
    rules = [(g["matrix_rule"], g["transposed"]) for g in opt.param_groups]
    assert rules == [(True, True), (False, False)]
    assert opt.param_groups[0]["params"] == [model[1].weight]


def test_state_dict_round_trip_keeps_orientation() -> None:
    lin, conv, w = _pair()
    opt = bo.COSMOS(bo.matrix_param_groups(conv, head=None), rank=4)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["subspace"].shape == (32, 4)  # the input side of the (out, in) matrix
    again = bo.COSMOS(bo.matrix_param_groups(conv, head=None), rank=4)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["transposed"] is True


def test_real_transformers_conv1d() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    lin = nn.Linear(32, 128)
    conv = pytorch_utils.Conv1D(128, 32)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    assert stores_in_out(conv) and not stores_in_out(lin)
    x = torch.randn(8, 32)
    lin(x).square().sum().backward()
    conv(x).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, lin.weight.grad.T)  # autograd: up to rounding
    for name, hp in (("muon", {"ns_dtype": torch.float32}), ("swan", {}), ("cosmos", {"rank": 4})):
        opt_a = bo.create(name, bo.matrix_param_groups(lin, head=None), **hp)
        opt_b = bo.create(name, conv, **hp)
        assert [g.get("transposed", False) for g in opt_b.param_groups] == [True, False]
        _step_both(opt_a, lin.weight, opt_b, conv.weight, steps=3)


@pytest.mark.compile
def test_compiled_transposed_step() -> None:
    """torch.compile(opt.step, fullgraph=True) on a transposed group: no graph break, the eager
    nn.Linear update up to compiler rounding (measured 3e-8 after 3 steps)."""
    lin, conv, w = _pair()
    hp = {"lr": torch.tensor(0.01), "ns_dtype": torch.float32}
    opt_e = bo.Muon(bo.matrix_param_groups(lin, head=None), **hp)
    opt_c = bo.Muon(bo.matrix_param_groups(conv, head=None), **hp)
    step = torch.compile(opt_c.step, fullgraph=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = torch.randn(lin.weight.shape, generator=gen)
        lin.weight.grad, w.grad = g.clone(), g.T.contiguous()
        opt_e.step()
        step()
    torch.testing.assert_close(w.detach().T, lin.weight.detach(), rtol=1e-5, atol=1e-6)
