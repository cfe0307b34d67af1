"""Small helpers shared by the landscape modules (evaluation without touching the model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._hvp import batch_seed, functional_forward, normalize_batches, seeded_rng


def params_dict(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def classification_error(out: Tensor, y: Tensor) -> Tensor | None:
    """Fraction of examples whose arg-max logit is not the target, for ``(N, C)`` logits and
    integer class targets ``(N,)``; ``None`` for any other output/target form."""
    if (
        isinstance(out, Tensor)
        and isinstance(y, Tensor)
        and out.ndim == 2
        and out.shape[1] >= 2
        and y.ndim == 1
        and not y.is_floating_point()
        and not y.is_complex()
    ):
        return (out.argmax(1) != y).double().mean()
    return None


def evaluate_all(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    params: Mapping[str, Tensor] | None = None,
    metrics: Sequence[Callable] = (),
) -> tuple[float, list[float | None]]:
    """Batch-size-weighted mean loss and mean of each metric of ``model`` at ``params``
    (default: its own), computed on copies of the buffers so running statistics are not
    updated, in the parameters' dtype, under a seeded forked RNG (a random forward does not
    advance the caller's RNG). A metric that returns ``None`` on some batch gives ``None``."""
    batches = normalize_batches(data)
    total = sum(n for _, _, n in batches)
    forward = functional_forward(model)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    p = params if params is not None else {}
    loss_sum = 0.0
    sums: list[float | None] = [0.0 for _ in metrics]
    with torch.no_grad():
        for i, (x, y, nb) in enumerate(batches):
            with seeded_rng(batch_seed(0, i), device):
                out = forward(p, x)
            loss = loss_fn(out, y)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar")
            loss_sum += float(loss) * nb / total
            for j, metric in enumerate(metrics):
                v = metric(out, y)
                before = sums[j]
                sums[j] = None if v is None or before is None else before + float(v) * nb / total
    return loss_sum, sums


def evaluate(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    params: Mapping[str, Tensor] | None = None,
    metric: Callable | None = None,
) -> tuple[float, float | None]:
    """Batch-size-weighted mean loss (and metric) of ``model`` at ``params`` (default: its own),
    computed on copies of the buffers so running statistics are not updated."""
    loss, mets = evaluate_all(model, loss_fn, data, params, () if metric is None else (metric,))
    return loss, (mets[0] if metric is not None else None)
