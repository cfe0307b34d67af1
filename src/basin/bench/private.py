"""Differentially private bench runs (``basin bench --dp-noise`` / ``--dp-epsilon``).

A run's ``dp`` configuration (:func:`dp_config`) is part of its key. The run trains with
:func:`basin.distributed.make_private` (Opacus: per-sample clipping, Gaussian noise, Poisson
sampling of the workload's training examples with probability ``1 / ceil(n / batch_size)``
per step, seeded by the run's seed); its record's ``privacy`` holds the epsilon spent, the
delta, the noise multiplier in use and the sample rate (:func:`spent`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["check_dp_run", "dp_config", "privatize", "spent"]

_KEYS = ("noise_multiplier", "target_epsilon", "delta", "max_grad_norm", "accountant")


def dp_config(dp: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's DP settings, validated and completed (``delta`` 1e-5, ``max_grad_norm`` 1.0,
    ``accountant`` ``"prv"``), or ``None`` for a non-private run."""
    if dp is None:
        return None
    if not isinstance(dp, dict):
        raise ValueError(f"dp must be a dict of DP settings or None, got {type(dp).__name__}")
    unknown = sorted(set(dp) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown DP settings {unknown} (known: {', '.join(_KEYS)})")
    from basin.distributed.dp import ACCOUNTANTS, _check_delta, _check_positive

    noise, eps = dp.get("noise_multiplier"), dp.get("target_epsilon")
    if (noise is None) == (eps is None):
        raise ValueError(
            "a private run needs exactly one of --dp-noise (noise multiplier) and --dp-epsilon "
            f"(target epsilon), got noise={noise!r}, epsilon={eps!r}"
        )
    out = {
        "noise_multiplier": None if noise is None else _check_positive("--dp-noise", noise),
        "target_epsilon": None if eps is None else _check_positive("--dp-epsilon", eps),
        "delta": _check_delta(dp.get("delta", 1e-5) if dp.get("delta") is not None else 1e-5),
        "max_grad_norm": _check_positive(
            "--dp-max-grad-norm",
            dp.get("max_grad_norm") if dp.get("max_grad_norm") is not None else 1.0,
        ),
        "accountant": dp.get("accountant") or "prv",
    }
    if out["accountant"] not in ACCOUNTANTS:
        raise ValueError(
            f"DP accountant must be one of {', '.join(ACCOUNTANTS)}, got {out['accountant']!r}"
        )
    return out


def _training_data(task: Any, what: str) -> torch.utils.data.Dataset:
    """The training examples of a task as a map-style dataset: the tensors of the in-memory
    workloads, or the dataset of a DataLoader workload."""
    from torch.utils.data import IterableDataset, TensorDataset

    b = task.batches
    x, y = getattr(b, "x", None), getattr(b, "y", None)
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return TensorDataset(x, y)
    ds = getattr(getattr(b, "loader", None), "dataset", None)
    if ds is not None and not isinstance(ds, IterableDataset) and hasattr(ds, "__len__"):
        return ds
    raise ValueError(
        f"{what}: differentially private training samples the training examples themselves "
        "(Poisson sampling); this workload's batches are generated, not drawn from a fixed "
        "training set (use a tensor workload: digits_cnn, mnist1d_*, Workload.from_tensors / "
        "from_loaders)"
    )


def check_dp_run(
    dp: dict[str, Any], workload: Any, optimizer: str, *, steps: int | None,
    sharpness_every: int, task: Any,
) -> None:  # fmt: skip
    """Refuse, with one ``ValueError``, a private run that cannot be made: a target epsilon
    without a step budget, sharpness during training, an optimizer or training method that
    evaluates extra gradients, a workload without a fixed training set, or a model with
    layers Opacus cannot train privately (named, with ``ModuleValidator.fix``)."""
    from basin.distributed.dp import check_dp_model
    from basin.optim import info

    if dp["target_epsilon"] is not None and steps is None:
        raise ValueError("--dp-epsilon needs a step budget (--steps): the noise is set for it")
    if sharpness_every:
        raise ValueError(
            "--sharpness-every is not available with DP: the Hessian of the training data "
            "between steps is not private"
        )
    entry = info(optimizer)
    if entry.needs_closure:
        raise ValueError(
            f"{optimizer} evaluates the gradient several times per step (it needs a closure); "
            "DP-SGD privatizes one gradient per step: use a single-gradient optimizer with DP"
        )
    if entry.method is not None:
        raise ValueError(
            f"{optimizer} adds a training method ({entry.method}) whose loss terms reach "
            "beyond one example's gradient; it cannot run with DP"
        )
    _training_data(task, f"workload {workload.name!r}")
    was = task.model.training
    task.model.train()
    try:
        check_dp_model(task.model)
    except ValueError as exc:
        raise ValueError(f"workload {workload.name!r}: {exc}") from None
    finally:
        task.model.train(was)


class _Cycle:
    """The Poisson-sampled loader's batches forever (one pass of it is ``1 / q`` steps)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.it = iter(loader)

    def __iter__(self) -> _Cycle:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            batch = next(self.it)
        return batch[0], batch[1]


def privatize(cfg: Any, task: Any, opt: Any) -> tuple[Any, Iterator[Any], Any]:
    """``(DP optimizer, Poisson-sampled batches, PrivateTraining)`` of a run: the task's
    model and optimizer through :func:`basin.distributed.make_private`, the batches sampled
    from the task's training examples, sampling and noise seeded from the run's seed."""
    from torch.utils.data import DataLoader

    from basin.distributed.dp import make_private

    # Opacus' backward hooks on a first layer whose input needs no gradient: harmless
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    dp = cfg.dp
    data = _training_data(task, f"workload {cfg.workload!r}")
    loader = DataLoader(
        data, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed)
    )
    private = make_private(
        task.model,
        opt,
        loader,
        noise_multiplier=dp["noise_multiplier"],
        target_epsilon=dp["target_epsilon"],
        steps=cfg.steps if dp["target_epsilon"] is not None else None,
        delta=dp["delta"],
        max_grad_norm=dp["max_grad_norm"],
        accountant=dp["accountant"],
        noise_generator=torch.Generator().manual_seed(cfg.seed + 1_000_003),
    )
    dp_opt, base = private.optimizer, opt
    if callable(getattr(base, "train", None)) and callable(getattr(base, "eval", None)):
        dp_opt.train, dp_opt.eval = base.train, base.eval  # Schedule-Free's two points
    return dp_opt, _Cycle(private.data_loader), private


def spent(private: Any) -> dict[str, Any]:
    """What a private run's record holds: the epsilon spent (Opacus' accountant) at its
    delta, the noise multiplier in use, the sample rate and the steps counted."""
    return {
        "epsilon": private.epsilon(),
        "delta": private.delta,
        "noise_multiplier": private.noise_multiplier,
        "target_epsilon": private.target_epsilon,
        "sample_rate": private.sample_rate,
        "steps": private.steps,
        "max_grad_norm": private.max_grad_norm,
        "accountant": private.accountant,
    }
