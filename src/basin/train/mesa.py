"""MESA: Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022, arXiv:2205.14083)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from basin.optim._base import check_int, check_range

from ._common import (
    active,
    check_window,
    register_loss_method,
    require_class_logits,
    softened_kl,
    tensor_bytes,
)

__all__ = ["MESA", "bench_method"]


class MESA:
    r"""MESA, the memory-efficient variant of SAF: the trajectory loss against an exponential
    moving average of the weights instead of a per-sample logit bank::

        theta_ema <- decay * theta_ema + (1 - decay) * theta      (after every optimizer step)
        L = lam * tau^2 * KL(softmax(f_ema(x) / tau) || softmax(f(x) / tau))   (batchmean)
        active while start_epoch < epoch < end_epoch              (both strict, as the authors)

    In your own loop::

        mesa = basin.train.MESA(model)
        loss = loss_fn(logits, y) + mesa.penalty(logits, x, epoch)   # one no-grad EMA forward
        loss.backward(); opt.step(); mesa.update(model)

    The EMA model is a deep copy of ``model`` taken at construction, kept in eval mode with no
    gradients; like timm's ``ModelEmaV2`` (the authors' EMA) it averages every floating entry
    of the state dict, BatchNorm running statistics included, and its BatchNorm layers
    normalise with those averaged statistics. Logits may be ``[B, C]`` or per token
    ``[..., C]`` (the KL is over the last dimension, averaged over the rest). Cost: one
    forward of the EMA model per active step, and one copy of the weights.

    Arguments: ``lam`` 0.8 (>= 0), ``tau`` 5 (> 0), ``decay`` 0.9998 (in [0, 1)),
    ``start_epoch`` 5 (>= -1), ``end_epoch`` None (never; the authors' 360).

    Differences: lam 0.8 as the authors' README and ``run.sh`` (their code defaults to 0.3;
    docs/training-methods.md, "SAF and MESA"); integer buffers (``num_batches_tracked``) are
    copied, not averaged (timm's average truncates them); the EMA forward runs only on active
    steps (the authors run it every step, for logging).

    References: Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022,
    arXiv:2205.14083; code github.com/AngusDujw/SAF (``MESA_train.py``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = 0.8,
        tau: float = 5.0,
        decay: float = 0.9998,
        start_epoch: int = 5,
        end_epoch: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"MESA needs the nn.Module being trained, got {type(model).__name__}")
        self.lam = check_range("lam", lam, 0.0, math.inf, high_inclusive=False)
        self.tau = check_range("tau", tau, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        self.decay = check_range("decay", decay, 0.0, 1.0, high_inclusive=False)
        self.start_epoch, self.end_epoch = check_window(start_epoch, end_epoch)
        self.ema = copy.deepcopy(model)
        self.ema.eval()
        self.ema.requires_grad_(False)

    def active(self, epoch: int) -> bool:
        return active(epoch, self.start_epoch, self.end_epoch)

    def penalty(self, logits: Tensor, x: Any, epoch: int) -> Tensor:
        """``lam * tau^2 * KL(EMA || model)`` on the batch ``x`` whose model logits are
        ``logits``; 0 (and no EMA forward) outside the epoch window."""
        epoch = check_int("epoch", epoch, 0)
        if not self.active(epoch):
            return logits.new_zeros(())
        with torch.no_grad():
            target = self.ema(x)
        if target.shape != logits.shape:
            raise ValueError(
                f"MESA: the EMA model gives {tuple(target.shape)}, the logits are "
                f"{tuple(logits.shape)}"
            )
        return self.lam * softened_kl(logits, target, self.tau)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step toward ``model``'s current weights and buffers (after each step)."""
        mine, theirs = self.ema.state_dict(), model.state_dict()
        if mine.keys() != theirs.keys():
            raise ValueError("MESA.update: the model's state-dict keys differ from the EMA's")
        d = self.decay
        for k, e in mine.items():
            m = theirs[k].detach()
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.to(e), alpha=1.0 - d)
            else:
                e.copy_(m)

    @property
    def state_bytes(self) -> int:
        return tensor_bytes(*self.ema.state_dict().values())

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.clone() for k, v in self.ema.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])


class _BenchMESA:
    """MESA in the harness: the epoch from the task's batch iterator."""

    def __init__(self, mesa: MESA, batches: Any) -> None:
        self.mesa, self.batches = mesa, batches

    def penalty(self, x: Any, y: Any, out: Tensor) -> Tensor:
        return self.mesa.penalty(out, x, self.batches.epoch)

    def after_step(self, model: nn.Module) -> None:
        self.mesa.update(model)

    @property
    def state_bytes(self) -> int:
        return self.mesa.state_bytes

    def state_dict(self) -> dict[str, Any]:
        return self.mesa.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mesa.load_state_dict(state)


def bench_method(task: Any, **hp: Any) -> _BenchMESA:
    """The harness's MESA (registry entry ``mesa``): needs class logits (per sample or per
    token) and a batch iterator that counts epochs (every built-in one with class targets)."""
    require_class_logits(task, "mesa", per_sample=False)
    if not hasattr(task.batches, "epoch"):
        raise ValueError(
            f"mesa needs the epoch count: this workload's batches ({type(task.batches).__name__})"
            " do not expose .epoch"
        )
    return _BenchMESA(MESA(task.model, **hp), task.batches)


# bench runs are a few hundred steps: an EMA horizon of ~100 steps (decay 0.99,
# the authors' 0.9998 is ~5000 steps) and the term on from the second epoch
register_loss_method(
    "mesa",
    state_memory=2.0,
    state_note="SGD momentum (1.0) + the EMA model (1.0); 1 extra no-grad forward per active step",
    method_defaults={
        "lam": 0.8,
        "tau": 5.0,
        "decay": 0.99,
        "start_epoch": 0,
        "end_epoch": None,
    },
)
