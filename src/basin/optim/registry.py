"""Optimizer registry: the single source of truth about every optimizer basin can build.

Names: basin's own (``"adabelief"``), any ``torch.optim`` optimizer as ``"torch:<name>"`` and,
when the package is installed, any ``pytorch_optimizer`` optimizer as
``"pytorch_optimizer:<name>"``. A bare name that basin does not have resolves to ``torch:``
first, then ``pytorch_optimizer:`` (``"adamw"`` -> ``"torch:adamw"``, ``"lion"`` ->
``"pytorch_optimizer:lion"``), as timm and pytorch_optimizer do. Lookup is case-insensitive;
unknown names raise ``ValueError`` with the closest known names.

Each of basin's optimizers declares its :class:`OptimInfo` beside its class; third-party
optimizers get one from :data:`_EXTERNAL` (a few well-known ones) or a generic one. Everything
the benchmark, the tuner, PBT, the CLI and the tests need to know about an optimizer -- its
family and batch-size rule, which workload learning rate it takes, its harness defaults and
search space, how to split a model into parameter groups, whether it needs a closure -- is read
from here and nowhere else.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .param_groups import decay_groups

__all__ = [
    "OptimInfo",
    "Paper",
    "available",
    "create",
    "get_class",
    "info",
    "infos",
    "register",
    "resolve",
]


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    arxiv: str
    year: int


# ---------------------------------------------------------------- search spaces
# Default tuning spaces (format: basin.bench.space). Ranges follow AlgoPerf's baselines:
# learning rate log-uniform, 1 - beta log-uniform (``one_minus`` keeps betas below 1).
LR_ADAPTIVE = {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}
LR_SGD = {"type": "float", "low": 1e-4, "high": 1.0, "log": True}
LR_ANY = {"type": "float", "low": 1e-5, "high": 1.0, "log": True}
BETA1 = {"type": "float", "low": 1e-2, "high": 0.3, "log": True, "one_minus": True}
BETA2 = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "one_minus": True}
MOMENTUM = {"type": "float", "low": 1e-2, "high": 0.5, "log": True, "one_minus": True}
WEIGHT_DECAY = {"type": "float", "low": 1e-6, "high": 1e-1, "log": True}

ELEMENTWISE_CAPS = frozenset({"foreach", "compile", "maximize", "param_groups", "closure"})

ADAM_SPACE = {"lr": LR_ADAPTIVE, "betas[0]": BETA1, "betas[1]": BETA2, "weight_decay": WEIGHT_DECAY}
SGD_SPACE = {"lr": LR_SGD, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
LR_SPACE = {"lr": LR_ANY}


def _frozen(m: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class OptimInfo:
    """Everything any consumer needs to know about one optimizer.

    - ``paper``, ``state_memory`` (optimizer state per parameter, in multiples of the
      parameter's size, e.g. Adam = 2.0, at the default hyperparameters), ``state_note``.
    - ``family``: ``"adaptive"``, ``"sgd"``, ``"matrix"`` (a matrix rule for weight matrices,
      AdamW for the rest) or ``"quasi-newton"``.
    - ``lr_scaling``: batch-size rule for the learning rate, ``"linear"`` (SGD-type, Goyal et
      al. 2017) or ``"sqrt"`` (adaptive, Granziol et al. 2020) or ``"none"``.
    - ``lr_from``: which workload learning-rate entry each learning-rate hyperparameter takes
      (``{"lr": ("sgdsai", "sgd")}``: the workload's ``"sgdsai"`` entry, else its ``"sgd"``);
      a hyperparameter whose entries the workload lacks keeps the optimizer's own default.
    - ``defaults``: hyperparameters the harness sets beyond the class's own defaults (torch's
      SGD gets momentum 0.9).
    - ``search_space``: the default tuning space (format of :mod:`basin.bench.space`).
    - ``param_groups``: ``model -> parameter groups`` the optimizer needs when it is built from
      a model (weight-decay split, matrix/fallback split); ``None``: ``model.parameters()``.
    - ``needs_closure``: ``step(closure)`` re-evaluates the loss (L-BFGS).
    - ``method``: a training method that is more than an optimizer step (a loss term, an EMA
      teacher), run by the harness beside ``cls``: the import path ``"module:function"`` of its
      factory ``function(task, **method_hparams)``, resolved only when a run needs it (so
      ``basin.optim`` never imports ``basin.train``); it is called before the optimizer is
      built (it may change the model: swap layers, add parameters), with ``task.steps`` the
      run's planned steps (``None`` for a time budget alone). The factory returns an object with
      ``penalty(x, y, out)`` (added to the task's loss), ``after_step(model)``,
      ``state_dict()`` / ``load_state_dict()`` and ``state_bytes``
      (:class:`basin.train._common.HarnessMethod`), or raises ``ValueError`` when the task lacks
      what the method needs. ``create(name, ...)`` builds ``cls`` alone, the method's base
      optimizer.
    - ``method_defaults``: every hyperparameter of the method, with the harness's value; a
      run's hyperparameters named here go to the method, the others to ``cls``.
    - ``capabilities``: flags such as ``foreach``, ``fused``, ``compile``, ``maximize``,
      ``distributed``.
    """

    name: str
    cls: type[Optimizer]
    paper: Paper | None = None
    state_memory: float | None = None
    capabilities: frozenset[str] = field(default_factory=frozenset)
    state_note: str = ""
    family: str = "adaptive"
    lr_scaling: str = "sqrt"
    lr_from: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: _frozen({"lr": ("adaptive",)})
    )
    defaults: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    search_space: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _frozen(LR_SPACE))
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    needs_closure: bool = False
    method: str | None = None
    method_defaults: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.lr_scaling not in ("linear", "sqrt", "none"):
            raise ValueError(f"{self.name}: lr_scaling must be linear, sqrt or none")
        lr_from = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in self.lr_from.items()}
        object.__setattr__(self, "lr_from", _frozen(lr_from))
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        object.__setattr__(self, "method_defaults", _frozen(self.method_defaults))
        if self.method is not None and (":" not in self.method or self.method.startswith(":")):
            raise ValueError(f"{self.name}: method must be 'module:function', got {self.method!r}")
        if self.method is None and self.method_defaults:
            raise ValueError(f"{self.name}: method_defaults without a method")
        both = set(self.method_defaults) & set(self.defaults)
        if both:
            raise ValueError(f"{self.name}: {sorted(both)} both optimizer and method defaults")
        object.__setattr__(
            self, "search_space", _frozen({k: _frozen(v) for k, v in self.search_space.items()})
        )
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))

    def build_params(self, model: nn.Module, **options: Any) -> list[Any]:
        """The parameter groups (or parameters) this optimizer is built with from ``model``;
        ``options`` go to the builder (``head=``, ``transposed=`` for the matrix optimizers'
        :func:`basin.optim.matrix_param_groups`, ``weight_decay=`` and group options for
        :func:`basin.optim.weight_decay_groups`)."""
        if self.param_groups is None:
            if options:
                raise ValueError(
                    f"{self.name}: groups={options!r} given, but this optimizer is built from "
                    f"plain parameters (no group builder takes options)"
                )
            return [p for p in model.parameters() if p.requires_grad]
        try:
            return self.param_groups(model, **options)
        except TypeError as err:
            raise ValueError(f"{self.name}: bad groups= option(s) {options!r}: {err}") from None

    def split_hparams(self, hp: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(optimizer hyperparameters, method hyperparameters)`` of a run's ``hp``."""
        opt = {k: v for k, v in hp.items() if k not in self.method_defaults}
        return opt, {k: v for k, v in hp.items() if k in self.method_defaults}

    def build_method(self, task: Any, **method_hp: Any) -> Any:
        """The entry's training method for a bench ``task`` (``None`` for a plain optimizer):
        the factory named by :attr:`method`, called with :attr:`method_defaults` updated by
        ``method_hp``."""
        if self.method is None:
            if method_hp:
                raise ValueError(f"{self.name}: no training method takes {sorted(method_hp)}")
            return None
        module, _, fn = self.method.partition(":")
        factory = getattr(importlib.import_module(module), fn)
        return factory(task, **{**self.method_defaults, **method_hp})


FAMILIES = ("adaptive", "sgd", "matrix", "quasi-newton")

_REGISTRY: dict[str, OptimInfo] = {}

PREFIX_TORCH = "torch:"
PREFIX_PO = "pytorch_optimizer:"


def register(info: OptimInfo) -> OptimInfo:
    """Add one of basin's optimizers (its file calls this beside the class)."""
    key = info.name.lower()
    if key in _REGISTRY and _REGISTRY[key].cls is not info.cls:
        raise ValueError(f"optimizer name {info.name!r} is already registered")
    if ":" in key:
        raise ValueError(f"basin optimizer names have no prefix, got {info.name!r}")
    _REGISTRY[key] = replace(info, name=key)
    return _REGISTRY[key]


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


def _load_all() -> None:
    importlib.import_module("basin.optim")  # importing the package registers basin's optimizers
    # training methods with a registry entry (saf, mesa) register from their own modules
    importlib.import_module("basin.train")


def available() -> list[str]:
    """Every name :func:`create` accepts: basin's, ``torch:*`` and ``pytorch_optimizer:*``."""
    _load_all()
    names = sorted(_REGISTRY)
    names += [PREFIX_TORCH + n for n in sorted(_torch_optimizers())]
    names += [PREFIX_PO + n for n in _pytorch_optimizer_names()]
    return names


def _unknown(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown optimizer {name!r}{hint} (see basin.optim.available())"


def resolve(name: str) -> str:
    """The canonical name of ``name``: basin's own, else ``torch:<name>``, else
    ``pytorch_optimizer:<name>``; ``ValueError`` (with close names) for unknown names."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"optimizer name must be a non-empty string, got {name!r}")
    _load_all()
    key = name.strip().lower()
    if key.startswith(PREFIX_TORCH):
        sub = key[len(PREFIX_TORCH) :]
        if sub not in _torch_optimizers():
            raise ValueError(_unknown(name, [PREFIX_TORCH + k for k in _torch_optimizers()]))
        return key
    if key.startswith(PREFIX_PO):
        sub = key[len(PREFIX_PO) :]
        names = _pytorch_optimizer_names()
        if not names:
            raise ValueError(
                f"{name!r} needs the pytorch_optimizer package: pip install pytorch-optimizer"
            )
        if sub not in names:
            raise ValueError(_unknown(name, [PREFIX_PO + k for k in names]))
        return key
    if key in _REGISTRY:
        return key
    if key in _torch_optimizers():
        return PREFIX_TORCH + key
    if key in _pytorch_optimizer_names():
        return PREFIX_PO + key
    bare = sorted(_REGISTRY) + sorted(_torch_optimizers()) + list(_pytorch_optimizer_names())
    raise ValueError(_unknown(name, bare + available()))


def get_class(name: str) -> type[Optimizer]:
    """The optimizer class for a registry name."""
    return info(name).cls


@cache
def _external_class(key: str) -> type[Optimizer]:
    if key.startswith(PREFIX_TORCH):
        return _torch_optimizers()[key[len(PREFIX_TORCH) :]]
    po = importlib.import_module("pytorch_optimizer")
    return po.load_optimizer(key[len(PREFIX_PO) :])


def info(name: str) -> OptimInfo:
    """The :class:`OptimInfo` of any name :func:`create` accepts (bare names resolved)."""
    key = resolve(name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    return _external_info(key)


@cache
def _external_info(key: str) -> OptimInfo:
    cls = _external_class(key)
    spec = dict(_EXTERNAL.get(key, {}))
    accepted = _accepted_hyperparameters(cls)
    if "lr_from" not in spec and accepted is not None and "lr" not in accepted:
        spec["lr_from"] = {}
    if "param_groups" not in spec and _EXTERNAL.get(key) is None:
        spec["param_groups"] = None  # unknown third-party optimizers: plain parameters
    return OptimInfo(name=key, cls=cls, **spec)


def infos() -> list[OptimInfo]:
    """The entries of basin's own optimizers, by name."""
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def create(
    name: str,
    params: Iterable[Any] | nn.Module,
    *,
    groups: Mapping[str, Any] | None = None,
    **hyperparameters: Any,
) -> Optimizer:
    """Build an optimizer by name.

    ``params`` is what ``torch.optim`` takes (parameters or groups), or a model
    (``nn.Module``), in which case the optimizer's own parameter-group builder splits it
    (weight decay off for biases and norms; for matrix optimizers, hidden matrices to the
    matrix rule and embeddings, head and vectors to the AdamW fallback)::

        create("adabelief", model.parameters(), lr=1e-3)
        create("muon", model, lr=0.02)          # routed by basin.optim.matrix_param_groups
        create("muon", model, groups={"head": ["lm_head"], "transposed": ["proj"]})

    ``groups`` (with a model only) are options of the entry's group builder. Unknown
    hyperparameter names raise ``ValueError`` listing the accepted ones.

    An entry with a training method (:attr:`OptimInfo.method`: ``"saf"``, ``"mesa"``) builds
    its base optimizer alone (for both: ``torch.optim.SGD``, with the hyperparameters given;
    the harness adds momentum 0.9): the method itself is a loss term the benchmark harness
    adds, and in your own loop it is ``basin.train.SAF`` / ``basin.train.MESA``. Method
    hyperparameters (``lam``) are refused here, with a pointer to them."""
    entry = info(name)
    accepted = _accepted_hyperparameters(entry.cls)
    if accepted is not None:
        unknown = sorted(set(hyperparameters) - accepted)
        of_method = sorted(set(unknown) & set(entry.method_defaults))
        if of_method:
            raise ValueError(
                f"{name}: {', '.join(of_method)} belong to its training method "
                f"({entry.method}), not to its base optimizer {entry.cls.__name__}; "
                "basin.bench runs both, or build the method yourself (basin.train)"
            )
        if unknown:
            raise ValueError(
                f"{name}: unknown hyperparameter(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(accepted))}"
            )
    if isinstance(params, nn.Module):
        params = entry.build_params(params, **dict(groups or {}))
    elif groups:
        raise ValueError("groups= options need a model (nn.Module) as params, not a list")
    return entry.cls(params, **hyperparameters)


def _accepted_hyperparameters(cls: type) -> set[str] | None:
    try:
        sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None  # accepts anything
        if p.name not in ("self", "params") and p.kind is not p.VAR_POSITIONAL:
            names.add(p.name)
    return names


# Third-party optimizers the harness knows more about than the generic entry (learning rate
# from the workload's "adaptive" entry, learning rate alone searched, plain parameters).
_SGD_SPEC: dict[str, Any] = {
    "family": "sgd",
    "lr_scaling": "linear",
    "lr_from": {"lr": ("sgd",)},
    "search_space": SGD_SPACE,
    "param_groups": decay_groups,
}
_ADAM_SPEC: dict[str, Any] = {"search_space": ADAM_SPACE, "param_groups": decay_groups}
_EXTERNAL: dict[str, dict[str, Any]] = {
    "torch:adamw": _ADAM_SPEC,
    "torch:adam": _ADAM_SPEC,
    "torch:nadam": _ADAM_SPEC,
    "torch:radam": _ADAM_SPEC,
    "torch:adamax": _ADAM_SPEC,
    "torch:sgd": {**_SGD_SPEC, "defaults": {"momentum": 0.9}},
    "torch:asgd": {**_SGD_SPEC, "search_space": {"lr": LR_SGD, "weight_decay": WEIGHT_DECAY}},
    "torch:lbfgs": {
        "family": "quasi-newton",
        "lr_scaling": "none",
        "lr_from": {},
        "needs_closure": True,
        "search_space": {"lr": {"type": "float", "low": 1e-2, "high": 1.0, "log": True}},
    },
    "pytorch_optimizer:sgdsai": {**_SGD_SPEC, "lr_from": {"lr": ("sgdsai", "sgd")}},
    "pytorch_optimizer:sgdw": _SGD_SPEC,
    "pytorch_optimizer:sgdp": _SGD_SPEC,
    "pytorch_optimizer:lion": {
        "search_space": {
            "lr": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "weight_decay": WEIGHT_DECAY,
        },
        "param_groups": decay_groups,
    },
}
