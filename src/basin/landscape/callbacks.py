"""Trackers a training loop calls every N steps (sharpness = top Hessian eigenvalue, and trace).

Under full-batch gradient descent the sharpness rises to about ``2 / lr`` and hovers there (J. Cohen,
S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at
the Edge of Stability", arXiv:2103.00065, 2021); the tracker records the series to show it.
Each measurement warm-starts Lanczos from the previous top eigenvector, which changes slowly
between measurements, so it needs fewer products than a cold start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from ._hvp import CurvatureOperator, normalize_batches, select_parameters
from .eigen import hessian_eigenvalues
from .trace import METHODS, MIN_PRODUCTS, hessian_trace

__all__ = ["SharpnessRecord", "SharpnessTracker", "lightning_callback", "trainer_callback"]


@dataclass(frozen=True)
class SharpnessRecord:
    step: int
    sharpness: float
    sharpness_bound: float
    trace: float
    trace_stderr: float
    n_hvp: int
    seconds: float


class SharpnessTracker:
    """Record the top Hessian (or GGN) eigenvalue (and trace) of ``loss_fn`` on ``data`` every
    ``every`` steps: call ``tracker(step)`` (or ``tracker.step(step)``) from the training loop.

    Args:
        model: as for :func:`~basin.landscape.hessian_eigenvalues`.
        loss_fn: as for :func:`~basin.landscape.hessian_eigenvalues`.
        data: as for :func:`~basin.landscape.hessian_eigenvalues`; read once, checked and kept (a fixed measurement set: an iterator or DataLoader is
            materialised here), so empty data, a model without trainable parameters or an
            empty ``params`` selection raise ``ValueError`` at construction, not at the first
            measurement.
        kind: ``"hessian"`` (default) or ``"ggn"`` (Gauss-Newton sharpness; the trace is then
            the GGN's, exact with ``trace_method="gn-split"``).
        every: measure when ``step % every == 0``.
        trace_hvp: products for the trace (0 disables the trace).
        trace_method: any method of :func:`~basin.landscape.hessian_trace`: ``"hutch++"``
            (default), ``"hutchinson"``, ``"xtrace"``, ``"gn-split"`` (exact Gauss-Newton part
            plus sampled residual), ``"gn-xtrace"`` or ``"auto"``.
        tol: Lanczos tolerance (relative error bound of the sharpness).
        params: parameter subset.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        *,
        every: int = 10,
        trace_hvp: int = 0,
        trace_method: str = "hutch++",
        tol: float = 1e-4,
        params: str | Sequence[str] | None = None,
        seed: int = 0,
        kind: str = "hessian",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if trace_method not in METHODS:
            raise ValueError(f"trace_method must be one of {METHODS}, got {trace_method!r}")
        lo = MIN_PRODUCTS[trace_method]
        if (
            isinstance(trace_hvp, bool)
            or not isinstance(trace_hvp, int)
            or trace_hvp < 0
            or 0 < trace_hvp < lo
        ):
            raise ValueError(
                f"trace_hvp must be 0 or an integer >= {lo} for {trace_method}, got {trace_hvp!r}"
            )
        if kind not in ("hessian", "ggn"):
            raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        select_parameters(model, params)  # raises for no trainable parameters / bad names
        data = [(x, y) for x, y, _ in normalize_batches(data)]  # raises for empty data
        self.trace_method = trace_method
        self.kind = kind
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.trace_hvp, self.tol, self.params, self.seed = (
            every,
            trace_hvp,
            tol,
            params,
            seed,
        )
        self.records: list[SharpnessRecord] = []
        self._vec: Tensor | None = None

    def __call__(self, step: int) -> SharpnessRecord | None:
        return self.step(step)

    def step(self, step: int) -> SharpnessRecord | None:
        """Measure if ``step`` is a multiple of ``every``; returns the new record or None."""
        if step % self.every:
            return None
        return self.measure(step)

    def measure(self, step: int) -> SharpnessRecord:
        t0 = time.perf_counter()
        # one operator for both estimates: the trace reuses the eigen-solver's cached graphs
        op = CurvatureOperator(
            self.model, self.loss_fn, self.data, params=self.params, kind=self.kind, seed=self.seed
        )
        eig = hessian_eigenvalues(op, k=1, tol=self.tol, seed=self.seed, init=self._vec)
        self._vec = eig.eigenvectors[0]
        n = eig.n_hvp
        tr, se = math.nan, math.nan
        if self.trace_hvp:
            t = hessian_trace(
                op, n_hvp=self.trace_hvp, method=self.trace_method, seed=self.seed + step
            )
            tr, se, n = t.trace, t.stderr, n + t.n_hvp
        rec = SharpnessRecord(
            step=int(step),
            sharpness=float(eig.eigenvalues[0]),
            sharpness_bound=float(eig.error_bounds[0]),
            trace=tr,
            trace_stderr=se,
            n_hvp=n,
            seconds=time.perf_counter() - t0,
        )
        self.records.append(rec)
        return rec

    @property
    def steps(self) -> list[int]:
        return [r.step for r in self.records]

    @property
    def sharpness(self) -> list[float]:
        return [r.sharpness for r in self.records]

    @property
    def traces(self) -> list[float]:
        return [r.trace for r in self.records]

    def as_dicts(self) -> list[dict]:
        """Records as plain dicts (for JSON / the bench store)."""
        return [asdict(r) for r in self.records]


def trainer_callback(tracker: SharpnessTracker) -> Any:
    """A ``transformers.TrainerCallback`` that calls ``tracker(state.global_step)`` after every
    optimizer step and adds each record to the Trainer's logs (``sharpness``, and ``trace``
    when measured)::

        module, loss_fn = basin.landscape.hf_adapter(model)
        tracker = SharpnessTracker(module, loss_fn, fixed_batch, every=100)
        Trainer(model, args, ..., callbacks=[basin.landscape.trainer_callback(tracker)])

    ``tracker`` must measure the model the Trainer trains (through :func:`hf_adapter`, which
    wraps it without copying). Needs transformers (imported here, not by basin)."""
    from transformers import TrainerCallback

    class SharpnessCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            rec = tracker(state.global_step)
            if rec is not None:
                entry = {"sharpness": rec.sharpness, "step": rec.step}
                if not math.isnan(rec.trace):
                    entry["trace"] = rec.trace
                state.log_history.append(entry)
            return control

    return SharpnessCallback()


def lightning_callback(tracker: SharpnessTracker) -> Any:
    """A Lightning ``Callback`` that calls ``tracker(trainer.global_step)`` after every training
    batch (``global_step`` counts optimizer steps) and logs ``sharpness`` (and ``trace``) with
    the LightningModule's logger. Needs lightning (``lightning.pytorch``, else
    ``pytorch_lightning``)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback  # type: ignore[assignment]

    class SharpnessCallback(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec = tracker(trainer.global_step)
            if rec is not None and trainer.logger is not None:
                metrics = {"sharpness": rec.sharpness}
                if not math.isnan(rec.trace):
                    metrics["trace"] = rec.trace
                trainer.logger.log_metrics(metrics, step=rec.step)

    return SharpnessCallback()
