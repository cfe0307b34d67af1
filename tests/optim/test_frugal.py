"""FRUGAL-specific checks beyond tests/optim/test_common.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from optim_db import assert_close_after_rounding, classification_batches, mlp, train
from torch import nn

import basin.optim as bo


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
    batches = classification_batches(25)
    train(model, opt, batches)
    train(ref_model, ref, batches)
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
    batches = classification_batches(15)
    train(model, opt, batches)
    train(ref_model, ref, batches)
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
        if k in ("exp_avg", "exp_avg_sq", "exp_avg_pool", "exp_avg_sq_pool")
    )


def _regions(opt, ws, indices) -> list[tuple[int, int]]:
    """[start, end) of the given blocks' moments in their (single) pool."""
    return sorted(
        (int(opt.state[ws[i]]["offset"]), int(opt.state[ws[i]]["offset"]) + ws[i].numel())
        for i in indices
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
    batches = classification_batches(20)
    train(model, opt, batches[:7])
    model2 = copy.deepcopy(model)
    opt2 = bo.FRUGAL(model2.parameters(), proj_type="block", density=0.5, update_gap=3, seed=9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    seen = set()
    for batch in batches[7:]:
        train(model, opt, [batch])
        train(model2, opt2, [batch])
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
    batches = classification_batches(30)
    for model, foreach in zip(models, (False, True)):
        opt = bo.FRUGAL(
            model.parameters(), proj_type="block", density=0.5, update_gap=3, foreach=foreach
        )
        train(model, opt, batches)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ block orders

# Active blocks at the 1st, 2nd, 3rd, 4th re-selection, worked out by hand from the authors'
# BlockOptimizer (fzmushko/FRUGAL, frugal/proj_optimizer_templates.py, _update_states).
_ORDERS = {
    # n = 6 blocks, density 1/3: k = 2
    (6, "ascending"): [{0, 1}, {2, 3}, {4, 5}, {0, 1}],
    (6, "descending"): [{5, 4}, {3, 2}, {1, 0}, {5, 4}],
    (6, "mirror"): [{0, 5}, {1, 4}, {2, 3}, {0, 5}],
    # n = 7 blocks, density 4/7: k = 4 (wraps mid-window; mirror never picks the middle block 3)
    (7, "ascending"): [{0, 1, 2, 3}, {4, 5, 6, 0}, {1, 2, 3, 4}, {5, 6, 0, 1}],
    (7, "descending"): [{6, 5, 4, 3}, {2, 1, 0, 6}, {5, 4, 3, 2}, {1, 0, 6, 5}],
    (7, "mirror"): [{0, 1, 6, 5}, {2, 0, 4, 6}, {1, 2, 5, 4}, {0, 1, 6, 5}],
}


def _blocks(n: int, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(3 + i % 2, 4, generator=gen, dtype=torch.float64))
        for i in range(n)
    ]


def _set_grads(ws, gen) -> None:
    for w in ws:
        w.grad = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype)


@pytest.mark.parametrize("n,order", list(_ORDERS))
def test_block_order_active_sets(n, order) -> None:
    density = 1 / 3 if n == 6 else 4 / 7
    ws = _blocks(n)
    opt = bo.FRUGAL(ws, proj_type="block", density=density, update_gap=3, block_order=order)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for t in range(12):
        _set_grads(ws, gen)
        opt.step()
        active = {i for i, w in enumerate(ws) if int(opt.state[w]["active"])}
        if t % 3 == 0:
            seen.append(active)
        else:  # fixed between re-selections
            assert active == seen[-1]
        # with reset_statistics the pool holds the k largest blocks: the active ones get
        # disjoint regions of it
        regions = _regions(opt, ws, active)
        assert all(a[1] <= b[0] for a, b in zip(regions, regions[1:]))
        assert regions[-1][1] <= opt.state[ws[0]]["exp_avg_pool"].numel()
    assert seen == _ORDERS[(n, order)]


@pytest.mark.parametrize("order", ["random", "ascending", "descending", "mirror"])
@pytest.mark.parametrize("reset", [True, False])
def test_block_orders_match_reference_on_seven_blocks(order, reset) -> None:
    """Against the float64 transcription (its own cursor bookkeeping) on 7 blocks, 4 active,
    re-selected every 2 steps: 14 steps cross 7 re-selections, wrapping every order."""
    from references.frugal_paper import FRUGALPaper

    hp = dict(
        lr=1e-2, density=4 / 7, update_gap=2, proj_type="block", block_order=order,
        reset_statistics=reset, inactive_update_rule="sgd", inactive_lr_scale=0.5, seed=5,
    )  # fmt: skip
    ws, ref_ws = _blocks(7), _blocks(7)
    opt, ref = bo.FRUGAL(ws, **hp), FRUGALPaper(ref_ws, **hp)
    gen = torch.Generator().manual_seed(2)
    for _ in range(14):
        _set_grads(ws, gen)
        for w, r in zip(ws, ref_ws):
            r.grad = w.grad.clone()
        opt.step()
        ref.step()
    for w, r in zip(ws, ref_ws):
        torch.testing.assert_close(w, r, rtol=1e-12, atol=1e-14)


def test_block_order_round_trip_continues_the_cycle() -> None:
    ws = _blocks(6)
    hp = dict(proj_type="block", density=1 / 3, update_gap=2, block_order="descending")
    opt = bo.FRUGAL(ws, **hp)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # 2 re-selections: {5, 4}, {3, 2}
        _set_grads(ws, gen)
        opt.step()
    ws2 = [nn.Parameter(w.detach().clone()) for w in ws]
    opt2 = bo.FRUGAL(ws2, **hp)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):  # step 5 re-selects: {1, 0}
        _set_grads(ws2, gen)
        opt2.step()
    assert {i for i, w in enumerate(ws2) if int(opt2.state[w]["active"])} == {0, 1}


def test_block_order_validation() -> None:
    ws = _blocks(6)
    with pytest.raises(ValueError, match="block_order must be one of random, ascending"):
        bo.FRUGAL(ws, proj_type="block", block_order="cyclic")
    with pytest.raises(ValueError, match="block_order='mirror'.*k=3"):  # round(6 / 2) = 3
        bo.FRUGAL(ws, proj_type="block", density=0.5, block_order="mirror")
    bo.FRUGAL(ws, proj_type="block", density=2 / 3, block_order="mirror")  # k = 4
    bo.FRUGAL(ws, proj_type="svd", density=0.5, block_order="mirror")  # ignored off "block"


# ------------------------------------------------------------------ torch.compile


def test_compiled_state_layout_is_fixed_across_rebuilds() -> None:
    """The state is allocated once: a rebuild overwrites it in place (what lets a compiled step
    cross rebuilds without recompiling); the generic compile test checks compiled == eager."""
    w = nn.Parameter(torch.randn(12, 6, dtype=torch.float64))
    opt = bo.FRUGAL([w], proj_type="random", update_gap=2, density=0.5)
    gen = torch.Generator().manual_seed(0)
    layout, ptrs, projs = None, None, []
    for _ in range(5):
        _set_grads([w], gen)
        opt.step()
        st = opt.state[w]
        now = {k: (tuple(v.shape), v.dtype) for k, v in st.items()}
        layout = layout or now
        ptrs = ptrs or {k: v.data_ptr() for k, v in st.items()}
        assert now == layout and {k: v.data_ptr() for k, v in st.items()} == ptrs
        projs.append(st["proj"].clone())
    assert not torch.equal(projs[1], projs[2]) and torch.equal(projs[2], projs[3])


def test_block_pool_holds_the_k_largest_blocks_per_kind() -> None:
    """Unequal blocks and two dtypes: one pool per (device, dtype) in its first block's state,
    sized to the k largest blocks of that kind (with reset_statistics), all blocks without."""
    gen = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(2 + i, 3, generator=gen, dtype=torch.float64)) for i in range(5)]
    ws.insert(1, nn.Parameter(torch.randn(7, 2, generator=gen)))  # float32: its own pool
    for reset, f64_size, f32_size in ((True, 18 + 15, 14), (False, 6 + 9 + 12 + 15 + 18, 14)):
        opt = bo.FRUGAL(ws, proj_type="block", density=1 / 3, reset_statistics=reset)  # k = 2
        _set_grads(ws, gen)
        opt.step()
        assert opt.state[ws[0]]["exp_avg_pool"].numel() == f64_size
        assert opt.state[ws[1]]["exp_avg_sq_pool"].dtype == torch.float32
        assert opt.state[ws[1]]["exp_avg_sq_pool"].numel() == f32_size
        assert _state_floats(opt) == 2 * (f64_size + f32_size)


@pytest.mark.compile
@pytest.mark.parametrize("order,reset", [("random", True), ("mirror", False)])
def test_block_compiled_continues_an_eager_state_dict(order, reset) -> None:
    """Unequal float64 blocks plus a float32 one (two pools), 6 active of 8, re-selected every
    2 steps: eager steps, then a state_dict round trip into a fullgraph-compiled step, which
    crosses re-selections with no recompile and follows the eager run."""

    def blocks():
        ws = _blocks(7, seed=4)
        ws.append(nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(5))))
        return ws

    hp = dict(proj_type="block", density=0.75, update_gap=2, block_order=order,
              reset_statistics=reset, weight_decay=0.1, lr=1e-2, seed=1)  # fmt: skip
    torch._dynamo.reset()
    ws, ws2 = blocks(), blocks()
    opt, opt2 = bo.FRUGAL(ws, **hp), bo.FRUGAL(ws2, **hp)
    gen = torch.Generator().manual_seed(6)

    def step(compiled_step=None):
        _set_grads(ws, gen)
        for w, w2 in zip(ws, ws2):
            w2.grad = w.grad.clone()
        opt.step()
        if compiled_step is not None:
            compiled_step()

    for _ in range(5):  # ws2 follows ws through an eager twin up to the round trip
        step()
        opt2.step()
    opt2 = bo.FRUGAL(ws2, **hp)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    compiled = torch.compile(opt2.step, fullgraph=True)
    for _ in range(3):
        step(compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            step(compiled)
            assert [int(opt.state[w]["active"]) for w in ws] == [
                int(opt2.state[w]["active"]) for w in ws2
            ]
    # the float32 block at float32's rounding (Inductor's kernels round differently by CPU:
    # one ulp was seen on another machine), the float64 ones at 1e-9
    for w, w2 in zip(ws, ws2):
        assert_close_after_rounding(w2, w, steps=9)
