"""BiPer: binary networks with periodic weight binarization (Vargas et al., CVPR 2024,
arXiv:2404.01278)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from basin.optim._base import check_range

from ._common import StepScheduledMethod

__all__ = [
    "BiPerConv2d",
    "BiPerLinear",
    "biper_activation_grad",
    "biper_sign",
    "biper_weight",
    "set_biper_stage",
]


class _SignSTE(torch.autograd.Function):
    """``sign`` forward, identity backward (BiPer's stage-2 weight quantizer)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def biper_activation_grad(x: Tensor) -> Tensor:
    """BiPer's (Bi-Real's) backward slope of the activation sign: ``max(0, 2 - 2|x|)``."""
    return (2.0 - 2.0 * x.abs()).clamp_min(0.0)


class _SignActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * biper_activation_grad(x)


def biper_sign(x: Tensor) -> Tensor:
    """Activation binarization: ``sign(x)`` forward, ``max(0, 2 - 2|x|)`` backward."""
    return _SignActivation.apply(x)


def biper_weight(w: Tensor, w0: float = 30.0, stage: int = 1) -> Tensor:
    """BiPer's weights: ``sin(w0 w)`` in stage 1 (smooth), ``sign(sin(w0 w))`` in stage 2 with
    the identity (straight-through) backward through ``sign``, so the gradient is still
    ``w0 cos(w0 w)`` times the upstream one."""
    s = torch.sin(w0 * w)
    return s if stage == 1 else _SignSTE.apply(s)


def _check_stage(stage: Any) -> int:
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return int(stage)


class _BiPerLayer:
    training: bool
    """Inputs normalised per sample (training mode) and binarized, weights periodic, the output
    scaled by a learnable per-output ``alpha``."""

    w0: float
    stage: int
    binarize_input: bool
    alpha: nn.Parameter

    def _init_biper(self, w0: float, stage: int, binarize_input: bool, n_out: int) -> None:
        self.w0 = check_range("w0", w0, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        self.stage = _check_stage(stage)
        if not isinstance(binarize_input, bool):
            raise ValueError(f"binarize_input must be True or False, got {binarize_input!r}")
        self.binarize_input = binarize_input
        w: Tensor = self.weight  # type: ignore[attr-defined]
        # the authors initialise alpha uniformly in [0, 1)
        self.alpha = nn.Parameter(torch.rand(n_out, device=w.device, dtype=w.dtype))

    def binary_input(self, x: Tensor) -> Tensor:
        if not self.binarize_input:
            return x
        if self.training:  # the authors' per-sample scaling: changes the backward, not sign
            dims = tuple(range(1, x.ndim))
            x = x / torch.sqrt(x.var(dims, keepdim=True) + 1e-5)
        return biper_sign(x)

    def binary_weight(self) -> Tensor:
        return biper_weight(self.weight, self.w0, self.stage)  # type: ignore[attr-defined]

    def penalty(self) -> Tensor:
        """The authors' quantization-error term ``mean(sin^2(w0 W))`` (their scripts add it,
        times a scheduled ``tau``, to the loss)."""
        return torch.sin(self.w0 * self.weight).square().mean()  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, w0={self.w0:g}, stage={self.stage}"


class BiPerLinear(_BiPerLayer, nn.Linear):
    """A binary ``nn.Linear`` trained with BiPer (arXiv:2404.01278): output
    ``alpha * F.linear(sign(x~), q(W), bias)`` with ``q(W) = sin(w0 W)`` (stage 1) or
    ``sign(sin(w0 W))`` (stage 2, identity backward through sign), ``x~`` the input divided
    by its per-sample standard deviation in training mode, and ``sign`` back-propagating by
    ``max(0, 2 - 2|x~|)``. ``w0`` 30 (the authors' default; their scripts use 20), ``stage``
    1 or 2 (:func:`set_biper_stage`), ``binarize_input`` True."""

    def __init__(
        self,
        *args: Any,
        w0: float = 30.0,
        stage: int = 1,
        binarize_input: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self._init_biper(w0, stage, binarize_input, self.out_features)

    def forward(self, input: Tensor) -> Tensor:
        out = F.linear(self.binary_input(input), self.binary_weight(), self.bias)
        return out * self.alpha


class BiPerConv2d(_BiPerLayer, nn.Conv2d):
    """A binary ``nn.Conv2d`` trained with BiPer (arXiv:2404.01278); as :class:`BiPerLinear`,
    ``alpha`` per output channel, every conv setting kept."""

    def __init__(
        self,
        *args: Any,
        w0: float = 30.0,
        stage: int = 1,
        binarize_input: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self._init_biper(w0, stage, binarize_input, self.out_channels)

    def forward(self, input: Tensor) -> Tensor:
        out = self._conv_forward(self.binary_input(input), self.binary_weight(), self.bias)
        return out * self.alpha.view(-1, 1, 1)


def set_biper_stage(model: nn.Module, stage: int) -> int:
    """Switch every BiPer layer of ``model`` to ``stage`` (1: ``sin``, 2: ``sign(sin)``);
    returns the number of layers switched."""
    stage = _check_stage(stage)
    layers = [m for m in model.modules() if isinstance(m, _BiPerLayer)]
    if not layers:
        raise ValueError("set_biper_stage: the model has no BiPer layer")
    for m in layers:
        m.stage = stage
    return len(layers)


def bench_method(task: Any, w0: float = 20.0, stage2_at: float = 2.0 / 3.0) -> StepScheduledMethod:
    """The harness's BiPer (registry entry ``biper``): every
    :class:`basin.train.BinarizableLinear` of the task's model becomes a :class:`BiPerLinear`
    sharing its weight and bias (its ``alpha`` new, so built before the optimizer), in place;
    stage 1 for steps ``s < round(stage2_at * task.steps)`` (0-based), stage 2 after.
    ``stage2_at`` in [0, 1] (2/3: the authors' CIFAR-10 scripts, 600 + 300 epochs).
    ``ValueError`` for a model without such layers or a run without a step budget."""
    from ._common import planned_steps, swap_binarizable

    w0 = check_range("w0", w0, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    stage2_at = check_range("stage2_at", stage2_at, 0.0, 1.0)
    steps = planned_steps(task, "biper")

    def make(old: nn.Linear) -> BiPerLinear:
        w = old.weight
        return BiPerLinear(old.in_features, old.out_features, bias=old.bias is not None,
                           w0=w0, device=w.device, dtype=w.dtype)  # fmt: skip

    swap_binarizable(task.model, "biper", make)
    model, switch = task.model, round(stage2_at * steps)
    return StepScheduledMethod(lambda step: set_biper_stage(model, 1 if step < switch else 2))


def _register() -> None:
    from basin.optim.param_groups import decay_groups
    from basin.optim.registry import LR_SGD, OptimInfo, Paper, register

    register(
        OptimInfo(
            name="biper",
            cls=torch.optim.SGD,
            paper=Paper(
                "BiPer: Binary Neural Networks using a Periodic Function",
                "Vargas et al.",
                "2404.01278",
                2024,
            ),  # fmt: skip
            state_memory=1.0,
            state_note="SGD momentum; BiPer adds alpha (one per output) to the model",
            capabilities=frozenset({"method"}),
            family="sgd",
            lr_scaling="linear",
            lr_from={"lr": ("biper", "sgd")},
            defaults={"momentum": 0.9},
            search_space={
                "lr": LR_SGD,
                "w0": {"type": "float", "low": 5.0, "high": 50.0, "log": True},
            },
            param_groups=decay_groups,
            method="basin.train.biper:bench_method",
            method_defaults={"w0": 20.0, "stage2_at": 2.0 / 3.0},
        )
    )


_register()
