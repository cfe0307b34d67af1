"""Optimizers that wrap a base optimizer (SAM/ASAM, GGPO): the base is built on the wrapper's
own parameter groups and shares them (the same dicts), so LR schedulers, ``add_param_group``
and state dicts reach both; the weights saved while a perturbation is applied travel in the
state dict."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ._base import BasinOptimizer

__all__ = ["WrapperOptimizer"]


class WrapperOptimizer(BasinOptimizer):
    """Base class. Subclasses set ``_algo`` (name in messages), ``_registry_names`` (their own
    registry names, refused as a base), call :meth:`_wrap` from ``__init__`` and may add to
    the state dict with :meth:`_extra_state` / :meth:`_load_extra_state`."""

    _algo: str
    _registry_names: tuple[str, ...] = ()

    def _wrap(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | str,
        own: dict[str, Any],
        base_hp: dict[str, Any],
    ) -> None:
        build = self._base_builder(base_optimizer, base_hp)
        self._own_keys = tuple(own)
        BasinOptimizer.__init__(self, params, own)
        for gi, group in enumerate(self.param_groups):
            self._validate(group, gi)
        self.base_optimizer = build(self.param_groups)
        self.param_groups = self.base_optimizer.param_groups  # the same dicts
        self.state = self.base_optimizer.state
        self.defaults = {**self.base_optimizer.defaults, **own}
        self.skipped_steps = 0
        self._backup: dict[Tensor, Tensor] = {}

    @classmethod
    def _base_builder(
        cls, base: Any, hp: dict[str, Any]
    ) -> Callable[[list[dict[str, Any]]], Optimizer]:
        """Check ``base_optimizer`` now (``ValueError`` naming it) and return its builder."""
        from .registry import create, resolve

        if isinstance(base, str):
            try:
                name = resolve(base)
            except ValueError as err:
                raise ValueError(f"base_optimizer: {err}") from None
            if name in cls._registry_names:
                raise ValueError(f"base_optimizer cannot be {cls._algo} itself")
            return lambda groups: create(name, groups, **hp)
        if inspect.isclass(base) and issubclass(base, Optimizer):
            if issubclass(base, cls._root()):
                raise ValueError(f"base_optimizer cannot be {cls._algo} itself")
            return lambda groups: base(groups, **hp)
        raise ValueError(
            f"base_optimizer must be a torch.optim.Optimizer class or a registry name, got {base!r}"
        )

    @classmethod
    def _root(cls) -> type:
        """The wrapper family ``cls`` belongs to (SAM for SAMSGD): the class just below
        WrapperOptimizer in its MRO."""
        mro = cls.__mro__
        return mro[mro.index(WrapperOptimizer) - 1]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # during __init__: the wrapper's own groups
            return Optimizer.add_param_group(self, param_group)
        for k in self._own_keys:
            param_group.setdefault(k, self.defaults[k])
        self._validate(param_group, len(self.param_groups))
        self.base_optimizer.add_param_group(param_group)

    @property
    def perturbed(self) -> bool:
        """True while the weights hold a perturbation (their originals are saved)."""
        return bool(self._backup)

    # ------------------------------------------------------------ state

    def _extra_state(self, index: dict[int, int]) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, own: dict[str, Any], params: list[Tensor]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and the shared groups (torch's packing), the class under
        ``"basin_optimizer"`` and, under the wrapper's name, its base's class, the skipped-step
        count and the weights saved while perturbed."""
        out = super().state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        out[self._algo.lower()] = {
            "base_optimizer": type(self.base_optimizer).__name__,
            "skipped_steps": self.skipped_steps,
            "backup": {index[id(p)]: v.clone() for p, v in self._backup.items()},
            **self._extra_state(index),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = self._algo.lower()
        own = state_dict.get(key, {})
        base = type(self.base_optimizer).__name__
        if own and own.get("base_optimizer") != base:
            raise ValueError(
                f"this {self._algo} state dict wraps {own.get('base_optimizer')}, not {base}: "
                f"load it into a {self._algo} over that optimizer"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != key})
        # torch rebuilt the groups and the state: hand the same objects to the base again
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        self.param_groups, self.state = self.base_optimizer.param_groups, self.base_optimizer.state
        params = [p for g in self.param_groups for p in g["params"]]
        self._backup = {
            params[int(i)]: v.to(params[int(i)]) for i, v in own.get("backup", {}).items()
        }
        self.skipped_steps = own.get("skipped_steps", 0)
        self._load_extra_state(own, params)
