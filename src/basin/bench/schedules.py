"""Learning-rate schedules and batch-size scaling rules.

A schedule is a multiplier of the base learning rate as a function of training progress
``p`` in [0, 1] (steps done / step budget, or elapsed / time budget), so the same spec works
for step and wall-clock budgets. Specs are plain dicts (stored with a run's config)::

    {"name": "constant"}
    {"name": "cosine", "warmup": 0.05, "final": 0.0}
    {"name": "warmup", "warmup": 0.1}                      # linear warmup, then constant
    {"name": "wsd", "warmup": 0.05, "decay": 0.2, "decay_shape": "1-sqrt"}
    {"name": "wsd-s", "warmup": 0.05, "decay": 0.2, "cycles": 3, "decay_shape": "linear"}

WSD (warmup-stable-decay): linear warmup over the first ``warmup`` fraction, constant, then a
decay to ``final`` over the last ``decay`` fraction with shape ``f(x)`` = ``1 - x``
(linear), ``0.5 (1 + cos pi x)`` (cosine) or ``1 - sqrt(x)`` (Hagele et al., "Scaling Laws
and Compute-Optimal Training beyond Fixed Training Durations", arXiv:2405.18392, 2024).
WSD-S (Wen et al., "Understanding Warmup-Stable-Decay Learning Rates: A River Valley Loss
Landscape Perspective", arXiv:2410.05192, 2024) keeps one main branch: the run is cut into
``cycles`` equal segments, each ends with a decay, and training resumes from the decayed
weights at the stable rate -- so in a single run it is a sawtooth of WSD segments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "SCHEDULES",
    "lr_multiplier",
    "make_schedule",
    "scale_lr",
    "scaling_rule",
    "validate_schedule",
]

SCHEDULES = ("constant", "cosine", "warmup", "wsd", "wsd-s")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")

_KEYS = {
    "constant": set(),
    "cosine": {"warmup", "final"},
    "warmup": {"warmup"},
    "wsd": {"warmup", "decay", "decay_shape", "final"},
    "wsd-s": {"warmup", "decay", "decay_shape", "final", "cycles"},
}


def _decay(shape: str, x: float) -> float:
    if shape == "linear":
        return 1.0 - x
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * x))
    return 1.0 - math.sqrt(x)


def _frac(spec: dict[str, Any], key: str, default: float) -> float:
    v = spec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"schedule {key} must be a fraction in [0, 1], got {v!r}")
    return float(v)


def validate_schedule(spec: dict[str, Any] | str | None) -> dict[str, Any]:
    """Normalised copy of a schedule spec; raises ``ValueError`` naming the bad field."""
    if spec is None:
        spec = {"name": "constant"}
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = str(spec.get("name", "constant")).lower()
    if name not in _KEYS:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    extra = set(spec) - _KEYS[name] - {"name"}
    if extra:
        raise ValueError(
            f"schedule {name!r} does not take {', '.join(sorted(extra))}; "
            f"it takes {', '.join(sorted(_KEYS[name])) or 'nothing'}"
        )
    out: dict[str, Any] = {"name": name}
    if "warmup" in _KEYS[name]:
        out["warmup"] = _frac(spec, "warmup", 0.0)
    if "final" in _KEYS[name]:
        out["final"] = _frac(spec, "final", 0.0)
    if "decay" in _KEYS[name]:
        out["decay"] = _frac(spec, "decay", 0.2)
        shape = str(spec.get("decay_shape", "linear")).lower()
        if shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {shape!r}")
        out["decay_shape"] = shape
    if name == "wsd-s":
        c = spec.get("cycles", 3)
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"schedule cycles must be an integer >= 1, got {c!r}")
        out["cycles"] = c
        if out["warmup"] >= 1.0 / c:
            raise ValueError("schedule warmup must be shorter than one wsd-s cycle")
    elif name == "wsd" and out["warmup"] + out["decay"] > 1.0:
        raise ValueError("schedule warmup + decay must not exceed 1")
    return out


def lr_multiplier(spec: dict[str, Any], p: float) -> float:
    """Multiplier of the base learning rate at progress ``p`` in [0, 1]."""
    p = min(max(p, 0.0), 1.0)
    name = spec["name"]
    if name == "constant":
        return 1.0
    warm = spec.get("warmup", 0.0)
    if warm > 0 and p < warm:
        return p / warm
    if name == "warmup":
        return 1.0
    final = spec.get("final", 0.0)
    if name == "cosine":
        x = (p - warm) / (1.0 - warm) if warm < 1 else 1.0
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * x))
    decay, shape = spec["decay"], spec["decay_shape"]
    if name == "wsd-s":
        seg = 1.0 / spec["cycles"]
        q = p - seg * min(int(p / seg), spec["cycles"] - 1)  # position inside its segment
        start = seg * (1.0 - decay)
        if decay == 0 or q < start:
            return 1.0
        return final + (1.0 - final) * _decay(shape, (q - start) / (seg * decay))
    start = 1.0 - decay
    if decay == 0 or p < start:
        return 1.0
    return final + (1.0 - final) * _decay(shape, (p - start) / decay)


def make_schedule(spec: dict[str, Any] | str | None) -> Callable[[float], float]:
    """``progress -> multiplier`` for a validated spec."""
    s = validate_schedule(spec)
    return lambda p: lr_multiplier(s, p)


def scaling_rule(optimizer: str) -> str:
    """The optimizer's batch-size rule from its registry entry
    (:attr:`basin.optim.OptimInfo.lr_scaling`): ``"linear"`` for SGD-type optimizers (Goyal et
    al., arXiv:1706.02677, 2017), ``"sqrt"`` for adaptive ones (Granziol et al., "Learning
    Rates as a Function of Batch Size", arXiv:2006.09092, 2020)."""
    from basin.optim import info

    return info(optimizer).lr_scaling


def scale_lr(lr: float, base_batch: int, batch: int, rule: str = "linear") -> float:
    """Learning rate for ``batch`` given ``lr`` tuned at ``base_batch`` under ``rule``
    (``"linear"``: lr * k, ``"sqrt"``: lr * sqrt(k), ``"none"``; k = batch / base_batch)."""
    if base_batch < 1 or batch < 1:
        raise ValueError(f"batch sizes must be positive integers, got {base_batch}, {batch}")
    k = batch / base_batch
    if rule == "linear":
        return lr * k
    if rule == "sqrt":
        return lr * math.sqrt(k)
    if rule == "none":
        return lr
    raise ValueError(f"rule must be 'linear', 'sqrt' or 'none', got {rule!r}")
