"""The registry's SAM and ASAM: the wrapper over ``torch.optim.SGD`` with momentum 0.9 (the
papers' experiments), built by name (``create("sam", model)``, ``basin bench -o asam``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..param_groups import weight_decay_groups
from ..registry import LR_SGD, OptimInfo, Paper, register
from .wrapper import SAM

__all__ = ["ASAMSGD", "SAMSGD", "named_decay_groups"]


class SAMSGD(SAM):
    """``SAM`` over ``torch.optim.SGD`` with momentum 0.9 (the paper's experiments): what the
    registry builds for ``"sam"`` (``basin bench -o sam``). Same arguments as SAM and SGD."""

    _adaptive = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        rho: float | None = None,
        eta: float = 0.01,
        perturb_eps: float | None = None,
        sync_perturbation: bool = False,
        model: nn.Module | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(
            params, torch.optim.SGD, (0.5 if self._adaptive else 0.05) if rho is None else rho,
            self._adaptive, eta=eta, perturb_eps=perturb_eps, sync_perturbation=sync_perturbation,
            model=model, nonfinite=nonfinite, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach,
        )  # fmt: skip


class ASAMSGD(SAMSGD):
    """``SAM(adaptive=True)`` over SGD with momentum 0.9, ``rho`` 0.5 and ``eta`` 0.01 (the ASAM
    authors' defaults): what the registry builds for ``"asam"``."""

    _adaptive = True


def named_decay_groups(
    model: nn.Module, weight_decay: float | None = None, **group_options: Any
) -> list[dict[str, Any]]:
    """:func:`basin.optim.weight_decay_groups` (by default the optimizer's weight decay on
    weights, none on biases and norms) with ``param_names``, which ASAM's rule reads."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = weight_decay_groups(model, weight_decay, **group_options)
    for g in groups:
        g["param_names"] = [names[id(p)] for p in g["params"]]
    return groups


# the harness skips a step whose gradient overflows (the perturbed point of a run that is
# diverging): the run then ends as its loss says, not with an exception
_HARNESS = {"nonfinite": "skip"}
_CAPS = frozenset({"closure", "maximize", "param_groups", "amp", "distributed", "wrapper"})
_NOTE = "SGD momentum (1.0) + the weights saved during the step (1.0); 2 passes per step"

register(
    OptimInfo(
        name="sam",
        cls=SAMSGD,
        paper=Paper(
            "Sharpness-Aware Minimization for Efficiently Improving Generalization",
            "Foret et al.",
            "2010.01412",
            2020,
        ),
        state_memory=2.0,
        capabilities=_CAPS,
        state_note=_NOTE,
        family="sgd",
        lr_scaling="linear",
        lr_from={"lr": ("sam", "sgd")},
        search_space={
            "lr": LR_SGD,
            "rho": {"type": "float", "low": 0.01, "high": 0.5, "log": True},
        },
        param_groups=named_decay_groups,
        needs_closure=True,
        defaults=_HARNESS,
    )
)
register(
    OptimInfo(
        name="asam",
        cls=ASAMSGD,
        paper=Paper(
            "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep "
            "Neural Networks",
            "Kwon et al.",
            "2102.11600",
            2021,
        ),
        state_memory=2.0,
        capabilities=_CAPS,
        state_note=_NOTE,
        family="sgd",
        lr_scaling="linear",
        lr_from={"lr": ("asam", "sam", "sgd")},
        search_space={
            "lr": LR_SGD,
            "rho": {"type": "float", "low": 0.05, "high": 5.0, "log": True},
        },
        param_groups=named_decay_groups,
        needs_closure=True,
        defaults=_HARNESS,
    )
)
