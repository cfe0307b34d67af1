"""The table every optimizer test loops over.

One ``OptimCase`` per optimizer: its hyperparameter variants, how to build its independent
reference (the authors' package, or a float64 transcription of the paper in tests/references/),
which state tensors correspond, and the inputs that must raise. tests/optim/test_common.py
then gives every case the same checks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import basin.optim as bo

# A reference factory gets (params, our hyperparameters) and returns an optimizer, or None when
# no reference covers that variant.
RefFactory = Callable[[list[torch.Tensor], dict[str, Any]], Optimizer | None]


@dataclass
class OptimCase:
    name: str
    cls: type[Optimizer]
    variants: list[dict[str, Any]]
    reference: RefFactory | None = None
    # our state key -> reference state key, compared after the reference run
    state_map: dict[str, str] = field(default_factory=dict)
    rtol: float = 1e-10
    # (hyperparameters, text the ValueError message must contain)
    errors: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    # hyperparameters that make the optimizer train the test MLP well
    train_hp: dict[str, Any] = field(default_factory=dict)
    compile_variants: list[int] = field(default_factory=lambda: [0])
    has_foreach: bool = True
    model: Callable[[], nn.Module] | None = None  # default: tests.optim_db.mlp
    steps: int = 100

    def ids(self) -> list[str]:
        return [variant_id(v) for v in self.variants]


def variant_id(hp: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in hp.items()) or "default"


def mlp() -> nn.Module:
    """Small MLP (8-16-16-4, 500 parameters, biases included) used by the generic checks."""
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def quiet(factory: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
    """Reference packages print banners and warnings on construction; silence them."""
    import contextlib
    import io

    def build(*args: Any, **kwargs: Any) -> Optimizer:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory(*args, **kwargs)

    return build


# ------------------------------------------------------------------ AdaBelief


def _adabelief_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from references.adabelief_paper import AdaBeliefPaper

    full = {**_ADABELIEF_DEFAULTS, **hp}
    if full["amsgrad"] and full["rectify"]:
        # the package ignores amsgrad under rectify; basin follows AMSGrad (see docstring)
        return AdaBeliefPaper(params, **full)
    from adabelief_pytorch import AdaBelief as RefAdaBelief

    return quiet(RefAdaBelief)(params, print_change_log=False, **full)


_ADABELIEF_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-16,
    weight_decay=0.0,
    amsgrad=False,
    weight_decouple=True,
    fixed_decay=False,
    rectify=True,
    degenerated_to_sgd=True,
)

_COMMON_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"maximize": 1}, "maximize"),
    ({"foreach": "yes"}, "foreach"),
]
_ADAM_LIKE_ERRORS: list[tuple[dict[str, Any], str]] = _COMMON_ERRORS + [
    ({"betas": (1.0, 0.999)}, "betas[0]"),
    ({"betas": (0.9, -0.1)}, "betas[1]"),
    ({"betas": (0.9,)}, "betas"),
    ({"eps": -1e-8}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
]

ADABELIEF = OptimCase(
    name="adabelief",
    cls=bo.AdaBelief,
    variants=[
        {},
        {"rectify": False},
        {"rectify": False, "amsgrad": True},
        {"amsgrad": True},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "fixed_decay": True, "rectify": False},
        {"weight_decay": 0.05, "weight_decouple": False},
        {"degenerated_to_sgd": False, "betas": (0.8, 0.99), "eps": 1e-12},
        {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-8, "rectify": False},
    ],
    reference=_adabelief_reference,
    state_map={
        "exp_avg": "exp_avg",
        "exp_avg_var": "exp_avg_var",
        "max_exp_avg_var": "max_exp_avg_var",
    },
    errors=_ADAM_LIKE_ERRORS + [({"amsgrad": "no"}, "amsgrad"), ({"rectify": None}, "rectify")],
    train_hp={"lr": 1e-2},
    compile_variants=[0, 2],
)

# ------------------------------------------------------------------ diffGrad


def _diffgrad_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    # torch-optimizer 0.3.0 follows the paper and diffGrad_v2.py in every variant here (its only
    # deviation, L2 decay written into p.grad, does not change the trajectory: see
    # tests/optim/test_diffgrad.py, which also checks the float64 paper transcription).
    from torch_optimizer import DiffGrad as RefDiffGrad

    return quiet(RefDiffGrad)(params, **hp)


DIFFGRAD = OptimCase(
    name="diffgrad",
    cls=bo.DiffGrad,
    variants=[
        {},
        {"weight_decay": 0.1},
        {"betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 1e-2},
        {"lr": 3e-3, "betas": (0.5, 0.9), "eps": 1e-10, "weight_decay": 0.01},
    ],
    reference=_diffgrad_reference,
    state_map={
        "exp_avg": "exp_avg",
        "exp_avg_sq": "exp_avg_sq",
        "previous_grad": "previous_grad",
    },
    errors=_ADAM_LIKE_ERRORS,
    train_hp={"lr": 1e-2},
    compile_variants=[1],
)

# ------------------------------------------------------------------ EXAdam


def _exadam_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    # no package from the author: the float64 transcription of the paper (pytorch-optimizer's
    # EXAdam, a second opinion, is compared in tests/optim/test_exadam.py)
    from references.exadam_paper import EXAdamPaper

    return EXAdamPaper(params, **hp)


EXADAM = OptimCase(
    name="exadam",
    cls=bo.EXAdam,
    variants=[
        {},
        {"dynamic_step_size": False},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "dynamic_step_size": False},
        {"betas": (0.8, 0.99), "eps": 1e-6},
        {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-10},
    ],
    reference=_exadam_reference,
    state_map={"exp_avg": "m", "exp_avg_sq": "v"},
    errors=_ADAM_LIKE_ERRORS + [({"dynamic_step_size": "no"}, "dynamic_step_size")],
    train_hp={"lr": 1e-2},
    compile_variants=[2],
)

# ------------------------------------------------------------------ AdamP / SGDP


def _adamp_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from adamp import AdamP as RefAdamP

    return quiet(RefAdamP)(params, **hp)


def _sgdp_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    if hp.get("momentum", 0) != 0 and not hp.get("nesterov", False):
        # the package projects its momentum buffer in place here; basin follows the paper
        # (see SGDP's docstring and tests/optim/test_adamp.py)
        from references.sgdp_paper import SGDPPaper

        return SGDPPaper(params, **hp)
    from adamp import SGDP as RefSGDP

    return quiet(RefSGDP)(params, **hp)


_PROJECTION_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"delta": -0.1}, "delta"),
    ({"wd_ratio": 1.5}, "wd_ratio"),
    ({"wd_ratio": float("nan")}, "wd_ratio"),
    ({"nesterov": 1}, "nesterov"),
]

ADAMP = OptimCase(
    name="adamp",
    cls=bo.AdamP,
    variants=[
        {},
        {"weight_decay": 0.1},
        {"nesterov": True},
        # a large delta makes the projection fire on the (not scale-invariant) test MLP too
        {"delta": 1.0, "wd_ratio": 0.5, "weight_decay": 0.05},
        {"delta": 1.0, "nesterov": True, "weight_decay": 0.1},
        {"lr": 1e-2, "betas": (0.5, 0.9), "eps": 1e-6, "weight_decay": 0.01},
    ],
    reference=_adamp_reference,
    state_map={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    errors=_ADAM_LIKE_ERRORS + _PROJECTION_ERRORS,
    train_hp={"lr": 1e-2},
    compile_variants=[3],
)

SGDP = OptimCase(
    name="sgdp",
    cls=bo.SGDP,
    variants=[
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2},
        {"lr": 0.1, "weight_decay": 0.1, "dampening": 0.2, "delta": 1.0, "wd_ratio": 0.5},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2, "delta": 1.0},
        {"lr": 0.05, "momentum": 0.5, "nesterov": True, "weight_decay": 1e-2, "delta": 1.0},
    ],
    reference=_sgdp_reference,
    # no generic state map: momentum=0 keeps no buffer; buffers are compared in test_adamp.py
    errors=[({"lr": 0.1, **hp}, n) if "lr" not in hp else (hp, n) for hp, n in _COMMON_ERRORS]
    + [({"lr": 0.1, **hp}, n) for hp, n in _PROJECTION_ERRORS]
    + [
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "dampening": -0.5}, "dampening"),
        ({"lr": 0.1, "eps": -1.0}, "eps"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
    ],
    train_hp={"lr": 0.1, "momentum": 0.9},
    compile_variants=[6],
)


# ------------------------------------------------------------------ SGD-SaI


def _sgd_sai_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    if hp.get("momentum", 0.9) == 0:
        # sgd-sai 1.0.3 crashes with momentum=0 (tests/optim/test_sgd_sai.py)
        from references.sgd_sai_paper import SGDSaIPaper

        return SGDSaIPaper(params, **hp)
    import contextlib
    import io

    from sgd_sai import SGD_sai

    ref = quiet(SGD_sai)(params, **hp)
    step = ref.step

    def silent_step(closure=None):  # it prints a banner on its first step
        with contextlib.redirect_stdout(io.StringIO()):
            return step(closure)

    ref.step = silent_step  # type: ignore[method-assign]
    return ref


SGDSAI = OptimCase(
    name="sgdsai",
    cls=bo.SGDSaI,
    variants=[
        {},
        {"momentum": 0.0},
        {"weight_decay": 0.0},
        {"lr": 1e-3, "momentum": 0.5, "eps": 1e-6, "weight_decay": 0.1},
    ],
    reference=_sgd_sai_reference,
    state_map={"momentum_buffer": "momentum_buffer", "gsnr": "gsnr"},
    errors=_COMMON_ERRORS
    + [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
    train_hp={"lr": 1e-2},
    compile_variants=[0, 1],
)

CASES: list[OptimCase] = [ADABELIEF, DIFFGRAD, EXADAM, ADAMP, SGDP, SGDSAI]
CASES_BY_NAME = {c.name: c for c in CASES}
