"""Normalize-and-Project (Lyle et al., NeurIPS 2024, arXiv:2407.01800)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from basin.optim._base import check_bool, check_positive
from basin.optim._sphere import FixedNormWrapper

__all__ = ["NormalizeAndProject", "effective_lr", "insert_layernorm", "nap_matched_lr"]

_ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
)


class NormalizeAndProject(FixedNormWrapper):
    r"""NaP's projection step over any optimizer: after each ``optimizer.step()`` every projected
    weight is rescaled back to its norm at construction (or to ``radius``)::

        w' = base optimizer's step from w
        w  <- w' * ||w_0|| / ||w'||          (Frobenius norm of the whole tensor)

    With layer normalization before each nonlinearity (:func:`insert_layernorm`) the network is
    scale-invariant in these weights, so fixing their norms fixes the effective learning rate
    (:func:`effective_lr`); the learning-rate schedule of ``optimizer`` then *is* the effective
    schedule. Schedule it as usual (``torch.optim.lr_scheduler`` on ``optimizer``), or reproduce an
    unconstrained run's implicit decay with :func:`nap_matched_lr`.

    ``params``: the tensors to project; default every parameter of ``optimizer`` with
    ``ndim >= 2`` (the weights of Linear / Conv / Embedding layers), so biases and normalization
    gains/offsets are left alone. ``radius``: project to this norm instead of the initial one.

    References: Lyle, Zheng, Khetarpal, Martens, van Hasselt, Pascanu, Dabney, "Normalization and
    effective learning rates in reinforcement learning", NeurIPS 2024, arXiv:2407.01800.
    """

    _name = "NaP"
    _state_key = "nap"
    _what = "projected weights"

    @torch.no_grad()
    def project(self) -> None:
        """Rescale each projected weight to its target norm (the norm is taken in float64)."""
        for p, r in zip(self.params, self.norms):
            n = float(p.double().norm())
            if n > 0 and math.isfinite(n):
                p.mul_(r / n)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.project()
        return loss


def effective_lr(lr: float, weight_norm: float, *, adaptive: bool = False) -> float:
    """The effective learning rate of a scale-invariant weight of norm ``weight_norm``:
    ``lr / ||w||**2`` for gradient-proportional steps (SGD: the gradient scales as ``1/||w||``
    and the angle moved as ``step/||w||``), ``lr / ||w||`` for adaptive steps whose size does not
    follow the gradient's scale (Adam, ``adaptive=True``)."""
    check_positive("weight_norm", weight_norm)
    check_bool("adaptive", adaptive)
    return lr / weight_norm if adaptive else lr / weight_norm**2


def nap_matched_lr(
    lr: float, weight_norm: float, projected_norm: float, *, adaptive: bool = False
) -> float:
    """The learning rate that gives a NaP weight held at ``projected_norm`` the effective learning
    rate an unconstrained one of norm ``weight_norm`` has under ``lr`` (NaP made to follow an
    unconstrained run's implicit schedule): ``lr * (projected / norm)**2``, or ``**1`` when
    ``adaptive``."""
    check_positive("projected_norm", projected_norm)
    return effective_lr(lr, weight_norm, adaptive=adaptive) * (
        projected_norm if adaptive else projected_norm**2
    )


def _features(layer: nn.Module) -> tuple[str, int] | None:
    if isinstance(layer, nn.Linear):
        return "linear", layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv", layer.out_channels
    return None


def insert_layernorm(model: nn.Module) -> nn.Module:
    """Put a normalization layer between each Linear / Conv layer and the activation that follows
    it inside any ``nn.Sequential`` of ``model`` (in place; returns ``model``): ``nn.LayerNorm``
    over the features after a Linear, ``nn.GroupNorm(1, C)`` (layer norm over channels and
    positions) after a Conv. Already-normalized pairs and layers not followed by an activation
    (e.g. the output head) are left alone; architectures outside ``nn.Sequential`` need their
    normalization placed by hand."""
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        layers = list(module)
        out: list[nn.Module] = []
        changed = False
        for i, layer in enumerate(layers):
            out.append(layer)
            kind = _features(layer)
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if kind is None or not isinstance(nxt, _ACTIVATIONS):
                continue
            ref = next(layer.parameters())
            norm: nn.Module = (
                nn.LayerNorm(kind[1]) if kind[0] == "linear" else nn.GroupNorm(1, kind[1])
            )
            out.append(norm.to(device=ref.device, dtype=ref.dtype))
            changed = True
        if changed:
            for key in list(module._modules):
                del module._modules[key]
            for j, layer in enumerate(out):
                module.add_module(str(j), layer)
    return model


class _BenchNaP:
    """NaP in the harness: the task's weights (``ndim >= 2``) projected back to their norms at
    the start of the run after every optimizer step; nothing added to the loss."""

    state_bytes = 0

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.ndim >= 2]
        self.norms = [float(p.detach().double().norm()) for p in self.params]

    def penalty(self, x: Any, y: Any, out: Tensor) -> Tensor:
        return out.new_zeros(())

    @torch.no_grad()
    def after_step(self, model: Any) -> None:
        for p, r in zip(self.params, self.norms):
            n = float(p.double().norm())
            if n > 0 and math.isfinite(n):
                p.mul_(r / n)

    def state_dict(self) -> dict[str, Any]:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["norms"]) != len(self.norms):
            raise ValueError("NaP state: a different number of projected weights")
        self.norms = [float(n) for n in state["norms"]]


def bench_method(task: Any) -> _BenchNaP:
    """The harness's NaP (registry entry ``nap``, over AdamW): projection only, on the workload's
    model as it is (its own normalization layers, if any; none is inserted, since the optimizer
    is built first). ``ValueError`` for a workload without weight matrices (bare points)."""
    params = [p for p in task.model.parameters() if p.ndim >= 2]
    if not params:
        raise ValueError(
            "nap needs a model with weight matrices (ndim >= 2); this workload has none"
        )
    if any(not float(p.detach().double().norm()) > 0 for p in params):
        raise ValueError("nap needs nonzero initial weights to project to their norms")
    return _BenchNaP(task.model)


def _register() -> None:
    from basin.optim.param_groups import decay_groups
    from basin.optim.registry import ADAM_SPACE, OptimInfo, Paper, register

    register(
        OptimInfo(
            name="nap",
            cls=torch.optim.AdamW,
            paper=Paper(
                "Normalization and effective learning rates in reinforcement learning",
                "Lyle et al.",
                "2407.01800",
                2024,
            ),
            state_memory=2.0,
            state_note="AdamW moments; NaP keeps one norm per weight matrix",
            capabilities=frozenset({"method"}),
            family="adaptive",
            lr_scaling="sqrt",
            lr_from={"lr": ("nap", "adaptive")},
            search_space=dict(ADAM_SPACE),
            param_groups=decay_groups,
            method="basin.train.nap:bench_method",
        )
    )


_register()
