"""Population Based Training over basin workloads with Ray Tune (optional: ``basin-optim[ray]``).

A population of trials trains the same workload and optimizer with different hyperparameters.
Every ``interval`` steps each trial evaluates, reports its metric and saves a checkpoint (model,
optimizer state, step). Ray Tune's PBT scheduler then lets a trial in the bottom quantile
*exploit* one in the top quantile (continue from its checkpoint, hyperparameters included) and
*explore* (multiply each continuous hyperparameter by 0.8 or 1.2, or resample it with
probability ``resample_probability``). After a restore the mutated hyperparameters are written
into the optimizer's parameter groups, so the optimizer state (moments) carries over while the
new values take effect at once.

Hyperparameters and ranges come from the same search spaces as :mod:`basin.bench.tune`
(:mod:`basin.bench.space`); values are kept inside ``[low, high]`` after perturbation.
``one_minus`` parameters are perturbed on ``1 - x`` (beta2 = 0.999 -> 0.9988 or 0.9992).

Differences from the paper: data order after an exploit is not the donor's (the batch iterator
is re-seeded from the trial's seed and step), which PBT does not require.

Reference: Jaderberg et al., "Population Based Training of Neural Networks", arXiv:1711.09846,
2017; Liaw et al., "Tune: A Research Platform for Distributed Model Selection and Training",
arXiv:1807.05118, 2018.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import workloads as _wl

__all__ = ["PBTResult", "pbt", "require_ray"]


def require_ray() -> Any:
    """Import Ray Tune or raise ``ValueError`` with the install line."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise ValueError(
            "population based training needs Ray Tune: pip install 'basin-optim[ray]' "
            "(or pip install 'ray[tune]')"
        ) from None
    return ray


@dataclass
class PBTResult:
    """Outcome of :func:`pbt`. ``trials``: one dict per member (``trial_id``, ``config``,
    ``hparams`` used by the optimizer at the end and ``first_hparams`` at the first
    evaluation (``first_step``), ``config_hparams`` (those of its final configuration), ``metric``,
    ``eval_loss``, ``step``, ``exploits``: how many times it took over another member's
    checkpoint, ``lineage``: the members its weights descend from)."""

    workload: str
    optimizer: str
    mode: str
    best_metric: float | None
    best_hparams: dict[str, Any]
    trials: list[dict[str, Any]] = field(default_factory=list)
    path: str = ""

    @property
    def n_exploits(self) -> int:
        return sum(t["exploits"] for t in self.trials)


def _clip(space: Mapping[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Keep perturbed values inside each parameter's range (PBT's custom_explore_fn)."""
    for name, p in space.items():
        if name not in cfg:
            continue
        s = p.spec
        if p.type == "float":
            cfg[name] = float(min(max(cfg[name], s["low"]), s["high"]))
        elif p.type == "int":
            cfg[name] = int(min(max(round(cfg[name]), s["low"]), s["high"]))
    return cfg


def _history(r: Any) -> Any:
    """A trial's reported rows (``step``, ``hparams``), from its first evaluation on.

    ``Result.metrics_dataframe`` prefers ``result.json``, which Ray's JSON logger re-downloads
    from storage each time a trial (re)starts (a PBT exploit, or a pause under ``synch``); a
    copy not yet synced there loses the rows reported before the restart. ``progress.csv`` is
    opened once per trial and appended to, so the longer of the two is the full history."""
    import pandas as pd

    frames = []
    csv = Path(r.path) / "progress.csv" if r.path else None
    if csv is not None and csv.is_file():
        try:
            frames.append(pd.read_csv(csv, dtype={"trial_id": str}))
        except (OSError, ValueError, pd.errors.ParserError):
            pass
    if r.metrics_dataframe is not None:
        frames.append(r.metrics_dataframe)
    frames = [f for f in frames if {"hparams", "step"} <= set(f.columns) and len(f)]
    if not frames:
        return pd.DataFrame({"hparams": [], "step": []})
    return max(frames, key=len)


def _trainable(config: dict[str, Any], workload: Any = None) -> None:
    """Ray Tune function trainable: train ``interval`` steps, evaluate, checkpoint, repeat."""
    import torch
    from ray import tune

    from basin.optim import NonFiniteGradientError, info

    from .evalpoint import at_eval_point, to_train_point
    from .runner import build_training, make_config, train_step
    from .space import parse_space
    from .tune import merge_hparams

    torch.set_num_threads(1)
    job = config["_job"]
    space = parse_space(job["space"], job["optimizer"])
    values = {n: p.value_of(config[n]) for n, p in space.items() if n in config}
    hp = merge_hparams(job["base_hparams"], space, values)  # as tune's trials build theirs
    # a user's workload travels as an object (Ray pickles it); built-in ones by name
    cfg = make_config(
        workload or job["workload"], job["optimizer"], hp, seed=job["seed"], steps=job["steps"]
    )
    w = _wl.get(cfg.workload)
    me = tune.get_context().get_trial_id()

    # lineage: the members whose weights this member's weights descend from (via exploits);
    # exploits: per member, how many times it took over another member's checkpoint
    step, lineage, exploits = 0, [], {}
    ckpt = tune.get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        step = state["step"]
        lineage, exploits = list(state["lineage"]), dict(state["exploits"])
        if state["trial_id"] != me:
            lineage.append(state["trial_id"])
            exploits[me] = exploits.get(me, 0) + 1
    task = w.build(cfg.seed + step, cfg.batch_size)  # new data order after a restore
    model = task.model
    task.steps = cfg.steps  # the whole run's, as bench gives a scheduled method (reste, biper)
    opt, method = build_training(cfg.optimizer, cfg.hparams, task)  # + SAF/MESA, if any
    to_train_point(opt, cfg.optimizer)  # checkpoints are written at the training point
    if state is not None:
        model.load_state_dict(state["model"])
        if method is not None and state.get("method") is not None:
            method.load_state_dict(state["method"])
        # the donor's moments, this trial's (possibly mutated) hyperparameters: each group keeps
        # what the constructor just gave it (e.g. Muon's fallback group gets adamw_lr as "lr")
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for g, f in zip(opt.param_groups, fresh):
            g.update(f)
    model.train()
    needs_closure = info(cfg.optimizer).needs_closure
    total, interval = job["steps"], job["interval"]
    while step < total:
        diverged, end = False, step + min(interval, total - step)
        while step < end:
            x, y = next(task.batches)
            try:
                train_step(model, task.loss_fn, opt, x, y, needs_closure, method)
            except NonFiniteGradientError:  # refused (nothing changed): the member diverged;
                diverged, step = True, end  # the worst score, then it ends (as a NaN loss)
                break
            step += 1
        if diverged:
            res = {"eval_loss": math.inf, "metric": math.nan}
        else:
            with at_eval_point(opt, cfg.optimizer):  # Schedule-Free: evaluated at x
                res = task.evaluate(model)
        ok = math.isfinite(res["eval_loss"]) and math.isfinite(res["metric"])
        bad = -math.inf if w.metric_mode == "max" else math.inf
        metrics = {
            "metric": float(res["metric"]) if ok else bad,
            "eval_loss": float(res["eval_loss"]) if ok else math.inf,
            "step": step,
            "exploits": exploits.get(me, 0),
            "lineage": ",".join(lineage),
            # what this member's optimizer was built with; after an exploit its groups were
            # given exactly these (the donor's state, not its hyperparameters)
            "hparams": json.dumps(
                {
                    k: opt.defaults[k] if k in opt.defaults else v
                    for k, v in cfg.hparams.items()
                    if k in opt.defaults or k in info(cfg.optimizer).method_defaults
                },
                sort_keys=True,
                default=str,
            ),
        }
        with tempfile.TemporaryDirectory() as d:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "method": None if method is None else method.state_dict(),
                    "step": step,
                    "trial_id": me,
                    "lineage": lineage,
                    "exploits": exploits,
                },
                Path(d) / "state.pt",
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        if not ok:
            return


def pbt(
    workload: str,
    optimizer: str,
    *,
    population: int = 4,
    steps: int | None = None,
    interval: int | None = None,
    search_space: Any = None,
    seed: int = 0,
    out_dir: str | Path = "results/pbt",
    name: str | None = None,
    num_cpus: int | None = None,
    quantile_fraction: float = 0.25,
    resample_probability: float = 0.25,
    perturbation_factors: tuple[float, float] = (1.2, 0.8),
    synch: bool = False,
    verbose: int = 0,
) -> PBTResult:
    """Run PBT on a new local Ray instance (``ray.init(address="local", num_cpus=...)``: never
    a cluster that ``RAY_ADDRESS`` or an earlier ``ray start`` recorded) or, when Ray is already
    initialized, on the cluster it is connected to.

    ``num_cpus`` (logical, default ``population``) should let the whole population run at
    once: PBT otherwise pauses members to let others catch up, restarting their workers.

    ``steps``: training steps per member (default: the workload's); ``interval``: steps
    between evaluations/perturbations (default: the workload's ``eval_every``). Checkpoints and
    Ray's logs go under ``out_dir/name``. ``ValueError`` on bad input or missing Ray."""
    from .runner import _check_int
    from .tune import prepare

    _check_int("population", population, 2)
    if not (0 < quantile_fraction <= 0.5):
        raise ValueError(f"quantile_fraction must be in (0, 0.5], got {quantile_fraction!r}")
    if not (0 <= resample_probability <= 1):
        raise ValueError(f"resample_probability must be in [0, 1], got {resample_probability!r}")
    spec = prepare(
        workload,
        optimizer,
        1,
        search_space=search_space,
        storage=None,  # validate only: PBT keeps its state in Ray's checkpoints, not a study
        seed=seed,
        steps=steps,
        eval_every=interval,
    )
    w = _wl.get(spec.workload)
    total = spec.run_kwargs["steps"]
    if total is None:
        raise ValueError("PBT needs a step budget (steps)")
    every = spec.run_kwargs["eval_every"]
    ray = require_ray()
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    def dist(p: Any) -> Any:
        s = p.spec
        if p.type == "float":
            return (tune.loguniform if s.get("log") else tune.uniform)(s["low"], s["high"])
        if p.type == "int":
            return tune.randint(s["low"], s["high"] + 1)
        if p.type == "categorical":
            return tune.choice(s["choices"])
        return s["value"]

    mutations = {n: dist(p) for n, p in spec.space.items() if p.type != "fixed"}
    if not mutations:
        raise ValueError("search space has nothing to mutate (only fixed values)")
    mode = "max" if w.metric_mode == "max" else "min"
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration",
        metric="metric",
        mode=mode,
        perturbation_interval=1,
        hyperparam_mutations=mutations,
        quantile_fraction=quantile_fraction,
        resample_probability=resample_probability,
        perturbation_factors=perturbation_factors,
        custom_explore_fn=lambda c: _clip(spec.space, c),
        synch=synch,
    )
    from .space import space_to_dict

    job = {
        "workload": spec.workload,
        "optimizer": spec.optimizer,
        "space": space_to_dict(spec.space),
        "base_hparams": spec.base_hparams,
        "seed": seed,
        "steps": total,
        "interval": every,
    }
    param_space = {"_job": job, **{n: dist(p) for n, p in spec.space.items()}}
    out = Path(out_dir).resolve()
    name = name or f"{spec.workload}-{spec.optimizer.replace(':', '_')}"
    started = False
    if not ray.is_initialized():
        import basin

        src = str(Path(basin.__file__).resolve().parents[1])
        pp = os.environ.get("PYTHONPATH", "")
        ray.init(
            address="local",
            num_cpus=num_cpus or population,
            include_dashboard=False,
            log_to_driver=verbose > 0,
            logging_level="ERROR",
            runtime_env={"env_vars": {"PYTHONPATH": src + (os.pathsep + pp if pp else "")}},
        )
        started = True
    try:
        from ray.tune.search import BasicVariantGenerator

        own = w if w.family == "own" else None
        trainable = tune.with_parameters(_trainable, workload=own)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space=param_space,
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                num_samples=population,
                search_alg=BasicVariantGenerator(random_state=seed),
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(out),
                verbose=verbose,
                # stopping at the last evaluation keeps PBT from exploiting there (the member
                # would end with a configuration it never trained with)
                stop={"training_iteration": -(-total // every)},
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
            ),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    trials = []
    for r in grid:  # type: ignore[attr-defined]  # a ResultGrid iterates its results
        m = r.metrics or {}
        df = _history(r)
        first = json.loads(df["hparams"].iloc[0]) if len(df) else {}
        first_step = int(df["step"].iloc[0]) if len(df) else None
        trials.append(
            {
                "trial_id": m.get("trial_id"),
                "config": {k: v for k, v in (r.config or {}).items() if k != "_job"},
                "hparams": json.loads(m.get("hparams", "{}")),
                "metric": m.get("metric"),
                "eval_loss": m.get("eval_loss"),
                "step": m.get("step"),
                "exploits": int(m.get("exploits", 0)),
                "lineage": [x for x in str(m.get("lineage", "")).split(",") if x],
                "first_hparams": first,
                "first_step": first_step,
                "config_hparams": json.loads(
                    json.dumps(
                        spec.hparams(
                            {
                                n: p.value_of(v)
                                for n, v in (r.config or {}).items()
                                if (p := spec.space.get(n)) is not None
                            }
                        ),
                        default=str,
                    )
                ),
                "error": None if r.error is None else str(r.error).splitlines()[0],
            }
        )
    done = [t for t in trials if t["metric"] is not None and math.isfinite(t["metric"])]
    best = (max if mode == "max" else min)(done, key=lambda t: t["metric"]) if done else None
    result = PBTResult(
        workload=spec.workload,
        optimizer=spec.optimizer,
        mode=mode,
        best_metric=None if best is None else best["metric"],
        best_hparams={} if best is None else best["hparams"],
        trials=trials,
        path=str(out / name),
    )
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "basin_pbt.json").write_text(
        json.dumps(result.__dict__, indent=1, sort_keys=True, default=str)
    )
    return result
