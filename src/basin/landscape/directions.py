"""Directions in parameter space for loss-surface slices.

Filter normalisation follows H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the
Loss Landscape of Neural Nets", arXiv:1712.09913, 2018: a Gaussian direction ``d`` is rescaled
filter by filter (a filter = one slice along the output dimension of a weight with ndim >= 2:
a row of a Linear weight, an output channel of a Conv weight) so that
``||d_f|| = ||w_f||``; parameters with ndim <= 1 (biases, normalisation scales and shifts) get a
zero direction.

Differences from loss-landscapes 3.0: it draws uniform [0, 1) directions, not Gaussian ones, and
normalises after orthogonalising; here directions are Gaussian and are not orthogonalised (two
independent Gaussian directions in high dimension are nearly orthogonal, and orthogonalising
after normalisation would break the per-filter norms).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["direction_to", "eigenvector_direction", "filter_normalize", "random_direction"]


def filter_normalize(direction: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rescale ``direction`` filter by filter to the norms of ``model``'s weights; zero for
    parameters with ndim <= 1."""
    out = {}
    params = dict(model.named_parameters())
    for name, d in direction.items():
        if name not in params:
            raise ValueError(f"direction has a parameter {name!r} the model does not have")
        w = params[name].detach()
        if d.shape != w.shape:
            raise ValueError(
                f"direction {name!r} has shape {tuple(d.shape)}, weight {tuple(w.shape)}"
            )
        if w.ndim <= 1:
            out[name] = torch.zeros_like(w)
            continue
        d2 = d.reshape(d.shape[0], -1)
        w2 = w.reshape(w.shape[0], -1)
        dn = torch.linalg.vector_norm(d2, dim=1, keepdim=True)
        wn = torch.linalg.vector_norm(w2, dim=1, keepdim=True)
        scale = torch.where(
            dn > 0, wn / dn.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(dn)
        )
        out[name] = (d2 * scale).reshape(w.shape)
    return out


def random_direction(
    model: nn.Module, seed: int = 0, normalization: str | None = "filter"
) -> dict[str, Tensor]:
    """A Gaussian direction over the model's parameters, filter-normalised by default
    (``normalization=None`` keeps the raw Gaussian)."""
    if normalization not in ("filter", None):
        raise ValueError(f"normalization must be 'filter' or None, got {normalization!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d = {
        n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device)
        for n, p in model.named_parameters()
    }
    return filter_normalize(d, model) if normalization == "filter" else d


def direction_to(model_a: nn.Module, model_b: nn.Module) -> dict[str, Tensor]:
    """``w_b - w_a`` (the same architecture): the straight line from a to b is alpha in [0, 1]."""
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[n].shape != pb[n].shape for n in pa):
        raise ValueError("model_a and model_b must have the same parameter names and shapes")
    return {n: (pb[n].detach() - pa[n].detach()) for n in pa}


def eigenvector_direction(result, i: int, model: nn.Module) -> dict[str, Tensor]:
    """Eigenvector ``i`` of an :class:`~basin.landscape.EigenResult` as a direction over all of
    ``model``'s parameters (zero for parameters outside the eigen-computation's subset)."""
    vec = result.vector(i)
    return {
        n: vec[n].to(p.dtype) if n in vec else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }
