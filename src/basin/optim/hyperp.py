"""HyperP: hypersphere (Frobenius-sphere) optimization with learning-rate transfer (Ren et al.,
"Rethinking Language Model Scaling under Transferable Hypersphere Optimization",
arXiv:2603.28743)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import check_positive, check_range
from ._sphere import FixedNormWrapper

__all__ = ["HyperP", "hyperp_lr"]


class HyperP(FixedNormWrapper):
    r"""Keep each weight matrix on its Frobenius sphere of radius ``R`` (its norm at
    construction, or ``radius``), moving it by a step of fixed relative size ``lr`` along the
    base optimizer's update direction (the authors' MuonH when the base is Muon)::

        D = W - W'                        W' = the base optimizer's step from W
        W <- W - lr * R * D / ||D||_F     (lr: the parameter's group learning rate)
        W <- W * R / ||W||_F

    so ``||W_{t+1} - W_t||_F ~ lr * ||W_t||_F`` whatever the width: the paper's width-transfer
    rule is that the same base ``lr`` is used at every width (no width factor; with Muon the base's
    own shape-dependent learning-rate adjustment drops out of ``D / ||D||``). Tokens: see
    :func:`hyperp_lr`. The base optimizer steps every other parameter as usual (biases, gains,
    and whatever is left out of ``params``: the authors exclude embeddings).

    ``params``: the matrices on the sphere (default: every parameter of ``optimizer`` with
    ``ndim >= 2``); ``radius``: one radius for all instead of their initial norms; ``eps``: a
    ``||D||`` at or below it leaves the weight where it is. The step holds a copy of the sphere
    matrices (one extra parameter's worth of memory while it runs).

    Reference: Ren, Liu, Shen, Chen, arXiv:2603.28743 (2026); code github.com/microsoft/ArchScale
    (``lit_gpt/optim/muon.py``, ``use_muonh``). Differences: docs/training-methods.md.
    """

    _name = "HyperP"
    _state_key = "hyperp"
    _what = "sphere matrices"
    _matrices_only = True

    def __init__(
        self,
        optimizer: Optimizer,
        params: Iterable[Tensor] | None = None,
        *,
        radius: float | None = None,
        eps: float = 1e-10,
    ) -> None:
        check_range("eps", eps, 0.0, math.inf, high_inclusive=False)
        super().__init__(optimizer, params, radius=radius)
        self.eps = float(eps)
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    @property
    def radii(self) -> list[float]:
        """The sphere radii (``norms``)."""
        return self.norms

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with torch.no_grad():
            before = [p.detach().clone() for p in self.params]
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        with torch.no_grad():
            for p, w, r in zip(self.params, before, self.norms):
                d = w - p
                dn = float(d.double().norm())
                if not dn > self.eps:
                    p.copy_(w)
                    continue
                group = self._group_of.get(id(p))
                if group is None:  # a group added after construction
                    self._group_of = {
                        id(q): g for g in self.optimizer.param_groups for q in g["params"]
                    }
                    group = self._group_of[id(p)]
                lr = float(group["lr"])
                new = w.double() - (lr * r / dn) * d.double()
                new.mul_(r / float(new.norm()))
                p.copy_(new)
        return loss

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}


def hyperp_lr(
    base_lr: float,
    *,
    tokens: float | None = None,
    base_tokens: float | None = None,
    exponent: float = 0.32,
) -> float:
    """HyperP's transferred learning rate: the base learning rate tuned at the smallest scale,
    unchanged across width, times the data-scaling power law ``(tokens / base_tokens) **
    -exponent`` (the paper's "magic exponent" 0.32) when both token counts are given."""
    check_positive("base_lr", base_lr)
    check_range("exponent", exponent, 0.0, math.inf, high_inclusive=False)
    if (tokens is None) != (base_tokens is None):
        raise ValueError("tokens and base_tokens must be given together (or neither)")
    if tokens is None or base_tokens is None:
        return float(base_lr)
    check_positive("tokens", tokens)
    check_positive("base_tokens", base_tokens)
    return float(base_lr) * (tokens / base_tokens) ** (-exponent)
