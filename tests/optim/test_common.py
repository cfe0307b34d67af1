"""The same checks for every optimizer in tests/optim_db.py."""

from __future__ import annotations

import copy
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


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, step=None) -> None:
    step = step or opt.step
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()
        step()


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
    opt = case.cls(model.parameters(), **hp)
    ref = case.reference(list(ref_model.parameters()), dict(hp))
    if ref is None:
        pytest.skip("no reference covers this variant")
    batches = make_data(case.steps)
    for batch in batches:
        for m, o in ((model, opt), (ref_model, ref)):
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
    if dtype == torch.float32:
        ref = make_model(case)
        ref_opt = case.cls(ref.parameters(), **case.variants[0])
        train(ref, ref_opt, batches)
        for p, r in zip(model.parameters(), ref.parameters()):
            assert_tensors_close(p.detach(), r.detach().float(), 1e-4, "float32 vs float64")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_sparse_and_complex_gradients_raise(case: OptimCase) -> None:
    emb = nn.Embedding(10, 4, sparse=True).double()
    opt = case.cls(emb.parameters(), **case.variants[0])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex128))
    opt = case.cls([z], **case.variants[0])
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_registry_entry(case: OptimCase) -> None:
    import basin.optim as bo

    info = bo.info(case.name)
    assert info.cls is case.cls
    assert info.paper.arxiv and info.paper.year >= 2014
    opt = bo.create(case.name, make_model(case).parameters(), **case.variants[0])
    assert isinstance(opt, case.cls)
