"""The same checks for every optimizer in tests/optim_db.py."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
import torch._dynamo
from optim_db import CASES, OptimCase, mlp
from torch import nn

VARIANTS = [
    pytest.param(case, i, id=f"{case.name}-{vid}")
    for case in CASES
    for i, vid in enumerate(case.ids())
]
CASE_PARAMS = [pytest.param(case, id=case.name) for case in CASES]


def make_model(case: OptimCase, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return (case.model or mlp)().to(dtype)


def make_data(n_batches: int, dtype: torch.dtype = torch.float64, seed: int = 1):
    """Mini-batches of a fixed classification problem (labels from a random teacher)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = (x @ teacher + 0.5 * torch.randn(256, 4, generator=gen, dtype=torch.float64)).argmax(1)
    x = x.to(dtype)
    return [(x[(i * 32) % 256 :][:32], y[(i * 32) % 256 :][:32]) for i in range(n_batches)]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# classes that step only with a closure (OptimCase.closure)
CLOSURE_CLASSES = {case.cls for case in CASES if case.closure}


def closure_step(model: nn.Module, opt: torch.optim.Optimizer, batch, loss_fn=None) -> Any:
    """``opt.step(closure)`` with a closure that recomputes the batch's loss and gradients."""
    loss_fn = loss_fn or loss_of

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    return opt.step(closure)


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, step=None) -> None:
    if step is None and type(opt) in CLOSURE_CLASSES:
        for batch in batches:
            closure_step(model, opt, batch)
        return
    step = step or opt.step
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        step()


_OWN_GRADIENTS = (
    "it evaluates the gradients itself and raises ValueError on a non-finite one (no "
    "nonfinite option)"
)


def skip_closure_case(case: OptimCase, why: str) -> None:
    if case.closure:
        pytest.skip(f"{case.name} steps only with a closure: {why}")


def assert_tensors_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    """Relative to the tensor's scale: |a - b| <= rtol * max(|b|, max|b|*rtol-floor)."""
    assert a.shape == b.shape, what
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    err = (a.double() - b.double()).abs().max() / scale
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:.1e}"


def compare_models(a: nn.Module, b: nn.Module, rtol: float) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_tensors_close(pa.detach(), pb.detach(), rtol, f"param {name}")


def compare_states(
    opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer, key_map: dict[str, str], rtol: float
) -> int:
    params_a = [p for g in opt_a.param_groups for p in g["params"]]
    params_b = [p for g in opt_b.param_groups for p in g["params"]]
    compared = 0
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for ka, kb in key_map.items():
            if ka in sa and kb in sb and isinstance(sa[ka], torch.Tensor):
                assert_tensors_close(
                    sa[ka], torch.as_tensor(sb[kb]).to(sa[ka]), rtol, f"state {ka} of param {i}"
                )
                compared += 1
    return compared


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("case,vi", VARIANTS)
def test_matches_reference(case: OptimCase, vi: int) -> None:
    """float64, >= 100 mini-batch steps: parameters and state equal the independent reference."""
    if case.reference is None:
        pytest.skip(f"{case.name} has no reference in the table")
    hp = case.variants[vi]
    model = make_model(case)
    ref_model = copy.deepcopy(model)
    extra = case.reference_extra or (lambda m, hp: {})
    opt = case.cls(model.parameters(), **{**hp, **extra(model, hp)})
    ref = case.reference(list(ref_model.parameters()), {**hp, **extra(ref_model, hp)})
    if ref is None:
        pytest.skip("no reference covers this variant")
    batches = make_data(case.steps)
    for batch in batches:
        for m, o in ((model, opt), (ref_model, ref)):
            if case.closure:
                closure_step(m, o, batch)
                continue
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()
    compare_models(model, ref_model, case.rtol)
    if case.state_map:
        assert compare_states(opt, ref, case.state_map, case.rtol) > 0, "no state was compared"
    # the run must have moved the parameters, or the comparison proves nothing
    assert not torch.equal(next(model.parameters()), next(make_model(case).parameters()))


# ---------------------------------------------------------------- paths


def _two_group_model(case: OptimCase):
    """Two param groups (the second with another lr) and an extra float32 matrix beside the
    float64 model, so the multi-tensor path must split by dtype."""
    model = make_model(case)
    aux = nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(5)))
    params = list(model.parameters())
    return model, aux, [{"params": params[:2]}, {"params": params[2:] + [aux], "lr": 2e-3}]


@pytest.mark.parametrize("case,vi", VARIANTS)
def test_foreach_equals_single_tensor(case: OptimCase, vi: int) -> None:
    """The multi-tensor path equals the readable single-tensor path, parameters and state."""
    if not case.has_foreach:
        pytest.skip("no multi-tensor path")
    hp = case.variants[vi]
    results = []
    for foreach in (False, True):
        model, aux, groups = _two_group_model(case)
        opt = case.cls(groups, **{**hp, "foreach": foreach})
        for x, y in make_data(15):
            opt.zero_grad()
            aux_term = ((aux.double() - x[:4]) ** 2).mean()
            (nn.functional.cross_entropy(model(x), y) + aux_term).backward()
            opt.step()
        results.append((model, aux, opt))
    (m1, a1, o1), (m2, a2, o2) = results
    compare_models(m2, m1, 1e-12)
    assert_tensors_close(a2.detach(), a1.detach(), 1e-6, "float32 param")
    state_keys = {k: k for st in o1.state.values() for k in st if isinstance(st[k], torch.Tensor)}
    if not state_keys:  # a stateless variant (e.g. SGDP without momentum): both must be stateless
        assert not any(o2.state.values())
        return
    assert compare_states(o2, o1, state_keys, 1e-6) > 0


@pytest.mark.compile
@pytest.mark.parametrize(
    "case,vi",
    [pytest.param(c, i, id=f"{c.name}-{c.ids()[i]}") for c in CASES for i in c.compile_variants],
)
def test_compiled_equals_eager(case: OptimCase, vi: int) -> None:
    """torch.compile(opt.step, fullgraph=True): no graph breaks, no recompiles after warm-up, and
    the same trajectory as eager."""
    hp = case.variants[vi]
    torch._dynamo.reset()
    model = make_model(case)
    model_c = copy.deepcopy(model)
    opt = case.cls(model.parameters(), **hp)
    opt_c = case.cls(model_c.parameters(), **hp)
    compiled_step = torch.compile(opt_c.step, fullgraph=True)
    batches = make_data(12)
    train(model, opt, batches[:3])
    train(model_c, opt_c, batches[:3], step=compiled_step)
    with torch._dynamo.config.patch(error_on_recompile=True):
        train(model, opt, batches[3:])
        train(model_c, opt_c, batches[3:], step=compiled_step)
    compare_models(model_c, model, 1e-9)


# ---------------------------------------------------------------- state and API


@pytest.mark.parametrize("case,vi", VARIANTS)
def test_state_dict_round_trip(case: OptimCase, vi: int) -> None:
    """Save after 7 steps, load into a fresh optimizer: the continuation is bit-identical."""
    hp = case.variants[vi]
    batches = make_data(14)
    model = make_model(case)
    opt = case.cls(model.parameters(), **hp)
    train(model, opt, batches[:7])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, batches[7:])

    model2 = make_model(case, seed=123)
    model2.load_state_dict(saved_model)
    opt2 = case.cls(model2.parameters(), **hp)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, batches[7:])
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize(
    "case,hp,needle",
    [pytest.param(c, hp, n, id=f"{c.name}-{n}-{hp}") for c in CASES for hp, n in c.errors],
)
def test_invalid_hyperparameters_raise(case: OptimCase, hp: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as info:
        case.cls(make_model(case).parameters(), **hp)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "case,hp,needle",
    [pytest.param(c, hp, n, id=f"{c.name}-{n}-{hp}") for c in CASES for hp, n in c.errors],
)
def test_invalid_hyperparameters_of_a_param_group_raise(
    case: OptimCase, hp: dict[str, Any], needle: str
) -> None:
    """The same checks hold for a group's own hyperparameters, and the invalid group is not
    kept (a caught error leaves the optimizer as it was)."""
    params = list(make_model(case).parameters())
    opt = case.cls(params[:2], **case.variants[0])
    if not hp or not set(hp) <= set(opt.defaults):
        pytest.skip("not about a param-group hyperparameter")
    before = len(opt.param_groups)
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": params[2:], **hp})
    assert needle in str(info.value) and "param group" in str(info.value), str(info.value)
    assert len(opt.param_groups) == before


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_maximize_equals_minimizing_the_negation(case: OptimCase) -> None:
    batches = make_data(10)
    model_a, model_b = make_model(case), make_model(case)
    opt_a = case.cls(model_a.parameters(), **case.variants[0])
    opt_b = case.cls(model_b.parameters(), **{**case.variants[0], "maximize": True})
    for batch in batches:
        if case.closure:
            closure_step(model_a, opt_a, batch)
            closure_step(model_b, opt_b, batch, lambda m, b: -loss_of(m, b))
            continue
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss_of(model_a, batch).backward()
        (-loss_of(model_b, batch)).backward()
        opt_a.step()
        opt_b.step()
    compare_models(model_b, model_a, 1e-12)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_trains_with_closure_and_scheduler(case: OptimCase) -> None:
    """Full-batch training of the MLP lowers the loss; the closure's loss is returned and an
    LR scheduler drives the learning rate."""
    model = make_model(case, dtype=torch.float32)
    x, y = (torch.cat(t) for t in zip(*make_data(8, dtype=torch.float32)))
    opt = case.cls(model.parameters(), **case.train_hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 150 else 0.5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(200):
        loss = opt.step(closure)
        sched.step()
    assert isinstance(loss, torch.Tensor)
    final = nn.functional.cross_entropy(model(x), y).item()
    assert final < 0.7 * first, (first, final)
    base_lr = case.train_hp.get("lr", opt.defaults["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * float(base_lr))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_low_precision_parameters(case: OptimCase, dtype: torch.dtype) -> None:
    """float32/bfloat16 parameters: state in the parameter's dtype, finite, and float32 tracks the
    float64 trajectory closely."""
    batches = make_data(5)
    model = make_model(case, dtype=dtype)
    opt = case.cls(model.parameters(), **case.variants[0])
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, [(x.to(dtype), y) for x, y in batches])
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
                assert v.dtype == dtype
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))
    if dtype == torch.float32 and case.float32_tracks_float64:
        tracked, ref = model, make_model(case)
        hp = dict(case.variants[0])
        if case.reference_extra is not None:
            # RegularizedNewton's default curvature, central differences with a step of
            # eps_dtype^(1/3), is itself only eps^(2/3)-accurate (2.5e-5 in float32): both
            # sides take exact curvature here, so that the comparison is of rounding only
            tracked = make_model(case, dtype=dtype)
            f32 = case.cls(tracked.parameters(), **hp, **case.reference_extra(tracked, hp))
            train(tracked, f32, [(x.to(dtype), y) for x, y in batches])
            hp.update(case.reference_extra(ref, hp))
        ref_opt = case.cls(ref.parameters(), **hp)
        train(ref, ref_opt, batches)
        for p, r in zip(tracked.parameters(), ref.parameters()):
            assert_tensors_close(p.detach(), r.detach().float(), 1e-4, "float32 vs float64")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_sparse_and_complex_gradients_raise(case: OptimCase) -> None:
    emb = nn.Embedding(10, 4, sparse=True).double()
    opt = case.cls(emb.parameters(), **case.variants[0])
    emb(torch.tensor([1, 2])).sum().backward()
    # a closure optimizer gets a closure that keeps the gradients already there
    zero = torch.zeros((), dtype=torch.float64)
    step = (lambda: opt.step(lambda: zero)) if case.closure else opt.step
    with pytest.raises(RuntimeError, match="sparse"):
        step()
    z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex128))
    opt = case.cls([z], **case.variants[0])
    z.grad = torch.ones_like(z)
    step = (lambda: opt.step(lambda: zero)) if case.closure else opt.step
    with pytest.raises(RuntimeError, match="complex"):
        step()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_registry_entry(case: OptimCase) -> None:
    import basin.optim as bo

    info = bo.info(case.name)
    assert info.cls is case.cls
    assert info.paper.arxiv and info.paper.year >= 2014
    opt = bo.create(case.name, make_model(case).parameters(), **case.variants[0])
    assert isinstance(opt, case.cls)


# ---------------------------------------------------------------- all-or-nothing steps


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _same_value(a: Any, b: Any) -> bool:
    """Bit for bit: tensors, and lists of them (SOAP's per-dimension factors, None included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _assert_unchanged(model: nn.Module, opt: torch.optim.Optimizer, snapshot) -> None:
    """Parameters and every state entry (step counters included) bit for bit as in
    ``snapshot``."""
    params, state = snapshot
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"parameter {k} changed"
    now = opt.state_dict()["state"]
    assert now.keys() == state["state"].keys()
    for i, st in now.items():
        assert st.keys() == state["state"][i].keys()
        for k, v in st.items():
            old = state["state"][i][k]
            same = _same_value(v, old)
            assert same, f"state {k} of parameter {i} changed"


def _backward(model: nn.Module, batch) -> None:
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()


# the first parameter (a weight matrix) and the last one (a bias): a partial step would have
# changed the parameters before the last one already
_POISON = [
    pytest.param(0, float("nan"), id="first-nan"),
    pytest.param(-1, float("inf"), id="last-inf"),
]


@pytest.mark.parametrize("where,value", _POISON)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_nonfinite_gradient_raises_naming_it_and_changes_nothing(
    case: OptimCase, where: int, value: float
) -> None:
    """After two clean steps, a NaN/inf entry in one gradient: ValueError naming that parameter
    (its name when the optimizer was given named parameters), and no parameter or state changed;
    the next clean step then works."""
    skip_closure_case(case, _OWN_GRADIENTS)
    model = make_model(case)
    opt = case.cls(list(model.named_parameters()), **case.variants[0])
    batches = make_data(4)
    train(model, opt, batches[:2])
    _backward(model, batches[2])
    name, p = list(model.named_parameters())[where]
    p.grad.view(-1)[1] = value
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError) as info:
        opt.step()
    msg = str(info.value)
    assert repr(name) in msg and str(tuple(p.shape)) in msg and "nonfinite='skip'" in msg, msg
    _assert_unchanged(model, opt, snapshot)
    train(model, opt, batches[3:])
    assert all(torch.isfinite(q).all() for q in model.parameters())


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_nonfinite_skip_skips_the_whole_step(case: OptimCase) -> None:
    """nonfinite='skip': the poisoned step changes nothing and is counted, so the run equals one
    that never saw that batch (bit for bit)."""
    skip_closure_case(case, _OWN_GRADIENTS)
    hp = {**case.variants[0], "nonfinite": "skip"}
    batches = make_data(5)
    clean, model = make_model(case), make_model(case)
    opt_clean, opt = case.cls(clean.parameters(), **hp), case.cls(model.parameters(), **hp)
    train(clean, opt_clean, batches[:2] + batches[3:])
    train(model, opt, batches[:2])
    _backward(model, batches[2])
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    snapshot = _snapshot(model, opt)
    opt.step()
    _assert_unchanged(model, opt, snapshot)
    assert opt.skipped_steps == 1
    train(model, opt, batches[3:])
    for a, b in zip(model.parameters(), clean.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_huge_finite_gradients_are_not_mistaken_for_nonfinite(case: OptimCase) -> None:
    """The fast check is a norm, which overflows for huge finite entries: the exact check behind
    it must let them through (no error, no skip)."""
    skip_closure_case(case, _OWN_GRADIENTS)
    model = make_model(case)
    opt = case.cls(model.parameters(), **case.variants[0])
    _backward(model, make_data(1)[0])
    next(model.parameters()).grad.view(-1)[0] = 1e300
    assert opt._check_grads()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_nonfinite_must_be_raise_or_skip(case: OptimCase) -> None:
    skip_closure_case(case, "no nonfinite option")
    with pytest.raises(ValueError, match="nonfinite must be one of 'raise', 'skip'"):
        case.cls(make_model(case).parameters(), **{**case.variants[0], "nonfinite": "ignore"})


# ---------------------------------------------------------------- tensor learning rates

_LR_SHAPES = [pytest.param((), id="0d"), pytest.param((1,), id="1"), pytest.param((1, 1), id="1x1")]


def _lr_names(case: OptimCase) -> list[str]:
    """The constructor's learning rates: ``lr`` and a fallback's (``adamw_lr``), not the
    deprecated spellings (default None)."""
    names = inspect.signature(case.cls.__init__).parameters
    return [
        n for n, p in names.items() if (n == "lr" or n.endswith("_lr")) and p.default is not None
    ]


def _paths(case: OptimCase) -> list[bool]:
    return [False, True] if case.has_foreach else [False]


@pytest.mark.parametrize("shape", _LR_SHAPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_tensor_lr_equals_float_lr_on_every_path(case: OptimCase, shape: tuple) -> None:
    """A one-element tensor lr (0-d, [1], [1, 1]; float32, as torch.tensor makes it), for every
    learning rate of the constructor, on the single- and multi-tensor paths: the trajectory of
    the same lr as a float, bit for bit; an LR scheduler can drive it in place."""
    hp = dict(case.variants[0])
    probe = case.cls(make_model(case).parameters(), **hp)
    for foreach in _paths(case):
        runs = []
        for as_tensor in (False, True):
            lrs = {}
            for n in _lr_names(case):
                value = torch.tensor(float(hp.get(n, probe.defaults.get(n, 1e-3))) * 3)
                lrs[n] = value.reshape(shape) if as_tensor else value.item()
            if "lr" not in hp and "lr" not in lrs:
                lrs["lr"] = probe.defaults["lr"]
            model = make_model(case)
            path = {"foreach": foreach} if case.has_foreach else {}  # no foreach argument
            opt = case.cls(model.parameters(), **{**hp, **lrs, **path})
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            for batch in make_data(5):
                train(model, opt, [batch])
                sched.step()
            runs.append(model)
        assert not torch.equal(next(runs[0].parameters()), next(make_model(case).parameters()))
        for a, b in zip(runs[1].parameters(), runs[0].parameters()):
            assert torch.equal(a, b), f"foreach={foreach}"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_tensor_lr_with_more_than_one_element_is_refused(case: OptimCase) -> None:
    params = list(make_model(case).parameters())
    for n in _lr_names(case):
        with pytest.raises(ValueError, match=n):
            case.cls(params, **{**case.variants[0], n: torch.tensor([1e-3, 1e-3])})


@pytest.mark.compile
@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_compiled_step_takes_a_tensor_lr(case: OptimCase) -> None:
    """torch.compile(fullgraph=True) with a 0-d tensor lr that is changed in place (as an LR
    scheduler does): no graph break, no recompile, the eager float-lr trajectory (float64)."""
    if not case.compile_variants:
        pytest.skip("no compiled step (see its case in tests/optim_db.py)")
    hp = dict(case.variants[case.compile_variants[0]])
    defaults = inspect.signature(case.cls.__init__).parameters
    lrs = {n: float(hp.get(n, defaults[n].default)) for n in _lr_names(case)}  # fallback's too
    torch._dynamo.reset()
    model, model_c = make_model(case), make_model(case)
    opt = case.cls(model.parameters(), **{**hp, **lrs})
    tensors = {n: torch.tensor(v, dtype=torch.float64) for n, v in lrs.items()}
    opt_c = case.cls(model_c.parameters(), **{**hp, **tensors})
    compiled_step = torch.compile(opt_c.step, fullgraph=True)
    for i, batch in enumerate(make_data(8)):
        with torch._dynamo.config.patch(error_on_recompile=i >= 2):
            train(model, opt, [batch])
            train(model_c, opt_c, [batch], step=compiled_step)
        if i % 3 == 2:  # halve every lr (fallback groups too): a float, and the tensor in place
            for g, g_c in zip(opt.param_groups, opt_c.param_groups):
                g["lr"] = g["lr"] / 2
                g_c["lr"].div_(2)
    compare_models(model_c, model, 1e-9)


# ---------------------------------------------------------------- state dicts


def _other_case(case: OptimCase) -> OptimCase:
    """The next optimizer in the table (a different class)."""
    return CASES[(CASES.index(case) + 1) % len(CASES)]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_dict_names_its_optimizer_and_refuses_another(case: OptimCase) -> None:
    """state_dict() records the class; another basin optimizer's state dict is refused with a
    message naming both, leaving the optimizer as it was; without the tag (an older basin) it
    still loads."""
    other = _other_case(case)
    batches = make_data(4)
    m_other = make_model(other)
    o_other = other.cls(m_other.parameters(), **other.variants[0])
    train(m_other, o_other, batches[:2])
    foreign = o_other.state_dict()
    assert foreign["basin_optimizer"] == other.cls.__name__

    model = make_model(case)
    opt = case.cls(model.parameters(), **case.variants[0])
    train(model, opt, batches[:2])
    saved = opt.state_dict()
    assert saved["basin_optimizer"] == case.cls.__name__
    snapshot = _snapshot(model, opt)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(foreign)
    assert other.cls.__name__ in str(info.value) and case.cls.__name__ in str(info.value)
    _assert_unchanged(model, opt, snapshot)

    untagged = {k: v for k, v in copy.deepcopy(saved).items() if k != "basin_optimizer"}
    opt2 = case.cls(make_model(case).parameters(), **case.variants[0])
    opt2.load_state_dict(untagged)
    assert opt2.state_dict()["basin_optimizer"] == case.cls.__name__


@pytest.mark.parametrize("case,vi", VARIANTS)
def test_old_state_dict_with_number_step_loads(case: OptimCase, vi: int) -> None:
    """A state dict whose ``step`` entries are plain numbers (torch < 1.12 wrote them so)
    continues exactly like the tensor one."""
    hp = case.variants[vi]
    batches = make_data(8)
    model = make_model(case)
    opt = case.cls(model.parameters(), **hp)
    train(model, opt, batches[:4])
    saved_model = copy.deepcopy(model.state_dict())
    old = copy.deepcopy(opt.state_dict())
    converted = 0
    for st in old["state"].values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].item()
            converted += 1
    train(model, opt, batches[4:])
    model2 = make_model(case)
    model2.load_state_dict(saved_model)
    opt2 = case.cls(model2.parameters(), **hp)
    opt2.load_state_dict(old)
    train(model2, opt2, batches[4:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    if converted:
        assert all(
            isinstance(st["step"], torch.Tensor) for st in opt2.state.values() if "step" in st
        )


def _assert_same_tree(a: Any, b: Any, where: str = "state_dict") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("case,vi", VARIANTS)
def test_state_dict_is_deterministic(case: OptimCase, vi: int) -> None:
    """Two identical runs give identical state dicts; loading one (also through torch.save /
    torch.load with weights_only) and saving again gives it back unchanged (keys, dtypes,
    devices, values)."""
    import io

    hp = case.variants[vi]
    sds = []
    for _ in range(2):
        model = make_model(case)
        opt = case.cls(model.parameters(), **hp)
        train(model, opt, make_data(3))
        sds.append(opt.state_dict())
    _assert_same_tree(sds[0], sds[1])
    buf = io.BytesIO()
    torch.save(sds[0], buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    opt2 = case.cls(make_model(case).parameters(), **hp)
    opt2.load_state_dict(loaded)
    _assert_same_tree(opt2.state_dict(), sds[0])


# ---------------------------------------------------------------- param groups and hooks


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_per_group_lr_and_weight_decay(case: OptimCase) -> None:
    """Two param groups: a group's lr and weight_decay act on that group only. lr=0 freezes the
    second group (weight decay included) while the first trains; changing the second group's
    weight decay leaves the first group's trajectory bit for bit as it was (seeded gradients
    that do not depend on the parameters, so that the groups do not interact through the loss)."""
    skip_closure_case(case, "one parameter group (one Newton system), no weight decay")
    hp = case.variants[0]

    def run(second: dict[str, Any]):
        model = make_model(case)
        params = list(model.parameters())
        first, rest = params[: len(params) // 2], params[len(params) // 2 :]
        opt = case.cls([{"params": first}], **hp)
        opt.add_param_group({"params": rest, **second})
        for g in opt.param_groups:  # a routed companion group carries the group's settings too
            if any(p is q for p in g["params"] for q in rest):
                g.update(second)
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        return first, rest

    start = list(make_model(case).parameters())
    half = len(start) // 2
    first, rest = run({"lr": 0.0, "weight_decay": 0.5})
    assert all(torch.equal(p, s) for p, s in zip(rest, start[half:])), "lr=0 group moved"
    assert any(not torch.equal(p, s) for p, s in zip(first, start[:half]))
    first_a, rest_a = run({"weight_decay": 0.0})
    first_b, rest_b = run({"weight_decay": 0.3})
    assert all(torch.equal(a, b) for a, b in zip(first_a, first_b))
    assert any(not torch.equal(a, b) for a, b in zip(rest_a, rest_b)), "weight_decay ignored"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_step_and_state_dict_hooks_run(case: OptimCase) -> None:
    """torch's hooks work on every basin optimizer: step pre/post hooks once per step (also a
    skipped one), state_dict and load_state_dict pre/post hooks, a post hook's edits kept."""
    model = make_model(case)
    opt = case.cls(model.parameters(), **case.variants[0])
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(model, opt, make_data(2))
    assert calls == ["pre", "post"] * 2

    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))

    def sd_post(o, sd):
        calls.append("sd-post")
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert sd["extra"] == 1 and sd["basin_optimizer"] == case.cls.__name__
    opt2 = case.cls(make_model(case).parameters(), **case.variants[0])
    opt2.register_load_state_dict_pre_hook(lambda o, s: calls.append("load-pre"))
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt2.load_state_dict(sd)
    assert calls[-4:] == ["sd-pre", "sd-post", "load-pre", "load-post"]
