"""Hyperparameter search with Optuna: resumable, prunable studies over basin workloads.

:func:`tune` runs an Optuna study (TPE by default; random and quasi-random Halton available)
over a search space (:mod:`basin.bench.space`) for one workload and optimizer. Each trial is
one :func:`basin.bench.runner.run`; every evaluation is reported to the trial, so the median
pruner can stop unpromising trials early. The objective is the workload's metric (or the
evaluation loss) at the end of the run; a run that diverges is recorded as pruned (Optuna's
samplers treat it as worse than every finished trial) with ``user_attrs["status"] =
"diverged"``.

Storage is any SQLAlchemy URL Optuna accepts: by default the SQLite file that ``basin bench``
uses, or PostgreSQL for several workers running the same command. Rerunning the same command
resumes the study until it holds ``n_trials`` finished (complete or pruned) trials. A worker
killed mid-trial (even by SIGKILL) loses no finished trial: its running trial is marked
failed and queued again with the same parameters, either at once (same host, process gone)
or, for other hosts, once its heartbeat is older than the grace period.

Reference: Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework",
KDD 2019, arXiv:1907.10902.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import workloads as _wl
from .runner import _check_int, make_config, run
from .space import Param, _accepted, default_space, load_space, space_to_dict
from .store import DEFAULT_STORAGE

__all__ = [
    "SAMPLERS",
    "TuneResult",
    "TuneSpec",
    "prepare",
    "study_summaries",
    "tune",
]

SAMPLERS = ("tpe", "random", "qmc")
PRUNERS = ("median", "none")
OBJECTIVES = ("metric", "eval_loss")
HEARTBEAT_INTERVAL = 10
GRACE_PERIOD = 30
MAX_RETRY = 3


@dataclass
class TuneSpec:
    """A validated tuning job (everything checked, nothing stored yet)."""

    workload: str
    optimizer: str
    space: dict[str, Param]
    n_trials: int
    sampler: str
    pruner: str
    objective: str
    direction: str
    storage: str
    study_name: str
    seed: int
    run_kwargs: dict[str, Any]
    base_hparams: dict[str, Any]
    workload_fingerprint: str = ""

    def fingerprint(self) -> dict[str, Any]:
        """What a study must agree on to be resumed by this spec."""
        return {
            "workload": self.workload,
            "workload_fingerprint": self.workload_fingerprint,
            "optimizer": self.optimizer,
            "objective": self.objective,
            "space": space_to_dict(self.space),
            "run": {k: self.run_kwargs[k] for k in sorted(self.run_kwargs)},
        }

    def hparams(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Optimizer hyperparameters for the space values ``{name: value}``."""
        hp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.base_hparams.items()}
        for name, p in self.space.items():
            if name not in values:
                continue
            if p.index is None:
                hp[p.base] = values[name]
            else:
                hp[p.base][p.index] = values[name]
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in hp.items()}


@dataclass
class TuneResult:
    study_name: str
    storage: str
    direction: str
    n_complete: int
    n_pruned: int
    n_failed: int
    n_new: int
    best_value: float | None
    best_params: dict[str, Any]
    best_hparams: dict[str, Any]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:  # pragma: no cover - optuna is a dependency of tuning
        raise ValueError("basin tune needs optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def prepare(
    workload: str | Any,
    optimizer: str,
    n_trials: int,
    *,
    sampler: str = "tpe",
    pruner: str = "median",
    search_space: str | Path | Mapping[str, Any] | None = None,
    storage: str = DEFAULT_STORAGE,
    study_name: str | None = None,
    seed: int = 0,
    objective: str = "metric",
    **run_kwargs: Any,
) -> TuneSpec:
    """Validate a tuning job; ``ValueError`` with one clear line on any mistake.

    ``run_kwargs`` go to :func:`basin.bench.runner.make_config` (``steps``, ``time_budget``,
    ``batch_size``, ``schedule``, ``eval_every``)."""
    from basin.optim import resolve

    from .space import parse_space

    w = _wl.get(workload)
    optimizer = resolve(optimizer)
    _check_int("trials", n_trials, 1)
    _check_int("seed", seed, 0)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (use {', '.join(SAMPLERS)})")
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r} (use {', '.join(PRUNERS)})")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (use {', '.join(OBJECTIVES)})")
    if search_space is None:
        space = default_space(optimizer)
    elif isinstance(search_space, Mapping):
        space = parse_space(search_space, optimizer)
    else:
        space = load_space(search_space, optimizer)
    _, sig_defaults = _accepted(optimizer)
    base = _wl.default_hparams(w, optimizer)
    for p in space.values():
        if p.index is None:
            continue
        v = base.get(p.base, sig_defaults.get(p.base))
        if not isinstance(v, (tuple, list)) or p.index >= len(v):
            n = len(v) if isinstance(v, (tuple, list)) else 0
            raise ValueError(
                f"search space: parameter {p.name!r}: {p.base!r} of {optimizer} has "
                f"{n or 'no'} element(s)" + (f" (default {v!r})" if v is not None else "")
            )
        base[p.base] = tuple(v)
    allowed = {"steps", "time_budget", "batch_size", "schedule", "eval_every"}
    unknown = set(run_kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
    run_kwargs = {k: v for k, v in run_kwargs.items() if v is not None}
    cfg = make_config(w, optimizer, base, seed=seed, **run_kwargs)
    run_kwargs = {
        "steps": cfg.steps,
        "time_budget": cfg.time_budget,
        "batch_size": cfg.batch_size,
        "schedule": cfg.schedule,
        "eval_every": cfg.eval_every,
    }
    spec = TuneSpec(
        workload=w.name,
        optimizer=optimizer,
        space=space,
        n_trials=n_trials,
        sampler=sampler,
        pruner=pruner,
        objective=objective,
        direction=("maximize" if w.metric_mode == "max" else "minimize")
        if objective == "metric"
        else "minimize",
        storage=storage,
        # your own workloads carry their fingerprint in the default name: editing the model or
        # the data starts a new study instead of refusing the old one
        study_name=study_name
        or (
            f"{w.name}-{cfg.workload_fingerprint[:8]}-{optimizer}"
            if w.family == "own"
            else f"{w.name}-{optimizer}"
        ),
        seed=seed,
        run_kwargs=run_kwargs,
        base_hparams=dict(cfg.hparams),
        workload_fingerprint=cfg.workload_fingerprint,
    )
    # every end of every range must make a valid optimizer (names, ranges) before we start
    for name, p in space.items():
        for v in p.extremes():
            try:
                make_config(w, optimizer, spec.hparams({name: v}), seed=seed, **run_kwargs)
            except ValueError as exc:
                raise ValueError(f"search space: parameter {name!r} = {v!r}: {exc}") from None
    _check_storage_url(storage)
    return spec


def _check_storage_url(url: str) -> None:
    """Reject unusable storage URLs before anything is written."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"storage URL {url!r} is not a URL; use sqlite:///path.db or "
            "postgresql://user:pass@host/db"
        )
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
    except Exception as exc:  # noqa: BLE001 -- sqlalchemy raises several types
        raise ValueError(f"cannot parse storage URL {url!r}: {exc}") from None
    if u.get_backend_name() == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:"):
            raise ValueError(
                f"storage {url!r} is in memory; a study must be stored in a file to resume"
            )
        p = Path(db)
        if p.is_dir():
            raise ValueError(f"storage {url!r} is a directory, not a database file")
        if p.exists():
            try:
                con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
                con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                con.close()
            except sqlite3.Error as exc:
                raise ValueError(f"cannot open storage {url!r}: {exc}") from None


def _open_storage(spec: TuneSpec, heartbeat: int, grace: int) -> Any:
    optuna = _optuna()
    url = spec.storage
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database:
        try:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create storage {url!r}: {exc.strerror}") from None
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=MAX_RETRY
            ),
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 -- driver missing, unreachable server, bad file
        msg = " ".join(str(exc).split())
        if len(msg) > 300:
            msg = msg[:300] + "..."
        raise ValueError(f"cannot open storage {url!r}: {type(exc).__name__}: {msg}") from None


def _make_sampler(spec: TuneSpec, offset: int) -> Any:
    optuna = _optuna()
    seed = spec.seed + offset  # a resumed study must not replay the same random draws
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, spec.n_trials))
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.QMCSampler(
        qmc_type="halton",
        scramble=True,
        seed=spec.seed,  # the sequence position comes from the study, so keep one seed
        independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        warn_independent_sampling=False,
        warn_asynchronous_seeding=False,
    )


def _make_pruner(spec: TuneSpec) -> Any:
    optuna = _optuna()
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_orphans(study: Any) -> list[int]:
    """Fail RUNNING trials started on this host by a process that no longer exists, and queue
    them again (the heartbeat does the same for other hosts after the grace period)."""
    optuna = _optuna()
    storage = study._storage
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("basin_host") != host:
            continue
        pid = t.user_attrs.get("basin_pid")
        if not isinstance(pid, int) or pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
    cb = storage.get_heartbeat_stale_trial_callback()
    for tid in failed:
        if cb is not None:
            cb(study, storage.get_trial(tid))
    return [storage.get_trial(tid).number for tid in failed]


def _fingerprint_hash(spec: TuneSpec) -> str:
    blob = json.dumps(spec.fingerprint(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tune(
    spec: TuneSpec,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    on_trial: Callable[[Any, int, int], None] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> TuneResult:
    """Run (or resume) the study of ``spec`` until it holds ``spec.n_trials`` finished trials.

    ``on_trial(frozen_trial, n_finished, n_trials)`` is called after each trial;
    ``progress(step, steps)`` during training (for progress bars); ``on_start()`` once the
    study is open and checked (before the first trial)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    storage = _open_storage(spec, heartbeat_interval, grace_period)
    fp = _fingerprint_hash(spec)
    try:
        existing = optuna.load_study(study_name=spec.study_name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        if existing.direction.name.lower() != spec.direction:
            raise ValueError(
                f"study {spec.study_name!r} in {spec.storage} optimizes in the other direction; "
                "choose another --study-name"
            )
        old = existing.user_attrs.get("basin_fingerprint")
        if old is not None and old != fp:
            raise ValueError(
                f"study {spec.study_name!r} in {spec.storage} was made with a different "
                "workload, optimizer, objective, search space or budget; "
                "choose another --study-name"
            )
    n_before = len(existing.trials) if existing is not None else 0
    study = optuna.create_study(
        study_name=spec.study_name,
        storage=storage,
        sampler=_make_sampler(spec, n_before),
        pruner=_make_pruner(spec),
        direction=spec.direction,
        load_if_exists=True,
    )
    if existing is None:
        study.set_user_attr("basin_fingerprint", fp)
        study.set_user_attr("basin_spec", json.loads(json.dumps(spec.fingerprint(), default=str)))
        study.set_user_attr("workload", spec.workload)
        study.set_user_attr("optimizer", spec.optimizer)
        study.set_user_attr("objective", spec.objective)
    _fail_orphans(study)
    optuna.storages.fail_stale_trials(study)

    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    host, pid = socket.gethostname(), os.getpid()

    def objective(trial: Any) -> float:
        trial.set_user_attr("basin_host", host)
        trial.set_user_attr("basin_pid", pid)
        values = {name: p.sample(trial) for name, p in spec.space.items()}
        hp = spec.hparams(values)
        cfg = make_config(spec.workload, spec.optimizer, hp, seed=spec.seed, **spec.run_kwargs)
        trial.set_user_attr("hparams", json.loads(json.dumps(cfg.hparams, default=str)))

        def report(step: int, m: dict[str, float]) -> None:
            trial.report(float(m[spec.objective]), step)
            if trial.should_prune():
                trial.set_user_attr("status", "pruned")
                raise optuna.TrialPruned(f"pruned at step {step}")

        res = run(cfg, report=report, progress=progress)
        trial.set_user_attr("status", res.status)
        trial.set_user_attr("steps_done", res.steps_done)
        trial.set_user_attr("train_seconds", res.train_seconds)
        trial.set_user_attr("final", {k: v for k, v in res.final.items() if v is not None})
        if res.status == "diverged":
            trial.set_user_attr("diverged_step", res.diverged_step)
            raise optuna.TrialPruned(f"diverged at step {res.diverged_step}")
        value = res.final[spec.objective]
        if value is None or not math.isfinite(value):
            trial.set_user_attr("status", "diverged")
            raise optuna.TrialPruned("no finite objective")
        return float(value)

    def n_finished() -> int:
        return len(study.get_trials(deepcopy=False, states=finished_states))

    def after(st: Any, trial: Any) -> None:
        done = n_finished()
        if on_trial is not None:
            on_trial(trial, done, spec.n_trials)
        if done >= spec.n_trials:
            st.stop()

    if on_start is not None:
        on_start()
    n_new = 0
    while n_finished() < spec.n_trials:
        before = len(study.trials)
        study.optimize(
            objective,
            n_trials=spec.n_trials - n_finished(),
            callbacks=[after],
            gc_after_trial=False,
        )
        n_new += len(study.trials) - before
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return TuneResult(
        study_name=spec.study_name,
        storage=spec.storage,
        direction=spec.direction,
        n_complete=len(complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_new=n_new,
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_hparams={} if best is None else dict(best.user_attrs.get("hparams", {})),
    )


# ------------------------------------------------------------------ report hook


def _has_optuna_tables(url: str) -> bool | None:
    """True/False for SQLite files (read-only check); None for other databases."""
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url if "://" in url else f"sqlite:///{url}")
    except Exception:  # noqa: BLE001
        return False
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database or ""
    if not db or db == ":memory:" or not Path(db).is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'"
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return row is not None


def study_summaries(storage: str) -> list[dict[str, Any]]:
    """Summaries of every Optuna study in ``storage`` for the HTML report (``[]`` if none).

    Each: ``name``, ``workload``, ``optimizer``, ``objective``, ``n_trials``, ``states``
    (count per state), ``direction``, ``best_value``, ``best_params``, ``best_hparams``,
    ``history`` (``[number, value]`` of complete trials in order) and ``importance``
    (fANOVA importance of each parameter, seeded; ``{}`` with fewer than 3 complete trials).
    A SQLite file is never modified."""
    url = storage if "://" in storage else f"sqlite:///{storage}"
    if _has_optuna_tables(url) is False:
        return []
    optuna = _optuna()
    from optuna.trial import TrialState

    try:
        st = optuna.storages.RDBStorage(url, skip_table_creation=True)
        summaries = optuna.get_all_study_summaries(storage=st)
    except Exception:  # noqa: BLE001 -- not an Optuna database: no studies to show
        return []
    out = []
    for s in summaries:
        study = optuna.load_study(study_name=s.study_name, storage=st)
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        states: dict[str, int] = {}
        for t in trials:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        importance: dict[str, float] = {}
        if len(done) >= 3:
            try:
                ev = optuna.importance.FanovaImportanceEvaluator(seed=0)
                importance = {
                    k: float(v)
                    for k, v in optuna.importance.get_param_importances(study, evaluator=ev).items()
                }
            except Exception:  # noqa: BLE001 -- e.g. a parameter that never varied
                importance = {}
        best = study.best_trial if done else None
        ua = study.user_attrs
        out.append(
            {
                "name": s.study_name,
                "workload": ua.get("workload"),
                "optimizer": ua.get("optimizer"),
                "objective": ua.get("objective"),
                "n_trials": len(trials),
                "states": states,
                "direction": study.direction.name.lower(),
                "best_value": None if best is None else best.value,
                "best_params": {} if best is None else dict(best.params),
                "best_hparams": {} if best is None else best.user_attrs.get("hparams", {}),
                "history": [[t.number, t.value] for t in sorted(done, key=lambda t: t.number)],
                "importance": importance,
            }
        )
    return out
