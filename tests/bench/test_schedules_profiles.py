"""Schedules, batch-size scaling rules and performance profiles against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from basin.bench.profiles import performance_profiles, profile_scores, taus
from basin.bench.schedules import (
    lr_multiplier,
    make_schedule,
    scale_lr,
    scaling_rule,
    validate_schedule,
)


def test_constant_and_warmup() -> None:
    assert make_schedule("constant")(0.7) == 1.0
    f = make_schedule({"name": "warmup", "warmup": 0.2})
    assert [f(p) for p in (0.0, 0.1, 0.2, 0.9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])


def test_cosine_closed_form() -> None:
    f = make_schedule({"name": "cosine", "warmup": 0.1, "final": 0.1})
    for p in (0.1, 0.3, 0.55, 0.8, 1.0):
        x = (p - 0.1) / 0.9
        assert f(p) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x)))


@pytest.mark.parametrize(
    "shape, g",
    [
        ("linear", lambda x: 1 - x),
        ("cosine", lambda x: 0.5 * (1 + math.cos(math.pi * x))),
        ("1-sqrt", lambda x: 1 - math.sqrt(x)),
    ],
)
def test_wsd_shapes(shape, g) -> None:
    f = make_schedule({"name": "wsd", "warmup": 0.1, "decay": 0.2, "decay_shape": shape})
    assert f(0.05) == pytest.approx(0.5)
    assert f(0.5) == f(0.8) == 1.0
    for p in (0.85, 0.9, 0.95, 1.0):
        assert f(p) == pytest.approx(g((p - 0.8) / 0.2))


def test_wsd_s_is_a_sawtooth_of_decays() -> None:
    spec = validate_schedule({"name": "wsd-s", "warmup": 0.05, "decay": 0.25, "cycles": 2})
    # segments [0, .5) and [.5, 1]; each decays linearly over its last quarter
    assert lr_multiplier(spec, 0.025) == pytest.approx(0.5)
    assert lr_multiplier(spec, 0.3) == 1.0
    assert lr_multiplier(spec, 0.375 + 0.0625) == pytest.approx(0.5)
    assert lr_multiplier(spec, 0.5) == 1.0  # resumes at the stable rate after a decay
    assert lr_multiplier(spec, 0.875 + 0.0625) == pytest.approx(0.5)
    assert lr_multiplier(spec, 1.0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "wsd", "decay": 1.5}, "decay must be a fraction"),
        ({"name": "wsd", "decay_shape": "exp"}, "decay_shape"),
        ({"name": "wsd-s", "cycles": 0}, "cycles"),
        ({"name": "cosine", "cycles": 2}, "does not take cycles"),
        ({"name": "wsd", "warmup": 0.5, "decay": 0.6}, "warmup \\+ decay"),
        ("linear-ish", "unknown schedule"),
    ],
)
def test_bad_schedules(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        validate_schedule(spec)


def test_batch_scaling_rules() -> None:
    assert scaling_rule("torch:sgd") == "linear" and scaling_rule("adabelief") == "sqrt"
    assert scale_lr(0.1, 128, 512, "linear") == pytest.approx(0.4)
    assert scale_lr(1e-3, 128, 512, "sqrt") == pytest.approx(2e-3)
    assert scale_lr(1e-3, 128, 32, "sqrt") == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="rule"):
        scale_lr(1.0, 1, 2, "cubic")


def test_performance_profiles_hand_computed() -> None:
    times = {
        "w1": {"a": 10.0, "b": 20.0, "c": math.inf},
        "w2": {"a": 30.0, "b": 10.0, "c": 35.0},
    }
    grid = np.array([1.0, 1.5, 2.0, 3.0, 3.5, 4.0])
    rho = performance_profiles(times, grid)
    assert rho["a"].tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert rho["b"].tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert rho["c"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.5]
    # scores: exact areas of the step functions on a fine grid
    g = taus(4.0, 30001)
    s = profile_scores(performance_profiles(times, g), g)
    assert s["a"] == pytest.approx((0.5 * 2 + 1.0 * 1) / 3, abs=1e-3)
    assert s["b"] == pytest.approx((0.5 * 1 + 1.0 * 2) / 3, abs=1e-3)
    assert s["c"] == pytest.approx(0.5 * 0.5 / 3, abs=1e-3)


def test_nobody_reaches_target() -> None:
    rho = performance_profiles({"w": {"a": math.inf, "b": math.inf}})
    assert all((r == 0).all() for r in rho.values())
