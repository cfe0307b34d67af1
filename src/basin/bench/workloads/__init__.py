"""Benchmark workloads: each is built offline and deterministically from a seed.

A :class:`Workload` declares everything a run needs: how to build the model and data from a
seed (:meth:`Workload.build` returns a :class:`Task`), the loss, the evaluation metric and
whether it is minimised or maximised, the default batch size and step budget, the target value
used for time-to-target, and per-optimizer default hyperparameters.

Look workloads up with :func:`get` (unknown names raise ``ValueError`` naming close matches)
and list them with :func:`names`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Task",
    "Workload",
    "default_hparams",
    "get",
    "names",
    "register",
    "workloads",
]

Batch = tuple[Tensor, Tensor]


@dataclass
class Task:
    """One built instance of a workload (model + data), ready to train.

    ``batches`` yields training batches forever in a seed-determined order;
    ``evaluate(model)`` returns ``{"eval_loss": ..., "metric": ...}`` on the held-out data
    (the model is put in eval mode and back); ``probe_batch`` is a fixed training batch used
    for periodic diagnostics such as sharpness. ``evaluate_train`` (optional) is ``evaluate`` on a
    fixed sample of the training data, for the generalization gap (eval minus train loss)."""

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: Iterator[Batch]
    evaluate: Callable[[nn.Module], dict[str, float]]
    probe_batch: Batch
    data_digest: str | None = None  # digest of all the data, where the builder has it
    evaluate_train: Callable[[nn.Module], dict[str, float]] | None = None
    # the run's planned optimizer steps, set by the harness before it builds a training method
    # (which may schedule over them: reste, biper); None: not known (a time budget alone)
    steps: int | None = None


@dataclass(frozen=True)
class Workload:
    """A benchmark problem. ``build(seed, batch_size)`` makes a :class:`Task`.

    ``metric_mode`` is ``"min"`` or ``"max"``; ``target`` is the metric value that counts as
    reached for time-to-target (``None``: no target). ``lr`` holds the workload's learning
    rates per entry name (``"adaptive"``: Adam-like, ``"sgd"``: SGD with momentum 0.9,
    ``"sgdsai"``); each optimizer's registry entry says which entry it takes
    (:attr:`basin.optim.OptimInfo.lr_from`). ``hparams`` holds optional per-optimizer
    overrides. ``source`` is how to load the workload again in another process (``-w``
    syntax), for workloads defined outside basin. ``tokens_per_sample``: the tokens one
    training sample holds, for token (language-model) workloads; None for others (Step Law's
    ``--lr-rule steplaw`` needs it).

    Your own model and data: :meth:`from_tensors` and :meth:`from_loaders`."""

    name: str
    family: str
    description: str
    builder: Callable[[int, int], Task]
    metric: str
    metric_mode: str
    target: float | None
    batch_size: int
    steps: int
    eval_every: int
    lr: dict[str, float]
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str | None = None
    tokens_per_sample: int | None = None

    def build(self, seed: int, batch_size: int | None = None) -> Task:
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        torch.manual_seed(seed)
        return self.builder(seed, bs)

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is at least as good as ``b``."""
        return a <= b if self.metric_mode == "min" else a >= b

    def reached(self, value: float) -> bool:
        return self.target is not None and self.better(value, self.target)

    def meta(self) -> dict[str, Any]:
        """What a stored run records about its workload (reports need no registry lookup)."""
        return {
            "metric": self.metric,
            "metric_mode": self.metric_mode,
            "target": self.target,
            "description": self.description,
            "source": self.source,
        }

    def fingerprint(self) -> str:
        """Digest of the model architecture and the data (computed once per process): part of
        every run's key, so a changed model or dataset never reuses stored results."""
        from .own import fingerprint

        return fingerprint(self)

    @classmethod
    def from_tensors(cls, name: str, model_fn: Callable[[], nn.Module], **kw: Any) -> Workload:
        """Your own model on in-memory tensors: see :func:`basin.bench.workloads.own.from_tensors`."""
        from .own import from_tensors

        return from_tensors(name, model_fn, **kw)

    @classmethod
    def from_loaders(cls, name: str, model_fn: Callable[[], nn.Module], **kw: Any) -> Workload:
        """Your own model on DataLoaders: see :func:`basin.bench.workloads.own.from_loaders`."""
        from .own import from_loaders

        return from_loaders(name, model_fn, **kw)


_WORKLOADS: dict[str, Workload] = {}
_LOADED = False


def register(w: Workload) -> Workload:
    _WORKLOADS[w.name] = w
    return w


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import charlm, digits, mnist1d, quadratic, synthetic  # noqa: F401  (register)

    _LOADED = True


def names() -> list[str]:
    _load_all()
    return sorted(_WORKLOADS)


def workloads() -> list[Workload]:
    _load_all()
    return [_WORKLOADS[n] for n in sorted(_WORKLOADS)]


def get(name: str | Workload) -> Workload:
    """The workload called ``name``; unknown names raise ``ValueError`` with close names.

    ``name`` may also be a :class:`Workload` (registered and returned), ``path/to/file.py:NAME``
    or ``package.module:NAME``, where ``NAME`` is a :class:`Workload` or a callable returning
    one (loaded, registered under its name, and returned)."""
    if isinstance(name, Workload):
        return _register_own(name)
    if not isinstance(name, str):
        raise ValueError(f"workload must be a name or a Workload, got {type(name).__name__}")
    _load_all()
    key = name.strip().lower()
    if key in _WORKLOADS:
        return _WORKLOADS[key]
    if ":" in name:
        from .own import load

        return _register_own(load(name.strip()))
    close = difflib.get_close_matches(key, list(_WORKLOADS), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown workload {name!r}{hint} (known: {', '.join(sorted(_WORKLOADS))}; "
        "or path/to/file.py:NAME, package.module:NAME)"
    )


def _register_own(w: Workload) -> Workload:
    """Register a user's workload under its name; a built-in name cannot be taken over."""
    _load_all()
    key = w.name.strip().lower()
    old = _WORKLOADS.get(key)
    if old is not None and old is not w and old.family != "own":
        raise ValueError(f"workload name {w.name!r} is taken by a built-in workload; rename it")
    _WORKLOADS[key] = w
    return w


def default_hparams(workload: Workload | str, optimizer: str) -> dict[str, Any]:
    """Default hyperparameters of ``optimizer`` on ``workload``: the registry entry's harness
    defaults (:attr:`basin.optim.OptimInfo.defaults`, and its training method's
    :attr:`~basin.optim.OptimInfo.method_defaults`), each learning rate from the workload
    entry the optimizer takes (:attr:`~basin.optim.OptimInfo.lr_from`; none: the optimizer's
    own default), then the workload's per-optimizer overrides."""
    from basin.optim import info

    w = get(workload)
    entry = info(optimizer)
    hp: dict[str, Any] = {**entry.defaults, **entry.method_defaults}
    for hp_name, keys in entry.lr_from.items():
        for k in keys:
            if k in w.lr:
                hp[hp_name] = w.lr[k]
                break
    hp.update(w.hparams.get(entry.name, {}))
    return hp


class _Forever:
    """Seeded infinite mini-batch iterator over in-memory tensors (reshuffled each epoch; the
    last partial batch of an epoch is dropped).

    For training methods that need them (:mod:`basin.train`: SAF keys a logit bank on sample
    indices), it exposes ``n_samples``, ``last_indices`` (the indices into ``x`` of the batch
    last returned) and ``epoch`` (the epoch, from 0, that batch belongs to)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.n_samples = len(x)
        self.bs = min(batch_size, len(x))
        self.gen = torch.Generator().manual_seed(seed)
        self._perm = torch.randperm(len(x), generator=self.gen)
        self._pos = 0
        self.epoch = 0
        self.last_indices = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> _Forever:
        return self

    def __next__(self) -> Batch:
        if self._pos + self.bs > len(self._perm):
            self._perm = torch.randperm(len(self.x), generator=self.gen)
            self._pos = 0
            self.epoch += 1
        idx = self._perm[self._pos : self._pos + self.bs]
        self._pos += self.bs
        self.last_indices = idx
        return self.x[idx], self.y[idx]


def train_sample(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """A fixed sample of ``n`` training examples (the same for every seed), on which the
    generalization gap is measured."""
    if n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    return x[idx], y[idx]


def classification_eval(
    x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], chunk: int = 2048
) -> Callable[[nn.Module], dict[str, float]]:
    """Evaluation function returning mean cross-entropy and accuracy on ``(x, y)``."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(x), chunk):
                out = model(x[i : i + chunk])
                total_loss += float(loss_fn(out, y[i : i + chunk])) * len(out)
                correct += int((out.argmax(-1) == y[i : i + chunk]).sum())
        model.train(was_training)
        return {"eval_loss": total_loss / len(x), "metric": correct / len(x)}

    return evaluate
