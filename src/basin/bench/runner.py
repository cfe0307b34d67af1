"""One training run -> one result record; and sweeps of runs that resume from a store.

:func:`make_config` resolves and validates a run's full configuration (workload defaults,
per-optimizer default hyperparameters, budget, schedule) so that mistakes surface before
anything runs; :func:`run` trains it and returns a :class:`RunResult`; :func:`sweep` runs many
configurations, skipping those already in the store, storing each finished run at once.

For tuners: ``run(config, report=callback)`` calls ``callback(step, metrics)`` after every
evaluation with ``metrics = {"train_loss", "eval_loss", "metric", "seconds"}``; an exception
raised by the callback (e.g. ``optuna.TrialPruned``) propagates out of :func:`run` unchanged
and nothing is stored.

A run whose training loss (or evaluation loss) becomes NaN or infinite stops and is returned
with ``status="diverged"`` and ``diverged_step`` = the first step whose loss was not finite.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast

import torch

from basin.optim._base import check_int as _check_int

from . import workloads as _wl
from .evalpoint import at_eval_point, to_eval_point, to_train_point
from .schedules import lr_multiplier, validate_schedule

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "RunConfig",
    "RunResult",
    "build_training",
    "environment",
    "git_revision",
    "make_config",
    "run",
    "sweep",
]

# The README's default comparison. diffgrad and sgdsai are basin optimizers.
DEFAULT_OPTIMIZERS: list[str] = ["torch:adamw", "torch:sgd", "adabelief", "diffgrad", "sgdsai"]

ReportFn = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class RunConfig:
    """Full configuration of one run. Build it with :func:`make_config`.

    ``steps`` and ``time_budget`` (seconds of training, evaluation excluded) are budgets:
    training stops at whichever comes first (at least one is set). ``landscape``: measure the
    top Hessian eigenvalue and the Hessian trace of the trained model. ``tuning``: how the
    hyperparameters were chosen (``""``: defaults or by hand; ``"qmc:N"``: the best of N
    quasi-random trials, :mod:`basin.bench.compare`). ``adaptive_batch``: AdAdaGrad's
    growing batch size (:class:`basin.train.AdaptiveBatchSize` arguments, ``batch_size`` the
    initial one; None: fixed). ``key()`` is the hash
    of everything here, the workload's fingerprint (model architecture and data) included, so
    any change makes a different run."""

    workload: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int = 0
    steps: int | None = None
    time_budget: float | None = None
    batch_size: int = 1
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "constant"})
    eval_every: int = 100
    log_every: int = 10
    sharpness_every: int = 0
    landscape: bool = False
    tuning: str = ""
    workload_fingerprint: str = ""
    dp: dict[str, Any] | None = None  # differential privacy (basin.bench.private)
    adaptive_batch: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hparams"] = _jsonable(d["hparams"])
        for name in ("dp", "adaptive_batch"):  # runs without them keep the keys they had
            if d[name] is None:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> str:
        d = self.to_dict()
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def make_config(
    workload: str | _wl.Workload,
    optimizer: str,
    hparams: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    time_budget: float | None = None,
    batch_size: int | None = None,
    schedule: dict[str, Any] | str | None = None,
    eval_every: int | None = None,
    log_every: int = 10,
    sharpness_every: int = 0,
    landscape: bool = False,
    tuning: str = "",
    dp: dict[str, Any] | None = None,
    adaptive_batch: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve defaults and validate; raises ``ValueError`` with one clear line on mistakes.

    ``workload``: a name, ``file.py:NAME`` / ``module:NAME``, or a
    :class:`~basin.bench.workloads.Workload` (e.g. from ``Workload.from_tensors``).
    ``optimizer``: any registry name; bare names resolve as :func:`basin.optim.resolve` says
    and the config holds the canonical one. Hyperparameters: the workload's default for this
    optimizer (see :func:`basin.bench.workloads.default_hparams`) updated by ``hparams``,
    checked by building the optimizer on the workload's real model. If neither ``steps`` nor
    ``time_budget`` is given, the workload's step budget is used. ``dp``: differentially
    private training (:func:`basin.bench.private.dp_config`: ``noise_multiplier`` or
    ``target_epsilon``, ``delta``, ``max_grad_norm``), checked against the workload."""
    from basin.optim import create, info, resolve

    from .workloads.own import probe, probe_task

    w = _wl.get(workload)
    optimizer = resolve(optimizer)  # unknown names raise with close matches
    hp = _wl.default_hparams(w, optimizer)
    hp.update(hparams or {})
    _check_int("seed", seed, 0)
    if steps is not None:
        _check_int("steps", steps, 1)
    if time_budget is not None:
        if (
            isinstance(time_budget, bool)
            or not isinstance(time_budget, (int, float))
            or not (math.isfinite(time_budget) and time_budget > 0)
        ):
            raise ValueError(
                f"time_budget must be a positive number of seconds, got {time_budget!r}"
            )
        time_budget = float(time_budget)
    if steps is None and time_budget is None:
        steps = w.steps
    bs = w.batch_size if batch_size is None else _check_int("batch_size", batch_size, 1)
    ev = w.eval_every if eval_every is None else _check_int("eval_every", eval_every, 1)
    _check_int("log_every", log_every, 1)
    _check_int("sharpness_every", sharpness_every, 0)
    if not isinstance(landscape, bool):
        raise ValueError(f"landscape must be True or False, got {landscape!r}")
    if sharpness_every or landscape:
        _sharpness_fn()  # fails now, not in the middle of a sweep
    sched = validate_schedule(schedule)
    if adaptive_batch is not None:
        adaptive_batch = _adaptive_batch(adaptive_batch, bs, info(optimizer).method)
    _check_types(optimizer, hp)
    _check_lr_given(optimizer, hp, w)
    fp, model = probe(w)
    entry = info(optimizer)
    opt_hp, method_hp = entry.split_hparams(hp)
    # hyperparameter names and values: the optimizer itself validates them, on the real model
    # with the parameter groups the run will use; a training method (saf, mesa) validates its
    # own, and refuses a workload that lacks what it needs, on the workload's probe task
    try:
        create(optimizer, model, **opt_hp)
        if entry.method is not None:  # on a copy: a method may change the model (tract, reste)
            pt = probe_task(w)
            pt = dataclasses.replace(pt, model=copy.deepcopy(pt.model), steps=steps)
            entry.build_method(pt, **method_hp)
    except TypeError as exc:
        raise ValueError(f"{optimizer}: invalid hyperparameters {hp}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- third-party optimizers raise their own types
        msg = str(exc)
        raise ValueError(msg if optimizer in msg else f"{optimizer}: {msg}") from None
    if dp is not None:
        from .private import check_dp_run, dp_config

        if adaptive_batch is not None:
            raise ValueError("dp and adaptive_batch do not combine: DP-SGD samples its own "
                             "batches (Poisson sampling at a fixed rate)")  # fmt: skip
        dp = cast(dict[str, Any], dp_config(dp))
        check_dp_run(dp, w, optimizer, steps=steps, sharpness_every=sharpness_every,
                     task=probe_task(w))  # fmt: skip
    return RunConfig(
        workload=w.name,
        optimizer=optimizer,
        hparams=_jsonable(hp),
        seed=seed,
        steps=steps,
        time_budget=time_budget,
        batch_size=bs,
        schedule=sched,
        eval_every=ev,
        log_every=log_every,
        sharpness_every=sharpness_every,
        landscape=landscape,
        tuning=tuning,
        workload_fingerprint=fp,
        dp=dp,
        adaptive_batch=adaptive_batch,
    )


def _adaptive_batch(spec: dict[str, Any], batch_size: int, method: str | None) -> dict[str, Any]:
    """A validated copy of an ``adaptive_batch`` spec (the controller's own checks)."""
    from basin.train.adadagrad import AdaptiveBatchSize

    if not isinstance(spec, dict) or "batch_size" in spec:
        raise ValueError("adaptive_batch must be a dict of AdaptiveBatchSize arguments besides "
                         "batch_size (the run's batch_size is the initial one)")  # fmt: skip
    if method is not None:
        raise ValueError("adaptive_batch does not combine with a training method (saf, mesa)")
    try:
        AdaptiveBatchSize(batch_size, **spec)
    except TypeError as exc:
        raise ValueError(f"adaptive_batch: {exc}") from None
    return dict(spec)


class _Regrouped:
    """Batches of any size cut from a workload's fixed-size batches, in order, no sample
    dropped (what is left of a batch starts the next one)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches
        self.rest: tuple[torch.Tensor, torch.Tensor] | None = None

    def next(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs: list[torch.Tensor] = [self.rest[0]] if self.rest is not None else []
        ys: list[torch.Tensor] = [self.rest[1]] if self.rest is not None else []
        n = sum(len(x) for x in xs)
        while n < size:
            x, y = next(self.batches)
            xs.append(x)
            ys.append(y)
            n += len(x)
        x, y = (torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else (xs[0], ys[0])
        self.rest = (x[size:], y[size:]) if n > size else None
        return x[:size], y[:size]


def _check_types(optimizer: str, hp: dict[str, Any]) -> None:
    """A text where the optimizer's default is a number (``--hp lr=abc``) is one clear error
    for every optimizer, whatever its own validation says."""
    import inspect

    from basin.optim import get_class

    try:
        params = inspect.signature(get_class(optimizer).__init__).parameters
    except (TypeError, ValueError):
        return
    for name, value in hp.items():
        p = params.get(name)
        if p is None or not isinstance(value, str):
            continue
        d = p.default
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            raise ValueError(f"{optimizer}: {name} must be a number, got {value!r}")


def _check_lr_given(optimizer: str, hp: dict[str, Any], w: _wl.Workload) -> None:
    """An optimizer without a default learning rate on a workload that gives none for it."""
    import inspect

    from basin.optim import info

    entry = info(optimizer)
    try:
        p = inspect.signature(entry.cls.__init__).parameters.get("lr")
    except (TypeError, ValueError):
        return
    if p is not None and p.default is p.empty and "lr" not in hp:
        want = ", ".join(repr(k) for k in entry.lr_from.get("lr", ())) or "none"
        raise ValueError(
            f"{optimizer} has no default learning rate and workload {w.name!r} gives none for "
            f"it (it reads the workload's lr entry {want}): pass lr (--hp lr=...) or add the "
            "entry to the workload's lr"
        )


@dataclass
class RunResult:
    """What one run produced. ``series`` holds the curves:

    - ``train``: ``step``, ``seconds`` (training time), ``loss`` (mean over the logging
      window), ``lr`` (first group), ``step_time`` (mean seconds per step in the window);
    - ``eval``: ``step``, ``seconds``, ``eval_loss``, ``metric``;
    - ``sharpness``: ``step``, ``value`` (top Hessian eigenvalue on a fixed training batch).

    ``final`` holds ``train_loss``, ``eval_loss``, ``metric``, ``best_metric``, ``sharpness``
    and, with ``landscape=True``, ``top_eigenvalue`` and ``hessian_trace`` of the trained model
    on the probe batch. ``model`` is the trained model itself (not stored; ``None`` for a
    result read back from a store or a failed run); ``workload_meta`` the workload's metric,
    mode, target and source, so a report needs no registry lookup.
    """

    config: dict[str, Any]
    key: str
    status: str  # "ok" | "diverged" | "failed"
    series: dict[str, dict[str, list[float]]]
    final: dict[str, float | None]
    time_to_target: dict[str, float] | None
    steps_done: int
    train_seconds: float
    wall_seconds: float
    step_time: float | None
    state_bytes: int
    n_params: int
    diverged_step: int | None = None
    cpu_seconds: float | None = None  # process CPU time of the whole run (all threads)
    error: str | None = None
    version: str = ""
    git_rev: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    workload_meta: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # a DP run's spent epsilon (basin.bench.private.spent)
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out = dataclasses.asdict(RunResult(**d))  # a copy without the (large) model
        del out["model"]
        return _jsonable(out)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        return cls(**{k: v for k, v in d.items() if k in names})


@cache
def git_revision() -> str | None:
    """Git commit of the source tree basin is imported from, or None (not a checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "argv0": Path(sys.argv[0]).name if sys.argv else "",
    }


def _provenance() -> dict[str, Any]:
    """Version, git revision, environment and creation time recorded with every run."""
    from basin import __version__

    return {
        "version": __version__,
        "git_rev": git_revision(),
        "env": environment(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _sharpness_fn() -> Callable[..., Any]:
    try:
        from basin.landscape import hessian_eigenvalues
    except ImportError as exc:
        raise ValueError(
            f"sharpness_every needs basin.landscape.hessian_eigenvalues, not importable: {exc}"
        ) from None
    return hessian_eigenvalues


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def run(
    config: RunConfig,
    report: ReportFn | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> RunResult:
    """Train one configuration and return its result (see the module docstring)."""
    from basin.optim import info
    from basin.optim._base import NonFiniteGradientError

    cfg = config
    w = _wl.get(cfg.workload)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    task = w.build(cfg.seed, cfg.batch_size)
    model, loss_fn, batches = task.model, task.loss_fn, task.batches
    model.train()
    task.steps = cfg.steps  # what a scheduled training method spreads its schedule over
    opt, method = build_training(cfg.optimizer, cfg.hparams, task)
    private = None
    if cfg.dp is not None:  # DP-SGD: Opacus' optimizer and Poisson-sampled batches
        from .private import privatize

        opt, batches, private = privatize(cfg, task, opt)
    to_train_point(opt, cfg.optimizer)  # Schedule-Free: train at y, evaluate at x
    base_lrs = [g["lr"] for g in opt.param_groups] if "lr" in opt.param_groups[0] else None
    constant = cfg.schedule["name"] == "constant"
    # optimizers that re-evaluate the loss inside step() get a closure (its first value is
    # the step's loss, as for every torch optimizer)
    needs_closure = info(cfg.optimizer).needs_closure
    sharp_fn = _sharpness_fn() if cfg.sharpness_every or cfg.landscape else None
    max_steps = cfg.steps if cfg.steps is not None else sys.maxsize
    budget = cfg.time_budget
    adaptive = None
    if cfg.adaptive_batch is not None:  # AdAdaGrad: the batch grows by its test
        from basin.train.adadagrad import AdaptiveBatchSize

        adaptive = AdaptiveBatchSize(cfg.batch_size, **cfg.adaptive_batch)
        regrouped = _Regrouped(batches)
    bsz: dict[str, list[float]] = {"step": [], "value": []}

    tr: dict[str, list[float]] = {"step": [], "seconds": [], "loss": [], "lr": [], "step_time": []}
    ev: dict[str, list[float]] = {"step": [], "seconds": [], "eval_loss": [], "metric": []}
    sh: dict[str, list[float]] = {"step": [], "value": []}
    pending: list[torch.Tensor] = []
    status, diverged_step, ttt = "ok", None, None
    train_s = 0.0
    window_start_s, window_start_step = 0.0, 0
    lr_now = base_lrs[0] if base_lrs else float("nan")
    step = 0
    t = time.perf_counter()
    while step < max_steps and (budget is None or train_s < budget):
        step += 1
        if not constant and base_lrs is not None:
            p = (step - 1) / cfg.steps if cfg.steps is not None else 0.0
            if budget is not None:
                p = max(p, train_s / budget)
            m = lr_multiplier(cfg.schedule, p)
            for g, lr0 in zip(opt.param_groups, base_lrs):
                g["lr"] = lr0 * m
            lr_now = base_lrs[0] * m
        if adaptive is None:
            x, y = next(batches)
        else:
            if not bsz["value"] or bsz["value"][-1] != adaptive.batch_size:
                bsz["step"].append(step)
                bsz["value"].append(adaptive.batch_size)
            x, y = regrouped.next(adaptive.batch_size)
            with math_attention():  # vmap batches the math attention, not the fused kernels
                adaptive.update(model, loss_fn, x, y)  # at the parameters of this step's gradient
        try:
            loss = train_step(model, loss_fn, opt, x, y, needs_closure, method)
        except NonFiniteGradientError:  # basin's optimizers refuse a NaN/inf gradient
            status, diverged_step = "diverged", step
            break
        if private is None or len(x):  # an empty Poisson batch still steps (noise), no loss
            pending.append(loss.detach())
        last = step >= max_steps
        now = time.perf_counter()
        train_s += now - t
        t = now
        if budget is not None and train_s >= budget:
            last = True
        if (step % cfg.log_every == 0 or last) and pending:
            losses = torch.stack(pending).float()
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                first_bad = int((~finite).nonzero()[0, 0])
                diverged_step = step - len(pending) + 1 + first_bad
                status = "diverged"
                break
            tr["step"].append(step)
            tr["seconds"].append(train_s)
            tr["loss"].append(float(losses.mean()))
            tr["lr"].append(float(lr_now))
            tr["step_time"].append((train_s - window_start_s) / max(step - window_start_step, 1))
            window_start_s, window_start_step = train_s, step
            pending.clear()
            if progress is not None:
                progress(step, cfg.steps)
        if (
            sharp_fn is not None
            and cfg.sharpness_every
            and (step % cfg.sharpness_every == 0 or last)
        ):
            with math_attention(), at_eval_point(opt, cfg.optimizer):
                val = sharp_fn(model, loss_fn, task.probe_batch, k=1).eigenvalues[0]
            sh["step"].append(step)
            sh["value"].append(float(val))
            model.train()
        if step % cfg.eval_every == 0 or last:
            with at_eval_point(opt, cfg.optimizer):
                res = task.evaluate(model)
            if not (math.isfinite(res["eval_loss"]) and math.isfinite(res["metric"])):
                status, diverged_step = "diverged", step
                break
            ev["step"].append(step)
            ev["seconds"].append(train_s)
            ev["eval_loss"].append(res["eval_loss"])
            ev["metric"].append(res["metric"])
            if ttt is None and w.reached(res["metric"]):
                ttt = {"step": step, "seconds": train_s}
            if report is not None:
                train_loss = tr["loss"][-1] if tr["loss"] else float("nan")
                report(step, {"train_loss": train_loss, "seconds": train_s, **res})
        t = time.perf_counter()  # evaluation, sharpness and callbacks are not training time

    to_eval_point(opt, cfg.optimizer)  # the diagnostics and the returned model: at x
    privacy = None
    if private is not None:
        from .private import spent

        privacy = spent(private)
        private.hooks.cleanup()  # the diagnostics and the returned model: plain again
    metrics = ev["metric"]
    final = {
        "train_loss": tr["loss"][-1] if tr["loss"] else None,
        "eval_loss": ev["eval_loss"][-1] if ev["eval_loss"] else None,
        "metric": metrics[-1] if metrics else None,
        "best_metric": (min(metrics) if w.metric_mode == "min" else max(metrics))
        if metrics
        else None,
        "sharpness": sh["value"][-1] if sh["value"] else None,
    }
    if status == "diverged":
        final = {k: None for k in final}
    else:
        final.update(_generalization(task, final))
        if cfg.landscape:
            final.update(_landscape(model, loss_fn, task.probe_batch, cfg.seed))
    return RunResult(
        config=cfg.to_dict(),
        key=cfg.key(),
        status=status,
        series={"train": tr, "eval": ev, "sharpness": sh}
        | ({"batch_size": bsz} if adaptive is not None else {}),
        final=final,
        time_to_target=ttt,
        steps_done=step,
        train_seconds=train_s,
        wall_seconds=time.perf_counter() - wall0,
        cpu_seconds=time.process_time() - cpu0,
        step_time=statistics.median(tr["step_time"]) if tr["step_time"] else None,
        state_bytes=_state_bytes(opt) + (method.state_bytes if method is not None else 0),
        n_params=sum(p.numel() for p in model.parameters()),
        diverged_step=diverged_step,
        workload_meta=w.meta(),
        privacy=privacy,
        model=model,
        **_provenance(),
    )


def build_training(optimizer: str, hparams: dict[str, Any], task: _wl.Task) -> tuple[Any, Any]:
    """``(optimizer, training method or None)`` of a run on ``task``: the registry entry's
    hyperparameters split (:meth:`basin.optim.OptimInfo.split_hparams`), its training method
    (SAF, MESA; :attr:`basin.optim.OptimInfo.method`) built from the task, then the optimizer
    on the task's model as the method leaves it, with the entry's parameter groups (so
    parameters a method adds, such as BiPer's ``alpha``, are trained). ``task.steps``: the
    run's planned steps, for methods that schedule over the run."""
    from basin.optim import create, info

    entry = info(optimizer)
    opt_hp, method_hp = entry.split_hparams(hparams)
    method = entry.build_method(task, **method_hp)
    opt = create(optimizer, task.model, **opt_hp)  # the registry's parameter groups
    return opt, method


def train_step(
    model: torch.nn.Module,
    loss_fn: Any,
    opt: torch.optim.Optimizer,
    x: Any,
    y: Any,
    closure: bool,
    method: Any = None,
) -> torch.Tensor:
    """One optimizer step on a batch; the task's loss on it (before the step, without a
    method's penalty). Optimizers that re-evaluate the loss inside ``step()`` (the registry's
    ``needs_closure``: L-BFGS, SAM) get a closure, whose value is what they minimise. A
    training ``method`` (:meth:`build_training`) adds ``method.penalty(x, y, out)`` to every
    evaluation of the loss, and ``method.after_step(model)`` runs after the step."""
    first: list[torch.Tensor] = []

    def objective() -> torch.Tensor:
        out = model(x)
        loss = loss_fn(out, y)
        if not first:
            first.append(loss.detach())
        return loss if method is None else loss + method.penalty(x, y, out)

    if closure:

        def fn() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            out = objective()
            out.backward()
            return out

        opt.step(fn)  # type: ignore[arg-type]  # closures may return the loss tensor
    else:
        total = objective()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    if method is not None:
        method.after_step(model)
    return first[0]


def math_attention() -> Any:
    """Scaled-dot-product attention on its math backend: the fused CPU/GPU kernels have no
    double backward, which every curvature product needs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _generalization(task: _wl.Task, final: dict[str, Any]) -> dict[str, Any]:
    """The trained model evaluated on a fixed sample of its training data, and the gap
    ``eval_loss - train_eval_loss`` (positive: it fits the training data better)."""
    if task.evaluate_train is None or final["eval_loss"] is None:
        return {}
    res = task.evaluate_train(task.model)
    return {
        "train_eval_loss": res["eval_loss"],
        "train_metric": res["metric"],
        "generalization_gap": final["eval_loss"] - res["eval_loss"],
    }


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _landscape(model: torch.nn.Module, loss_fn: Any, batch: Any, seed: int) -> dict[str, float]:
    """Top Hessian eigenvalue and Hessian trace (Hutch++, 30 products) of the trained model."""
    from basin.landscape import hessian_eigenvalues, hessian_trace

    was = model.training
    with math_attention():
        eig = hessian_eigenvalues(model, loss_fn, batch, k=1)
        tr = hessian_trace(model, loss_fn, batch, n_hvp=min(30, 3 * _n_params(model)), seed=seed)
    model.train(was)
    return {
        "top_eigenvalue": float(eig.eigenvalues[0]),
        "hessian_trace": float(tr.trace),
        "hessian_trace_stderr": float(tr.stderr),
    }


def sweep(
    configs: Sequence[RunConfig],
    store: Any,
    *,
    progress: Any = None,
    on_result: Callable[[RunResult | None, RunConfig], None] | None = None,
    group: str = "bench",
    lease: float | None = None,
    poll: float = 0.5,
) -> list[RunResult]:
    """Run every configuration not already stored; store each result as soon as it finishes.

    Diverged runs are stored (with their step) and the sweep goes on; a run that raises is
    stored as ``status="failed"`` with the error (and rerun on the next sweep). ``progress``
    is an optional ``(done, total, description, step, steps)`` callback.

    Several processes may sweep one store together: each run is claimed first
    (:meth:`basin.bench.store.Store.claim`, renewed every ``lease / 4`` seconds while it
    trains), so a worker skips runs that a live worker is training and takes over those whose
    worker died. Once its own share is done a worker waits (polling every ``poll`` seconds)
    until the runs others hold are stored, so when it returns every configuration is stored.
    Returns the runs this worker stored."""
    from .store import LEASE

    lease = LEASE if lease is None else lease
    results: list[RunResult] = []
    todo = [c for c in configs if not store.has(c.key())]
    done = len(configs) - len(todo)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    pending = todo
    while pending:
        waiting: list[RunConfig] = []
        for cfg in pending:
            if not store.claim(cfg.key(), lease=lease):
                if not _resolved(store, cfg, started):
                    waiting.append(cfg)  # a live worker trains it
                    continue
                done += 1
                continue
            res = _run_claimed(cfg, store, lease, done, len(configs), progress)
            if store.put(res, group=group):  # False: another worker stored it first
                results.append(res)
                if on_result is not None:
                    on_result(res, cfg)
            done += 1
        if waiting == pending:
            time.sleep(poll)
        pending = [c for c in waiting if not _resolved(store, c, started)]
        done += len(waiting) - len(pending)
    if progress is not None:
        progress(len(configs), len(configs), "done", 0, None)
    return results


def _resolved(store: Any, cfg: RunConfig, started: str) -> bool:
    """Whether a run is stored, or failed in another worker during this sweep (a failed run
    is retried by the next sweep, not by every worker of this one)."""
    st = store.status(cfg.key())
    return st is not None and (st[0] != "failed" or st[1] >= started)


def _run_claimed(
    cfg: RunConfig, store: Any, lease: float, done: int, total: int, progress: Any
) -> RunResult:
    desc = f"{cfg.workload} {cfg.optimizer} seed={cfg.seed}"

    def step_cb(s: int, steps: int | None) -> None:
        if progress is not None:
            progress(done, total, desc, s, steps)

    step_cb(0, cfg.steps)
    try:
        with store.keep_alive(cfg.key(), lease=lease):
            return run(cfg, progress=step_cb)
    except KeyboardInterrupt:
        with contextlib.suppress(ValueError):
            store.release(cfg.key())  # free it for another worker at once
        raise
    except Exception as exc:  # noqa: BLE001  -- recorded, the sweep goes on
        return _failed(cfg, exc)


def _failed(cfg: RunConfig, exc: BaseException) -> RunResult:
    return RunResult(
        config=cfg.to_dict(),
        key=cfg.key(),
        status="failed",
        series={"train": {}, "eval": {}, "sharpness": {}},
        final={},
        time_to_target=None,
        steps_done=0,
        train_seconds=0.0,
        wall_seconds=0.0,
        step_time=None,
        state_bytes=0,
        n_params=0,
        error=f"{type(exc).__name__}: {exc}",
        **_provenance(),
    )


def configs_for(
    workloads: Iterable[str | _wl.Workload],
    optimizers: Iterable[str],
    seeds: Iterable[int],
    hparams: dict[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> list[RunConfig]:
    """The cross product workload x optimizer x seed, validated before anything runs.
    ``hparams`` maps optimizer name -> hyperparameter overrides."""
    hparams = hparams or {}
    opts = list(optimizers)
    unknown = set(hparams) - set(opts)
    if unknown:
        raise ValueError(
            f"hyperparameters given for {', '.join(sorted(unknown))}, not in --optimizers"
        )
    return [
        make_config(w, o, hparams.get(o), seed=s, **kw)
        for w in workloads
        for o in opts
        for s in seeds
    ]
