"""basin.bench: optimizer benchmark harness.

Workloads built offline from a seed (:mod:`basin.bench.workloads`), one training run -> one
record (:mod:`basin.bench.runner`), SQLite storage that lets a killed sweep resume
(:mod:`basin.bench.store`), the same sweep as Ray tasks (:mod:`basin.bench.ray_sweep`),
learning-rate schedules and batch-size scaling rules (:mod:`basin.bench.schedules`; Step Law's
learning rate and batch size, :mod:`basin.bench.steplaw`), performance profiles
(:mod:`basin.bench.profiles`) and the HTML/JSON/CSV report (:mod:`basin.bench.report`).

    from basin.bench import make_config, run
    result = run(make_config("mnist1d_mlp", "adabelief", seed=0))

Your own model: :meth:`Workload.from_tensors` / :meth:`Workload.from_loaders`
(:mod:`basin.bench.workloads.own`); a tuned comparison: :mod:`basin.bench.compare`.
"""

from __future__ import annotations

from .ray_sweep import sweep_ray
from .runner import DEFAULT_OPTIMIZERS, RunConfig, RunResult, configs_for, make_config, run, sweep
from .steplaw import non_embedding_params, steplaw_batch_size, steplaw_lr
from .store import DEFAULT_STORAGE, Store
from .workloads import Workload

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "DEFAULT_STORAGE",
    "RunConfig",
    "RunResult",
    "Store",
    "Workload",
    "configs_for",
    "make_config",
    "non_embedding_params",
    "run",
    "steplaw_batch_size",
    "steplaw_lr",
    "sweep",
    "sweep_ray",
]
