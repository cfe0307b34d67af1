"""basin.bench.plan_runs: the runs of a plain sweep, with the learning-rate rules applied."""

from __future__ import annotations

import pytest

from basin.bench import workloads as wl
from basin.bench.plan import plan_runs
from basin.bench.schedules import scale_lr, scaling_rule


def test_scale_lr_rescales_only_defaults_and_hp_wins() -> None:
    w = wl.get("mnist1d_mlp")
    opts = ["adabelief", "torch:sgd"]
    configs, notes = plan_runs([w], opts, 2, {"torch:sgd": {"lr": 0.3}}, scale_lr=True,
                               steps=2, batch_size=4 * w.batch_size)  # fmt: skip
    assert notes == [] and len(configs) == 4
    by_opt = {c.optimizer: c for c in configs}
    base = wl.default_hparams(w, "adabelief")["lr"]
    expected = scale_lr(base, w.batch_size, 4 * w.batch_size, scaling_rule("adabelief"))
    assert by_opt["adabelief"].hparams["lr"] == pytest.approx(expected)
    assert expected != base
    assert by_opt["torch:sgd"].hparams["lr"] == 0.3
    assert {c.seed for c in configs} == {0, 1}


def test_steplaw_note_and_bad_rules() -> None:
    w = wl.get("charlm")
    configs, notes = plan_runs([w], ["torch:adamw"], 1, {}, lr_rule="steplaw", steps=2)
    assert len(notes) == 1 and notes[0].startswith("steplaw on charlm: N=")
    assert "lr" in configs[0].hparams
    with pytest.raises(ValueError, match="lr_rule must be one of default, steplaw"):
        plan_runs([w], ["torch:adamw"], 1, {}, lr_rule="kaplan", steps=2)
    with pytest.raises(ValueError, match="not with --scale-lr"):
        plan_runs([w], ["torch:adamw"], 1, {}, lr_rule="steplaw", scale_lr=True, steps=2)
    with pytest.raises(ValueError, match="--lr-rule steplaw: "):
        plan_runs([wl.get("mnist1d_mlp")], ["torch:adamw"], 1, {}, lr_rule="steplaw", steps=2)


def test_adaptive_batch_cap_defaults_to_eight_first_batches() -> None:
    w = wl.get("mnist1d_mlp")
    (cfg,), _ = plan_runs([w], ["torch:sgd"], 1, {}, adaptive_batch="norm", steps=2)
    assert cfg.adaptive_batch["test"] == "norm"
    assert cfg.adaptive_batch["max_batch_size"] == 8 * w.batch_size
