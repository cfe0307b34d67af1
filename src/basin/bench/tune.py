"""Hyperparameter search with Optuna: resumable, prunable studies over basin workloads.

:func:`tune` runs an Optuna study (TPE by default; random and quasi-random Halton available)
over a search space (:mod:`basin.bench.space`) for one workload and optimizer. Each trial is
one :func:`basin.bench.runner.run`; every evaluation is reported to the trial, so the median
pruner can stop unpromising trials early. The objective is the workload's metric (or the
evaluation loss) at the end of the run; a run that diverges is recorded as pruned (Optuna's
samplers treat it as worse than every finished trial) with ``user_attrs["status"] =
"diverged"``.

Storage is any SQLAlchemy URL Optuna accepts: by default the SQLite file that ``basin bench``
uses (several workers on one machine), or PostgreSQL for workers on several machines; workers
draw distinct sampler seeds and stop at the requested total. Rerunning the same command
resumes the study until it holds ``n_trials`` finished (complete or pruned) trials. A worker
killed mid-trial (even by SIGKILL) loses no finished trial: its running trial is marked
failed and queued again with the same parameters, either at once (same host, process gone)
or, for other hosts, once its heartbeat is older than the grace period.

Reference: Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework",
KDD 2019, arXiv:1907.10902.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interrupts
from . import workloads as _wl
from .runner import _check_int, make_config, run
from .space import Param, _accepted, default_space, load_space, space_to_dict
from .store import DEFAULT_STORAGE, owner_gone, pid_alive

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
CONNECT_TIMEOUT = 10  # seconds to reach a database server


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
    storage: str | None  # None: prepared to be validated only, not tuned (see prepare)
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
        return merge_hparams(self.base_hparams, self.space, values)


def merge_hparams(
    base: Mapping[str, Any], space: Mapping[str, Param], values: Mapping[str, Any]
) -> dict[str, Any]:
    """``base`` hyperparameters with the space values ``{name: value}`` written in (an indexed
    parameter such as ``betas[1]`` into its element); sequences come back as tuples and
    ``base`` is left unchanged. Names of ``space`` missing from ``values`` keep their base."""
    hp = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in base.items()}
    for name, p in space.items():
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
    # tune() asks and tells itself and beats the heartbeat in its own thread (_run_trial)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    return optuna


def prepare(
    workload: str | Any,
    optimizer: str,
    n_trials: int,
    *,
    sampler: str = "tpe",
    pruner: str = "median",
    search_space: str | Path | Mapping[str, Any] | None = None,
    storage: str | None = DEFAULT_STORAGE,
    study_name: str | None = None,
    seed: int = 0,
    objective: str = "metric",
    **run_kwargs: Any,
) -> TuneSpec:
    """Validate a tuning job; ``ValueError`` with one clear line on any mistake.

    ``run_kwargs`` go to :func:`basin.bench.runner.make_config` (``steps``, ``time_budget``,
    ``batch_size``, ``schedule``, ``eval_every``). ``storage=None`` validates the job without a
    study (what :func:`basin.bench.pbt.pbt` needs); :func:`tune` refuses such a spec."""
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
    if storage is not None:
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
    try:
        dialect = u.get_dialect()
    except Exception:  # noqa: BLE001 -- NoSuchModuleError: no such database or driver
        raise ValueError(
            f"storage {url!r}: SQLAlchemy knows no database driver {u.drivername!r}"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = (
            "; pip install 'basin-optim[postgres]' and use postgresql+psycopg://..."
            if u.get_backend_name() == "postgresql"
            else ""
        )
        raise ValueError(
            f"storage {url!r} needs the database driver {exc.name or u.drivername!r}, "
            f"which is not installed{hint}"
        ) from None
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


# ------------------------------------------------------------------ storage


def _optuna_keys() -> dict[str, set[str]]:
    """Optuna's tables and their key columns (primary and foreign keys, which every schema
    version has), read from Optuna's own table definitions."""
    try:
        from optuna.storages._rdb import models

        keys = {
            name: {c.name for c in t.primary_key.columns}
            | {fk.parent.name for fk in t.foreign_keys}
            for name, t in models.BaseModel.metadata.tables.items()
        }
        keys["studies"] = keys.get("studies", set()) | {"study_name"}
    except Exception:  # noqa: BLE001 -- another Optuna layout: check the two central tables
        keys = {"studies": {"study_id", "study_name"}, "trials": {"trial_id", "study_id"}}
    keys["alembic_version"] = {"version_num"}
    return keys


_INIT_ATTEMPTS = 40  # storage initialisation races lost before giving up (about 10 s)


def _check_sqlite_file(url: str, path: str) -> None:
    """Refuse (read-only, before anything is written) a SQLite file that is not a database or
    holds a table named like one of Optuna's that is not Optuna's (its key columns differ).
    Some of Optuna's tables without the others is fine: another worker is creating them."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return
    keys = _optuna_keys()
    problem = None
    try:
        con = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=60)
        try:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            for name in sorted(tables & set(keys)):
                cols = {r[1] for r in con.execute(f'PRAGMA table_info("{name}")')}
                if not keys[name] <= cols:
                    problem = f"has a table {name!r} that is not Optuna's"
                    break
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise ValueError(f"cannot open storage {url!r}: {exc}") from None
    if problem is not None:
        raise ValueError(
            f"storage {url!r} is not an Optuna database: it {problem}; "
            "use another file for --storage"
        )


def _init_race(exc: BaseException) -> bool:
    """Whether a storage error is one that several processes creating the same tables at
    once produce (another process got there first), so that trying again succeeds."""
    from sqlalchemy import exc as sa_exc

    if not isinstance(
        exc, (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError)
    ):
        return False
    msg = str(exc).lower()
    return any(s in msg for s in ("already exists", "unique", "duplicate", "locked"))


def _retry_init(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (an idempotent schema set-up) again while it loses a creation race."""
    for attempt in range(_INIT_ATTEMPTS):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised unless it is a lost race
            if attempt == _INIT_ATTEMPTS - 1 or not _init_race(exc):
                raise
            time.sleep(random.uniform(0.05, 0.4))  # noqa: S311 -- back-off jitter
    raise AssertionError("unreachable")  # pragma: no cover


def _open_storage(spec: TuneSpec, heartbeat: int, grace: int) -> Any:
    optuna = _optuna()
    url = spec.storage
    assert url is not None  # prepare(storage=None) validates only and never opens one
    from sqlalchemy.engine import make_url

    u = make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() == "sqlite" and u.database:
        _check_sqlite_file(url, u.database)
        try:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create storage {url!r}: {exc.strerror}") from None
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"connect_args": _connect_args(u)}
    try:
        return _retry_init(
            lambda: optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY
                ),
                **kwargs,
            )
        )
    except Exception as exc:  # noqa: BLE001 -- driver missing, unreachable server, bad file
        raise ValueError(f"cannot open storage {url!r}: {_one_line(exc)}") from None


def _connect_args(u: Any) -> dict[str, Any]:
    """A server that does not answer fails in seconds, not after the TCP timeout (libpq's
    ``connect_timeout``, unless the URL sets one)."""
    if u.get_backend_name() != "postgresql" or "connect_timeout" in u.query:
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT}


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(exc).__name__}: {msg}"


class _Mismatch(Exception):
    """The stored fingerprint is another one (raised to roll the transaction back)."""


class _Guard:
    """basin's own two tables next to Optuna's, in the same database (SQLAlchemy Core):

    * ``basin_tune_studies``: each study's fingerprint, written before the Optuna study is
      created and compared in the same transaction, so a study is never without its guard
      (a kill between the two steps leaves a guard and no study, or a guard and an empty
      study); ``sessions`` counts the workers that opened it (each one's sampler seed).
    * ``basin_tune_locks``: short leases (owner host and pid) that serialise "count the
      trials and start one" between workers, so they stop at the requested total.

    On SQLite every transaction is ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite
    recipe): the first statement already holds the write lock, so read-then-write is atomic;
    on other databases the rows are read ``FOR UPDATE``."""

    LOCK_LEASE = 15.0

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        sqlite = url.lower().startswith("sqlite")
        self.engine = sa.create_engine(
            url,
            connect_args={"timeout": 60} if sqlite else _connect_args(sa.engine.make_url(url)),
            poolclass=sa.pool.NullPool,
        )
        if sqlite:

            @sa.event.listens_for(self.engine, "connect")
            def _connect(dbapi_conn: Any, _rec: Any) -> None:
                dbapi_conn.isolation_level = None  # let the "begin" event emit BEGIN

            @sa.event.listens_for(self.engine, "begin")
            def _begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        meta = sa.MetaData()
        self.studies = sa.Table(
            "basin_tune_studies",
            meta,
            sa.Column("study_name", sa.String(512), primary_key=True),
            sa.Column("fingerprint", sa.String(64), nullable=False),
            sa.Column("sessions", sa.Integer, nullable=False),
        )
        self.locks = sa.Table(
            "basin_tune_locks",
            meta,
            sa.Column("name", sa.String(600), primary_key=True),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer, nullable=False),
            sa.Column("expires", sa.Float, nullable=False),
        )
        self.meta = meta
        self.host, self.pid = socket.gethostname(), os.getpid()

    def setup(self) -> None:
        _retry_init(lambda: self.meta.create_all(self.engine))

    def bind(self, name: str, fp: str, old_fp: str | None, unguarded: bool) -> tuple[str, int]:
        """Record (or read) the study's fingerprint and count this session, atomically:
        ``(fingerprint of the study, index of this session)``. ``old_fp``: the fingerprint a
        study made before the guard table existed keeps in its user attributes; ``unguarded``:
        the study exists with trials and no fingerprint at all (refused)."""
        sa, t = self.sa, self.studies

        def once() -> tuple[str, int]:
            with self.engine.begin() as c:
                row = c.execute(
                    sa.select(t.c.fingerprint, t.c.sessions)
                    .where(t.c.study_name == name)
                    .with_for_update()
                ).first()
                if row is None:
                    if unguarded:
                        return "", -1
                    stored, k = old_fp or fp, 0
                    c.execute(sa.insert(t).values(study_name=name, fingerprint=stored, sessions=1))
                else:
                    stored, k = row.fingerprint, int(row.sessions)
                if stored != fp:
                    raise _Mismatch(stored, k)  # rolls back: a refused worker counts nothing
                if row is not None:
                    c.execute(
                        sa.update(t).where(t.c.study_name == name).values(sessions=t.c.sessions + 1)
                    )
                return stored, k

        try:
            return _retry_init(once)
        except _Mismatch as m:
            return m.args[0], m.args[1]

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold the lease ``name`` for the block; wait while a live worker holds it, take it
        over from a gone one (see :func:`basin.bench.store.owner_gone`)."""
        while not self._try_lock(name):
            with interrupts.allow():
                time.sleep(random.uniform(0.01, 0.05))  # noqa: S311 -- back-off jitter
        try:
            yield
        finally:
            with self.engine.begin() as c:
                c.execute(
                    self.sa.delete(self.locks).where(
                        (self.locks.c.name == name)
                        & (self.locks.c.host == self.host)
                        & (self.locks.c.pid == self.pid)
                    )
                )

    def _try_lock(self, name: str) -> bool:
        sa, t = self.sa, self.locks
        now = time.time()
        try:
            with self.engine.begin() as c:
                row = c.execute(
                    sa.select(t.c.host, t.c.pid, t.c.expires)
                    .where(t.c.name == name)
                    .with_for_update()
                ).first()
                if row is not None and (row.host, row.pid) != (self.host, self.pid):
                    if not owner_gone(row.host, row.pid, row.expires, now):
                        return False
                vals = {"host": self.host, "pid": self.pid, "expires": now + self.LOCK_LEASE}
                if row is None:
                    c.execute(sa.insert(t).values(name=name, **vals))
                else:
                    c.execute(sa.update(t).where(t.c.name == name).values(**vals))
            return True
        except sa.exc.IntegrityError:  # another worker inserted it first
            return False

    def close(self) -> None:
        self.engine.dispose()


def _make_sampler(spec: TuneSpec, session: int, n_before: int) -> Any:
    """The sampler of one worker session. The first session of a new study is seeded with
    ``--seed`` (a rerun of the same command draws the same trials); every other session
    (a resume, or one of several workers) gets its own seed from ``(seed, session, trials)``,
    so workers that start together do not draw the same parameters."""
    optuna = _optuna()
    if session == 0 and n_before == 0:
        seed = spec.seed
    else:
        import numpy as np

        seed = int(np.random.SeedSequence([spec.seed, session, n_before]).generate_state(1)[0])
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(10, spec.n_trials), constant_liar=True
        )
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


_pid_alive = pid_alive


def _fail_and_requeue(study: Any, trial_id: int) -> bool:
    """Mark a running trial failed and queue it again with the same parameters (at most
    ``MAX_RETRY`` times); False if it had finished meanwhile."""
    optuna = _optuna()
    storage = study._storage
    try:
        if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another worker got there first
    cb = storage.get_heartbeat_stale_trial_callback()
    if cb is not None:
        cb(study, storage.get_trial(trial_id))
    return True


def _fail_orphans(study: Any) -> list[int]:
    """Fail RUNNING trials started on this host by a process that no longer exists, and queue
    them again (the heartbeat does the same for other hosts after the grace period).

    Called under the ask lease: a worker asks a trial and records its host and pid under that
    lease, so a RUNNING trial seen without them lost its worker in between (killed before its
    first heartbeat, so no stale heartbeat would ever tell): it is failed and queued too."""
    optuna = _optuna()
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("basin_pid")
        if "basin_host" in t.user_attrs and isinstance(pid, int):
            if t.user_attrs["basin_host"] != host or pid == os.getpid() or pid_alive(pid):
                continue
        if _fail_and_requeue(study, t._trial_id):
            failed.append(t.number)
    return failed


def _fingerprint_hash(spec: TuneSpec) -> str:
    blob = json.dumps(spec.fingerprint(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _refused(spec: TuneSpec, why: str) -> ValueError:
    return ValueError(
        f"study {spec.study_name!r} in {spec.storage} {why}; choose another --study-name"
    )


# storage calls hold Ctrl-C until they finish (training and waits take it at once), so an
# interrupt never leaves a write half-done and the running trial can be re-queued
@interrupts.held
def tune(
    spec: TuneSpec,
    *,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    on_trial: Callable[[Any, int, int], None] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    on_start: Callable[[], None] | None = None,
    poll: float = 1.0,
) -> TuneResult:
    """Run (or resume) the study of ``spec`` until it holds ``spec.n_trials`` finished trials.

    Several workers (processes, hosts) may run the same spec on one storage: each draws its
    own sampler seed, a trial is started only while the finished and running trials number
    fewer than ``spec.n_trials``, and a worker with nothing left to start waits (polling every
    ``poll`` seconds, failing and re-queueing the trials of workers that died) until the
    study holds ``spec.n_trials`` finished trials. Ctrl-C (``KeyboardInterrupt``) marks the
    running trial failed, queues it again with the same parameters and propagates.

    ``on_trial(frozen_trial, n_finished, n_trials)`` is called after each trial of this
    worker; ``progress(step, steps)`` during training (for progress bars); ``on_start()``
    once the study is open and checked (before the first trial)."""
    if spec.storage is None:
        raise ValueError(
            "this tuning job was prepared with storage=None: give prepare a storage URL"
        )
    optuna = _optuna()
    from optuna.trial import TrialState

    storage = _open_storage(spec, heartbeat_interval, grace_period)
    fp = _fingerprint_hash(spec)
    try:
        existing = optuna.load_study(study_name=spec.study_name, storage=storage)
    except KeyError:
        existing = None
    except Exception as exc:  # noqa: BLE001 -- an unreadable database
        raise ValueError(f"cannot read storage {spec.storage!r}: {_one_line(exc)}") from None
    old_fp, n_before = None, 0
    if existing is not None:
        if existing.direction.name.lower() != spec.direction:
            raise _refused(spec, "optimizes in the other direction")
        old_fp = existing.user_attrs.get("basin_fingerprint")
        n_before = len(existing.get_trials(deepcopy=False))
    guard = _Guard(spec.storage)
    try:
        try:
            guard.setup()
            stored, session = guard.bind(
                spec.study_name,
                fp,
                old_fp,
                existing is not None and old_fp is None and n_before > 0,
            )
        except Exception as exc:  # noqa: BLE001
            raise ValueError(
                f"cannot write to storage {spec.storage!r}: {_one_line(exc)}"
            ) from None
        if session < 0:
            raise _refused(
                spec,
                "has trials but no basin fingerprint (made outside basin tune, or by a run "
                "killed while creating it), so its budget and search space are unknown",
            )
        if stored != fp:
            raise _refused(
                spec,
                "was made with a different workload, optimizer, objective, search space or budget",
            )
        study = optuna.create_study(
            study_name=spec.study_name,
            storage=storage,
            sampler=_make_sampler(spec, session, n_before),
            pruner=_make_pruner(spec),
            direction=spec.direction,
            load_if_exists=True,
        )
        if study.user_attrs.get("basin_fingerprint") != fp:  # informative (report, dashboard)
            study.set_user_attr(
                "basin_spec", json.loads(json.dumps(spec.fingerprint(), default=str))
            )
            study.set_user_attr("workload", spec.workload)
            study.set_user_attr("optimizer", spec.optimizer)
            study.set_user_attr("objective", spec.objective)
            study.set_user_attr("basin_fingerprint", fp)
        return _work(
            spec, study, guard, heartbeat_interval, poll, on_trial, progress, on_start, TrialState
        )
    finally:
        guard.close()


def _work(
    spec: TuneSpec,
    study: Any,
    guard: _Guard,
    heartbeat_interval: int,
    poll: float,
    on_trial: Callable[[Any, int, int], None] | None,
    progress: Callable[[int, int | None], None] | None,
    on_start: Callable[[], None] | None,
    TrialState: Any,  # noqa: N803
) -> TuneResult:
    optuna = _optuna()
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    host, pid = socket.gethostname(), os.getpid()
    lock = f"ask:{spec.study_name}"

    def objective(trial: Any) -> float:
        values = {name: p.sample(trial) for name, p in spec.space.items()}
        hp = spec.hparams(values)
        cfg = make_config(spec.workload, spec.optimizer, hp, seed=spec.seed, **spec.run_kwargs)
        trial.set_user_attr("hparams", json.loads(json.dumps(cfg.hparams, default=str)))

        def report(step: int, m: dict[str, float]) -> None:
            with interrupts.hold():
                trial.report(float(m[spec.objective]), step)
                if trial.should_prune():
                    trial.set_user_attr("status", "pruned")
                    raise optuna.TrialPruned(f"pruned at step {step}")

        with interrupts.allow():  # training: Ctrl-C stops it at once
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

    if on_start is not None:
        on_start()
    n_new = 0
    while True:
        trial = None
        with guard.lock(lock):  # count and start under one lease: no worker overshoots
            _fail_orphans(study)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            done = sum(t.state in finished_states for t in trials)
            if done >= spec.n_trials:
                break
            if done + sum(t.state == TrialState.RUNNING for t in trials) < spec.n_trials:
                trial = study.ask()
                trial.set_user_attr("basin_host", host)
                trial.set_user_attr("basin_pid", pid)
                # a first beat before the lease is let go: a trial seen under it has an owner
                # and a heartbeat, so a worker killed from here on is found stale elsewhere
                study._storage.record_heartbeat(trial._trial_id)
        if trial is None:  # the rest is running in other workers
            with interrupts.allow():
                time.sleep(poll)
            continue
        frozen = _run_trial(study, trial, objective, heartbeat_interval, TrialState)
        n_new += frozen.state in finished_states  # not one another worker failed as stale
        if on_trial is not None:
            on_trial(frozen, n_finished(), spec.n_trials)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return TuneResult(
        study_name=spec.study_name,
        storage=str(spec.storage),
        direction=spec.direction,
        n_complete=len(complete),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials),
        n_new=n_new,
        best_value=None if best is None else best.value,
        best_params={} if best is None else dict(best.params),
        best_hparams={} if best is None else dict(best.user_attrs.get("hparams", {})),
    )


def _run_trial(
    study: Any,
    trial: Any,
    objective: Callable[[Any], float],
    every: int,
    TrialState: Any,  # noqa: N803
) -> Any:
    """Run one asked trial (its first heartbeat already written) with a heartbeat thread
    and tell the study how it ended."""
    optuna = _optuna()
    storage = study._storage
    tid = trial._trial_id
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a missed beat; the grace period covers it
                storage.record_heartbeat(tid)

    # the first beat was written when the trial was asked (under the ask lease, in _work)
    hb = threading.Thread(target=beat, name="basin-tune-heartbeat", daemon=True)
    hb.start()
    try:
        try:
            value = objective(trial)
        finally:
            stop.set()
            hb.join()
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        # another worker failed this trial as stale (this one stalled past the grace period,
        # e.g. a paused machine) and queued it again: the retry counts, this one goes on
        return storage.get_trial(tid)
    except KeyboardInterrupt:
        _fail_and_requeue(study, tid)  # Ctrl-C: the same parameters run again next time
        raise
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    return study.tell(trial, value, skip_if_finished=True)


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


def read_studies(storage: str) -> list[tuple[Any, Any]]:
    """``(summary, study)`` of every Optuna study in ``storage``, read without creating or
    changing anything (``[]`` when it holds none or is no Optuna database)."""
    url = storage if "://" in storage else f"sqlite:///{storage}"
    if _has_optuna_tables(url) is False:
        return []
    optuna = _optuna()
    try:
        st = optuna.storages.RDBStorage(url, skip_table_creation=True)
        summaries = optuna.get_all_study_summaries(storage=st)
    except Exception:  # noqa: BLE001 -- not an Optuna database: no studies to show
        return []
    return [(s, optuna.load_study(study_name=s.study_name, storage=st)) for s in summaries]


def study_summaries(storage: str) -> list[dict[str, Any]]:
    """Summaries of every Optuna study in ``storage`` for the HTML report (``[]`` if none).

    Each: ``name``, ``workload``, ``optimizer``, ``objective``, ``n_trials``, ``states``
    (count per state), ``direction``, ``best_value``, ``best_params``, ``best_hparams``,
    ``history`` (``[number, value]`` of complete trials in order) and ``importance``
    (fANOVA importance of each parameter, seeded; ``{}`` with fewer than 3 complete trials).
    A SQLite file is never modified."""
    optuna = _optuna()
    from optuna.trial import TrialState

    out = []
    for s, study in read_studies(storage):
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
