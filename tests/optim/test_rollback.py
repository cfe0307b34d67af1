"""A step that fails part-way (a factorization raising in COSMOS, SOAP or FRUGAL) leaves the
parameters and optimizer state exactly as they were, and training then continues as if the
failed step had never been attempted."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import basin.optim as bo

CASES = [
    ("cosmos", lambda m: bo.COSMOS(bo.matrix_param_groups(m), lr=1e-2, rank=2), "qr"),
    ("soap", lambda m: bo.SOAP(m.parameters(), lr=1e-2, precondition_frequency=1), "qr"),
    ("frugal", lambda m: bo.FRUGAL(bo.matrix_param_groups(m), lr=1e-2, update_gap=2), "svd"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _state(opt: torch.optim.Optimizer) -> list[dict]:
    return [
        {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
        for s in (opt.state.get(p, {}) for g in opt.param_groups for p in g["params"])
    ]


def _equal(x: object, y: object) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_equal, x, y))
    return x == y


def _same(a: list[dict], b: list[dict]) -> bool:
    return _equal(a, b)


@pytest.mark.parametrize(("name", "build", "fn"), CASES, ids=[c[0] for c in CASES])
def test_failed_factorization_changes_nothing(name, build, fn, monkeypatch) -> None:  # noqa: ANN001
    model, clean = _model(), _model()
    opt, ref = build(model), build(clean)
    for step in range(2):
        for m, o in ((model, opt), (clean, ref)):
            _backward(m, step)
            o.step()
    _backward(model, 2)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_state = _state(opt)
    real = getattr(torch.linalg, fn)
    calls = {"n": 0}

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 2:  # after the first matrix has been updated
            raise torch.linalg.LinAlgError(f"injected {fn} failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, fn, failing)
    with pytest.raises(torch.linalg.LinAlgError, match="injected"):
        opt.step()
    assert calls["n"] == 2, f"{name} did not reach a second {fn} in this step"
    monkeypatch.setattr(torch.linalg, fn, real)
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
    assert _same(before_state, _state(opt))
    # the retried step and the next one are those of a run that never failed
    for step in (2, 3):
        if step == 3:
            _backward(model, step)
        _backward(clean, step)
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clean.parameters()))
    assert _same(_state(opt), _state(ref))


def test_elementwise_optimizers_take_no_snapshot() -> None:
    model = _model()
    assert not bo.AdaBelief(model.parameters())._needs_snapshot()
    assert bo.COSMOS(bo.matrix_param_groups(model), rank=2)._needs_snapshot()


SPARSE_REFRESH = [
    ("soap", lambda m: bo.SOAP(m.parameters(), lr=1e-2, precondition_frequency=3)),
    ("frugal", lambda m: bo.FRUGAL(bo.matrix_param_groups(m), lr=1e-2, update_gap=3)),
]


@pytest.mark.parametrize(("name", "build"), SPARSE_REFRESH, ids=[c[0] for c in SPARSE_REFRESH])
def test_snapshot_exactly_on_the_steps_that_factorize(name, build, monkeypatch) -> None:  # noqa: ANN001
    """The copy is taken on every step that calls a factorization, and only on those."""
    model = _model()
    opt = build(model)
    calls = {"n": 0}
    for fn in ("qr", "eigh", "svd"):
        real = getattr(torch.linalg, fn)

        def counted(*args, _real=real, **kwargs):  # noqa: ANN002, ANN003
            calls["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, fn, counted)
    needs, factorized = [], []
    for step in range(8):
        _backward(model, step)
        needs.append(opt._needs_snapshot())
        before = calls["n"]
        opt.step()
        factorized.append(calls["n"] > before)
    assert needs == factorized, f"{name}: snapshot {needs} vs factorizing steps {factorized}"
    assert any(factorized) and not all(factorized)
