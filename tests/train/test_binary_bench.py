"""ReSTE and BiPer in the harness (registry entries ``reste``, ``biper`` on ``mnist1d_bnn``): one
bench step's gradients equal the estimators (basin.train.reste_sign / biper_weight /
biper_sign, themselves checked against the authors' code in test_binary.py) applied by hand to
the same float64 parameters at the step's scheduled ``o`` / stage, written here from the
documented mapping; BiPer's ``alpha`` is trained; refusals name what is missing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import basin.train as bt
from basin.bench import make_config
from basin.bench import workloads as wl
from basin.bench.runner import build_training, train_step
from basin.bench.workloads.own import probe_task

STEPS = 10


def _task(name: str, **hp: object):
    cfg = make_config("mnist1d_bnn", name, hp, steps=STEPS)
    task = wl.get("mnist1d_bnn").build(0, 32)
    task.model.double()
    task.steps = cfg.steps
    opt, method = build_training(name, cfg.hparams, task)
    x, y = next(task.batches)
    return task, opt, method, x.double(), y


def _bn(h: torch.Tensor, bn: torch.nn.BatchNorm1d, p: dict) -> torch.Tensor:
    return F.batch_norm(h, None, None, p[f"{bn}.weight"], p[f"{bn}.bias"], True, 0.0, 1e-5)


def _hand(p: dict, x: torch.Tensor, binary) -> torch.Tensor:
    """The mnist1d_bnn network with its hidden layers (net.2, net.4) computed by ``binary``."""
    h = _bn(F.linear(x, p["net.0.weight"], p["net.0.bias"]), "net.1", p)
    h = _bn(binary(h, "net.2"), "net.3", p)
    h = _bn(binary(h, "net.4"), "net.5", p)
    return F.linear(h, p["net.6.weight"], p["net.6.bias"])


def _check_step(task, opt, method, x, y, binary) -> None:
    model = task.model
    p = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    loss = F.cross_entropy(_hand(p, x, lambda h, n: binary(h, n, p)), y)
    want = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
    got_loss = train_step(model, task.loss_fn, opt, x, y, False, method)
    assert torch.allclose(got_loss, loss.detach(), rtol=1e-12, atol=0)
    for k, q in model.named_parameters():
        torch.testing.assert_close(q.grad, want[k], rtol=1e-12, atol=1e-15, msg=k)


def _o(step: int, steps: int, o_end: float = 3.0) -> float:
    # the authors' per-epoch o, with a step as the epoch (docs/training-methods.md)
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi / 2.0 * step / steps))


def test_reste_bench_step_is_the_estimator_at_the_scheduled_o() -> None:
    task, opt, method, x, y = _task("reste", o_end=2.5)
    layers = [m for m in task.model.modules() if isinstance(m, bt.ReSTELinear)]
    assert len(layers) == 2 and all(m.o == 1.0 for m in layers)  # step 0: the clipped STE
    for _ in range(3):
        method.after_step(task.model)
    o = _o(3, STEPS, 2.5)
    assert all(m.o == pytest.approx(o, rel=1e-15) and m.o_a == m.o for m in layers)

    def binary(h: torch.Tensor, n: str, p: dict) -> torch.Tensor:
        w = p[f"{n}.weight"]
        return F.linear(bt.reste_sign(h, o), bt.reste_sign(w, o) * w.abs().mean(), p[f"{n}.bias"])

    _check_step(task, opt, method, x, y, binary)
    assert layers[0].o == pytest.approx(_o(4, STEPS, 2.5), rel=1e-15)
    # a restored method (PBT) resumes the schedule where the state says; the end holds o_end
    method.load_state_dict({"step": 7})
    assert layers[1].o == pytest.approx(_o(7, STEPS, 2.5), rel=1e-15)
    method.load_state_dict({"step": STEPS + 5})
    assert layers[1].o == pytest.approx(2.5, rel=1e-15)


def test_biper_bench_steps_switch_stage_and_train_alpha() -> None:
    task, opt, method, x, y = _task("biper", w0=20.0)
    layers = [m for m in task.model.modules() if isinstance(m, bt.BiPerLinear)]
    assert len(layers) == 2
    # alpha was added before the optimizer: it is in the optimizer, with every parameter
    ids = sorted(id(q) for g in opt.param_groups for q in g["params"])
    assert ids == sorted(id(q) for q in task.model.parameters())
    switch = round(2.0 / 3.0 * STEPS)  # 7: the last stage-1 step is 6 (0-based)
    for _ in range(switch - 1):
        method.after_step(task.model)

    def binary(stage: int):
        def f(h: torch.Tensor, n: str, p: dict) -> torch.Tensor:
            hs = h / torch.sqrt(h.var(1, keepdim=True) + 1e-5)
            wq = bt.biper_weight(p[f"{n}.weight"], 20.0, stage)
            return F.linear(bt.biper_sign(hs), wq, p[f"{n}.bias"]) * p[f"{n}.alpha"]

        return f

    assert {m.stage for m in layers} == {1}
    alpha = layers[0].alpha.detach().clone()
    _check_step(task, opt, method, x, y, binary(1))
    assert not torch.equal(alpha, layers[0].alpha)  # trained
    assert {m.stage for m in layers} == {2}
    _check_step(task, opt, method, x, y, binary(2))
    method.load_state_dict({"step": switch - 1})
    assert {m.stage for m in layers} == {1}


def test_refusals_and_the_probe_left_alone() -> None:
    with pytest.raises(ValueError, match=r"^biper needs a step budget"):
        make_config("mnist1d_bnn", "biper", time_budget=1.0)
    with pytest.raises(ValueError, match=r"stage2_at must be .*\[0, 1\]"):
        make_config("mnist1d_bnn", "biper", {"stage2_at": 1.5}, steps=3)
    with pytest.raises(ValueError, match=r"o_end must be"):
        make_config("mnist1d_bnn", "reste", {"o_end": 0.5}, steps=3)
    # validation swaps a copy: the probe model keeps its marked layers for the next method
    make_config("mnist1d_bnn", "reste", steps=3)
    kinds = {type(m) for m in probe_task(wl.get("mnist1d_bnn")).model.modules()}
    assert bt.BinarizableLinear in kinds and bt.ReSTELinear not in kinds
