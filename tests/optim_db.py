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

# ------------------------------------------------------------------ COSMOS
# The test MLP's last layer (4 x 16) gets rank-3 gradients under cross-entropy (the logit
# gradient sums to zero over classes), so rank <= 2 keeps the residual of every matrix nonzero;
# at rank >= rank(G) the Muon part normalises rounding noise (as in the authors' code).


def _cosmos_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from references.cosmos_paper import COSMOSPaper

    if hp.get("ns_dtype", torch.bfloat16) is not None:
        return None  # bfloat16 Newton-Schulz: no float64 transcription covers it
    return COSMOSPaper(params, **{k: v for k, v in hp.items() if k != "ns_dtype"})


def _cosmos_mlp() -> nn.Module:
    """8-16-4 MLP: two matrices (one tall, one wide) and two biases; one hidden layer fewer than
    ``mlp`` keeps torch.compile of the per-matrix SVD/QR/Newton-Schulz graph affordable."""
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


COSMOS_CASE = OptimCase(
    name="cosmos",
    cls=bo.COSMOS,
    variants=[
        {"rank": 2, "ns_dtype": None},
        {"rank": 1, "ns_dtype": None, "nesterov": False, "weight_decay": 0.1, "lr": 1e-2},
        {"rank": 2, "ns_dtype": None, "betas": (0.95, 0.95), "lr_ratio": 0.2, "gamma": 0.5},
        {"rank": 2, "ns_dtype": None, "ns_steps": 3, "eps": 1e-6, "max_rows": 10},
        {"rank": 2},
    ],
    reference=_cosmos_reference,
    # P and S are defined up to column signs (see tests/references/cosmos_paper.py); M and V
    # are sign-invariant. tests/optim/test_cosmos.py compares P P^T and P S P^T.
    state_map={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    rtol=1e-10,
    errors=_ADAM_LIKE_ERRORS
    + [
        ({"rank": 64}, "rank"),
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"gamma": -1.0}, "gamma"),
        ({"lr_ratio": -0.1}, "lr_ratio"),
        ({"nesterov": 1}, "nesterov"),
        ({"ns_steps": -1}, "ns_steps"),
        ({"ns_dtype": torch.int32}, "ns_dtype"),
        ({"max_rows": 0}, "max_rows"),
    ],
    train_hp={"rank": 2, "lr": 1e-2},
    compile_variants=[0],  # bfloat16 Newton-Schulz: Inductor's fusion changes bf16 rounding
    model=_cosmos_mlp,
    has_foreach=False,  # per-matrix work (QR, SVD, Newton-Schulz): no multi-tensor path
)

# ------------------------------------------------------------------ FRUGAL


def _frugal_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from references.frugal_paper import FRUGALPaper

    return FRUGALPaper(params, **hp)


FRUGAL_CASE = OptimCase(
    name="frugal",
    cls=bo.FRUGAL,
    variants=[
        {"update_gap": 5},
        {"update_gap": 5, "reset_statistics": False},
        {"update_gap": 4, "proj_type": "random", "reset_statistics": False, "seed": 3},
        {"update_gap": 5, "proj_type": "randperm", "inactive_update_rule": "sgd", "density": 0.5},
        {
            "update_gap": 3,
            "inactive_update_rule": "no",
            "proj_side": "left",
            "density": 0.3,
            "lr": 1e-2,
            "proj_params_lr_scale": 0.5,
            "inactive_lr_scale": 0.3,
        },
        # svd needs r <= rank(G) (else null-space vectors are arbitrary): forcing the right side
        # on the 4 x 16 layer (rank-3 gradients) would break that, random projectors do not
        {
            "update_gap": 7,
            "proj_type": "random",
            "proj_side": "right",
            "density": 1.0,
            "weight_decay": 0.0,
            "betas": (0.8, 0.99),
            "eps": 1e-6,
        },
    ],
    reference=_frugal_reference,
    state_map={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    rtol=1e-10,
    errors=_ADAM_LIKE_ERRORS
    + [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"update_gap": 0}, "update_gap"),
        ({"proj_type": "qr"}, "proj_type"),
        ({"proj_side": "both"}, "proj_side"),
        ({"inactive_update_rule": "adam"}, "inactive_update_rule"),
        ({"inactive_lr_scale": -1.0}, "inactive_lr_scale"),
        ({"proj_params_lr_scale": -1.0}, "proj_params_lr_scale"),
        ({"reset_statistics": 1}, "reset_statistics"),
        ({"seed": -1}, "seed"),
    ],
    train_hp={"lr": 1e-2, "update_gap": 20},
    compile_variants=[],  # the projector rebuild is eager Python control flow (see frugal.py)
    has_foreach=False,  # per-matrix work (SVD/QR projectors): no multi-tensor path
)

CASES: list[OptimCase] = [ADABELIEF, COSMOS_CASE, FRUGAL_CASE]
CASES_BY_NAME = {c.name: c for c in CASES}
