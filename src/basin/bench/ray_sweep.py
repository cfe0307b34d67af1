"""``basin bench`` sweeps fanned out over a Ray cluster, on the same store as the sequential one.

:func:`sweep_ray` is :func:`basin.bench.runner.sweep` with the training done by Ray tasks: the
driver (the process calling it) alone touches the store. It claims a run
(:meth:`basin.bench.store.Store.claim`, renewed while the run trains), submits it as a task
that trains it with :func:`basin.bench.runner.run` and returns the record, and stores each
record as soon as its task ends. So the semantics are the sequential sweep's: runs already
stored are skipped, a run a live worker holds is left to it, a killed driver's claims are
taken over by the next sweep (at once on the same host, where its process is gone; after the
lease elsewhere), and a rerun resumes where the killed one stopped. A run is the same
computation wherever it trains (same configuration and seed, ``threads`` torch threads), so
its record holds the same losses and metrics as the sequential sweep's.

At most as many runs are claimed at once as the cluster has CPUs for (``threads`` each), so
other drivers or ``basin bench`` workers on the same store share the rest of the sweep.
Ray: Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI 2018,
arXiv:1712.05889.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import workloads as _wl
from .runner import RunConfig, RunResult, _check_int, _failed, _resolved, run

__all__ = ["require_ray", "sweep_ray"]


def _train(cfg: RunConfig, workload: Any, threads: int) -> dict[str, Any]:
    """The Ray task: one run, its record as a dict (the trained model stays behind)."""
    import torch

    torch.set_num_threads(threads)
    if workload is not None:  # a user's workload travels as an object; built-in ones by name
        _wl.get(workload)
    try:
        return run(cfg).to_dict()
    except Exception as exc:  # noqa: BLE001 -- recorded as failed, as the sequential sweep does
        return _failed(cfg, exc).to_dict()


def require_ray() -> Any:
    """Import Ray or raise ``ValueError`` with the install line."""
    try:
        import ray
    except ImportError:
        raise ValueError("sweeps over Ray need Ray: pip install 'basin-optim[ray]'") from None
    return ray


def _init(ray: Any, address: str, num_cpus: int | None) -> bool:
    """Start a local Ray or connect to ``address``; False if Ray was already initialised."""
    if ray.is_initialized():
        return False
    import basin

    src = str(Path(basin.__file__).resolve().parents[1])
    pp = os.environ.get("PYTHONPATH", "")
    kw: dict[str, Any] = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        # the workers import the basin this driver runs (nodes elsewhere need it installed)
        runtime_env={"env_vars": {"PYTHONPATH": src + (os.pathsep + pp if pp else "")}},
    )
    try:
        if address == "local":
            # "local" explicitly: address=None would join the cluster that RAY_ADDRESS or the
            # last `ray start` on this host recorded (even a dead one)
            ray.init(address="local", num_cpus=num_cpus, **kw)
        else:
            kw.pop("include_dashboard")
            ray.init(address=address, **kw)
    except Exception as exc:  # noqa: BLE001 -- no cluster there, bad address
        raise ValueError(f"cannot start or reach Ray at {address!r}: {exc}") from None
    return True


def sweep_ray(
    configs: Sequence[RunConfig],
    store: Any,
    *,
    address: str = "local",
    num_cpus: int | None = None,
    threads: int = 1,
    progress: Any = None,
    on_result: Callable[[RunResult | None, RunConfig], None] | None = None,
    group: str = "bench",
    lease: float | None = None,
    poll: float = 0.5,
) -> list[RunResult]:
    """Run every configuration not already stored as a Ray task; store each result as soon as
    it finishes. Returns the runs this driver stored (see the module docstring).

    ``address``: ``"local"`` starts a Ray of ``num_cpus`` logical CPUs (default: all) for the
    sweep; ``"auto"`` or ``"host:port"`` / ``"ray://host:10001"`` joins a running cluster
    (``num_cpus`` must then be None). An initialised Ray is used as it is and left running.
    ``threads``: torch threads (and Ray CPUs) of each run. ``progress``, ``on_result``,
    ``group``, ``lease`` and ``poll`` as for :func:`basin.bench.runner.sweep`; ``progress``
    is called as each run ends. ``ValueError`` on bad input, missing Ray or no cluster."""
    from .store import LEASE

    if not isinstance(address, str) or not address:
        raise ValueError(f"Ray address must be 'local', 'auto' or host:port, got {address!r}")
    _check_int("threads", threads, 1)
    if num_cpus is not None:
        _check_int("num_cpus", num_cpus, 1)
        if address != "local":
            raise ValueError("num_cpus sizes a local Ray; a cluster at an address has its own")
    lease = LEASE if lease is None else lease
    ray = require_ray()
    todo = [c for c in configs if not store.has(c.key())]
    if not todo:
        if progress is not None:
            progress(len(configs), len(configs), "done", 0, None)
        return []
    started = _init(ray, address, num_cpus)
    try:
        return _fan_out(ray, configs, todo, store, threads, progress, on_result, group, lease,
                        poll)  # fmt: skip
    finally:
        if started:
            ray.shutdown()


def _fan_out(
    ray: Any,
    configs: Sequence[RunConfig],
    todo: list[RunConfig],
    store: Any,
    threads: int,
    progress: Any,
    on_result: Callable[[RunResult | None, RunConfig], None] | None,
    group: str,
    lease: float,
    poll: float,
) -> list[RunResult]:
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if cpus < threads:
        raise ValueError(f"the Ray cluster has {cpus:g} CPU(s), fewer than --threads {threads}")
    slots = int(cpus // threads)
    task = ray.remote(num_cpus=threads, max_retries=0)(_train)
    total, done = len(configs), len(configs) - len(todo)
    begun = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results: list[RunResult] = []
    running: dict[Any, tuple[RunConfig, contextlib.ExitStack]] = {}
    pending = list(todo)

    def own(cfg: RunConfig) -> Any:
        w = _wl.get(cfg.workload)
        return w if w.family == "own" else None

    try:
        while pending or running:
            waiting = []
            for cfg in pending:
                if len(running) >= slots:
                    waiting.append(cfg)
                elif store.claim(cfg.key(), lease=lease):
                    keep = contextlib.ExitStack()
                    keep.enter_context(store.keep_alive(cfg.key(), lease=lease))
                    running[task.remote(cfg, own(cfg), threads)] = (cfg, keep)
                elif not _resolved(store, cfg, begun):
                    waiting.append(cfg)  # a live worker trains it
                else:
                    done += 1
            pending = waiting
            if not running:
                time.sleep(poll)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=poll)
            for ref in ready:
                cfg, keep = running.pop(ref)
                try:
                    res = RunResult.from_dict(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 -- the task's worker died (OOM, node lost)
                    res = _failed(cfg, exc)
                finally:
                    keep.close()
                if store.put(res, group=group):  # False: another worker stored it first
                    results.append(res)
                    if on_result is not None:
                        on_result(res, cfg)
                done += 1
                if progress is not None:
                    desc = f"{cfg.workload} {cfg.optimizer} seed={cfg.seed}"
                    progress(done, total, desc, 0, None)
    except BaseException:
        for ref, (cfg, keep) in running.items():  # Ctrl-C: free the claims for another worker
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
            keep.close()
            with contextlib.suppress(ValueError):
                store.release(cfg.key())
        raise
    if progress is not None:
        progress(total, total, "done", 0, None)
    return results
