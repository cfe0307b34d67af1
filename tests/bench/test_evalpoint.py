"""Optimizers with a separate evaluation point (Schedule-Free): the harness evaluates and
diagnoses at x, trains at y, and hands back the model at x."""

from __future__ import annotations

import math

import pytest
import torch

import basin.optim as bo
from basin.bench import make_config, run
from basin.bench import workloads as wl
from basin.bench.evalpoint import at_eval_point, has_eval_point
from basin.bench.runner import train_step

STEPS, EVERY = 20, 10


def _by_hand(cfg):
    """The run's training reproduced step by step, with x evaluated at every eval step."""
    task = wl.get(cfg.workload).build(cfg.seed, cfg.batch_size)
    model = task.model
    model.train()
    opt = bo.create(cfg.optimizer, model, **cfg.hparams)
    evals = []
    for step in range(1, STEPS + 1):
        x, y = next(task.batches)
        train_step(model, task.loss_fn, opt, x, y, False)
        if step % EVERY == 0:
            opt.eval()
            evals.append(task.evaluate(model))
            at_x = [p.detach().clone() for p in model.parameters()]
            opt.train()
            at_y = task.evaluate(model)
    return evals, at_x, at_y


def test_a_schedule_free_run_evaluates_at_x_and_returns_x() -> None:
    cfg = make_config(
        "mnist1d_mlp", "schedulefree_adamw", {"lr": 1e-2}, steps=STEPS, eval_every=EVERY,
        schedule="constant", landscape=True,
    )  # fmt: skip
    r = run(cfg)
    assert r.status == "ok", r.error
    evals, at_x, at_y = _by_hand(cfg)
    assert r.series["eval"]["metric"] == pytest.approx([e["metric"] for e in evals], rel=1e-12)
    assert r.series["eval"]["eval_loss"] == pytest.approx(
        [e["eval_loss"] for e in evals], rel=1e-12
    )
    for p, q in zip(r.model.parameters(), at_x):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
    # evaluating at y instead would have given another number
    assert not math.isclose(at_y["eval_loss"], r.final["eval_loss"], rel_tol=1e-6)
    # the final diagnostics ran on the returned model (x)
    task = wl.get("mnist1d_mlp").build(0)
    assert math.isclose(task.evaluate(r.model)["eval_loss"], r.final["eval_loss"], rel_tol=1e-9)
    assert r.final["top_eigenvalue"] > 0


def test_the_capability_comes_from_the_registry_or_the_methods() -> None:
    model = torch.nn.Linear(3, 2)
    assert "train_eval" in bo.info("schedulefree_adamw").capabilities
    assert has_eval_point(bo.create("schedulefree_adamw", model), "schedulefree_adamw")
    assert not has_eval_point(bo.create("adabelief", model), "adabelief")
    assert not has_eval_point(torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_third_party_schedule_free_optimizer_runs() -> None:
    """pytorch_optimizer's ScheduleFreeAdamW: no registry entry declares the capability; the
    harness finds its train()/eval() methods and switches it like basin's."""
    pytest.importorskip("pytorch_optimizer")
    r = run(make_config("mnist1d_mlp", "pytorch_optimizer:schedulefreeadamw", steps=4,
                        eval_every=2, log_every=1))  # fmt: skip
    assert r.status == "ok", r.error
    assert all(math.isfinite(m) for m in r.series["eval"]["metric"])


def test_at_eval_point_returns_to_train_mode_when_the_block_raises() -> None:
    model = torch.nn.Linear(3, 2)
    opt = bo.create("schedulefree_adamw", model)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    with pytest.raises(KeyError), at_eval_point(opt, "schedulefree_adamw"):
        assert not opt.training
        raise KeyError
    assert opt.training
