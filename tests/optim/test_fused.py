"""The fused path (``fused=True``, basin.optim._fused) of every optimizer that has one, against
the readable single-tensor path: float64 over 100 steps, parameters and state, several groups
and dtypes, parameters that miss steps, state-dict round trips across the paths, and the inputs
that must raise.

The fused kernel is Inductor-compiled: it rounds differently from eager ATen (which uses FMA in
``lerp``/``add(alpha=)``/``addcmul``), so float64 agreement is not bit for bit: an FMA and a
separately rounded multiply-add differ by up to an ulp, a few times per element and step, and
the differences reach the next steps through the loss (the matrix rules' parameters differ too,
as their gradients do). Checked at 16 ulps a step over the 100 steps (3.6e-13); measured max
relative differences 3e-15 (AdaBelief) to 4e-14 (SWAN's matrices), machine-dependent. One compiled kernel per
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
TOL = 100 * 16 * torch.finfo(torch.float64).eps  # 100 steps (see module docstring)


def _groups(case: OptimCase):
    """Two param groups (the second with another lr), a float32 matrix beside the float64 model
    (two dtypes in one group) and a float64 vector that gets a gradient from step 4 on (its step
    counter lags: a separate flat run)."""
    model = make_model(case)
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float32 if case.fused_float32 else torch.float64
    aux = nn.Parameter(torch.randn(4, 8, generator=gen, dtype=dtype))
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


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    """Floating-point state to ``rtol``; integral state (FRUGAL's generator) exactly."""
    if a.is_floating_point():
        assert_tensors_close(a, b, rtol, what)
    else:
        assert torch.equal(a, b), what


def _compare_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer, rtol: float) -> int:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    n = 0
    for i, (x, y) in enumerate(zip(pa, pb)):
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys(), f"state keys of param {i}"
        for k in sa:
            assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, f"{k} of {i}"
            _close(sa[k], sb[k], rtol, f"state {k} of param {i}")
            n += 1
    return n


@pytest.mark.compile
@pytest.mark.parametrize("case", FUSED)
def test_fused_equals_single_tensor(case: OptimCase) -> None:
    """Every variant, 100 float64 steps: parameters and state equal the single-tensor path."""
    for hp in case.fused_hps():
        (m1, a1, l1, o1), (m2, a2, l2, o2) = (_run(case, hp, f, 100) for f in (False, True))
        assert o2.__dict__.get("_flat_runs") and not o1.__dict__.get("_flat_runs")
        compare_models(m2, m1, TOL)
        assert_tensors_close(l2.detach(), l1.detach(), TOL, f"lagging param, {hp}")
        aux_tol = 1e-5 if case.fused_float32 else TOL
        assert_tensors_close(a2.detach(), a1.detach(), aux_tol, f"matrix beside, {hp}")
        assert _compare_state(o2, o1, 1e-5) > 0 or not any(o1.state.values())
        pairs = zip(*([p for g in o.param_groups for p in g["params"]] for o in (o1, o2)))
        for p1, p2 in pairs:
            if p1.dtype != torch.float64:
                continue
            for k in o1.state[p1]:
                _close(o2.state[p2][k], o1.state[p1][k], TOL, f"{k}, {hp}")


@pytest.mark.compile
@pytest.mark.parametrize("case", FUSED)
def test_fused_state_dict_round_trips(case: OptimCase) -> None:
    """Fused -> fused continues bit for bit; fused <-> non-fused continue as the single-tensor
    path does; state dicts have the same keys and shapes on both paths."""
    hp = case.fused_hps()[0]
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
    hp = case.fused_hps()[0]
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
    # a gradient of another dtype (possible through .data): refused before anything changes
    v = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    v.grad = torch.ones_like(v)
    v.grad.data = torch.ones(3)
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))  # a group before it: untouched too
    w.grad = torch.ones_like(w)
    opt = case.cls([{"params": [w]}, {"params": [v]}], **{**hp, "fused": True})
    with pytest.raises(ValueError, match=r"fused=True\) needs gradients of the parameter's dtype"):
        opt.step()
    assert not v.detach().any() and not w.detach().any()
    assert not opt.state.get(v) and not opt.state.get(w)


def test_registry_lists_fused_exactly_for_the_fused_cases() -> None:
    import basin.optim as bo

    listed = {n for n in bo.available() if "fused" in bo.info(n).capabilities}
    assert listed == {c.name for c in CASES if c.has_fused}


@pytest.mark.parametrize("case", FUSED)
def test_fused_is_off_by_default(case: OptimCase) -> None:
    """``fused=None`` keeps the eager paths (no compile, no flat buffers)."""
    model = make_model(case)
    opt = case.cls(model.parameters(), **case.fused_hps()[0])
    loss_of(model, make_data(1)[0]).backward()
    opt.step()
    assert not getattr(opt, "_flat_runs", None)


@pytest.mark.compile
def test_fused_layout_is_rebuilt_exactly_when_it_may_be_stale() -> None:
    """The steady-state check (basin.optim._fused.flat_runs) is identity comparisons only: the
    layout is reused while nothing changed and rebuilt on every invalidation the module lists,
    each checked to continue as the single-tensor path does: a parameter missing its gradient
    (another set, then differing step counters), another set of state keys, ``load_state_dict``,
    a step of the group on another path in between (with a lagging parameter, so that a stale
    layout would apply one bias correction to two counters) and a restored step."""
    import basin.optim as bo

    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        runs.append((model, bo.AdaBelief(model.parameters(), lr=1e-2, fused=fused)))
    (ref_model, ref), (model, opt) = runs
    batches = make_data(12)

    def step(i: int, skip: tuple[int, ...] = ()) -> None:
        x, y = batches[i]
        for m, o in runs:
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x[:, :4]).repeat(1, 2), y).backward()
            for j in skip:
                list(m.parameters())[j].grad = None
            o.step()
        compare_models(model, ref_model, TOL)

    def layout() -> list:
        # one group and dtype: the entry of the state keys used last
        return max(opt._flat_runs.values(), key=lambda entry: entry.tick).runs

    step(0)
    first = layout()
    step(1)
    assert layout() is first  # steady state: reused
    step(2, skip=(1,))  # another set of parameters with gradients
    assert layout() is not first and len(layout()) == 1
    step(3)  # all again: parameter 1 lags one step -> a run of its own
    assert len(layout()) == 2
    step(4)
    assert len(layout()) == 2
    before = layout()
    opt.param_groups[0]["fused"] = ref.param_groups[0]["fused"] = False
    step(5, skip=(0, 1))  # the group on the single-tensor path, parameters 0, 1 left behind
    opt.param_groups[0]["fused"] = True
    step(6)  # same parameters as at step 4, but counters moved elsewhere: rebuilt
    assert layout() is not before and len(layout()) == 3
    opt.load_state_dict(opt.state_dict())
    ref.load_state_dict(ref.state_dict())
    assert not opt.__dict__.get("_flat_runs")
    step(7)
    before = layout()
    for o in (opt, ref):
        o.param_groups[0]["amsgrad"] = True  # new state key: max_exp_avg_var
    step(8)
    assert all("max_exp_avg_var" in r.flats for r in layout())
    assert opt.state[next(model.parameters())]["max_exp_avg_var"].data_ptr() in {
        r.flats["max_exp_avg_var"].data_ptr() for r in layout()
    }
    before = layout()
    opt._restore([])  # what a failed step does (after putting the state back)
    assert not opt.__dict__.get("_flat_runs")
    step(9)
    assert layout() is not before


@pytest.mark.compile
def test_fused_parameters_live_in_one_buffer_without_breaking_aliases() -> None:
    """A fused step moves the parameters that own their storage into one flat buffer per run
    (read and written in place: no gather or scatter of the parameters), leaves a parameter
    that is a view of a tensor of the user's alone (the update still lands in that tensor),
    bumps the version counters (autograd refuses a graph that saved the old values), and
    follows a parameter the user moved (``p.data = ...``) instead of writing a stale buffer;
    every step equal to the single-tensor path."""
    import basin.optim as bo

    def build() -> tuple[nn.Module, torch.Tensor, nn.Parameter]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        owner = torch.randn(10, dtype=torch.float64)
        shared = nn.Parameter(owner[2:8])  # a view of the user's tensor
        return model, owner, shared

    (m_ref, own_ref, sh_ref), (m, own, sh) = build(), build()
    ref = bo.AdaBelief([*m_ref.parameters(), sh_ref], lr=1e-2)
    opt = bo.AdaBelief([*m.parameters(), sh], lr=1e-2, fused=True)
    batches = make_data(6)

    def step(i: int) -> None:
        x, y = batches[i]
        for model, s, o in ((m_ref, sh_ref, ref), (m, sh, opt)):
            o.zero_grad(set_to_none=True)
            out = model(x[:, :4]).repeat(1, 2) + s[:4].sum()
            nn.functional.cross_entropy(out, y).backward()
            o.step()
        compare_models(m, m_ref, TOL)
        assert_tensors_close(own, own_ref, TOL, "the user's tensor behind a parameter")

    step(0)
    addresses = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert len(addresses) == 1, "the model's parameters were not moved into one buffer"
    (run,) = [
        r for layout in opt._flat_runs.values() for r in layout.runs if r.flat_params is not None
    ]
    assert run.flat_params.untyped_storage().data_ptr() in addresses
    assert sh.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()  # not moved
    w = next(m.parameters())
    saved = (w * w).sum()  # saves w
    step(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    for model in (m, m_ref):  # the user moves the parameters (as .to() or a checkpoint load may)
        for p in model.parameters():
            p.data = p.data.clone()
    moved = {p.untyped_storage().data_ptr() for p in m.parameters()}
    step(2)
    step(3)
    assert {p.untyped_storage().data_ptr() for p in m.parameters()}.isdisjoint(moved - addresses)
    assert len({p.untyped_storage().data_ptr() for p in m.parameters()}) == 1
