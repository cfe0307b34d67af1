"""FRUGAL-specific checks beyond tests/optim/test_common.py."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_db import mlp
from torch import nn

import basin.optim as bo


def _batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(32, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (32,), generator=gen),
        )
        for _ in range(n)
    ]


def _run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("proj_type", ["svd", "random", "randperm"])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_state_is_two_density_of_the_parameter_plus_projector(proj_type, shape) -> None:
    density = 0.25
    w = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = bo.FRUGAL([w], density=density, proj_type=proj_type)
    w.grad = torch.randn_like(w)
    opt.step()
    st = opt.state[w]
    moments = st["exp_avg"].numel() + st["exp_avg_sq"].numel()
    assert moments == 2 * density * w.numel()
    r = round(density * min(shape))
    if proj_type == "randperm":
        assert st["proj"].dtype == torch.int64 and st["proj"].numel() == r
    else:
        assert st["proj"].shape == (min(shape), r)
        torch.testing.assert_close(st["proj"].T @ st["proj"], torch.eye(r, dtype=torch.float64))


def test_non_projected_params_follow_torch_adamw() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    ref_model = copy.deepcopy(model)
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    opt = bo.FRUGAL([{"params": model.parameters(), "matrix_rule": False}], **hp)
    ref = torch.optim.AdamW(ref_model.parameters(), **hp)
    batches = _batches(25)
    _run(model, opt, batches)
    _run(ref_model, ref, batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_density_one_without_residual_is_adamw() -> None:
    """density=1: the kept subspace is everything, FRUGAL is AdamW in a rotated basis (the
    element-wise second moment makes it basis-dependent, except for randperm = identity up to
    a permutation)."""
    torch.manual_seed(0)
    model = mlp().double()
    ref_model = copy.deepcopy(model)
    opt = bo.FRUGAL(model.parameters(), density=1.0, proj_type="randperm", weight_decay=0.0)
    ref = torch.optim.AdamW(ref_model.parameters(), weight_decay=0.0)
    batches = _batches(15)
    _run(model, opt, batches)
    _run(ref_model, ref, batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_projector_rebuild_schedule_and_reset() -> None:
    w = nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
    opt = bo.FRUGAL([w], update_gap=3, proj_type="random")
    projs, steps = [], []
    for _ in range(7):
        w.grad = torch.randn_like(w)
        opt.step()
        projs.append(opt.state[w]["proj"].clone())
        steps.append(int(opt.state[w]["step"]))
    changed = [not torch.equal(projs[i], projs[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # rebuilt at steps 1, 4, 7
    assert steps == [1, 2, 3, 1, 2, 3, 1]


def test_random_projectors_are_seeded() -> None:
    def proj(seed):
        w = nn.Parameter(torch.ones(16, 8, dtype=torch.float64))
        opt = bo.FRUGAL([w], proj_type="random", seed=seed)
        w.grad = torch.ones_like(w)
        opt.step()
        return opt.state[w]["proj"]

    assert torch.equal(proj(0), proj(0)) and not torch.equal(proj(0), proj(1))


def test_low_precision_state_dict_keeps_indices_and_generator() -> None:
    """torch casts loaded state to the parameter's dtype; indices > 256 would not survive
    bfloat16, so FRUGAL restores its integral state."""
    w = nn.Parameter(torch.randn(600, 700, dtype=torch.bfloat16))
    opt = bo.FRUGAL([w], proj_type="randperm", update_gap=2)
    w.grad = torch.randn_like(w)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    w2 = nn.Parameter(w.detach().clone())
    opt2 = bo.FRUGAL([w2], proj_type="randperm", update_gap=2)
    opt2.load_state_dict(saved)
    st, st2 = opt.state[w], opt2.state[w2]
    assert st2["proj"].dtype == torch.int64 and torch.equal(st2["proj"], st["proj"])
    assert st2["rng_state"].dtype == torch.uint8
    for o, p in ((opt, w), (opt2, w2)):
        for _ in range(2):
            p.grad = torch.ones_like(p)
            o.step()
    assert torch.equal(opt.state[w]["proj"], opt2.state[w2]["proj"]) and torch.equal(w, w2)


def test_matrix_rule_true_on_a_vector_raises() -> None:
    with pytest.raises(ValueError, match="matrix_rule=True"):
        bo.FRUGAL([{"params": [nn.Parameter(torch.zeros(3))], "matrix_rule": True}])
    with pytest.raises(ValueError, match="density"):
        bo.FRUGAL([{"params": [nn.Parameter(torch.zeros(3, 3))], "density": 0.0}])


def _state_floats(opt) -> int:
    return sum(
        t.numel()
        for st in opt.state.values()
        for k, t in st.items()
        if k in ("exp_avg", "exp_avg_sq")
    )


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_block_state_is_two_density_of_the_blocks(density) -> None:
    """8 equal 16 x 16 blocks: after every re-selection exactly round(8 density) carry moments."""
    gen = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(16, 16, generator=gen, dtype=torch.float64)) for _ in range(8)]
    opt = bo.FRUGAL(ws, density=density, proj_type="block", update_gap=2)
    total = sum(w.numel() for w in ws)
    active_sets = set()
    for _ in range(10):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        opt.step()
        assert _state_floats(opt) == 2 * density * total
        active_sets.add(tuple(int(opt.state[w]["active"]) for w in ws))
    assert len(active_sets) > 1, "the active set was never re-drawn"
    # without reset_statistics the moments of left blocks stay
    opt = bo.FRUGAL(ws, density=0.25, proj_type="block", update_gap=1, reset_statistics=False)
    for _ in range(10):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        opt.step()
    assert _state_floats(opt) > 2 * 0.25 * total


def test_block_state_dict_round_trip_continues_the_draw() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    opt = bo.FRUGAL(model.parameters(), proj_type="block", density=0.5, update_gap=3, seed=4)
    batches = _batches(20)
    _run(model, opt, batches[:7])
    model2 = copy.deepcopy(model)
    opt2 = bo.FRUGAL(model2.parameters(), proj_type="block", density=0.5, update_gap=3, seed=9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    seen = set()
    for batch in batches[7:]:
        _run(model, opt, [batch])
        _run(model2, opt2, [batch])
        flags = [int(opt.state[p]["active"]) for p in model.parameters() if p.ndim == 2]
        flags2 = [int(opt2.state[p]["active"]) for p in model2.parameters() if p.ndim == 2]
        assert flags == flags2
        seen.add(tuple(flags))
    assert len(seen) > 1, "no re-selection after the round trip"
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_block_foreach_equals_single_tensor() -> None:
    """The active blocks' AdamW runs through the shared fallback: both of its paths agree."""
    torch.manual_seed(0)
    models = [mlp().double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    batches = _batches(30)
    for model, foreach in zip(models, (False, True)):
        opt = bo.FRUGAL(
            model.parameters(), proj_type="block", density=0.5, update_gap=3, foreach=foreach
        )
        _run(model, opt, batches)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
