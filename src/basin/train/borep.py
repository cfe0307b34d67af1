"""BO-REP: bilevel optimization under unbounded smoothness (Hao, Gong, Liu, ICLR 2024,
arXiv:2401.09587)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from basin.optim._base import check_int, check_range

__all__ = ["BOREP"]

Loss = Callable[[Any], Tensor]


class BOREP:
    r"""BO-REP for ``min_x F(x, y*(x))``, ``y*(x) = argmin_y g(x, y)`` (``g`` strongly convex in
    ``y``): normalized momentum on ``x``, lower-level *initialization refinement* (Epoch-SGD at
    ``x_0``) and *periodic* lower-level updates, and a Neumann-series hypergradient estimate::

        k = 0:             y <- EpochSGD(g(x_0, .), y)        (refine_epochs epochs; 0: skip)
        k > 0, k % I == 0: y <- N SGD steps on g(x_k, .)  (lower_lr)
        v_0 = grad_y F(x_k, y; xi),  v_q = (I - alpha H(zeta_q)) v_{q-1},  q = 1..Q-1
        h   = grad_x F(x_k, y; xi) - grad2_xy g(x_k, y; zeta_0) [alpha sum_q v_q]
        m  <- beta m + (1 - beta) h                        (m starts at 0)
        x  <- x - lr m / ||m||                             (norm over all upper parameters)

    ``upper_loss(batch)`` and ``lower_loss(batch)`` compute ``F`` and ``g`` on a batch from the
    current tensors ``upper_params`` / ``lower_params`` (leaves with ``requires_grad``, updated
    in place). :meth:`step` takes one upper batch ``xi`` and an iterator of lower batches, drawn
    in this order: the refinement's steps (first call only), the ``N`` lower steps (periodic
    calls), ``zeta_0``, then ``zeta_1..zeta_{Q-1}``. Epoch-SGD: epoch ``e`` runs
    ``refine_steps * 2^e`` steps at ``refine_lr / 2^e`` and restarts from the average of the
    points it evaluated gradients at.

    Arguments: ``lr`` (eta, > 0), ``beta`` (momentum, [0, 1)), ``lower_lr`` (gamma, > 0),
    ``period`` (I, >= 1), ``lower_steps`` (N, >= 1), ``neumann_terms`` (Q, >= 1),
    ``neumann_alpha`` (1/C, > 0; needs ``alpha < 2 / L`` for the lower Hessians' ``L``),
    ``refine_epochs`` (>= 0), ``refine_steps`` (>= 1), ``refine_lr`` (> 0, default ``lower_lr``).

    References: Hao, Gong, Liu, "Bilevel Optimization under Unbounded Smoothness: A New
    Algorithm and Convergence Analysis", ICLR 2024, arXiv:2401.09587; code
    github.com/MingruiLiu-ML-Lab/Bilevel-Optimization-under-Unbounded-Smoothness.
    """

    def __init__(
        self,
        upper_params: Sequence[Tensor],
        lower_params: Sequence[Tensor],
        upper_loss: Loss,
        lower_loss: Loss,
        *,
        lr: float = 1e-2,
        beta: float = 0.9,
        lower_lr: float = 1e-2,
        period: int = 1,
        lower_steps: int = 1,
        neumann_terms: int = 10,
        neumann_alpha: float = 0.1,
        refine_epochs: int = 0,
        refine_steps: int = 10,
        refine_lr: float | None = None,
    ) -> None:
        self.xs, self.ys = list(upper_params), list(lower_params)
        if not self.xs or not self.ys:
            raise ValueError("upper_params and lower_params must be non-empty")
        for t in self.xs + self.ys:
            if not (isinstance(t, Tensor) and t.is_leaf and t.requires_grad):
                raise ValueError("parameters must be leaf tensors with requires_grad=True")
        self.upper_loss, self.lower_loss = upper_loss, lower_loss
        pos = {"low_inclusive": False, "high_inclusive": False}
        self.lr = check_range("lr", lr, 0.0, math.inf, **pos)
        self.beta = check_range("beta", beta, 0.0, 1.0, high_inclusive=False)
        self.lower_lr = check_range("lower_lr", lower_lr, 0.0, math.inf, **pos)
        self.period = check_int("period", period, 1)
        self.lower_steps = check_int("lower_steps", lower_steps, 1)
        self.neumann_terms = check_int("neumann_terms", neumann_terms, 1)
        self.neumann_alpha = check_range("neumann_alpha", neumann_alpha, 0.0, math.inf, **pos)
        self.refine_epochs = check_int("refine_epochs", refine_epochs, 0)
        self.refine_steps = check_int("refine_steps", refine_steps, 1)
        rl = lower_lr if refine_lr is None else refine_lr
        self.refine_lr = check_range("refine_lr", rl, 0.0, math.inf, **pos)
        self.momentum = [torch.zeros_like(x) for x in self.xs]
        self.k = 0

    def _lower_grad(self, batch: Any) -> list[Tensor]:
        return list(torch.autograd.grad(self.lower_loss(batch), self.ys))

    def _sgd(self, batches: Iterator[Any], steps: int, lr: float, average: bool) -> None:
        avg = [torch.zeros_like(y) for y in self.ys]
        for _ in range(steps):
            if average:
                avg = [a + y.detach() for a, y in zip(avg, self.ys)]
            grads = self._lower_grad(next(batches))
            with torch.no_grad():
                for y, g in zip(self.ys, grads):
                    y.sub_(lr * g)
        if average:
            with torch.no_grad():
                for y, a in zip(self.ys, avg):
                    y.copy_(a / steps)

    def refine(self, lower_batches: Iterator[Any]) -> None:
        """Epoch-SGD on ``g(x, .)`` from the current ``y`` (called by the first :meth:`step`)."""
        for e in range(self.refine_epochs):
            self._sgd(lower_batches, self.refine_steps * 2**e, self.refine_lr / 2**e, True)

    def hypergradient(self, upper_batch: Any, lower_batches: Iterator[Any]) -> list[Tensor]:
        """The Neumann-series hypergradient estimate ``h`` at the current ``(x, y)``."""
        xs, ys = self.xs, self.ys
        grads = torch.autograd.grad(self.upper_loss(upper_batch), xs + ys, allow_unused=True)
        full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, xs + ys)]
        fx, v = full[: len(xs)], full[len(xs) :]
        gy0 = torch.autograd.grad(self.lower_loss(next(lower_batches)), ys, create_graph=True)
        acc = [t.clone() for t in v]
        a = self.neumann_alpha
        for _ in range(self.neumann_terms - 1):
            gy = torch.autograd.grad(self.lower_loss(next(lower_batches)), ys, create_graph=True)
            hv = torch.autograd.grad(gy, ys, grad_outputs=v, allow_unused=True)
            v = [vi if h is None else vi - a * h.detach() for vi, h in zip(v, hv)]
            acc = [s + vi for s, vi in zip(acc, v)]
        z = [a * s for s in acc]
        mixed = torch.autograd.grad(gy0, xs, grad_outputs=z, allow_unused=True)
        return [f.detach() if m is None else (f - m).detach() for f, m in zip(fx, mixed)]

    def step(self, upper_batch: Any, lower_batches: Iterator[Any]) -> list[Tensor]:
        """One iteration (see the class docstring); returns the hypergradient estimate ``h``."""
        lower_batches = iter(lower_batches)
        if self.k == 0:
            self.refine(lower_batches)
        elif self.k % self.period == 0:
            self._sgd(lower_batches, self.lower_steps, self.lower_lr, False)
        h = self.hypergradient(upper_batch, lower_batches)
        with torch.no_grad():
            for m, hi in zip(self.momentum, h):
                m.mul_(self.beta).add_(hi, alpha=1.0 - self.beta)
            norm = math.sqrt(sum(float(m.pow(2).sum()) for m in self.momentum))
            if norm > 0.0:
                for x, m in zip(self.xs, self.momentum):
                    x.sub_(self.lr / norm * m)
        self.k += 1
        return h
