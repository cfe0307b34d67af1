"""Parameter-group helpers."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["weight_decay_groups"]

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def weight_decay_groups(
    model: nn.Module, weight_decay: float, **group_options: Any
) -> list[dict[str, Any]]:
    """Two parameter groups: weight decay on weight matrices and kernels, none on biases,
    normalisation parameters and any other tensor with ``ndim <= 1``.

    Extra keyword arguments (e.g. ``lr``) are added to both groups. Parameters that do not
    require gradients are left out; shared parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim <= 1 or name == "bias" or isinstance(module, _NORM_TYPES):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]
    return [g for g in groups if g["params"]]
