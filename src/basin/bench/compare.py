"""A fair, tuned comparison and the statistics that say which optimizer wins and how sure.

Protocol (:func:`tuned_configs`, AlgoPerf's external tuning, Dahl et al., "Benchmarking Neural
Network Training Algorithms", arXiv:2306.07179, 2023): for every workload and optimizer,
``n_trials`` quasi-random trials (scrambled Halton) from the optimizer's registry search space,
all under the same budget and with the same tuning seed; the configuration with the best final
metric is then trained over the evaluation seeds ``0..S-1``. The tuning seed
(:data:`TUNING_SEED`) is none of the evaluation seeds, so the seeds that rank the optimizers
never chose their hyperparameters. Every optimizer gets the same number of trials and steps:
the comparison ranks optimizers, not the defaults someone picked.

Statistics (:func:`verdicts`): per workload, each configuration's mean final metric with a
95% bootstrap confidence interval over seeds; the winner against every other configuration
with the mean paired difference (same seed = same initialisation and data order), its 95%
bootstrap interval and a two-sided paired t-test; and a plain-language verdict line, which
says "beats" only when the interval excludes 0 *and* the paired test gives p < 0.05 (with few
seeds the percentile bootstrap alone is too optimistic).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import workloads as _wl

__all__ = [
    "TUNING_SEED",
    "bootstrap_ci",
    "paired_comparison",
    "sensitivity",
    "tuned_configs",
    "verdicts",
]

TUNING_SEED = 1000
STUDY_PREFIX = "compare-"
N_BOOTSTRAP = 10_000


# ------------------------------------------------------------------ protocol


@dataclass
class TunedChoice:
    """The outcome of one optimizer's tuning on one workload."""

    workload: str
    optimizer: str
    study_name: str
    n_trials: int
    best_value: float | None
    hparams: dict[str, Any]
    train_seconds: float
    steps: int


def tuned_configs(
    workloads: Sequence[str | Any],
    optimizers: Sequence[str],
    n_trials: int,
    seeds: Sequence[int],
    storage: str,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    on_trial: Callable[[str, Any, int, int], None] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    final: dict[str, Any] | None = None,
    **run_kwargs: Any,
) -> tuple[list[Any], list[TunedChoice]]:
    """Tune every (workload, optimizer) with ``n_trials`` quasi-random trials, then return the
    run configurations of the winners over ``seeds`` (to be run by
    :func:`basin.bench.runner.sweep`) and what each tuning chose.

    ``overrides`` (optimizer -> hyperparameters) are fixed for every trial and excluded from
    the search; ``run_kwargs`` (``steps``, ``time_budget``, ``batch_size``, ``schedule``,
    ``eval_every``) are the budget every trial and every final run shares; ``final``
    (``sharpness_every``, ``landscape``) applies to the final runs only. Studies live in
    ``storage`` (an SQLAlchemy URL) and resume when the same command runs again."""
    from basin.optim import resolve

    from .runner import _check_int, make_config
    from .space import default_space
    from .tune import prepare, tune

    _check_int("tune trials", n_trials, 1)
    if "://" not in str(storage):  # a plain path, as basin bench accepts: the same file
        storage = f"sqlite:///{storage}"
    overrides = {resolve(k): v for k, v in (overrides or {}).items()}
    configs, choices = [], []
    for wspec in workloads:
        w = _wl.get(wspec)
        for name in optimizers:
            opt = resolve(name)
            fixed = dict(overrides.get(opt, {}))
            space = {
                n: p.spec
                for n, p in default_space(opt).items()
                if p.base not in fixed and n not in fixed
            }
            if not space:
                raise ValueError(f"{opt}: --hp fixes every hyperparameter of its search space")
            spec = prepare(
                w,
                opt,
                n_trials,
                sampler="qmc",
                pruner="none",
                search_space=space,
                storage=storage,
                seed=TUNING_SEED,
                **run_kwargs,
            )
            spec.base_hparams.update(fixed)
            tag = hashlib.sha256(
                json.dumps([spec.fingerprint(), fixed], sort_keys=True, default=str).encode()
            ).hexdigest()[:8]
            spec.study_name = f"{STUDY_PREFIX}{w.name}-{opt}-{tag}"
            cb = None if on_trial is None else (lambda t, d, n, _o=opt: on_trial(_o, t, d, n))
            res = tune(spec, on_trial=cb, progress=progress)
            cost_s, cost_steps = _study_cost(spec)
            hp = dict(spec.base_hparams)
            if res.best_value is not None:
                hp = spec.hparams({k: _value(spec, k, v) for k, v in res.best_params.items()})
            choices.append(
                TunedChoice(
                    w.name, opt, spec.study_name, n_trials, res.best_value, hp, cost_s, cost_steps
                )
            )
            tuning = f"qmc:{n_trials}"
            configs += [
                make_config(w, opt, hp, seed=s, tuning=tuning, **_run_args(spec), **(final or {}))
                for s in seeds
            ]
    return configs, choices


def _value(spec: Any, name: str, raw: Any) -> Any:
    p = spec.space.get(name)
    return raw if p is None else p.value_of(raw)


def _run_args(spec: Any) -> dict[str, Any]:
    return {k: v for k, v in spec.run_kwargs.items() if v is not None}


def _study_cost(spec: Any) -> tuple[float, int]:
    import optuna

    st = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
    secs = sum(float(t.user_attrs.get("train_seconds", 0.0)) for t in st.trials)
    steps = sum(int(t.user_attrs.get("steps_done", 0)) for t in st.trials)
    return secs, steps


# ------------------------------------------------------------------ statistics


def bootstrap_ci(
    xs: Sequence[float], level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``xs`` (None with fewer than 2 values)."""
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if len(a) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(N_BOOTSTRAP, len(a)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_comparison(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """``a - b`` over the seeds both have: mean difference, its 95% bootstrap interval, and
    the two-sided paired t-test p-value (None with fewer than 2 shared seeds)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return None
    from scipy import stats

    arr = np.asarray(d)
    if np.allclose(arr, arr[0]):
        p = 0.0 if arr[0] != 0 else 1.0
    else:
        p = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return {"n": len(d), "mean": float(arr.mean()), "ci": bootstrap_ci(d), "p_value": p}


def _finals(runs: Sequence[dict[str, Any]]) -> dict[int, float]:
    out = {}
    for r in runs:
        m = (r.get("final") or {}).get("metric")
        if r["status"] == "ok" and m is not None and math.isfinite(m):
            out[int(r["config"]["seed"])] = float(m)
    return out


def _meta(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    meta = dict(runs[0].get("workload_meta") or {})
    if not meta:
        try:
            meta = _wl.get(runs[0]["config"]["workload"]).meta()
        except ValueError:
            meta = {"metric": "metric", "metric_mode": "max", "target": None}
    return meta


def _diff_text(x: float, metric: str) -> str:
    if metric == "accuracy":
        return f"{x * 100:+.2f} points accuracy"
    return f"{x:+.4g} {metric}"


def verdicts(runs: Sequence[dict[str, Any]], labels: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per workload: ``ranking`` (label, mean, ci, n, seeds) best first, ``pairs`` (the winner
    against each other label: paired difference, interval, p-value), ``protocol`` and the
    ``verdict`` line. ``labels``: run key -> configuration label
    (:func:`basin.bench.report.labels`). Diverged runs count as the worst outcome of their
    seed in the ranking text but are left out of the paired statistics."""
    by_w: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["status"] == "failed":
            continue
        by_w[r["config"]["workload"]][labels[r["key"]]].append(r)
    out = {}
    for wname, groups in sorted(by_w.items()):
        first = next(iter(groups.values()))
        meta = _meta(first)
        metric, mode = meta.get("metric", "metric"), meta.get("metric_mode", "max")
        sign = 1.0 if mode == "max" else -1.0
        ranking = []
        for label, rs in groups.items():
            f = _finals(rs)
            vals = list(f.values())
            ranking.append(
                {
                    "label": label,
                    "mean": float(np.mean(vals)) if vals else None,
                    "ci": bootstrap_ci(vals),
                    "n": len(vals),
                    "diverged": sum(r["status"] == "diverged" for r in rs),
                    "finals": f,
                    "tuning": rs[0]["config"].get("tuning", ""),
                }
            )
        ranking.sort(key=lambda x: (x["mean"] is None, -sign * (x["mean"] or 0.0)))
        best = ranking[0]
        pairs = []
        for other in ranking[1:]:
            pc = paired_comparison(best["finals"], other["finals"])
            pairs.append({"label": other["label"], **(pc or {"n": 0})})
        tunings = sorted({x["tuning"] for x in ranking})
        protocol = (
            "default hyperparameters (untuned: this ranks defaults, not optimizers)"
            if tunings == [""]
            else "tuned: " + ", ".join(_protocol_text(t) for t in tunings)
        )
        out[wname] = {
            "metric": metric,
            "mode": mode,
            "ranking": ranking,
            "pairs": pairs,
            "protocol": protocol,
            "verdict": _verdict(wname, metric, best, pairs),
        }
    return out


def _protocol_text(t: str) -> str:
    if not t:
        return "some at default hyperparameters"
    kind, _, n = t.partition(":")
    return f"best of {n} quasi-random (Halton) trials per optimizer, tuning seed {TUNING_SEED}"


def _verdict(wname: str, metric: str, best: dict[str, Any], pairs: list[dict[str, Any]]) -> str:
    if best["mean"] is None:
        return f"{wname}: no run finished, no verdict"
    if not pairs:
        return f"{wname}: only {best['label']} ran; nothing to compare"
    runner_up = pairs[0]
    if runner_up.get("n", 0) < 2 or runner_up.get("ci") is None:
        return (
            f"{best['label']} leads {runner_up['label']} on {wname}, but with fewer than 2 "
            "shared seeds there is no confidence interval: run more seeds"
        )
    lo, hi = runner_up["ci"]
    diff = _diff_text(runner_up["mean"], metric)
    ci = f"95% CI [{_diff_text(lo, metric).split()[0]}, {_diff_text(hi, metric).split()[0]}]"
    tail = f"paired over {runner_up['n']} seeds, p = {runner_up['p_value']:.2g}"
    excludes_zero = (lo > 0 and runner_up["mean"] > 0) or (hi < 0 and runner_up["mean"] < 0)
    if excludes_zero and runner_up["p_value"] < 0.05:
        return f"{best['label']} beats {runner_up['label']} on {wname}: {diff}, {ci} ({tail})"
    why = f"the {ci} includes 0" if not excludes_zero else "the paired test is not significant"
    return (
        f"no clear winner on {wname}: {best['label']} leads {runner_up['label']} by {diff}, "
        f"but {why} ({tail}); run more seeds to separate them"
    )


# ------------------------------------------------------------------ sensitivity


def sensitivity(storage: str) -> list[dict[str, Any]]:
    """Learning-rate sensitivity of every comparison study in ``storage``: per study its
    workload, optimizer, ``points`` (``[lr, final objective]`` of complete trials, sorted by
    lr), ``diverged`` (lrs of trials that diverged), total training seconds and steps.
    ``[]`` when there are none. The storage is only read."""
    from .tune import read_studies

    out = []
    for s, study in read_studies(storage):
        if not s.study_name.startswith(STUDY_PREFIX):
            continue
        pts, div = [], []
        secs, steps = 0.0, 0
        lr_key = _lr_key(study)
        for t in study.get_trials(deepcopy=False):
            secs += float(t.user_attrs.get("train_seconds", 0.0))
            steps += int(t.user_attrs.get("steps_done", 0))
            lr = (t.user_attrs.get("hparams") or {}).get(lr_key)
            if lr is None:
                continue
            if t.state.name == "COMPLETE" and t.value is not None:
                pts.append([float(lr), float(t.value)])
            elif t.user_attrs.get("status") == "diverged":
                div.append(float(lr))
        out.append(
            {
                "name": s.study_name,
                "workload": s.user_attrs.get("workload"),
                "optimizer": s.user_attrs.get("optimizer"),
                "lr_name": lr_key,
                "points": sorted(pts),
                "diverged": sorted(div),
                "train_seconds": secs,
                "steps": steps,
                "n_trials": len(study.trials),
            }
        )
    return out


def _lr_key(study: Any) -> str:
    names = {n for t in study.trials for n in (t.user_attrs.get("hparams") or {})}
    return "lr" if "lr" in names else next((n for n in sorted(names) if "lr" in n), "lr")
