"""ReSTE: the rectified straight-through estimator for binary networks (Wu et al., ICCV 2023,
arXiv:2308.06689)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from basin.optim._base import check_int, check_range

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
