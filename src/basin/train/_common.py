"""Shared pieces of the loss-based training methods: the trajectory KL term, hyperparameter
checks, and what the benchmark harness needs from a method (:class:`HarnessMethod`)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from basin.optim._base import check_int


def softened_kl(logits: Tensor, target_logits: Tensor, tau: float) -> Tensor:
    """``tau**2 * KL(softmax(target/tau) || softmax(logits/tau))``, summed over the last dim and
    averaged over every other position (``batchmean`` for ``[B, C]``), as Hinton et al.'s
    distillation loss and the SAF authors' ``F.kl_div(..., reduction="none").sum(-1).mean()``.
    Gradients flow into ``logits`` only."""
    target = F.softmax(target_logits.detach().to(logits.dtype) / tau, dim=-1)
    log_p = F.log_softmax(logits / tau, dim=-1)
    kl = F.kl_div(log_p, target, reduction="none").sum(-1)
    return kl.mean() * tau**2


def check_window(start_epoch: Any, end_epoch: Any) -> tuple[int, int | None]:
    """``start_epoch`` an integer >= -1; ``end_epoch`` None (never ends) or an integer > start."""
    start = check_int("start_epoch", start_epoch, -1)
    if end_epoch is not None:
        if isinstance(end_epoch, bool) or not isinstance(end_epoch, int) or end_epoch <= start:
            raise ValueError(
                f"end_epoch must be None or an integer > start_epoch ({start}), got {end_epoch!r}"
            )
    return start, end_epoch


def active(epoch: int, start_epoch: int, end_epoch: int | None) -> bool:
    """The authors' window: ``start_epoch < epoch < end_epoch`` (both strict)."""
    return epoch > start_epoch and (end_epoch is None or epoch < end_epoch)


class HarnessMethod(Protocol):
    """What ``basin bench`` / ``tune`` / ``pbt`` call on a training method, built per run by the
    registry entry's ``method`` factory ``factory(task, **method_hparams)`` before the optimizer
    (``task.steps``: the run's planned steps, or ``None``), which raises ``ValueError`` when the
    task lacks what the method needs:

    - ``penalty(x, y, out)``: the term added to the task's loss for the batch ``(x, y)`` whose
      model output is ``out`` (called once per forward of the step, inside the closure for
      closure optimizers); its extra forward passes run here, so the run's measured step time
      includes them.
    - ``after_step(model)``: after each optimizer step (EMA updates).
    - ``state_dict()`` / ``load_state_dict(d)``: the method's state (PBT checkpoints it).
    - ``state_bytes``: bytes of the method's state, added to the run's ``state_bytes``."""

    state_bytes: int

    def penalty(self, x: Any, y: Any, out: Tensor) -> Tensor: ...

    def after_step(self, model: nn.Module) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def probe_output(task: Any, method: str) -> tuple[Tensor, Tensor]:
    """The model's output and the targets on the task's probe batch (eval mode, no grad, the
    model's mode restored), for checking what a method needs from the task."""
    x, y = task.probe_batch
    model = task.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    if not isinstance(out, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{method} needs a model returning a tensor of logits")
    return out, y


def require_class_logits(task: Any, method: str, *, per_sample: bool) -> int:
    """The number of classes of a task whose model outputs class logits for integer targets:
    ``[B, C]`` for ``[B]`` targets (``per_sample``), or ``[..., C]`` for ``[...]`` targets (per
    token). ``ValueError`` naming the method otherwise (regression, scalar objectives)."""
    out, y = probe_output(task, method)
    integer = not (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool)
    if per_sample:
        ok = integer and out.ndim == 2 and y.ndim == 1 and out.shape[0] == y.shape[0]
        want = "per-sample class logits [batch, classes] for integer class targets [batch]"
    else:
        ok = integer and out.ndim >= 2 and tuple(out.shape[:-1]) == tuple(y.shape)
        want = "class logits [..., classes] for integer class targets [...]"
    if not ok or out.shape[-1] < 2:
        raise ValueError(
            f"{method} needs {want}; this workload's model gives {tuple(out.shape)} for "
            f"targets {tuple(y.shape)} ({y.dtype})"
        )
    return int(out.shape[-1])


def tensor_bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def register_loss_method(
    name: str, state_memory: float, state_note: str, method_defaults: dict[str, Any]
) -> None:
    """The registry entry of a trajectory-loss method (SAF, MESA): over torch SGD with
    momentum 0.9 (the base ``torch:sgd`` and ``sam`` use, so the comparison is like for like),
    its learning rate and ``lam`` searched, built in the harness by
    ``basin.train.<name>:bench_method``."""
    from basin.optim.param_groups import decay_groups
    from basin.optim.registry import LR_SGD, OptimInfo, Paper, register

    register(
        OptimInfo(
            name=name,
            cls=torch.optim.SGD,
            paper=Paper("Sharpness-Aware Training for Free", "Du et al.", "2205.14083", 2022),
            state_memory=state_memory,
            state_note=state_note,
            capabilities=frozenset({"method"}),
            family="sgd",
            lr_scaling="linear",
            lr_from={"lr": (name, "sgd")},
            defaults={"momentum": 0.9},
            search_space={
                "lr": LR_SGD,
                "lam": {"type": "float", "low": 0.01, "high": 3.0, "log": True},
            },
            param_groups=decay_groups,
            method=f"basin.train.{name}:bench_method",
            method_defaults=method_defaults,
        )
    )


class BinarizableLinear(nn.Linear):
    """A hidden layer of a binary network, marked for a binary training method: real-valued
    (``F.linear(hardtanh(x), W, b)``, the clipped relaxation of ``sign``) until the method
    (``reste``, ``biper``: :func:`swap_binarizable`) replaces it by its binarized layer,
    whose own ``sign`` of the input takes the place of ``hardtanh``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(F.hardtanh(input), self.weight, self.bias)


def swap_binarizable(model: nn.Module, method: str, make: Any) -> list[nn.Module]:
    """Replace every :class:`BinarizableLinear` of ``model`` (in place) by ``make(layer)``, a
    binarized layer sharing its ``weight`` and ``bias``; returns the new layers. ``ValueError``
    naming ``method`` when the model has none."""
    found = [(n, m) for n, m in model.named_modules() if type(m) is BinarizableLinear]
    if not found:
        raise ValueError(
            f"{method} needs a binary-network workload whose hidden layers are "
            f"basin.train.BinarizableLinear (e.g. mnist1d_bnn); this workload has none"
        )
    new = []
    for name, old in found:
        layer = make(old)
        layer.weight, layer.bias = old.weight, old.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        new.append(layer)
    return new


def planned_steps(task: Any, method: str) -> int:
    """The run's planned optimizer steps (``task.steps``, set by the harness), which a
    scheduled method spreads its schedule over; ``ValueError`` naming ``method`` when the run
    has none (a time budget alone)."""
    steps = getattr(task, "steps", None)
    if steps is None:
        raise ValueError(f"{method} needs a step budget (steps=...), to schedule over the run")
    return check_int("steps", steps, 1)


class StepScheduledMethod:
    """A bench training method that only follows the run's step count (ReSTE's ``o``,
    BiPer's stage): ``apply(step)`` sets the model for 0-based step ``step``, at construction,
    after every optimizer step and after a ``load_state_dict`` (a restored PBT member goes on
    where its donor was). No loss term, no state beyond the step."""

    state_bytes = 0

    def __init__(self, apply: Any) -> None:
        self.apply = apply
        self.step = 0
        apply(0)

    def penalty(self, x: Any, y: Any, out: Tensor) -> Tensor:
        return out.new_zeros(())

    def after_step(self, model: Any) -> None:
        self.step += 1
        self.apply(self.step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.apply(self.step)
