"""SAF: Sharpness-Aware Training for Free (Du et al., NeurIPS 2022, arXiv:2205.14083)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from basin.optim._base import check_int, check_range

from ._common import (
    active,
    check_window,
    register_loss_method,
    require_class_logits,
    softened_kl,
    tensor_bytes,
)

__all__ = ["SAF", "bench_method"]


class SAF:
    r"""SAF's trajectory loss: keep each sample's logits from past epochs, and penalise the
    current logits' divergence from those recorded ``memory`` epochs ago::

        bank[i, e mod (E+1)] <- z_i(e)                    (detached, every time i is seen)
        L_tra = lam * tau^2 * mean_i KL(softmax(bank[i, (e-E) mod (E+1)] / tau)
                                         || softmax(z_i / tau))
        active while start_epoch < epoch < end_epoch      (both strict, as the authors)

    ``loss = loss_fn(logits, y) + saf.penalty(logits, indices, epoch)`` in your own loop; the
    loader must give each sample's index (:class:`basin.train.IndexedDataset`). The bank holds
    ``n_samples x (memory + 1) x n_classes`` numbers (``dtype``, float32 as the authors), on
    ``device``. A sample's slot from ``memory`` epochs ago holds what was recorded the last
    time that slot was written; one never written is zeros, i.e. a uniform target (the
    authors' bank also starts at zeros). It costs no extra forward or backward pass.

    Arguments (defaults: the paper's ImageNet setup): ``n_samples``, ``n_classes``;
    ``lam`` 0.3 (coefficient, >= 0), ``tau`` 5 (temperature, > 0), ``memory`` 3 (E~, epochs
    back, >= 1), ``start_epoch`` 5 (>= -1), ``end_epoch`` None (never; the authors' 300).

    Differences: lambda 0.3 with E~ 3 (the authors' README's lambda with their code's E~; see
    docs/training-methods.md, "SAF and MESA", for the sources); ``log_softmax`` for their
    ``log(softmax(.))`` (same value, stable); ``end_epoch=None`` for their fixed
    ``--kl_end_epoch``.

    References: Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022,
    arXiv:2205.14083; code github.com/AngusDujw/SAF (``SAF_train.py``).
    """

    def __init__(
        self,
        n_samples: int,
        n_classes: int,
        *,
        lam: float = 0.3,
        tau: float = 5.0,
        memory: int = 3,
        start_epoch: int = 5,
        end_epoch: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_samples = check_int("n_samples", n_samples, 1)
        self.n_classes = check_int("n_classes", n_classes, 2)
        self.lam = check_range("lam", lam, 0.0, math.inf, high_inclusive=False)
        self.tau = check_range("tau", tau, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        self.memory = check_int("memory", memory, 1)
        self.start_epoch, self.end_epoch = check_window(start_epoch, end_epoch)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.bank = torch.zeros(n_samples, memory + 1, n_classes, device=device, dtype=dtype)

    def active(self, epoch: int) -> bool:
        return active(epoch, self.start_epoch, self.end_epoch)

    def penalty(self, logits: Tensor, indices: Tensor, epoch: int) -> Tensor:
        """Record ``logits`` (``[B, C]``) of the samples ``indices`` (``[B]``) at ``epoch`` in the
        bank, and return ``lam * L_tra`` (0 outside the epoch window), to add to the loss."""
        if logits.ndim != 2 or logits.shape[1] != self.n_classes:
            raise ValueError(
                f"SAF needs logits [batch, {self.n_classes}], got {tuple(logits.shape)}"
            )
        idx = torch.as_tensor(indices, device=self.bank.device).long().reshape(-1)
        if idx.numel() != logits.shape[0]:
            raise ValueError(f"SAF: {idx.numel()} indices for a batch of {logits.shape[0]} logits")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_samples):
            raise ValueError(f"SAF: sample indices must lie in [0, {self.n_samples})")
        epoch = check_int("epoch", epoch, 0)
        slots = self.memory + 1
        # record first, then read the slot written `memory` epochs ago (the authors' order)
        self.bank[idx, epoch % slots] = logits.detach().to(self.bank)
        if not self.active(epoch):
            return logits.new_zeros(())
        past = self.bank[idx, (epoch - self.memory) % slots].to(logits.device)
        return self.lam * softened_kl(logits, past, self.tau)

    @property
    def state_bytes(self) -> int:
        return tensor_bytes(self.bank)

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bank = state["bank"]
        if tuple(bank.shape) != tuple(self.bank.shape):
            raise ValueError(
                f"SAF state: bank of shape {tuple(bank.shape)}, this SAF has "
                f"{tuple(self.bank.shape)} (n_samples, memory + 1, n_classes)"
            )
        self.bank.copy_(bank)


class _BenchSAF:
    """SAF in the harness: indices and epoch from the task's batch iterator."""

    def __init__(self, saf: SAF, batches: Any) -> None:
        self.saf, self.batches = saf, batches

    def penalty(self, x: Any, y: Any, out: Tensor) -> Tensor:
        return self.saf.penalty(out, self.batches.last_indices, self.batches.epoch)

    def after_step(self, model: Any) -> None:
        pass

    @property
    def state_bytes(self) -> int:
        return self.saf.state_bytes

    def state_dict(self) -> dict[str, Any]:
        return self.saf.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saf.load_state_dict(state)


def bench_method(task: Any, **hp: Any) -> _BenchSAF:
    """The harness's SAF (registry entry ``saf``): needs a task whose batch iterator exposes
    ``n_samples``, ``last_indices`` and ``epoch`` (the built-in in-memory workloads and
    ``Workload.from_tensors`` do) and whose model gives per-sample class logits."""
    n_classes = require_class_logits(task, "saf", per_sample=True)
    b = task.batches
    missing = [a for a in ("n_samples", "last_indices", "epoch") if not hasattr(b, a)]
    if missing:
        raise ValueError(
            "saf needs the sample index of every training example and the epoch: this "
            f"workload's batches ({type(b).__name__}) do not expose {', '.join(missing)} "
            "(use Workload.from_tensors, or a DataLoader over basin.train.IndexedDataset)"
        )
    device = next((p.device for p in task.model.parameters()), None)
    return _BenchSAF(SAF(b.n_samples, n_classes, device=device, **hp), b)


# bench epochs are short (mnist1d_mlp: 31 steps, digits_cnn: 22): the logits of 2
# epochs ago, active from epoch 2, so a few-hundred-step run trains with the term
register_loss_method(
    "saf",
    state_memory=1.0,
    state_note="SGD momentum; plus the logit bank, n_samples x (memory + 1) x classes; "
    "no extra pass",
    method_defaults={
        "lam": 0.3,
        "tau": 5.0,
        "memory": 2,
        "start_epoch": 1,
        "end_epoch": None,
    },
)
