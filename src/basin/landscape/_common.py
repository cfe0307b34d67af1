"""Small helpers shared by the landscape modules (evaluation without touching the model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._hvp import functional_forward, normalize_batches


def params_dict(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def evaluate(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    params: Mapping[str, Tensor] | None = None,
    metric: Callable | None = None,
) -> tuple[float, float | None]:
    """Batch-size-weighted mean loss (and metric) of ``model`` at ``params`` (default: its own),
    computed on copies of the buffers so running statistics are not updated."""
    batches = normalize_batches(data)
    total = sum(n for _, _, n in batches)
    forward = functional_forward(model)
    p = params if params is not None else {}
    loss_sum, metric_sum = 0.0, 0.0
    with torch.no_grad():
        for x, y, nb in batches:
            out = forward(p, x)
            loss = loss_fn(out, y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar")
            loss_sum += float(loss) * nb / total
            if metric is not None:
                metric_sum += float(metric(out, y)) * nb / total
    return loss_sum, (metric_sum if metric is not None else None)
