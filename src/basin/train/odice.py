"""ODICE's orthogonal-gradient update (Mao et al., ICLR 2024, arXiv:2402.00348)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from basin.optim._base import check_range

__all__ = ["orthogonal_gradient", "orthogonal_gradient_"]


def _grads(loss: Tensor, params: Sequence[Tensor], retain: bool) -> list[Tensor]:
    got = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]


def orthogonal_gradient(
    loss_forward: Tensor,
    loss_backward: Tensor,
    params: Iterable[Tensor],
    eta: float = 1.0,
    *,
    eps: float = 1e-10,
    retain_graph: bool = False,
) -> list[Tensor]:
    r"""The orthogonal-gradient combination of a forward and a backward loss term::

        g_f = d loss_forward / d theta        (the term through V(s))
        g_b = d loss_backward / d theta       (the term through V(s'))
        g   = g_f + eta * (g_b - (g_b . g_f) / max(||g_f||^2, eps) * g_f)

    The dot product and norm are over the concatenation of all ``params`` (one projection for
    the whole network, as the authors), and the coefficient is a constant (no gradient flows
    through it). Returns one tensor per parameter (zeros where neither loss reaches it); the
    graph is freed unless ``retain_graph``. ``eta`` >= 0 (1.0: the authors' default), ``eps``
    > 0 guards a vanishing ``g_f``. Use :func:`orthogonal_gradient_` to write ``.grad``.

    Reference: Mao, Xu, Chen, Zhan, Zhang, Xu, "ODICE: Revealing the Mystery of Distribution
    Correction Estimation via Orthogonal-gradient Update", ICLR 2024, arXiv:2402.00348.
    """
    eta = check_range("eta", eta, 0.0, float("inf"))
    eps = check_range("eps", eps, 0.0, float("inf"), low_inclusive=False)
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one tensor")
    for name, loss in (("loss_forward", loss_forward), ("loss_backward", loss_backward)):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor")
    g_f = _grads(loss_forward, params, retain=True)
    g_b = _grads(loss_backward, params, retain=retain_graph)
    dot = sum((torch.sum(b * f) for b, f in zip(g_b, g_f)), torch.zeros((), dtype=g_f[0].dtype))
    sq = sum((torch.sum(f * f) for f in g_f), torch.zeros((), dtype=g_f[0].dtype))
    coef = float(dot) / max(float(sq), eps)
    return [f + eta * (b - coef * f) for f, b in zip(g_f, g_b)]


def orthogonal_gradient_(
    loss_forward: Tensor,
    loss_backward: Tensor,
    params: Iterable[Tensor],
    eta: float = 1.0,
    *,
    eps: float = 1e-10,
    retain_graph: bool = False,
) -> None:
    """:func:`orthogonal_gradient`, accumulated into each parameter's ``.grad`` (as
    ``backward()`` does), so that other loss terms can be added with their own ``backward()``
    before or after and any optimizer's ``step()`` applies the sum."""
    params = list(params)
    combined = orthogonal_gradient(
        loss_forward, loss_backward, params, eta, eps=eps, retain_graph=retain_graph
    )
    for p, g in zip(params, combined):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g.detach())
