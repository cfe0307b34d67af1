"""Muon beyond the generic table: the authors' package bit for bit, the high-precision path
against an SVD transcription, the spectrum of the orthogonalisation, the AdamW fallback against
torch.optim.AdamW, parameter groups and the non-matrix error."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_db import quiet
from references.muon_paper import quintic_polar
from torch import nn

import basin.optim as bo
from basin.optim._kernels import newton_schulz5

muon_pkg = pytest.importorskip("muon")


def _mlp() -> nn.Module:
    # tall, wide and square matrices (the package cannot step conv kernels, see
    # test_conv_kernels_are_flattened), an embedding-free head and biases for the fallback
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 10),
        nn.Tanh(), nn.Linear(10, 5),
    )  # fmt: skip


@pytest.mark.parametrize(
    "shape", [(16, 16), (32, 8), (8, 40), (3, 24, 12), (1, 7), (128, 64)], ids=str
)
def test_newton_schulz5_bit_identical_to_the_package(shape) -> None:
    """bfloat16: the shared kernel equals the package's zeropower_via_newtonschulz5 exactly."""
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    for steps in (1, 5):
        ours = newton_schulz5(G, steps)
        ref = muon_pkg.zeropower_via_newtonschulz5(G, steps)
        assert ours.dtype == ref.dtype == torch.bfloat16
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("wd,momentum", [(0.1, 0.9)])  # defaults: in the table
def test_bit_identical_to_the_package_in_float32(wd: float, momentum: float) -> None:
    """40 steps on an MLP with float32 parameters: Muon groups and the AdamW fallback equal
    SingleDeviceMuonWithAuxAdam bit for bit. Tolerance 0 is the honest one: the same bfloat16
    Newton-Schulz arithmetic, and any difference in the inputs would flip bfloat16 roundings
    (relative 2**-8), which no small tolerance could absorb."""
    torch.manual_seed(0)
    model = _mlp()
    ref_model = copy.deepcopy(model)
    groups = bo.matrix_param_groups(
        model, matrix={"weight_decay": wd, "momentum": momentum}, fallback={"weight_decay": wd}
    )
    opt = bo.Muon(groups)
    rg = bo.matrix_param_groups(
        ref_model, matrix={"weight_decay": wd, "momentum": momentum}, fallback={"weight_decay": wd}
    )
    for g in rg:  # the package's flag
        g["use_muon"] = g.pop("matrix_rule")
    ref = quiet(muon_pkg.SingleDeviceMuonWithAuxAdam)(rg)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen)
    y = torch.randint(0, 5, (64,), generator=gen)
    start = [p.detach().clone() for p in model.parameters()]
    for t in range(40):
        xb, yb = x[(t % 4) * 16 :][:16], y[(t % 4) * 16 :][:16]
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            o.step()
    for (name, a), b, s in zip(model.named_parameters(), ref_model.parameters(), start):
        assert not torch.equal(a, s), name
        assert torch.equal(a, b), f"{name}: {(a - b).abs().max():.3e}"
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert torch.equal(v, ref.state[q][k]), k


@pytest.mark.parametrize("shape", [(12, 12), (20, 6), (5, 17)], ids=str)
@pytest.mark.parametrize("steps", [1, 5, 8])
def test_high_precision_newton_schulz_equals_the_svd_polynomial(shape, steps) -> None:
    """float64: the matrix iteration equals the scalar quintic composed ``steps`` times on the
    normalised singular values, U p(s) V^T (error amplified at most a**steps ~ 3.4**steps
    times float64 rounding: 1e-11 covers steps <= 8)."""
    G = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = newton_schulz5(G, steps, dtype=None)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, quintic_polar(G, steps), rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)], ids=str)
def test_orthogonalisation_spectrum(shape, dtype) -> None:
    """5 quintic steps send every singular value of a well-conditioned matrix (here s_min/s_max
    >= 0.05 after normalisation) into the quintic's known band ~[0.68, 1.2], not exactly to 1,
    with the singular vectors of the input."""
    gen = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), dtype=torch.float64, generator=gen))
    s = torch.linspace(0.05, 1.0, min(shape), dtype=torch.float64)
    G = U @ torch.diag(s) @ V.T
    out = newton_schulz5(G, 5, dtype=dtype).double()
    sv = torch.linalg.svdvals(out)
    # the exact band: the scalar quintic composed 5 times on [0.05, 1] / ||s||-normalised inputs
    x = torch.linspace(0.05, 1.0, 10001, dtype=torch.float64) / s.norm()
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    lo, hi = x.min().item(), x.max().item()
    assert 0.68 < lo and hi < 1.2  # the band the Muon write-up quotes
    # bfloat16: 5 iterations of matmuls rounded to 2**-8 relative: allow 2% beyond the band
    slack = 1e-9 if dtype == torch.float64 else 0.02
    assert sv.min() > lo - slack and sv.max() < hi + slack, (sv.min(), sv.max(), lo, hi)
    # singular vectors kept: U^T out V is (nearly) diagonal
    core = U.T @ out @ V
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < (1e-10 if dtype == torch.float64 else 0.05)


def test_adamw_fallback_equals_torch_adamw() -> None:
    """A matrix_rule=False group is AdamW (decoupled decay): float64, 50 steps, against
    torch.optim.AdamW to 1e-12 (different arithmetic order, same formula)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 3)).double()
    ref_model = copy.deepcopy(model)
    hp = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    opt = bo.Muon([{"params": model.parameters(), "matrix_rule": False, **hp}])
    ref = torch.optim.AdamW(ref_model.parameters(), **hp)
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        x = torch.randint(0, 10, (16, 3), generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fallback_defaults_come_from_adamw_arguments() -> None:
    model = nn.Linear(4, 3)
    opt = bo.Muon(
        [{"params": [model.weight]}, {"params": [model.bias], "matrix_rule": False}],
        lr=0.05,
        adamw_lr=1e-3,
        adamw_betas=(0.8, 0.9),
    )
    mg, ag = opt.param_groups
    assert mg["matrix_rule"] and mg["lr"] == 0.05
    assert not ag["matrix_rule"] and ag["lr"] == 1e-3 and ag["betas"] == (0.8, 0.9)
    assert ag["eps"] == 1e-10 and ag["weight_decay"] == 0.0


def test_non_matrix_parameter_without_fallback_raises_naming_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError) as info:
        bo.Muon(model.named_parameters())
    msg = str(info.value)
    assert "'0.bias'" in msg and "(4,)" in msg and "matrix_rule=False" in msg
    assert "matrix_param_groups" in msg and "adamw_fallback=True" in msg
    with pytest.raises(ValueError, match=r"#1 .*shape \(4,\)"):
        bo.Muon(model.parameters())


def test_adamw_fallback_routes_vectors_to_a_companion_group() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    opt = bo.Muon(model.parameters(), adamw_fallback=True, lr=0.03, weight_decay=0.1)
    (mg, ag) = opt.param_groups
    assert [p.ndim for p in mg["params"]] == [2, 2] and mg["lr"] == 0.03
    assert [p.ndim for p in ag["params"]] == [1, 1]
    assert ag["lr"] == 3e-4 and ag["weight_decay"] == 0.0 and not ag["matrix_rule"]


def test_matrix_param_groups_split() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.conv = nn.Conv1d(8, 8, 3)
            self.hidden = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 11, bias=False)

    net = Net()
    muon_g, adam_g = bo.matrix_param_groups(net, matrix={"lr": 0.05}, fallback={"lr": 1e-3})
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(muon_g["params"]) == {id(net.conv.weight), id(net.hidden.weight)}
    assert muon_g["matrix_rule"] and muon_g["lr"] == 0.05
    assert not adam_g["matrix_rule"] and adam_g["lr"] == 1e-3
    assert id(net.embed.weight) in ids(adam_g["params"])
    assert id(net.lm_head.weight) in ids(adam_g["params"])
    total = sum(p.numel() for g in (muon_g, adam_g) for p in g["params"])
    assert total == sum(p.numel() for p in net.parameters())
    # explicit head names (module or parameter), or none
    (mg, _) = bo.matrix_param_groups(net, head=["hidden.weight"])
    assert ids(mg["params"]) == {id(net.conv.weight), id(net.lm_head.weight)}
    (mg, _) = bo.matrix_param_groups(net, head=None)
    assert id(net.lm_head.weight) in ids(mg["params"])
    with pytest.raises(ValueError, match="lm_hed"):
        bo.matrix_param_groups(net, head=["lm_hed"])
    bo.Muon(bo.matrix_param_groups(net))  # a valid configuration


def test_conv_kernels_are_flattened() -> None:
    """Difference from the package (docstring): a (4, 2, 3, 1) kernel is orthogonalised as a 4x6
    matrix with scale sqrt(max(1, 4/6)) = 1, and the step has the kernel's shape. The package
    scales by sqrt(3/1) from the kernel's spatial dims and, in muon-optimizer 0.1.0, fails to
    reshape the update back (a RuntimeError on any conv kernel)."""
    w0 = torch.randn(4, 2, 3, 1, generator=torch.Generator().manual_seed(0))
    g = torch.randn(4, 2, 3, 1, generator=torch.Generator().manual_seed(1))
    w, w_ref = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    w.grad, w_ref.grad = g.clone(), g.clone()
    bo.Muon([w], lr=0.1).step()
    # first step from zero momentum: -lr * NS5(lerp(g, 0.05 g, 0.95)) of the 4x6 matrix
    u = torch.lerp(g, 0.05 * g, 0.95).reshape(4, 6)
    expected = w0 - 0.1 * newton_schulz5(u).float().reshape(4, 2, 3, 1)
    assert torch.equal(w.detach(), expected)
    with pytest.raises(RuntimeError):
        quiet(muon_pkg.SingleDeviceMuon)([w_ref], lr=0.1).step()


def test_grad_is_not_modified() -> None:
    w = nn.Parameter(torch.randn(6, 4))
    g = torch.randn(6, 4)
    w.grad = g.clone()
    opt = bo.Muon([w])
    opt.step()
    opt.step()
    assert torch.equal(w.grad, g)
