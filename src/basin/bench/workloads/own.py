"""Your own model and data as a basin workload, and the fingerprint of any workload.

From Python::

    from basin.bench import Workload, make_config, run
    w = Workload.from_tensors("my_mlp", lambda: MyNet(width=64), train=(x, y), eval=(xv, yv),
                              loss="cross_entropy", metric="accuracy", steps=500, batch_size=64)
    result = run(make_config(w, "adabelief", seed=0))

From the command line, put such a workload (or a function returning one) in a file and name it
with ``-w path/to/file.py:NAME`` or ``-w package.module:NAME``::

    basin bench -w my_workload.py:workload -o adabelief,adamw --tune 8

A workload's fingerprint (:func:`fingerprint`) digests its model architecture, its initial
weights at seed 0, its data and its evaluation of the initial model; it is part of every run's
key, so changing the model or the data reruns instead of serving stored results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Task, Workload, _Forever, train_sample

__all__ = ["LOSSES", "METRICS", "fingerprint", "from_loaders", "from_tensors", "load"]

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


def _accuracy(out: Tensor, y: Tensor) -> float:
    return float((out.argmax(-1) == y).float().mean())


def _mse(out: Tensor, y: Tensor) -> float:
    return float(F.mse_loss(out, y))


# name -> (per-batch function or None for the evaluation loss, mode)
METRICS: dict[str, tuple[Callable[[Tensor, Tensor], float] | None, str]] = {
    "accuracy": (_accuracy, "max"),
    "loss": (None, "min"),
    "mse": (_mse, "min"),
}

_PROBE = 256


def _loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


def _metric(
    metric: str | Callable[[Tensor, Tensor], float], metric_mode: str | None
) -> tuple[str, Callable[[Tensor, Tensor], float] | None, str]:
    if callable(metric):
        if metric_mode not in ("min", "max"):
            raise ValueError("metric_mode must be 'min' or 'max' for a metric function")
        return getattr(metric, "__name__", "metric"), metric, metric_mode
    if metric not in METRICS:
        raise ValueError(
            f"metric must be one of {', '.join(METRICS)} or a callable, got {metric!r}"
        )
    fn, mode = METRICS[metric]
    if metric_mode is not None and metric_mode != mode:
        raise ValueError(f"metric {metric!r} is {mode}imised; metric_mode={metric_mode!r}")
    return metric, fn, mode


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def _check_pair(name: str, pair: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a pair (inputs, targets) of tensors")
    x, y = pair
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a pair (inputs, targets) of tensors")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"{name}: inputs and targets must have the same, non-zero length "
            f"(got {len(x)} and {len(y)})"
        )
    return x, y


def _evaluator(
    batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    metric_fn: Callable[[Tensor, Tensor], float] | None,
) -> Callable[[nn.Module], dict[str, float]]:
    """Mean evaluation loss and metric over every example (batches weighted by their size)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        was = model.training
        model.eval()
        n, total_loss, total_metric = 0, 0.0, 0.0
        try:
            with torch.no_grad():
                for x, y in batches():
                    out = model(x)
                    k = len(y)
                    total_loss += float(loss_fn(out, y)) * k
                    if metric_fn is not None:
                        total_metric += float(metric_fn(out, y)) * k
                    n += k
        finally:
            model.train(was)
        if n == 0:
            raise ValueError("the evaluation data is empty")
        loss = total_loss / n
        return {"eval_loss": loss, "metric": loss if metric_fn is None else total_metric / n}

    return evaluate


def _workload(
    name: str, model_fn: Any, builder: Any, metric: str, mode: str, **kw: Any
) -> Workload:
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"name must be a non-empty string without ':', got {name!r}")
    if not callable(model_fn):
        raise ValueError("model_fn must be a callable returning an nn.Module")
    steps = _check_positive_int("steps", kw.pop("steps"))
    eval_every = kw.pop("eval_every")
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    _check_positive_int("eval_every", eval_every)
    target = kw.pop("target")
    if target is not None and not (isinstance(target, (int, float)) and math.isfinite(target)):
        raise ValueError(f"target must be a finite number or None, got {target!r}")
    tps = kw.pop("tokens_per_sample", None)
    if tps is not None:
        _check_positive_int("tokens_per_sample", tps)
    lr = dict(kw.pop("lr") or {})
    for k, v in lr.items():
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"lr[{k!r}] must be a positive number, got {v!r}")
    return Workload(
        name=name.strip(),
        family="own",
        description=kw.pop("description") or f"{name}: your model ({metric}, {mode}imised)",
        builder=builder,
        metric=metric,
        metric_mode=mode,
        target=None if target is None else float(target),
        batch_size=kw.pop("batch_size"),
        steps=steps,
        eval_every=eval_every,
        lr=lr,
        hparams=dict(kw.pop("hparams") or {}),
        tokens_per_sample=tps,
    )


def _model(model_fn: Callable[[], nn.Module]) -> nn.Module:
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_fn must return an nn.Module, got {type(model).__name__}")
    return model


def from_tensors(
    name: str,
    model_fn: Callable[[], nn.Module],
    *,
    train: tuple[Tensor, Tensor],
    eval: tuple[Tensor, Tensor],  # noqa: A002 -- the documented keyword
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
    metric: str | Callable[[Tensor, Tensor], float] = "accuracy",
    metric_mode: str | None = None,
    target: float | None = None,
    steps: int = 1000,
    batch_size: int = 128,
    eval_every: int | None = None,
    lr: dict[str, float] | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    description: str = "",
    tokens_per_sample: int | None = None,
) -> Workload:
    """A workload from in-memory tensors.

    ``model_fn()`` builds a fresh model (called after ``torch.manual_seed(seed)``, so each
    seed gets its own initialisation); ``train`` / ``eval`` are ``(inputs, targets)``.
    ``loss``: ``"cross_entropy"``, ``"mse"`` or ``loss(outputs, targets)``. ``metric``:
    ``"accuracy"`` (maximised), ``"loss"`` (the evaluation loss, minimised), ``"mse"``, or
    ``metric(outputs, targets) -> float`` (a batch mean) with ``metric_mode``. ``target``: the
    metric value for time-to-target (None: none). ``lr``: learning rates per registry entry
    name (``{"adaptive": 1e-3, "sgd": 0.05}``; missing ones: each optimizer's own default).
    ``tokens_per_sample``: tokens per training sample of a language model (Step Law's
    ``--lr-rule steplaw``).
    Training batches are drawn without replacement, reshuffled each epoch from the seed."""
    x, y = _check_pair("train", train)
    xe, ye = _check_pair("eval", eval)
    loss_fn = _loss(loss)
    mname, metric_fn, mode = _metric(metric, metric_mode)
    _check_positive_int("batch_size", batch_size)
    digest = _digest_tensors(x, y, xe, ye)

    def chunks(a: Tensor, b: Tensor) -> Callable[[], Iterator[tuple[Tensor, Tensor]]]:
        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            for i in range(0, len(a), 2048):
                yield a[i : i + 2048], b[i : i + 2048]

        return batches

    evaluate = _evaluator(chunks(xe, ye), loss_fn, metric_fn)
    # the generalization gap: the same evaluation on as many training examples
    evaluate_train = _evaluator(chunks(*train_sample(x, y, len(xe))), loss_fn, metric_fn)

    def build(seed: int, bs: int) -> Task:
        model = _model(model_fn)
        g = torch.Generator().manual_seed(seed)
        probe = torch.randperm(len(x), generator=g)[:_PROBE]
        return Task(
            model, loss_fn, _Forever(x, y, bs, seed), evaluate, (x[probe], y[probe]), digest,
            evaluate_train=evaluate_train,
        )  # fmt: skip

    return _workload(
        name, model_fn, build, mname, mode, steps=steps, eval_every=eval_every, target=target,
        lr=lr, hparams=hparams, description=description, batch_size=batch_size,
        tokens_per_sample=tokens_per_sample,
    )  # fmt: skip


class _Epochs:
    """Batches of a DataLoader forever, one epoch after another; ``epoch`` counts the passes.
    A loader over :class:`basin.train.IndexedDataset` yields ``(x, y, indices)``: the indices
    of the batch last returned are then ``last_indices`` (and ``n_samples`` the dataset's
    length), for training methods keyed on samples (SAF)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader
        self.it = iter(loader)
        self.epoch = 0
        from basin.train.data import IndexedDataset

        ds = getattr(loader, "dataset", None)
        if isinstance(ds, IndexedDataset):
            self.n_samples = len(ds)
            self.last_indices = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> _Epochs:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            self.epoch += 1
            try:
                batch = next(self.it)
            except StopIteration:
                raise ValueError("the training DataLoader is empty") from None
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError(
                "a training DataLoader must yield (inputs, targets) pairs, or (inputs, targets, "
                "indices) triples (basin.train.IndexedDataset)"
            )
        if len(batch) == 3:
            self.last_indices = torch.as_tensor(batch[2])
        return batch[0], batch[1]


def from_loaders(
    name: str,
    model_fn: Callable[[], nn.Module],
    *,
    train: Any,
    eval: Any,  # noqa: A002 -- the documented keyword
    loss: str | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
    metric: str | Callable[[Tensor, Tensor], float] = "accuracy",
    metric_mode: str | None = None,
    target: float | None = None,
    steps: int = 1000,
    eval_every: int | None = None,
    lr: dict[str, float] | None = None,
    hparams: dict[str, dict[str, Any]] | None = None,
    description: str = "",
    tokens_per_sample: int | None = None,
) -> Workload:
    """A workload from ``torch.utils.data.DataLoader``s yielding ``(inputs, targets)``.

    The batch size is the training loader's (the harness cannot change it). Shuffling follows
    the global RNG, which the harness seeds per run, so a seed gives one data order; pass
    loaders without a fixed ``generator`` for that. Other arguments as :func:`from_tensors`."""
    for k, ld in (("train", train), ("eval", eval)):
        if not hasattr(ld, "__iter__"):
            raise ValueError(f"{k} must be a DataLoader (or any re-iterable of batches)")
    bs = getattr(train, "batch_size", None) or 1
    loss_fn = _loss(loss)
    mname, metric_fn, mode = _metric(metric, metric_mode)
    evaluate = _evaluator(lambda: iter(eval), loss_fn, metric_fn)
    digest = _loader_digest(train, eval)

    def build(seed: int, batch_size: int) -> Task:
        if batch_size != bs:
            raise ValueError(
                f"workload {name!r} takes its batch size from its DataLoader ({bs}); "
                f"got batch_size={batch_size}"
            )
        model = _model(model_fn)
        probe = next(_Epochs(train))
        return Task(model, loss_fn, _Epochs(train), evaluate, probe, digest)

    return _workload(
        name, model_fn, build, mname, mode, steps=steps, eval_every=eval_every, target=target,
        lr=lr, hparams=hparams, description=description, batch_size=bs,
        tokens_per_sample=tokens_per_sample,
    )  # fmt: skip


# ------------------------------------------------------------------ loading


def load(spec: str) -> Workload:
    """The workload named by ``path/to/file.py:NAME`` or ``package.module:NAME``; ``NAME`` is a
    :class:`Workload` or a callable returning one. ``ValueError`` (one line) on any problem."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"workload {spec!r}: use path/to/file.py:NAME or package.module:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"workload {spec!r}: no such file {str(path)!r}")
        mod_name = "basin_workload_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        try:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            assert mspec is not None and mspec.loader is not None
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 -- the user's file: one line, not a traceback
            raise ValueError(
                f"workload {spec!r}: {str(path)!r} failed to load: {_why(exc)}"
            ) from None
        _pickle_by_value(module)
        source = f"{path}:{attr}"
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"workload {spec!r}: cannot import {where!r}: {_why(exc)}") from None
        source = spec
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Workload))
        hint = f" (Workloads there: {', '.join(found)})" if found else ""
        raise ValueError(f"workload {spec!r}: {where!r} has no attribute {attr!r}{hint}")
    obj = getattr(module, attr)
    if not isinstance(obj, Workload) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"workload {spec!r}: {attr}() failed: {_why(exc)}") from None
    if not isinstance(obj, Workload):
        raise ValueError(
            f"workload {spec!r}: {attr} is a {type(obj).__name__}, not a basin.bench.Workload "
            "(or a callable returning one); build it with Workload.from_tensors(...)"
        )
    return dataclasses.replace(obj, source=source)


def _why(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _pickle_by_value(module: Any) -> None:
    """Let Ray's workers (cloudpickle) receive a file-loaded workload without importing it."""
    try:
        import cloudpickle
    except ImportError:
        return
    try:
        cloudpickle.register_pickle_by_value(module)
    except (ValueError, TypeError):
        pass


# ------------------------------------------------------------------ fingerprints


def _update(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _digest_tensors(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def _loader_digest(train: Any, eval_: Any) -> str | None:
    """Exact digest of in-memory datasets (TensorDataset); else None (sampled at build)."""
    tensors: list[Tensor] = []
    for ld in (train, eval_):
        ds = getattr(ld, "dataset", None)
        if not isinstance(ds, torch.utils.data.TensorDataset):
            return None
        tensors += list(ds.tensors)
    return _digest_tensors(*tensors)


_FINGERPRINTS: dict[int, tuple[Workload, str, nn.Module, Task]] = {}


def probe(w: Workload) -> tuple[str, nn.Module]:
    """``(fingerprint, a model built at seed 0)`` of ``w``, computed once per process."""
    hit = _FINGERPRINTS.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[1], hit[2]
    return _probe(w)[1:3]


def probe_task(w: Workload) -> Task:
    """The task (seed 0) :func:`probe` built, computed once per process: what a training
    method's checks look at (its batch iterator, its model's output on the probe batch)."""
    hit = _FINGERPRINTS.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[3]
    return _probe(w)[3]


def _probe(w: Workload) -> tuple[Workload, str, nn.Module, Task]:
    rng = torch.random.get_rng_state()
    try:
        task = w.build(0)
        h = hashlib.sha256()
        h.update(repr(task.model).encode())
        for k, v in task.model.state_dict().items():
            h.update(k.encode())
            _update(h, v)
        if task.data_digest is not None:
            h.update(task.data_digest.encode())
        else:  # sampled: the first batches of seed 0 and the evaluation below
            for _ in range(4):
                for t in next(task.batches):
                    _update(h, t)
        for t in task.probe_batch:
            _update(h, t)
        ev = task.evaluate(task.model)
        h.update(json.dumps({k: f"{v:.10g}" for k, v in sorted(ev.items())}).encode())
        meta = {
            "loss": getattr(task.loss_fn, "__qualname__", repr(task.loss_fn)),
            "metric": w.metric,
            "mode": w.metric_mode,
        }
        h.update(json.dumps(meta, sort_keys=True).encode())
    finally:
        torch.random.set_rng_state(rng)
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[id(w)] = (w, digest, task.model, task)
    return _FINGERPRINTS[id(w)]


def fingerprint(w: Workload) -> str:
    """The workload's fingerprint (see the module docstring)."""
    return probe(w)[0]
