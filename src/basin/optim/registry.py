"""Optimizer registry: look optimizers up by name, whoever implements them.

Names: basin's own (``"adabelief"``), any ``torch.optim`` optimizer as ``"torch:<name>"`` and,
when the package is installed, any ``pytorch_optimizer`` optimizer as
``"pytorch_optimizer:<name>"``. Lookup is case-insensitive; unknown names raise ``ValueError``
with the closest known names.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["OptimInfo", "Paper", "available", "create", "get_class", "info", "register"]


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    arxiv: str
    year: int

    def cite(self) -> str:
        return f"{self.authors} ({self.year}). {self.title}. arXiv:{self.arxiv}"


@dataclass(frozen=True)
class OptimInfo:
    """What the benchmark and the CLI need to know about one of basin's optimizers.

    ``state_memory`` is optimizer state per parameter, in multiples of the parameter's size
    (e.g. Adam = 2.0), for the default hyperparameters; ``state_note`` qualifies it.
    ``capabilities`` are flags such as ``foreach``, ``compile``, ``maximize``, ``amsgrad``."""

    name: str
    cls: type[Optimizer]
    paper: Paper
    state_memory: float
    capabilities: frozenset[str] = field(default_factory=frozenset)
    state_note: str = ""


_REGISTRY: dict[str, OptimInfo] = {}

PREFIX_TORCH = "torch:"
PREFIX_PO = "pytorch_optimizer:"


def register(info: OptimInfo) -> OptimInfo:
    key = info.name.lower()
    if key in _REGISTRY and _REGISTRY[key].cls is not info.cls:
        raise ValueError(f"optimizer name {info.name!r} is already registered")
    _REGISTRY[key] = info
    return info


@cache
def _torch_optimizers() -> dict[str, type[Optimizer]]:
    out = {}
    for name, obj in vars(torch.optim).items():
        if inspect.isclass(obj) and issubclass(obj, Optimizer) and obj is not Optimizer:
            out[name.lower()] = obj
    return out


@cache
def _pytorch_optimizer_names() -> tuple[str, ...]:
    try:
        po = importlib.import_module("pytorch_optimizer")
    except Exception:  # not installed, or broken: the prefix is then unavailable
        return ()
    return tuple(po.get_supported_optimizers())


def available() -> list[str]:
    """Every name :func:`create` accepts: basin's, ``torch:*`` and ``pytorch_optimizer:*``."""
    names = sorted(_REGISTRY)
    names += [PREFIX_TORCH + n for n in sorted(_torch_optimizers())]
    names += [PREFIX_PO + n for n in _pytorch_optimizer_names()]
    return names


def info(name: str) -> OptimInfo:
    """Registry entry of one of basin's optimizers."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(_unknown(name, sorted(_REGISTRY)))
    return _REGISTRY[key]


def infos() -> list[OptimInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _unknown(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown optimizer {name!r}{hint} (see basin.optim.available())"


def get_class(name: str) -> type[Optimizer]:
    """The optimizer class for a registry name."""
    key = name.strip().lower()
    if key.startswith(PREFIX_TORCH):
        sub = key[len(PREFIX_TORCH) :]
        table = _torch_optimizers()
        if sub not in table:
            raise ValueError(_unknown(name, [PREFIX_TORCH + k for k in table]))
        return table[sub]
    if key.startswith(PREFIX_PO):
        sub = key[len(PREFIX_PO) :]
        names = _pytorch_optimizer_names()
        if not names:
            raise ValueError(
                f"{name!r} needs the pytorch_optimizer package: pip install pytorch-optimizer"
            )
        if sub not in names:
            raise ValueError(_unknown(name, [PREFIX_PO + k for k in names]))
        po = importlib.import_module("pytorch_optimizer")
        return po.load_optimizer(sub)
    if key not in _REGISTRY:
        raise ValueError(_unknown(name, available()))
    return _REGISTRY[key].cls


def create(name: str, params: Iterable[Any], **hyperparameters: Any) -> Optimizer:
    """Build an optimizer by name: ``create("adabelief", model.parameters(), lr=1e-3)``.

    Unknown hyperparameter names raise ``ValueError`` listing the accepted ones."""
    cls = get_class(name)
    accepted = _accepted_hyperparameters(cls)
    if accepted is not None:
        unknown = sorted(set(hyperparameters) - accepted)
        if unknown:
            raise ValueError(
                f"{name}: unknown hyperparameter(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
    return cls(params, **hyperparameters)


def _accepted_hyperparameters(cls: type) -> set[str] | None:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None  # accepts anything
        if p.name not in ("self", "params") and p.kind is not p.VAR_POSITIONAL:
            names.add(p.name)
    return names
