"""Schedule-Free AdamW beyond the generic checks: both of the authors' implementations
(schedulefree 1.4.1: the memory-efficient ``AdamWScheduleFree`` and the explicit-x
``AdamWScheduleFreeReference``) through train/eval switches, and the mode rules."""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from optim_db import mlp
from test_common import loss_of, make_data

import basin.optim as bo

schedulefree = pytest.importorskip("schedulefree")

HP = [
    {"warmup_steps": 30, "weight_decay": 0.1},
    {"lr": 1e-2, "betas": (0.8, 0.99), "warmup_steps": 10, "r": 1.0, "weight_lr_power": 1.0},
]


def _silent(fn):
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints on every switch
        return fn()


def _steps(pairs, batches):
    for batch in batches:
        for model, opt in pairs:
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()


@torch.no_grad()
def _max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p - q).abs().max() / q.abs().max()) for p, q in zip(a.parameters(), b.parameters())
    )


@pytest.mark.parametrize("hp", HP, ids=["warmup-wd", "r-power"])
@pytest.mark.parametrize("ref_name", ["AdamWScheduleFree", "AdamWScheduleFreeReference"])
def test_matches_the_authors_through_train_eval_switches(hp, ref_name) -> None:
    """float64, 100 steps, eval (x), train (y), 40 more steps, eval: y and x equal the authors'
    at every switch (measured <= 2e-15 against either implementation; asserted 1e-12)."""
    torch.manual_seed(0)
    model = mlp().double()
    ref_model = copy.deepcopy(model)
    opt = bo.ScheduleFreeAdamW(model.parameters(), **hp)
    ref = getattr(schedulefree, ref_name)(ref_model.parameters(), foreach=False, **hp)
    _silent(ref.train)
    batches = make_data(140)
    pairs = [(model, opt), (ref_model, ref)]
    _steps(pairs, batches[:100])
    assert _max_rel(model, ref_model) < 1e-12  # y
    opt.eval()
    _silent(ref.eval)
    assert not opt.training
    assert _max_rel(model, ref_model) < 1e-12  # x
    opt.train()
    _silent(ref.train)
    assert _max_rel(model, ref_model) < 1e-12  # y again
    _steps(pairs, batches[100:])
    opt.eval()
    _silent(ref.eval)
    assert _max_rel(model, ref_model) < 1e-12


def test_eval_holds_the_average_and_train_restores_y() -> None:
    """x = (y - (1 - b1) z) / b1 in eval mode, and train() gives y back (to rounding); both
    are no-ops when repeated; a new optimizer starts in train mode."""
    torch.manual_seed(0)
    model = mlp().double()
    opt = bo.ScheduleFreeAdamW(model.parameters(), betas=(0.9, 0.999))
    assert opt.training
    opt.eval()
    opt.train()  # before any step: nothing to switch
    _steps([(model, opt)], make_data(20))
    y = [p.detach().clone() for p in model.parameters()]
    z = [opt.state[p]["z"].clone() for p in model.parameters()]
    opt.eval()
    opt.eval()
    for p, yi, zi in zip(model.parameters(), y, z):
        torch.testing.assert_close(p, (yi - 0.1 * zi) / 0.9, rtol=1e-13, atol=1e-15)
    opt.train()
    opt.train()
    for p, yi in zip(model.parameters(), y):
        torch.testing.assert_close(p, yi, rtol=1e-13, atol=1e-15)


def test_step_in_eval_mode_raises_and_changes_nothing() -> None:
    model = mlp().double()
    opt = bo.ScheduleFreeAdamW(model.parameters())
    _steps([(model, opt)], make_data(3))
    opt.eval()
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, make_data(1)[0]).backward()
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.train(False)  # torch's Module.train(mode) convention
    assert not opt.training


def test_state_dict_keeps_the_mode_and_a_new_group_joins_it() -> None:
    """A checkpoint written in eval mode (model at x) loads into eval mode, and train()
    continues as the original did."""
    batches = make_data(10)
    model = mlp().double()
    opt = bo.ScheduleFreeAdamW(model.parameters())
    _steps([(model, opt)], batches[:5])
    opt.eval()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.train()
    _steps([(model, opt)], batches[5:])

    model2 = mlp().double()
    model2.load_state_dict(saved_model)
    opt2 = bo.ScheduleFreeAdamW(model2.parameters())
    opt2.load_state_dict(saved_opt)
    assert not opt2.training
    opt2.train()
    _steps([(model2, opt2)], batches[5:])
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)

    opt2.eval()
    opt2.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert opt2.param_groups[-1]["train_mode"] is False


# ------------------------------------------------------------------ Schedule-Free SGD

SGD_HP = [
    {"lr": 0.5, "warmup_steps": 30, "weight_decay": 0.1},
    {"lr": 0.2, "momentum": 0.8, "warmup_steps": 10, "r": 1.0, "weight_lr_power": 1.0},
]


@pytest.mark.parametrize("hp", SGD_HP, ids=["warmup-wd", "r-power"])
@pytest.mark.parametrize("ref_name", ["SGDScheduleFree", "SGDScheduleFreeReference"])
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_sgd_matches_the_authors_through_train_eval_switches(hp, ref_name, foreach) -> None:
    """float64, 100 steps, eval (x), train (y), 40 more steps, eval: y and x equal those of
    both of the authors' implementations at every switch (asserted 1e-12)."""
    torch.manual_seed(0)
    model = mlp().double()
    ref_model = copy.deepcopy(model)
    opt = bo.ScheduleFreeSGD(model.parameters(), foreach=foreach, **hp)
    ref = getattr(schedulefree, ref_name)(ref_model.parameters(), foreach=False, **hp)
    _silent(ref.train)
    batches = make_data(140)
    pairs = [(model, opt), (ref_model, ref)]
    _steps(pairs, batches[:100])
    assert _max_rel(model, ref_model) < 1e-12  # y
    opt.eval()
    _silent(ref.eval)
    assert not opt.training
    assert _max_rel(model, ref_model) < 1e-12  # x
    opt.train()
    _silent(ref.train)
    assert _max_rel(model, ref_model) < 1e-12
    _steps(pairs, batches[100:])
    opt.eval()
    _silent(ref.eval)
    assert _max_rel(model, ref_model) < 1e-12


def test_sgd_eval_holds_the_average_and_step_in_eval_mode_raises() -> None:
    """x = (y - (1 - m) z) / m in eval mode, train() restores y; step() in eval mode raises
    naming the class and changes nothing; weight decay leaves p.grad as it was."""
    torch.manual_seed(0)
    model = mlp().double()
    opt = bo.ScheduleFreeSGD(model.parameters(), lr=0.3, momentum=0.8, weight_decay=0.1)
    _steps([(model, opt)], make_data(20))
    grads = [p.grad.clone() for p in model.parameters()]
    y = [p.detach().clone() for p in model.parameters()]
    z = [opt.state[p]["z"].clone() for p in model.parameters()]
    assert set(opt.state[model[0].weight]) == {"step", "z", "lr_max", "weight_sum"}
    opt.eval()
    for p, yi, zi, gi in zip(model.parameters(), y, z, grads):
        torch.testing.assert_close(p, (yi - 0.2 * zi) / 0.8, rtol=1e-13, atol=1e-15)
        assert torch.equal(p.grad, gi)
    with pytest.raises(RuntimeError, match=r"ScheduleFreeSGD\.step\(\).*eval mode"):
        opt.step()
    opt.train()
    for p, yi in zip(model.parameters(), y):
        torch.testing.assert_close(p, yi, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("cls", [bo.ScheduleFreeAdamW, bo.ScheduleFreeSGD])
def test_shared_coefficients_equal_the_per_parameter_ones(cls, foreach, monkeypatch) -> None:
    # the step computes lr_t and c_t once when every parameter's (step, lr_max, weight_sum)
    # are equal; against the per-parameter computation (forced): the same state bit for bit,
    # also once a parameter without a gradient at one step makes them differ (warmup: lr_max
    # grows; r: the step enters the weights)
    import basin.optim.schedule_free as sf

    hp = {"lr": 0.05, "warmup_steps": 3, "r": 0.5, "weight_decay": 0.01, "foreach": foreach}
    models = [mlp().double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [cls(m.parameters(), **hp) for m in models]
    shared = sf._shared_coefficients
    calls = []

    def recorded(*args, **kw):
        out = shared(*args, **kw)
        calls.append(out is not None)
        return out

    for i, batch in enumerate(make_data(8)):
        for k, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            if i == 4:
                model[0].bias.grad = None  # this parameter skips a step
            monkeypatch.setattr(
                sf, "_shared_coefficients", (lambda *a, **kw: None) if k else recorded
            )
            opt.step()
    # shared while the parameters stepping have equal counters (at the skip too), then not
    assert calls == [True] * 5 + [False] * 3
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        if foreach:  # one alpha for all tensors instead of a list: the same up to rounding
            torch.testing.assert_close(p, q, rtol=1e-15, atol=1e-15)
        else:
            assert torch.equal(p, q)
        for key, value in opts[0].state[p].items():
            if key in ("step", "lr_max", "weight_sum"):
                assert torch.equal(value, opts[1].state[q][key]), key


@pytest.mark.parametrize("cls", [bo.ScheduleFreeAdamW, bo.ScheduleFreeSGD])
def test_float32_state_dict_round_trip_keeps_float64_averaging_weights(cls) -> None:
    # torch's load_state_dict casts state to the parameter's dtype: lr_max and weight_sum must
    # stay float64 (a float32 weight_sum rounds c_t), so the continuation is bit-identical
    hp = {"lr": 0.03, "warmup_steps": 3}
    batches = [(x.float(), y) for x, y in make_data(8)]
    model = mlp()
    opt = cls(model.parameters(), **hp)
    _steps([(model, opt)], batches[:4])
    saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _steps([(model, opt)], batches[4:])
    model2 = mlp()
    model2.load_state_dict(saved[1])
    opt2 = cls(model2.parameters(), **hp)
    opt2.load_state_dict(saved[0])
    state = opt2.state[model2[0].weight]
    assert state["lr_max"].dtype == state["weight_sum"].dtype == torch.float64
    _steps([(model2, opt2)], batches[4:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
