"""Normalize-and-Project (arXiv:2407.01800): the projection after the base step, checked against a
float64 transcription of the paper's update w <- (w - lr*u) * ||w0|| / ||w - lr*u|| with u the
base optimizer's step direction (SGD: the gradient; Adam: its bias-corrected m / (sqrt(v) + eps))."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from basin.train import NormalizeAndProject, insert_layernorm
from basin.train.nap import effective_lr, nap_matched_lr


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    insert_layernorm(m)
    return m.double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _project(w: torch.Tensor, r: float) -> torch.Tensor:
    return w * (r / math.sqrt(float((w * w).sum())))


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_matches_float64_transcription(base: str) -> None:
    model = _model()
    x, y = _batch()
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr)
        if base == "sgd"
        else torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps)
    )
    nap = NormalizeAndProject(opt)
    projected = {id(p) for p in nap.params}
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    r0 = {n: math.sqrt(float((p * p).sum())) for n, p in ref.items()}
    m = {n: torch.zeros_like(p) for n, p in ref.items()}
    v = {n: torch.zeros_like(p) for n, p in ref.items()}
    for t in range(1, 6):
        _grads(model, x, y)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        nap.step()
        for n, p in model.named_parameters():
            g = grads[n]
            if base == "sgd":
                u = g
            else:
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                mh, vh = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
                u = mh / (vh.sqrt() + eps)
            w = ref[n] - lr * u
            ref[n] = _project(w, r0[n]) if id(p) in projected else w
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-12, atol=1e-12)
            if id(p) in projected:
                assert abs(float(p.detach().norm()) - r0[n]) <= 1e-12 * r0[n]


def test_excludes_biases_and_norm_gains() -> None:
    model = _model()
    nap = NormalizeAndProject(torch.optim.SGD(model.parameters(), lr=0.5))
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = sorted(names[id(p)] for p in nap.params)
    assert chosen == ["0.weight", "3.weight", "6.weight"]  # the three Linear weights
    x, y = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _grads(model, x, y)
    nap.step()
    # a norm gain moved freely (not rescaled back)
    gain = dict(model.named_parameters())["1.weight"]
    assert not torch.equal(gain, before["1.weight"])
    assert abs(float(gain.detach().norm()) - float(before["1.weight"].norm())) > 1e-6


def test_insert_layernorm_places_norm_before_nonlinearities() -> None:
    m = _model()
    kinds = [type(layer).__name__ for layer in m]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "Tanh", "Linear"]
    c = insert_layernorm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU(), nn.Conv2d(4, 2, 1)))
    assert isinstance(c[1], nn.GroupNorm) and c[1].num_groups == 1


def test_state_dict_round_trip() -> None:
    x, y = _batch()
    a = _model()
    nap_a = NormalizeAndProject(torch.optim.Adam(a.parameters(), lr=0.05), radius=2.0)
    for _ in range(2):
        _grads(a, x, y)
        nap_a.step()
    b = _model()
    b.load_state_dict(a.state_dict())
    nap_b = NormalizeAndProject(torch.optim.Adam(b.parameters(), lr=0.05))
    nap_b.load_state_dict(copy.deepcopy(nap_a.state_dict()))  # torch shares same-dtype tensors
    assert nap_b.norms == [2.0] * 3
    for nap, model in ((nap_a, a), (nap_b, b)):
        _grads(model, x, y)
        nap.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="projected weights"):
        NormalizeAndProject(
            torch.optim.SGD(b.parameters(), lr=0.1), params=[b[0].weight]
        ).load_state_dict(nap_a.state_dict())


def test_invalid_arguments() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="radius"):
        NormalizeAndProject(opt, radius=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        NormalizeAndProject(m.parameters())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a parameter"):
        NormalizeAndProject(opt, params=[torch.ones(3, 3)])
    with pytest.raises(ValueError, match="norm"):
        z = nn.Linear(3, 3)
        nn.init.zeros_(z.weight)
        NormalizeAndProject(torch.optim.SGD(z.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="weight_norm"):
        effective_lr(0.1, 0.0)


def test_effective_lr_rule() -> None:
    # SGD on a scale-invariant function: scaling w by c scales the gradient by 1/c, so the
    # angular step lr*||g||/||w|| goes as lr/c**2; lr/||w||^2 stays the same under (c w, c^2 lr)
    torch.manual_seed(0)
    w = torch.randn(6, dtype=torch.float64)
    a = torch.randn(6, dtype=torch.float64)

    def angle_after_step(w: torch.Tensor, lr: float) -> float:
        w = w.clone().requires_grad_(True)
        f = (a @ w) / w.norm()  # scale-invariant
        (g,) = torch.autograd.grad(f, w)
        w2 = w.detach() - lr * g
        wd = w.detach()
        return float(torch.arccos((w2 @ wd) / (w2.norm() * wd.norm())))

    base = angle_after_step(w, 0.1)
    scaled = angle_after_step(3.0 * w, 0.1 * 9.0)
    assert math.isclose(base, scaled, rel_tol=1e-10)
    assert math.isclose(effective_lr(0.1, 1.0), effective_lr(0.9, 3.0), rel_tol=1e-15)
    assert math.isclose(nap_matched_lr(0.1, 3.0, 1.0), 0.1 / 9.0, rel_tol=1e-15)
    assert math.isclose(nap_matched_lr(0.1, 3.0, 1.0, adaptive=True), 0.1 / 3.0, rel_tol=1e-15)


def test_closure_is_passed_to_the_base() -> None:
    model = _model()
    x, y = _batch()
    nap = NormalizeAndProject(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3))
    r0 = list(nap.norms)

    def closure() -> torch.Tensor:
        nap.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = nap.step(closure)
    assert torch.is_tensor(loss)
    for p, r in zip(nap.params, r0):
        assert abs(float(p.detach().norm()) - r) <= 1e-12 * r


def test_bench_entry_projects_after_each_step() -> None:
    from basin.bench import make_config, run

    res = run(make_config("mnist1d_mlp", "nap", steps=3))
    assert math.isfinite(res.final["train_loss"])
    from basin.bench import workloads as wl
    from basin.bench.runner import build_training

    task = wl.get("mnist1d_mlp").build(0)
    opt, method = build_training("nap", {"lr": 1e-2}, task)
    norms = [float(p.detach().double().norm()) for p in task.model.parameters() if p.ndim >= 2]
    x, y = task.probe_batch
    nn.functional.cross_entropy(task.model(x), y).backward()
    opt.step()
    method.after_step(task.model)
    after = [float(p.detach().double().norm()) for p in task.model.parameters() if p.ndim >= 2]
    for a, b in zip(after, norms):
        assert abs(a - b) <= 1e-6 * b  # float32 weights
    with pytest.raises(ValueError, match="weight matrices"):
        make_config("rosenbrock", "nap", steps=2)
