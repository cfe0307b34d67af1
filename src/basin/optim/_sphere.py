"""What HyperP and Normalize-and-Project share: a wrapper over an optimizer instance that keeps
chosen weights at a fixed Frobenius norm (their norm at construction, or ``radius``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ._base import check_positive


class FixedNormWrapper:
    """Base class. ``params``: the tensors kept at a fixed norm (default: every parameter of
    ``optimizer`` with ``ndim >= 2``); ``norms[i]``: the target norm of ``params[i]``.
    Subclasses set ``_name`` (messages) and ``_state_key`` (their entry in the state dict) and
    implement ``step``."""

    _name = "FixedNormWrapper"
    _state_key = "fixed_norm"
    _what = "fixed-norm weights"
    _matrices_only = False  # True: a given parameter with ndim < 2 is refused

    def __init__(
        self,
        optimizer: Optimizer,
        params: Iterable[Tensor] | None = None,
        *,
        radius: float | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer)!r}"
            )
        if radius is not None:
            check_positive("radius", radius)
        self.optimizer = optimizer
        owned = [p for g in optimizer.param_groups for p in g["params"]]
        ids = {id(p) for p in owned}
        if params is None:
            chosen = [p for p in owned if p.ndim >= 2]
        else:
            chosen = list(params)
            for i, p in enumerate(chosen):
                if not isinstance(p, Tensor) or id(p) not in ids:
                    raise ValueError(f"params[{i}] is not a parameter of the optimizer")
                if self._matrices_only and p.ndim < 2:
                    raise ValueError(f"params[{i}] has ndim {p.ndim}: {self._name} is for matrices")
        if not chosen:
            raise ValueError("params: no parameter with ndim >= 2 to keep at a fixed norm")
        if len({id(p) for p in chosen}) != len(chosen):
            raise ValueError("params: a tensor is listed twice")
        self.params = chosen
        self.norms: list[float] = []
        for i, p in enumerate(chosen):
            n = float(p.detach().double().norm())
            if not n > 0 or not math.isfinite(n):
                raise ValueError(
                    f"params[{i}] has norm {n}: {self._name} needs a finite nonzero weight"
                )
            self.norms.append(float(radius) if radius is not None else n)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), self._state_key: {"norms": self.norms}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        norms = list(state[self._state_key]["norms"])
        if len(norms) != len(self.params):
            raise ValueError(
                f"{self._name} state has {len(norms)} {self._what}, this {self._name} has "
                f"{len(self.params)}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.norms = [float(n) for n in norms]
