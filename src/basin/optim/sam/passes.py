"""The machinery around SAM's two passes: BatchNorm statistics from the first pass only, the
first pass under DDP's ``no_sync``, the finite check, and averaging the first gradient over
ranks when the perturbation is synchronized."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .._base import _maybe_all_finite

__all__ = ["average_over_ranks", "ddp_no_sync", "finite", "frozen_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """BatchNorm running statistics (and ``num_batches_tracked``) of ``model`` are restored on
    exit, exactly (a copy): forwards inside still normalise with batch statistics in train mode,
    but leave no trace. SAM's second, perturbed pass runs inside it, so the statistics come from
    the first pass only, as in the authors' code."""
    saved = []
    if model is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved.append((m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in saved:
                for k, b in m.named_buffers(recurse=False):
                    if k in bufs:
                        b.copy_(bufs[k])


def ddp_no_sync(model: nn.Module | None) -> contextlib.AbstractContextManager:
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def finite(grads: list[Tensor]) -> bool:
    return not grads or _maybe_all_finite(grads) or all(bool(g.isfinite().all()) for g in grads)


def average_over_ranks(grads: list[Tensor]) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
