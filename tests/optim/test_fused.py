"""The fused path (``fused=True``, basin.optim._fused) of every optimizer that has one, against
the readable single-tensor path: float64 over 100 steps, parameters and state, several groups
and dtypes, parameters that miss steps, state-dict round trips across the paths, and the inputs
that must raise.

The fused kernel is Inductor-compiled: it rounds differently from eager ATen (which uses FMA in
``lerp``/``add(alpha=)``/``addcmul``), so float64 agreement is not bit for bit; the measured max
relative difference over 100 steps is ~3e-15, checked at 1e-14. One compiled kernel per
(optimizer, dtype, static flags) is shared by every test here (module-level cache).
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_db import CASES, OptimCase
from test_common import assert_tensors_close, compare_models, loss_of, make_data, make_model
from torch import nn

FUSED = [pytest.param(c, id=c.name) for c in CASES if c.has_fused]
TOL = 1e-14  # float64; measured ~3e-15 (see module docstring)


def _groups(case: OptimCase):
    """Two param groups (the second with another lr), a float32 matrix beside the float64 model
    (two dtypes in one group) and a float64 vector that gets a gradient from step 4 on (its step
    counter lags: a separate flat run)."""
    model = make_model(case)
    gen = torch.Generator().manual_seed(5)
    aux = nn.Parameter(torch.randn(4, 8, generator=gen))
    late = nn.Parameter(torch.randn(8, generator=gen, dtype=torch.float64))
    params = list(model.parameters())
    groups = [{"params": params[:2]}, {"params": params[2:] + [aux, late], "lr": 2e-3}]
    return model, aux, late, groups


def _run(case: OptimCase, hp: dict, fused: bool, steps: int):
    model, aux, late, groups = _groups(case)
    opt = case.cls(groups, **{**hp, "fused": fused})
    for i, (x, y) in enumerate(make_data(steps)):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, (x, y)) + ((aux.double() - x[:4]) ** 2).mean()
        if i >= 3:
            loss = loss + (late * x[0]).sum().tanh()
        loss.backward()
        opt.step()
    return model, aux, late, opt


def _compare_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, rtol: float) -> int:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    n = 0
    for i, (x, y) in enumerate(zip(pa, pb)):
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys(), f"state keys of param {i}"
        for k in sa:
            assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, f"{k} of {i}"
            assert_tensors_close(sa[k], sb[k], rtol, f"state {k} of param {i}")
            n += 1
    return n


@pytest.mark.compile
@pytest.mark.parametrize("case", FUSED)
def test_fused_equals_single_tensor(case: OptimCase) -> None:
    """Every variant, 100 float64 steps: parameters and state equal the single-tensor path."""
    for hp in case.variants:
        (m1, a1, l1, o1), (m2, a2, l2, o2) = (_run(case, hp, f, 100) for f in (False, True))
        compare_models(m2, m1, TOL)
        assert_tensors_close(l2.detach(), l1.detach(), TOL, f"lagging param, {hp}")
        assert_tensors_close(a2.detach(), a1.detach(), 1e-5, f"float32 param, {hp}")
        assert _compare_state(o2, o1, 1e-5) > 0
        pairs = zip(*([p for g in o.param_groups for p in g["params"]] for o in (o1, o2)))
        for p1, p2 in pairs:
            if p1.dtype != torch.float64:
                continue
            for k in o1.state[p1]:
                assert_tensors_close(o2.state[p2][k], o1.state[p1][k], TOL, f"{k}, {hp}")


@pytest.mark.compile
@pytest.mark.parametrize("case", FUSED)
def test_fused_state_dict_round_trips(case: OptimCase) -> None:
    """Fused -> fused continues bit for bit; fused <-> non-fused continue as the single-tensor
    path does; state dicts have the same keys and shapes on both paths."""
    hp = case.variants[0]
    batches = make_data(12)
    runs = {}
    for fused in (False, True):
        model = make_model(case)
        opt = case.cls(model.parameters(), **{**hp, "fused": fused})
        for b in batches[:6]:
            opt.zero_grad()
            loss_of(model, b).backward()
            opt.step()
        runs[fused] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    sd_plain, sd_fused = runs[False][1], runs[True][1]
    assert sd_plain["state"].keys() == sd_fused["state"].keys()
    for i, st in sd_plain["state"].items():
        assert {k: v.shape for k, v in st.items()} == {
            k: v.shape for k, v in sd_fused["state"][i].items()
        }

    def continue_from(saved_fused: bool, fused: bool) -> nn.Module:
        model = make_model(case, seed=123)
        model.load_state_dict(runs[saved_fused][0])
        opt = case.cls(model.parameters(), **{**hp, "fused": fused})
        opt.load_state_dict(copy.deepcopy(runs[saved_fused][1]))
        for b in batches[6:]:
            opt.zero_grad()
            loss_of(model, b).backward()
            opt.step()
        return model

    reference = continue_from(False, False)
    fused_fused = continue_from(True, True)
    again = continue_from(True, True)
    for p1, p2 in zip(fused_fused.parameters(), again.parameters()):
        assert torch.equal(p1, p2)
    compare_models(fused_fused, reference, TOL)
    compare_models(continue_from(False, True), reference, TOL)
    compare_models(continue_from(True, False), reference, TOL)


@pytest.mark.parametrize("case", FUSED)
def test_fused_refuses_bad_inputs(case: OptimCase) -> None:
    params = list(make_model(case).parameters())
    hp = case.variants[0]
    with pytest.raises(ValueError, match="fused"):
        case.cls(params, **{**hp, "fused": "yes"})
    with pytest.raises(ValueError, match="fused"):
        case.cls(params, **{**hp, "fused": True, "foreach": True})
    opt = case.cls(params[:1], **hp)
    with pytest.raises(ValueError, match="fused"):
        opt.add_param_group({"params": params[1:], "fused": 1})
    emb = nn.Embedding(5, 3, sparse=True)
    opt = case.cls(emb.parameters(), **{**hp, "fused": True})
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        case.cls([z], **{**hp, "fused": True}).step()


def test_registry_lists_fused_exactly_for_the_fused_cases() -> None:
    import basin.optim as bo

    listed = {n for n in bo.available() if "fused" in bo.info(n).capabilities}
    assert listed == {c.name for c in CASES if c.has_fused}


@pytest.mark.parametrize("case", FUSED)
def test_fused_is_off_by_default(case: OptimCase) -> None:
    """``fused=None`` keeps the eager paths (no compile, no flat buffers)."""
    model = make_model(case)
    opt = case.cls(model.parameters(), **case.variants[0])
    loss_of(model, make_data(1)[0]).backward()
    opt.step()
    assert not getattr(opt, "_flat_runs", None)
