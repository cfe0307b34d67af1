"""AdamP/SGDP on models whose weights are scale-invariant (followed by BatchNorm or LayerNorm),
where the projection actually fires; the generic MLP checks rarely reach that branch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from adamp import SGDP as RefSGDP
from adamp import AdamP as RefAdamP
from references.sgdp_paper import SGDPPaper
from torch import nn

import basin.optim as bo
import basin.optim.adamp as adamp_module
from basin.optim._kernels import scale_invariant_projection

STEPS = 100


def bn_mlp() -> nn.Module:
    """Linear -> BatchNorm1d (no bias before a norm: its gradient is pure rounding noise): each row of the first two weights is scale-invariant."""
    return nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 4),
    )  # fmt: skip


def ln_mlp() -> nn.Module:
    """Linear -> LayerNorm (no affine): the whole first weight is scale-invariant, its rows
    are not, so the layer view is the one that fires."""
    return nn.Sequential(
        nn.Linear(8, 16, bias=False), nn.LayerNorm(16, elementwise_affine=False), nn.Tanh(),
        nn.Linear(16, 4),
    )  # fmt: skip


def bn_cnn() -> nn.Module:
    """Conv2d -> BatchNorm2d: 4-D kernels, scale-invariant per output channel."""
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )  # fmt: skip


def batches(model_name: str, n: int):
    gen = torch.Generator().manual_seed(3)
    shape = (32, 2, 6, 6) if model_name == "bn_cnn" else (32, 8)
    out = []
    for _ in range(n):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (32,), generator=gen)
        out.append((x, y))
    return out


MODELS = {"bn_mlp": bn_mlp, "ln_mlp": ln_mlp, "bn_cnn": bn_cnn}


class ProjectionCounter:
    """Wraps the projection kernel: counts projections, and which view fired (channel view:
    every row of the projected update is orthogonal to its row of the weight)."""

    def __init__(self) -> None:
        self.channel = 0
        self.layer = 0

    def __call__(self, p, g, u, **kw):
        out, wd = scale_invariant_projection(p, g, u, **kw)
        if float(wd) != 1.0:
            rows = p.shape[0]
            cos = nn.functional.cosine_similarity(g.reshape(rows, -1), p.reshape(rows, -1))
            if cos.abs().max() < kw["delta"] / (p.numel() / rows) ** 0.5:
                self.channel += 1
            else:
                self.layer += 1
        return out, wd


@pytest.fixture
def counter(monkeypatch) -> ProjectionCounter:
    c = ProjectionCounter()
    monkeypatch.setattr(adamp_module, "scale_invariant_projection", c)
    return c


def run_pair(model_name, make_ours, make_ref, steps=STEPS):
    torch.manual_seed(0)
    model = MODELS[model_name]().double()
    ref_model = copy.deepcopy(model)
    opt, ref = make_ours(model.parameters()), make_ref(list(ref_model.parameters()))
    for x, y in batches(model_name, steps):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    start = MODELS[model_name]().double()
    assert not torch.equal(next(model.parameters()), next(start.parameters()))
    return model, ref_model, opt, ref


def assert_models_close(a, b, rtol=1e-10):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        err = (pa - pb).abs().max() / pb.abs().max()
        assert err <= rtol, f"{name}: {err:.3e}"


ADAMP_HPS = [
    {},
    {"weight_decay": 0.1},
    {"nesterov": True, "weight_decay": 0.05},
    {"delta": 0.05, "wd_ratio": 0.5, "weight_decay": 0.1, "lr": 3e-3},
]


@pytest.mark.parametrize("model_name", ["bn_mlp", "ln_mlp", "bn_cnn"])
@pytest.mark.parametrize("hp", ADAMP_HPS, ids=str)
def test_adamp_matches_authors_package_with_projection(counter, model_name, hp) -> None:
    model, ref_model, opt, ref = run_pair(
        model_name, lambda p: bo.AdamP(p, **hp), lambda p: RefAdamP(p, **hp)
    )
    assert_models_close(model, ref_model)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], ref.state[q][key]
            assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    # the projection branch must have been taken, in the view this model is built to trigger
    if model_name == "ln_mlp":
        assert counter.layer >= STEPS // 2, (counter.channel, counter.layer)
    else:
        assert counter.channel >= STEPS, (counter.channel, counter.layer)


SGDP_HPS = [
    {"lr": 0.1},
    {"lr": 0.1, "weight_decay": 1e-2, "dampening": 0.3},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.5, "wd_ratio": 0.5, "weight_decay": 0.1},
]


def _sgdp_reference(params, hp):
    if hp.get("momentum", 0) and not hp.get("nesterov"):
        return SGDPPaper(params, **hp)
    return RefSGDP(params, **hp)


@pytest.mark.parametrize("model_name", ["bn_mlp", "ln_mlp", "bn_cnn"])
@pytest.mark.parametrize("hp", SGDP_HPS, ids=str)
def test_sgdp_matches_reference_with_projection(counter, model_name, hp) -> None:
    """Authors' package where it follows the paper (no momentum, or nesterov), else the paper
    transcription (see test_authors_sgdp_projects_its_momentum_buffer)."""
    model, ref_model, opt, ref = run_pair(
        model_name, lambda p: bo.SGDP(p, **hp), lambda p: _sgdp_reference(p, hp)
    )
    assert_models_close(model, ref_model)
    if hp.get("momentum"):
        key = "momentum"
        for p, q in zip(model.parameters(), ref_model.parameters()):
            a, b = opt.state[p]["momentum_buffer"], ref.state[q][key]
            assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    if model_name == "ln_mlp":
        assert counter.layer >= STEPS // 2, (counter.channel, counter.layer)
    else:
        assert counter.channel >= STEPS, (counter.channel, counter.layer)


def test_transcription_agrees_with_authors_sgdp_where_they_coincide() -> None:
    """Validates the transcription: with nesterov the authors' update is a fresh tensor, so
    their buffer is not projected and both must agree."""
    hp = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
    _, m1, _, ref = run_pair("bn_mlp", lambda p: SGDPPaper(p, **hp), lambda p: RefSGDP(p, **hp))
    m0, _, paper, _ = run_pair("bn_mlp", lambda p: SGDPPaper(p, **hp), lambda p: RefSGDP(p, **hp))
    assert paper.n_projected >= STEPS
    assert_models_close(m0, m1)


def test_authors_sgdp_projects_its_momentum_buffer() -> None:
    """Documented difference: without nesterov the authors' SGDP projects its momentum buffer
    in place (d_p is the buffer); basin, like the paper, keeps the buffer's radial part."""
    hp = {"lr": 0.05, "momentum": 0.9}
    model, ref_model, opt, ref = run_pair(
        "bn_mlp", lambda p: bo.SGDP(p, **hp), lambda p: RefSGDP(p, **hp), steps=30
    )
    w, w_ref = model[0].weight, ref_model[0].weight
    w_before, w_ref_before = w.detach().clone(), w_ref.detach().clone()
    x, y = batches("bn_mlp", 31)[-1]
    for m, o in ((model, opt), (ref_model, ref)):
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    buf, buf_ref = opt.state[w]["momentum_buffer"], ref.state[w_ref]["momentum"]

    def radial(b, p):  # largest |<b_row, p_row>| / ||p_row||
        return ((b * p).sum(1) / p.norm(dim=1)).abs().max() / b.norm()

    # the reference buffer was projected against the pre-step weight (orthogonal up to eps) ...
    assert radial(buf_ref, w_ref_before) < 1e-6
    # ... ours keeps a radial component, so the trajectories differ
    assert radial(buf, w_before) > 1e-3
    assert (w - w_ref).abs().max() > 1e-6


def test_projection_kernel_closed_form() -> None:
    """Independent closed form on a tiny case: p rows orthogonal to g rows -> channel view."""
    p = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    g = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out, wd = scale_invariant_projection(p, g, u, delta=0.1, wd_ratio=0.25, eps=0.0)
    assert wd == 0.25
    assert torch.allclose(out, torch.tensor([[0.0, 2.0], [3.0, 0.0]], dtype=torch.float64))
    assert torch.equal(u, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    # g parallel to p: no projection, the same tensor comes back
    out, wd = scale_invariant_projection(p, p, u, delta=0.1, wd_ratio=0.25, eps=1e-8)
    assert wd == 1.0 and out is u


@pytest.mark.compile
@pytest.mark.parametrize("cls,hp", [(bo.AdamP, {"weight_decay": 0.1})], ids=["adamp"])
def test_compiled_projection_equals_eager(cls, hp) -> None:
    """Compiled step (both views computed, selected with torch.where) on a model where the
    projection fires equals eager; no graph breaks, no recompiles after warm-up."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = bn_cnn().double()
    model_c = copy.deepcopy(model)
    opt, opt_c = cls(model.parameters(), **hp), cls(model_c.parameters(), **hp)
    step_c = torch.compile(opt_c.step, fullgraph=True)
    data = batches("bn_cnn", 8)
    counter = ProjectionCounter()

    def train(m, o, step, part):
        for x, y in part:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            step()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adamp_module, "scale_invariant_projection", counter)
        train(model, opt, opt.step, data)
    assert counter.channel >= 8
    train(model_c, opt_c, step_c, data[:3])
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(model_c, opt_c, step_c, data[3:])
    assert_models_close(model_c, model, 1e-9)


def _rows_with_cosines(cosines):
    """p with unit rows e_i in R^4 and g whose row i has cosine cosines[i] with p's row i."""
    p = torch.zeros(len(cosines), 4, dtype=torch.float64)
    g = torch.zeros_like(p)
    for i, c in enumerate(cosines):
        p[i, i] = 1.0
        g[i, i] = c
        g[i, 3] = (1 - c * c) ** 0.5
    return p, g


@pytest.mark.parametrize("c,fires", [(0.0499, True), (0.0501, False)])
def test_projection_channel_threshold_is_delta_over_sqrt_row_length(c, fires) -> None:
    # rows of length 4: threshold 0.1/2 = 0.05; the layer view (cosine c > 0.1/sqrt(8)) never fires
    p, g = _rows_with_cosines([c, c])
    u = torch.ones_like(p)
    out, wd = scale_invariant_projection(p, g, u, delta=0.1, wd_ratio=0.5, eps=0.0)
    assert (wd == 0.5) is fires
    expected = u.clone()
    if fires:
        expected[0, 0] = expected[1, 1] = 0.0  # radial parts removed row by row
    assert torch.allclose(out, expected)


def test_projection_falls_back_to_the_layer_view() -> None:
    # rows too aligned for the channel view (0.2 > 0.05) but opposite: layer cosine 0 -> project
    # against the whole tensor, p_hat = p/||p||, u <- u - p_hat <p_hat, u>
    p, g = _rows_with_cosines([0.2, -0.2])
    u = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    out, wd = scale_invariant_projection(p, g, u, delta=0.1, wd_ratio=0.5, eps=0.0)
    p_hat = p / p.norm()
    assert wd == 0.5
    assert torch.allclose(out, u - p_hat * (p_hat * u).sum())
    # and the layer threshold is delta/sqrt(numel) = 0.1/sqrt(8): cosines 0.2 and -0.1 give a
    # layer cosine of 0.05 > 0.0354, so nothing fires
    p, g = _rows_with_cosines([0.2, -0.1])
    out, wd = scale_invariant_projection(p, g, u, delta=0.1, wd_ratio=0.5, eps=0.0)
    assert wd == 1.0 and out is u
