"""ReSTE: the rectified straight-through estimator for binary networks (Wu et al., ICCV 2023,
arXiv:2308.06689)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from basin.optim._base import check_int, check_range

from ._common import StepScheduledMethod

__all__ = [
    "ReSTEConv2d",
    "ReSTELinear",
    "ReSTESchedule",
    "reste_grad",
    "reste_o",
    "reste_sign",
]


def _check_o(o: Any) -> float:
    return check_range("o", o, 1.0, math.inf, high_inclusive=False)


def reste_grad(x: Tensor, o: float, t: float = 1.5, interval: float = 0.1) -> Tensor:
    """ReSTE's backward slope ``d sign(x) / dx`` at ``x``: the derivative of the rectified
    power ``sign(x) |x|^(1/o)``, ``(1/o) |x|^((1-o)/o)``, for ``interval < |x| <= t``; the
    secant slope of that power over ``[0, interval]``, ``interval^(1/o - 1)``, for
    ``|x| <= interval`` (where the derivative blows up); 0 for ``|x| > t``."""
    ax = x.abs()
    power = torch.pow(ax.clamp_min(interval), (1.0 - o) / o) / o
    near = torch.full_like(x, interval ** (1.0 / o - 1.0))
    slope = torch.where(ax <= interval, near, power)
    return torch.where(ax <= t, slope, torch.zeros_like(x))


class _ReSTESign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, o: float, t: float, interval: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.args = (o, t, interval)
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        return grad * reste_grad(x, *ctx.args), None, None, None


def reste_sign(x: Tensor, o: float = 1.0, t: float = 1.5, interval: float = 0.1) -> Tensor:
    """``sign(x)`` forward, :func:`reste_grad` backward. ``o`` >= 1 (1: the clipped STE),
    ``t`` the clipping threshold (1.5), ``interval`` the near-zero band (0.1), both as the
    authors' code."""
    _check_o(o)
    check_range("t", t, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    check_range("interval", interval, 0.0, t, low_inclusive=False, high_inclusive=False)
    return _ReSTESign.apply(x, float(o), float(t), float(interval))


def reste_o(epoch: int, epochs: int, o_end: float = 3.0) -> float:
    """The authors' schedule of ``o``: ``1 + (o_end - 1) (1 - cos(pi/2 * epoch / epochs))``,
    from 1 (STE) at epoch 0 towards ``o_end`` (3) at the end."""
    epochs = check_int("epochs", epochs, 1)
    epoch = check_int("epoch", epoch, 0)
    o_end = _check_o(o_end)
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi / 2 * epoch / epochs))


class _ReSTELayer:
    """Weights ``mean|W| * reste_sign(W)``, inputs ``reste_sign(x)`` (unless
    ``binarize_input=False``), then the layer's op; ``o`` / ``o_a`` set per epoch."""

    o: float
    o_a: float
    t: float
    t_a: float
    binarize_input: bool

    def _init_reste(self, t: float, binarize_input: bool) -> None:
        self.o = self.o_a = 1.0
        self.t = self.t_a = check_range(
            "t", t, 0.0, math.inf, low_inclusive=False, high_inclusive=False
        )
        if not isinstance(binarize_input, bool):
            raise ValueError(f"binarize_input must be True or False, got {binarize_input!r}")
        self.binarize_input = binarize_input

    def binary_weight(self) -> Tensor:
        w: Tensor = self.weight  # type: ignore[attr-defined]
        # the scale is differentiated too, as in the authors' layer
        return reste_sign(w, self.o, self.t) * w.abs().mean()

    def binary_input(self, x: Tensor) -> Tensor:
        return reste_sign(x, self.o_a, self.t_a) if self.binarize_input else x

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, o={self.o:.3g}, binarize_input={self.binarize_input}"


class ReSTELinear(_ReSTELayer, nn.Linear):
    """A binary ``nn.Linear`` trained with ReSTE (arXiv:2308.06689): output
    ``F.linear(sign(x), mean|W| sign(W), bias)``; ``sign`` back-propagates by
    :func:`reste_grad` with the layer's ``o`` (weights) and ``o_a`` (inputs), set each epoch by
    :class:`ReSTESchedule`. ``t`` 1.5; ``binarize_input`` True (1-bit activations; False:
    binary weights, real inputs)."""

    def __init__(self, *args: Any, t: float = 1.5, binarize_input: bool = True, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._init_reste(t, binarize_input)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.binary_input(input), self.binary_weight(), self.bias)


class ReSTEConv2d(_ReSTELayer, nn.Conv2d):
    """A binary ``nn.Conv2d`` trained with ReSTE (arXiv:2308.06689); as :class:`ReSTELinear`,
    every conv setting kept."""

    def __init__(self, *args: Any, t: float = 1.5, binarize_input: bool = True, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._init_reste(t, binarize_input)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.binary_input(input), self.binary_weight(), self.bias)


class ReSTESchedule:
    """Sets ``o`` (weights) and ``o_a`` (inputs) of every ReSTE layer of ``model`` to
    :func:`reste_o` of the epoch: call ``step(epoch)`` at the start of each epoch (0-based),
    of ``epochs``; ``o_end`` 3 (the authors' default)."""

    def __init__(self, model: nn.Module, epochs: int, o_end: float = 3.0) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _ReSTELayer)]
        if not self.layers:
            raise ValueError("ReSTESchedule: the model has no ReSTE layer")
        self.epochs = check_int("epochs", epochs, 1)
        self.o_end = _check_o(o_end)
        self.o = 1.0

    def step(self, epoch: int) -> float:
        self.o = reste_o(epoch, self.epochs, self.o_end)
        for m in self.layers:
            m.o = m.o_a = self.o
        return self.o


def bench_method(task: Any, o_end: float = 3.0) -> StepScheduledMethod:
    """The harness's ReSTE (registry entry ``reste``): every
    :class:`basin.train.BinarizableLinear` of the task's model becomes a :class:`ReSTELinear`
    sharing its parameters, in place, and ``o`` of step ``s`` (0-based) of the run's
    ``task.steps`` is :func:`reste_o` ``(s, task.steps, o_end)``: the authors' per-epoch
    schedule with one step as the epoch. ``ValueError`` for a model without such layers or
    a run without a step budget."""
    from ._common import planned_steps, swap_binarizable

    o_end = check_range("o_end", o_end, 1.0, math.inf, high_inclusive=False)
    steps = planned_steps(task, "reste")

    def make(old: nn.Linear) -> ReSTELinear:
        w = old.weight
        return ReSTELinear(old.in_features, old.out_features, bias=old.bias is not None,
                           device=w.device, dtype=w.dtype)  # fmt: skip

    swap_binarizable(task.model, "reste", make)
    schedule = ReSTESchedule(task.model, steps, o_end)
    return StepScheduledMethod(lambda step: schedule.step(min(step, schedule.epochs)))


def _register() -> None:
    from basin.optim.param_groups import decay_groups
    from basin.optim.registry import LR_SGD, OptimInfo, Paper, register

    register(
        OptimInfo(
            name="reste",
            cls=torch.optim.SGD,
            paper=Paper(
                "Estimator Meets Equilibrium Perspective: A Rectified Straight Through "
                "Estimator for Binary Neural Networks Training",
                "Wu et al.",
                "2308.06689",
                2023,
            ),  # fmt: skip
            state_memory=1.0,
            state_note="SGD momentum; ReSTE keeps no state (o is set from the step count)",
            capabilities=frozenset({"method"}),
            family="sgd",
            lr_scaling="linear",
            lr_from={"lr": ("reste", "sgd")},
            defaults={"momentum": 0.9},
            search_space={
                "lr": LR_SGD,
                "o_end": {"type": "float", "low": 1.5, "high": 5.0},
            },
            param_groups=decay_groups,
            method="basin.train.reste:bench_method",
            method_defaults={"o_end": 3.0},
        )
    )


_register()
