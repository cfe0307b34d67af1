"""HyperP: hypersphere (Frobenius-sphere) optimization with learning-rate transfer (Ren et al.,
"Rethinking Language Model Scaling under Transferable Hypersphere Optimization",
arXiv:2603.28743)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._base import (
    check_bool,
    check_foreach,
    check_lr,
    check_positive,
    check_range,
    scalar_lr,
)
from ._sphere import FixedNormWrapper
from ._wrapper import WrapperOptimizer
from .ggpo import _check_adamw_keys, _scalar_lrs
from .muon import Muon
from .param_groups import matrix_groups, matrix_param_groups
from .registry import BETA1, BETA2, LR_ADAPTIVE, OptimInfo, Paper, register

__all__ = ["HyperP", "HyperPAdamW", "HyperPMuon", "hyperp_lr", "sphere_groups"]


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


# ---------------------------------------------------------------- by name (registry)


class _HyperPBuilt(WrapperOptimizer):
    """HyperP built from parameters (the registry's ``hyperp_adamw`` / ``hyperp_muon``): the
    base optimizer is built on this optimizer's groups and shares them; each step checks the
    gradients, lets the base step, then moves every sphere weight by HyperP's rule. Group keys of
    its own: ``radius`` (None: the weight's norm when it is first stepped), ``sphere_eps`` (a
    ``||D||`` at or below it leaves the weight where it is) and ``sphere`` (False: the group's
    parameters are stepped by the base alone)."""

    _algo = "HyperP"
    _registry_names = ("hyperp_adamw", "hyperp_muon")

    def _init_sphere(
        self,
        params: Iterable[Any],
        base: type[Optimizer],
        radius: float | None,
        sphere_eps: float,
        nonfinite: str,
        base_hp: dict[str, Any],
    ) -> None:
        own = dict(radius=radius, sphere_eps=sphere_eps, sphere=True, nonfinite=nonfinite)
        # the lr as given (a tensor one too) in the groups, a float to the base's constructor
        # (torch's AdamW refuses a tensor lr with foreach=True)
        check_lr(base_hp["lr"])
        own["lr"] = base_hp["lr"]
        base_hp = {**base_hp, "lr": float(scalar_lr(base_hp["lr"]))}
        self._wrap(params, base, own, base_hp)
        for group in self.param_groups:  # the base's companion groups (Muon's routing) too
            for k, v in own.items():
                group.setdefault(k, v)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        if group.get("radius") is not None:
            check_positive("radius", group["radius"])
        check_range("sphere_eps", group.get("sphere_eps", 1e-10), 0.0, math.inf,
                    high_inclusive=False)  # fmt: skip
        check_bool("sphere", group.get("sphere", True))

    def _on_sphere(self, group: dict[str, Any]) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: ``closure`` (if given) re-evaluates the loss and gradients; then the
        gradient check, the base optimizer's step and HyperP's sphere step on its weights."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_grads():  # raises, or False for "skip"
            self.skipped_steps += 1
            return loss
        todo = []
        for gi, group in enumerate(self.param_groups):
            if not group.get("sphere", True):
                continue
            for pi, p in enumerate(self._on_sphere(group)):
                if p.grad is None:
                    continue
                w = p.detach().double().clone()
                r0 = self.state[p].get("sphere_radius") if p in self.state else None
                if r0 is None:
                    r0 = float(w.norm())
                    if group.get("radius") is None and not (r0 > 0 and math.isfinite(r0)):
                        raise ValueError(
                            f"{self._algo}: sphere weight #{pi} of param group {gi} (shape "
                            f"{tuple(p.shape)}) has norm {r0}: its radius needs a finite nonzero "
                            "weight (give radius=, or sphere=False on its group); nothing changed"
                        )
                todo.append((group, p, w, r0))
        with _scalar_lrs(self.param_groups):
            self.base_optimizer.step()
        for group, p, w, r0 in todo:
            self.state[p].setdefault("sphere_radius", r0)
            r = float(r0 if group.get("radius") is None else group["radius"])
            d = w - p.double()
            dn = float(d.norm())
            if not dn > group.get("sphere_eps", 1e-10):
                p.copy_(w)
                continue
            lr = float(scalar_lr(group["lr"]))
            new = w - (lr * r / dn) * d
            new.mul_(r / float(new.norm()))
            p.copy_(new)
        return loss


class HyperPAdamW(_HyperPBuilt):
    r"""HyperP over ``torch.optim.AdamW`` (the paper's AdamH), built from parameters: what the
    registry builds for ``"hyperp_adamw"``. Every ``ndim >= 2`` parameter of a group with
    ``sphere=True`` (default) stays on its Frobenius sphere and moves by HyperP's step (see
    :class:`HyperP`); the others (biases, gains, groups with ``sphere=False``) are AdamW's.
    ``lr`` is HyperP's relative step on the sphere weights and AdamW's learning rate for the
    rest: give those groups their own ``lr``.

    Args: AdamW's (``lr`` default 0.02, ``weight_decay`` default 0: decay only tilts the
    direction ``D`` on the sphere), then ``radius`` (None: each weight's norm when it is first
    stepped; or one radius for all), ``sphere_eps`` (HyperP's ``eps``, default 1e-10; AdamW's
    ``eps`` keeps its name), ``maximize``, ``foreach``, ``nonfinite`` (``"raise"`` or
    ``"skip"``, as every basin optimizer).

    Reference: Ren et al., arXiv:2603.28743 (2026). Details: docs/training-methods.md (HyperP).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.02,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        radius: float | None = None,
        sphere_eps: float = 1e-10,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        _check_adamw_keys(
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad}
        )
        check_bool("maximize", maximize)
        check_foreach(foreach)
        self._init_sphere(
            params, torch.optim.AdamW, radius, sphere_eps, nonfinite,
            dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, foreach=foreach),
        )  # fmt: skip

    _algo = "HyperPAdamW"

    def _check_hparams(self, group: dict[str, Any]) -> None:
        _check_adamw_keys(group)
        super()._check_hparams(group)

    def _on_sphere(self, group: dict[str, Any]) -> list[Tensor]:
        return [p for p in group["params"] if p.ndim >= 2]


class HyperPMuon(_HyperPBuilt):
    r"""HyperP over :class:`~basin.optim.Muon` (the authors' MuonH), built from parameters:
    what the registry builds for ``"hyperp_muon"``. The matrices Muon's rule steps (in groups
    with ``sphere=True``, default) stay on their Frobenius spheres and move by HyperP's step
    (see :class:`HyperP`); ``lr`` is that relative step (Muon's shape factor drops out of
    ``D / ||D||``). What Muon routes to its AdamW fallback (embeddings, head, ``ndim < 2``)
    is the fallback's, at ``adamw_lr``.

    Args: Muon's (same defaults; ``adamw_fallback=True`` routes ``ndim < 2`` parameters of a
    plain list), then ``radius``, ``sphere_eps`` (as :class:`HyperPAdamW`), ``maximize``,
    ``foreach``, ``nonfinite``.

    Reference: Ren et al., arXiv:2603.28743 (2026). Details: docs/training-methods.md (HyperP).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        *,
        adamw_lr: float | Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        adamw_fallback: bool = False,
        radius: float | None = None,
        sphere_eps: float = 1e-10,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        check_bool("maximize", maximize)
        check_foreach(foreach)
        self._init_sphere(
            params, Muon, radius, sphere_eps, nonfinite,
            dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                 ns_steps=ns_steps, ns_dtype=ns_dtype, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                 adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay,
                 adamw_fallback=adamw_fallback, maximize=maximize, foreach=foreach),
        )  # fmt: skip

    _algo = "HyperPMuon"

    @classmethod
    def _base_builder(
        cls, base: Any, hp: dict[str, Any]
    ) -> Callable[[list[dict[str, Any]]], Optimizer]:
        """Muon on these groups, named parameters as ``(name, tensor)`` pairs (Muon's routing
        splits a group's names with its parameters)."""

        def build(groups: list[dict[str, Any]]) -> Optimizer:
            named = []
            for g in groups:
                names = g.get("param_names")
                rest = {k: v for k, v in g.items() if k not in ("params", "param_names")}
                params = list(zip(names, g["params"])) if names is not None else g["params"]
                named.append({**rest, "params": params})
            return Muon(named, **hp)

        return build

    def _on_sphere(self, group: dict[str, Any]) -> list[Tensor]:
        base = self.base_optimizer
        assert isinstance(base, Muon)
        return base._split(group)[0]


def sphere_groups(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """The groups ``hyperp_adamw`` is built with from a model: the hidden weight matrices and
    kernels of :func:`basin.optim.matrix_param_groups` (``options``: its ``head=``...) on the
    sphere, embeddings, the output head and ``ndim < 2`` parameters off it (``sphere=False``),
    as the authors leave embeddings off the sphere."""
    groups = matrix_param_groups(model, **options)
    on = [p for g in groups if g.get("matrix_rule") for p in g["params"]]
    off = [p for g in groups if not g.get("matrix_rule") for p in g["params"]]
    return [g for g in ({"params": on}, {"params": off, "sphere": False}) if g["params"]]


_PAPER = Paper(
    "Rethinking Language Model Scaling under Transferable Hypersphere Optimization",
    "Ren et al.",
    "2603.28743",
    2026,
)
# HyperP's lr is a relative step per update (||W_{t+1} - W_t|| ~ lr ||W_t||), scale-free like
# Muon's: its own default (0.02), not the workload's Adam/SGD entries; searched over the range
# Muon's lr is
LR_RELATIVE = {"type": "float", "low": 1e-3, "high": 0.3, "log": True}
_CAPS = frozenset({"closure", "maximize", "param_groups", "wrapper", "sphere"})

register(
    OptimInfo(
        name="hyperp_adamw",
        cls=HyperPAdamW,
        paper=_PAPER,
        state_memory=2.0,
        capabilities=_CAPS,
        state_note="AdamW moments (2.0); the sphere weights are copied while the step runs",
        family="adaptive",
        lr_scaling="sqrt",
        lr_from={"lr": ("hyperp",)},
        search_space={"lr": LR_RELATIVE, "betas[0]": BETA1, "betas[1]": BETA2},
        param_groups=sphere_groups,
        # the harness skips a step whose gradient overflows (the run ends as its loss says)
        defaults={"nonfinite": "skip"},
    )
)
register(
    OptimInfo(
        name="hyperp_muon",
        cls=HyperPMuon,
        paper=_PAPER,
        state_memory=1.0,
        capabilities=_CAPS | {"matrix", "fallback", "nesterov"},
        state_note="matrices: Muon momentum (1.0); AdamW fallback params: 2.0; the sphere "
        "weights are copied while the step runs",
        family="matrix",
        lr_from={"adamw_lr": ("adaptive",)},
        search_space={
            "lr": LR_RELATIVE,
            "momentum": {"type": "float", "low": 1e-2, "high": 0.3, "log": True, "one_minus": True},
            "adamw_lr": LR_ADAPTIVE,
        },
        param_groups=matrix_groups,
        defaults={"nonfinite": "skip"},
    )
)
