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
    # a ``fused=True`` path (basin.optim._fused): checked against the single-tensor path
    has_fused: bool = False
    # the variants (indices) the fused checks run; None: every variant
    fused_variants: list[int] | None = None
    # the fused checks add a float32 parameter beside the float64 model (a second dtype, so
    # a second compiled kernel); False where another case covers that for the same machinery
    fused_float32: bool = True
    model: Callable[[], nn.Module] | None = None  # default: tests.optim_db.mlp
    steps: int = 100
    # a training method (the entry's OptimInfo.method: SAF, MESA) over a torch optimizer: not
    # an update rule of its own, so the generic optimizer checks (CASES) skip it; its own
    # tests are in ``tested_in``
    method: bool = False
    tested_in: str = ""
    # float32 parameters follow the float64 trajectory (to 1e-4 over 5 steps); False where the
    # update is not continuous in rounding (SOAP: eigenbases of rank-deficient factors)
    float32_tracks_float64: bool = True
    # step(closure) only (RegularizedNewton re-evaluates the loss and gradient inside the step):
    # the checks step it with a closure, and skip those that step on a gradient already there
    # (non-finite gradient handling, per-group settings)
    closure: bool = False
    # hyperparameters the reference check adds to a variant, on each side, given that side's
    # model (RegularizedNewton: exact Hessian products for the adaptive variants)
    reference_extra: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] | None = None

    def fused_hps(self) -> list[dict[str, Any]]:
        """The variants the fused checks run (``fused_variants``)."""
        if self.fused_variants is None:
            return self.variants
        return [self.variants[i] for i in self.fused_variants]

    def ids(self) -> list[str]:
        return [variant_id(v) for v in self.variants]


def variant_id(hp: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in hp.items()) or "default"


def mlp() -> nn.Module:
    """Small MLP (8-16-16-4, 500 parameters, biases included) used by the generic checks."""
    return nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def classification_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded float64 batches (32 x 8 inputs, 4 classes) for :func:`mlp`-sized models."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(32, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (32,), generator=gen),
        )
        for _ in range(n)
    ]


def train(model: nn.Module, opt: Optimizer, batches: list) -> None:
    """One cross-entropy step of ``opt`` per batch."""
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def rounding_tolerance(dtype: torch.dtype, steps: int) -> dict[str, float]:
    """``rtol``/``atol`` (relative to a tensor's largest entry) for two runs of the same update
    that may round differently: compiled vs eager (Inductor's kernels differ by CPU), foreach vs
    loop, another machine. float64: 1e-9, far above the measured ~1e-14; lower precisions: one
    unit of rounding (``finfo.eps``) per step and entry, accumulated over ``steps``."""
    if dtype == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-12}
    eps = torch.finfo(dtype).eps * steps
    return {"rtol": eps, "atol": eps}


def assert_close_after_rounding(actual: torch.Tensor, expected: torch.Tensor, steps: int) -> None:
    """:func:`rounding_tolerance` of ``expected``'s dtype, ``atol`` scaled by its largest entry."""
    tol = rounding_tolerance(expected.dtype, steps)
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


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
    has_fused=True,
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
    has_fused=True,
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
    has_fused=True,
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
    has_fused=True,
    fused_variants=[3, 4],  # with and without nesterov; the projection fires
    fused_float32=False,
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
    has_fused=True,
    fused_variants=[5, 6, 7],  # without and with a buffer, with nesterov; projections fire
    fused_float32=False,
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
    has_fused=True,
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

# ------------------------------------------------------------------ Muon


_MUON_DEFAULTS: dict[str, Any] = dict(
    lr=0.02,
    momentum=0.95,
    weight_decay=0.0,
    nesterov=True,
    ns_steps=5,
    ns_dtype=torch.bfloat16,
    adamw_lr=3e-4,
    adamw_betas=(0.9, 0.95),
    adamw_eps=1e-10,
    adamw_weight_decay=0.0,
)


def _matrices_first(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameter order of a matrix optimizer with automatic fallback routing (matrix
    group, then its fallback companion), so that states are compared parameter by parameter."""
    return [p for p in params if p.ndim >= 2] + [p for p in params if p.ndim < 2]


def _muon_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    """bfloat16 Newton-Schulz: the authors' package (basin is bit-identical to it); the
    high-precision path (ns_dtype=None): the float64 SVD-based transcription."""
    full = {**_MUON_DEFAULTS, **hp}
    if full["ns_dtype"] is None:
        from references.muon_paper import MuonPaper

        keys = set(_MUON_DEFAULTS) - {"ns_dtype"}
        return MuonPaper(_matrices_first(params), **{k: full[k] for k in keys})
    if full["ns_dtype"] is not torch.bfloat16 or not full["nesterov"] or full["ns_steps"] != 5:
        return None
    from muon import SingleDeviceMuonWithAuxAdam

    muon_group = dict(
        params=[p for p in params if p.ndim >= 2],
        use_muon=True,
        lr=full["lr"],
        momentum=full["momentum"],
        weight_decay=full["weight_decay"],
    )
    adam_group = dict(
        params=[p for p in params if p.ndim < 2],
        use_muon=False,
        lr=full["adamw_lr"],
        betas=full["adamw_betas"],
        eps=full["adamw_eps"],
        weight_decay=full["adamw_weight_decay"],
    )
    return quiet(SingleDeviceMuonWithAuxAdam)([muon_group, adam_group])


_MATRIX_ERRORS: list[tuple[dict[str, Any], str]] = _COMMON_ERRORS + [
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"ns_steps": 0}, "ns_steps"),
    ({"ns_steps": 2.5}, "ns_steps"),
    ({"ns_steps": True}, "ns_steps"),
]

MUON = OptimCase(
    name="muon",
    cls=bo.Muon,
    variants=[
        {"adamw_fallback": True, "ns_dtype": None},
        {"adamw_fallback": True},
        {
            "adamw_fallback": True,
            "momentum": 0.9,
            "weight_decay": 0.1,
            "adamw_lr": 1e-3,
            "adamw_betas": (0.8, 0.99),
            "adamw_weight_decay": 0.05,
        },
        {
            "adamw_fallback": True,
            "ns_dtype": None,
            "nesterov": False,
            "ns_steps": 3,
            "lr": 0.05,
            "weight_decay": 0.01,
        },
        {"adamw_fallback": True, "ns_dtype": torch.float32, "ns_steps": 7},
    ],  # fmt: skip
    has_fused=True,  # the AdamW fallback
    fused_variants=[0],
    reference=_muon_reference,
    state_map={
        "momentum_buffer": "momentum_buffer",
        "exp_avg": "exp_avg",
        "exp_avg_sq": "exp_avg_sq",
    },  # fmt: skip
    # the package: bit-identical (error 0); the SVD transcription: the quintic's slope at 0 is
    # a = 3.4445, so 5 steps amplify float64 rounding of small singular values by up to
    # a**5 ~ 5e2, and 100 steps accumulate it: measured <= 1e-12, asserted 1e-10
    rtol=1e-10,
    errors=_MATRIX_ERRORS
    + [
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"nesterov": "yes"}, "nesterov"),
        ({"ns_dtype": torch.int32}, "ns_dtype"),
        ({"adamw_betas": (0.9, 1.0)}, "adamw_betas[1]"),
        ({"adamw_eps": -1.0}, "adamw_eps"),
        ({"adamw_lr": -1.0}, "adamw_lr"),
        ({"adamw_fallback": 1}, "adamw_fallback"),
        ({}, "adamw_fallback=True"),
        ({}, "matrix_param_groups"),
    ],
    # float32 Newton-Schulz: bfloat16 matmuls are slow on CPU (the bf16 path is tested above)
    train_hp={"adamw_fallback": True, "lr": 0.02, "adamw_lr": 1e-2, "ns_dtype": torch.float32},
    compile_variants=[0],
)


# ------------------------------------------------------------------ SWAN


def _swan_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    """The float64 transcription with an exact (eigendecomposition) whitening: it matches once
    Newton-Schulz has converged, so only variants with >= 20 iterations are compared."""
    if hp.get("ns_steps", 10) < 20:
        return None
    from references.swan_paper import SWANPaper

    return SWANPaper(_matrices_first(params), **hp)


def swan_mlp() -> nn.Module:
    """8-6-4 MLP: whitening inverts each gradient's Gram matrix, and row centering leaves square
    and tall gradients rank-deficient (rows sum to zero), where Newton-Schulz and the exact
    inverse square root agree only up to amplified rounding; wide layers keep the comparison
    exact (measured <= 2e-13 over 100 steps with 20-25 iterations, asserted 1e-11). The default
    MLP (square and tall layers) is covered in tests/optim/test_swan.py."""
    return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))


SWAN_CASE = OptimCase(
    name="swan",
    cls=bo.SWAN,
    variants=[
        {"adamw_fallback": True, "ns_steps": 20},
        {"adamw_fallback": True},
        {"adamw_fallback": True, "ns_steps": 25, "lr": 0.01, "weight_decay": 0.1, "rescale": False},
        {
            "adamw_fallback": True,
            "ns_steps": 20,
            "adamw_lr": 3e-3,
            "adamw_betas": (0.8, 0.99),
            "adamw_weight_decay": 0.05,
            "eps": 1e-6,
        },
    ],  # fmt: skip
    has_fused=True,  # the AdamW fallback
    fused_variants=[0],
    reference=_swan_reference,
    state_map={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    rtol=1e-11,
    errors=_MATRIX_ERRORS
    + [
        ({"eps": -1.0}, "eps"),
        ({"rescale": 0}, "rescale"),
        ({"adamw_betas": (1.0, 0.9)}, "adamw_betas[0]"),
        ({"adamw_lr": float("nan")}, "adamw_lr"),
        ({}, "adamw_fallback=True"),
        ({}, "matrix_param_groups"),
    ],
    train_hp={"adamw_fallback": True, "lr": 1e-2, "adamw_lr": 1e-2},
    compile_variants=[0],
    model=swan_mlp,
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
        {"rank": 2, "ns_dtype": None, "variant": "paper"},
        {"rank": 1, "ns_dtype": None, "variant": "paper", "nesterov": False, "weight_decay": 0.1},
        {"rank": 2, "ns_dtype": None, "variant": "paper", "betas": (0.95, 0.95), "eps": 1e-6},
    ],
    has_fused=True,  # the AdamW fallback
    fused_variants=[0],
    reference=_cosmos_reference,
    # P and S are defined up to column signs (see tests/references/cosmos_paper.py); M and V
    # are sign-invariant. tests/optim/test_cosmos.py compares P P^T and P S P^T.
    state_map={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    rtol=1e-10,
    errors=_ADAM_LIKE_ERRORS
    + [
        ({"rank": 0}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"gamma": -1.0}, "gamma"),
        ({"lr_ratio": -0.1}, "lr_ratio"),
        ({"nesterov": 1}, "nesterov"),
        ({"ns_steps": -1}, "ns_steps"),
        ({"ns_dtype": torch.int32}, "ns_dtype"),
        ({"max_rows": 0}, "max_rows"),
        ({"variant": "Paper"}, "variant"),
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
        # block variant: 2 of the 3 weight matrices active, re-drawn every 3 steps
        {"update_gap": 3, "proj_type": "block", "density": 0.5, "seed": 2},
        {
            "update_gap": 3,
            "proj_type": "block",
            "density": 0.3,
            "reset_statistics": False,
            "inactive_update_rule": "sgd",
            "inactive_lr_scale": 0.5,
            "proj_params_lr_scale": 0.7,
        },
        # the authors' fixed block orders (3 weight matrices; tests/optim/test_frugal.py checks
        # the active sets on more blocks)
        {"update_gap": 2, "proj_type": "block", "density": 0.3, "block_order": "ascending"},
        {
            "update_gap": 3,
            "proj_type": "block",
            "density": 0.5,
            "block_order": "descending",
            "reset_statistics": False,
        },
        {"update_gap": 2, "proj_type": "block", "density": 0.6, "block_order": "mirror"},
    ],
    has_fused=True,  # the AdamW fallback
    fused_variants=[0],
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
        ({"block_order": "reverse"}, "block_order"),
        # mirror pairs blocks: k = round(0.3 * 3) = 1 active block is odd
        ({"proj_type": "block", "density": 0.3, "block_order": "mirror"}, "block_order"),
    ],
    train_hp={"lr": 1e-2, "update_gap": 20},
    compile_variants=[0, 2, 3, 6, 7, 8, 9, 10],  # svd, random, randperm, the block variants
    has_foreach=False,  # per-matrix work (SVD/QR projectors): no multi-tensor path
)

# ------------------------------------------------------------------ Schedule-Free AdamW
# The generic checks train without train()/eval() calls: basin's optimizer starts in train mode
# (the reference starts in eval mode; the factory switches it), so every check runs on y. The
# switches, x against the reference's x and the eval-mode error are in
# tests/optim/test_schedule_free.py.


def _schedule_free_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from schedulefree import AdamWScheduleFree

    ref = AdamWScheduleFree(params, foreach=False, **hp)
    ref.train()
    return ref


SCHEDULE_FREE = OptimCase(
    name="schedulefree_adamw",
    cls=bo.ScheduleFreeAdamW,
    variants=[
        {},
        {"warmup_steps": 20},
        {"weight_decay": 0.1, "warmup_steps": 10},
        {"lr": 1e-2, "betas": (0.5, 0.99), "eps": 1e-6, "r": 1.0, "weight_lr_power": 0.0},
        {"betas": (0.95, 0.9), "weight_decay": 0.01, "r": 0.5, "warmup_steps": 150},
    ],
    reference=_schedule_free_reference,
    state_map={"z": "z", "exp_avg_sq": "exp_avg_sq"},
    errors=_ADAM_LIKE_ERRORS
    + [
        ({"betas": (0.0, 0.999)}, "betas[0]"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"r": -1.0}, "r"),
        ({"weight_lr_power": float("nan")}, "weight_lr_power"),
    ],
    train_hp={"lr": 1e-2},
    compile_variants=[0, 2],
)

# Schedule-Free SGD: as for AdamW; the authors' SGDScheduleFree is the table's reference, its
# explicit-x SGDScheduleFreeReference is in tests/optim/test_schedule_free.py.


def _schedule_free_sgd_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer:
    from schedulefree import SGDScheduleFree

    ref = SGDScheduleFree(params, foreach=False, **hp)
    ref.train()
    return ref


SCHEDULE_FREE_SGD = OptimCase(
    name="schedulefree_sgd",
    cls=bo.ScheduleFreeSGD,
    variants=[
        {"lr": 0.5},
        {"lr": 0.5, "warmup_steps": 20},
        {"lr": 0.2, "weight_decay": 0.1, "warmup_steps": 10},
        {"lr": 0.1, "momentum": 0.5, "r": 1.0, "weight_lr_power": 0.0},
        {"lr": 0.3, "momentum": 0.95, "weight_decay": 0.01, "r": 0.5, "warmup_steps": 150},
    ],
    reference=_schedule_free_sgd_reference,
    state_map={"z": "z"},
    errors=[({"lr": 0.5, **hp}, n) if "lr" not in hp else (hp, n) for hp, n in _COMMON_ERRORS]
    + [
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"r": -1.0}, "r"),
        ({"weight_lr_power": float("nan")}, "weight_lr_power"),
    ],
    train_hp={"lr": 0.5},
    compile_variants=[0, 2],
)

# ------------------------------------------------------------------ SOAP
# The authors' code keeps L and R in torch's default dtype and takes eigh/QR in float32, so the
# float64 comparison is against the step-for-step transcription of it (tests/references/
# soap_paper.py); pytorch_optimizer's SOAP is a second opinion in tests/optim/test_soap.py.
# Eigenbases of rank-deficient factors (the MLP's gradients have rank < 16) are arbitrary in the
# null space: the comparison holds because both compute L, R with the same operations, bit for
# bit, so eigh sees the same matrices.


def _soap_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from references.soap_paper import SOAPPaper

    return SOAPPaper(params, **hp)


SOAP_CASE = OptimCase(
    name="soap",
    cls=bo.SOAP,
    variants=[
        {},
        {"precondition_frequency": 3, "weight_decay": 0.0, "betas": (0.9, 0.99)},
        {"shampoo_beta": 0.9, "normalize_grads": True, "lr": 1e-3},
        {"precondition_1d": True, "eps": 1e-6, "precondition_frequency": 7},
        {"max_precond_dim": 8, "weight_decay": 0.1},
        {"merge_dims": True, "max_precond_dim": 64, "precondition_frequency": 5},
        {"correct_bias": False, "lr": 1e-3},
    ],
    reference=_soap_reference,
    state_map={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    errors=_ADAM_LIKE_ERRORS
    + [
        ({"shampoo_beta": 1.0}, "shampoo_beta"),
        ({"shampoo_beta": "x"}, "shampoo_beta"),
        ({"precondition_frequency": 0}, "precondition_frequency"),
        ({"max_precond_dim": 2.5}, "max_precond_dim"),
        ({"merge_dims": 1}, "merge_dims"),
        ({"precondition_1d": None}, "precondition_1d"),
        ({"normalize_grads": "no"}, "normalize_grads"),
        ({"correct_bias": 0}, "correct_bias"),
    ],
    train_hp={"lr": 1e-2},
    # the null-space eigenvectors of a rank-deficient L or R (every tall or wide gradient's)
    # are whatever eigh returns, and float32 rounding picks other ones than float64: Adam in
    # another basis, so float32 runs do not track float64 ones (measured 2.5e-2 after 5 steps)
    float32_tracks_float64=False,
    # eager only: the eigenbasis refresh is a Python branch on the step count (SOAP docstring)
    compile_variants=[],
    has_foreach=False,  # per-tensor eigh/QR and rotations: no multi-tensor path
)

# ------------------------------------------------------------------ SAM / ASAM
# Registered by name as SAM/ASAM over SGD with momentum 0.9 (basin.optim.sam.SAMSGD/ASAMSGD).
# The generic checks call step() without a closure: each call is one phase (first_step, then
# second_step), so 200 batches are 100 SAM steps, each phase on its own batch; the float64
# transcription follows the same protocol. The closure path, pytorch_optimizer's SAM, AMP, DDP
# and the ASAM name rule are in tests/optim/test_sam.py.


def _sam_reference(params: list[torch.Tensor], hp: dict[str, Any], adaptive: bool = False):
    from references.sam_paper import SAMPaper

    hp = dict(hp)
    hp.setdefault("rho", 0.5 if adaptive else 0.05)
    return SAMPaper(params, adaptive=adaptive, **hp)


_SAM_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"rho": 0.0}, "rho"),
    ({"rho": -0.05}, "rho"),
    ({"rho": float("nan")}, "rho"),
    ({"eta": -0.1}, "eta"),
    ({"perturb_eps": -1.0}, "perturb_eps"),
    ({"sync_perturbation": 1}, "sync_perturbation"),
]

SAM_CASE = OptimCase(
    name="sam",
    cls=bo.sam.SAMSGD,
    variants=[
        {},
        {"rho": 0.1, "momentum": 0.0, "lr": 0.05},
        {"weight_decay": 1e-2, "nesterov": True, "rho": 0.02},
        {"lr": 0.02, "momentum": 0.5, "rho": 0.2},
    ],
    reference=_sam_reference,
    errors=_SAM_ERRORS,
    train_hp={"lr": 0.1},
    # torch.optim.SGD.step (the base) inserts graph breaks (torch's _use_grad wrapper) when it
    # is called from another step: no fullgraph compile of the wrapper
    compile_variants=[],
    has_foreach=False,  # the perturbation is a short loop (one norm, one add per tensor)
    steps=200,
)

ASAM_CASE = OptimCase(
    name="asam",
    cls=bo.sam.ASAMSGD,
    variants=[
        {},
        {"eta": 0.0, "rho": 1.0},
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3, "eta": 0.1},
    ],
    reference=lambda params, hp: _sam_reference(params, hp, adaptive=True),
    errors=_SAM_ERRORS,
    train_hp={"lr": 0.1},
    compile_variants=[],
    has_foreach=False,
    steps=200,
)

# ------------------------------------------------------------------ LoRA-GGPO
# Registered by name as GGPO over AdamW (basin.optim.ggpo.GGPOAdamW). The generic checks call
# step() without a closure and without perturb() before the forward: each step is then AdamW's
# alone (GGPO warns), which the float64 transcription's AdamW checks, with the gradient norms
# GGPO keeps. The perturbed protocols (closure; perturb() + step()) against the same
# transcription with the same draws over 120 steps, the per-row scales, the exact restore and the
# LoRA layer are in tests/optim/test_ggpo.py and tests/train/test_lora.py.


def _ggpo_reference(params: list[torch.Tensor], hp: dict[str, Any]) -> Optimizer | None:
    from references.ggpo_paper import GGPOPaper

    return GGPOPaper(params, **hp)


GGPO_CASE = OptimCase(
    name="ggpo",
    cls=bo.ggpo.GGPOAdamW,
    variants=[
        {},
        {"variant": "port"},
        {"sigma": 0.1, "beta": 0.5, "lr": 3e-3, "weight_decay": 0.0},
        {"sigma": 0.0, "beta": 0.0},
        {"variant": "port", "sigma": 0.05, "beta": 0.1, "betas": (0.8, 0.99), "seed": 7},
    ],
    reference=_ggpo_reference,
    state_map={"exp_avg": "m", "exp_avg_sq": "v"},
    errors=_ADAM_LIKE_ERRORS
    + [
        ({"sigma": -0.1}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"beta": -1.0}, "beta"),
        ({"variant": "Paper"}, "variant"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"amsgrad": 1}, "amsgrad"),
    ],
    train_hp={"lr": 1e-2},
    # torch.optim.AdamW.step (the base) inserts graph breaks when called from another step
    compile_variants=[],
    has_foreach=False,  # the perturbation is a short loop (one randn, one add per matrix)
)

# ------------------------------------------------------------------ RegularizedNewton
# A closure optimizer (step(closure) evaluates f, g and curvature products at points of its
# own): the checks call it with a closure. Reference: one iteration of the float64
# transcription of the authors' Algorithm 1 per step, with a dense central-difference Hessian
# (references/grad_norm_smooth_paper.py). The model is softmax regression (strictly convex, 27
# parameters), so that the dense reference and the "exact" solver stay cheap and every system
# is positive definite (the authors' Cholesky has no indefinite branch; basin's is tested in
# tests/optim/test_regularized_newton.py).


class _SoftmaxRegression(nn.Module):
    """8 inputs, 4 classes, the last logit fixed at 0 (27 parameters): strictly convex
    cross-entropy (a free fourth logit would add directions of zero curvature)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.inputs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs = x  # the last batch's inputs, for exact_hessian
        out = self.linear(x)
        return torch.cat([out, torch.zeros_like(out[:, :1])], dim=1)

    def exact_hessian(self) -> torch.Tensor:
        """Hessian of the mean cross-entropy on the last inputs at the current parameters, in
        parameter order (weight row-major, then bias). The logits are linear in the parameters,
        so it is ``mean_i J_i^T (diag p_i - p_i p_i^T) J_i`` on the three free logits, whatever
        the labels (checked against double backward in test_regularized_newton.py)."""
        assert self.inputs is not None, "no forward pass yet"
        x = self.inputs.detach()
        with torch.no_grad():
            p = torch.softmax(self(x), 1)[:, :3]
            b = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (n, 3, 3)
            xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)  # (n, 9): the bias as input 8
            h = torch.einsum("icd,ij,ik->cjdk", b, xa, xa).reshape(27, 27) / len(x)
            order = [c * 9 + j for c in range(3) for j in range(8)] + [c * 9 + 8 for c in range(3)]
            return h[order][:, order]


def _exact_curvature(model: nn.Module, hp: dict[str, Any]) -> dict[str, Any]:
    """The adaptive variants take exact Hessian products on both sides of the reference check:
    with central differences (rounding noise ~1e-11 of the Hessian per step, not continuous in
    the parameters) the search's iteration, which amplifies a difference 1.3-1.4x per step here,
    ends 30 steps apart by 1e-8..1e-6 (docs/training-methods.md); the non-adaptive variants
    keep central differences on both sides."""
    if not hp.get("adaptive", True):
        return {}

    def curvature() -> Callable[[torch.Tensor], torch.Tensor]:
        h = model.exact_hessian()  # type: ignore[operator]
        return lambda v: h @ v

    return {"curvature": curvature}


def _regularized_newton_reference(
    params: list[torch.Tensor], hp: dict[str, Any]
) -> Optimizer | None:
    from references.grad_norm_smooth_paper import RegularizedNewtonPaper

    if hp.get("maximize"):
        return None  # the generic maximize check covers it
    return RegularizedNewtonPaper(params, **hp)


REGULARIZED_NEWTON_CASE = OptimCase(
    name="regularized_newton",
    cls=bo.RegularizedNewton,
    variants=[
        {"solver": "exact"},
        {"cg_tol": 1e-14},  # conjugate gradients (solved to rounding), finite differences
        {"solver": "exact", "lr": 0.5},
        {"lr": 0.7, "gamma": 0.3, "cg_tol": 1e-14},
        {"solver": "exact", "gamma": 0.1, "adaptive": False},
        {"solver": "exact", "gamma": 0.5, "adaptive": False, "lr": 0.5},
        {"solver": "exact", "gamma": 20.0, "eps": 1e-6, "max_search": 2, "gamma_min": 1e-3},
    ],
    reference=_regularized_newton_reference,
    reference_extra=_exact_curvature,
    errors=[
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"maximize": 1}, "maximize"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma_min": -1.0}, "gamma_min"),
        ({"eps": -1e-8}, "eps"),
        ({"max_search": 0}, "max_search"),
        ({"adaptive": "yes"}, "adaptive"),
        ({"solver": "lu"}, "solver"),
        ({"cg_iters": 0}, "cg_iters"),
        ({"cg_tol": -1.0}, "cg_tol"),
        ({"curvature": 3}, "curvature"),
    ],
    train_hp={"solver": "exact"},
    compile_variants=[],  # eager only: Python control flow (the search, CG's stopping test)
    has_foreach=False,  # one flat system on all parameters
    model=_SoftmaxRegression,
    # 30 steps: each costs ~60 closure calls here and ~60 in the dense reference
    steps=30,
    closure=True,
)

# ------------------------------------------------------------------ HyperP (by name)
# Registered as HyperP over AdamW (AdamH) and over Muon (MuonH): basin.optim.HyperPAdamW /
# HyperPMuon. Reference: the float64 transcription of the sphere step over each base
# (references/hyperp_paper.py); tests/optim/test_hyperp.py checks the instance wrapper HyperP
# against the same equations. Muon's variants compute Newton-Schulz in float64 (ns_dtype None or
# torch.float64), which the transcription follows; a bfloat16 variant is run by the other checks.


def _hyperp_reference(params: list[torch.Tensor], hp: dict[str, Any], base: str):
    from references.hyperp_paper import HyperPPaper

    hp = dict(hp)
    if hp.pop("amsgrad", False) or hp.pop("sphere_eps", None) is not None:
        return None
    if base == "muon":
        if hp.pop("ns_dtype", torch.bfloat16) not in (None, torch.float64):
            return None
        hp.pop("adamw_fallback", None)
        params = _matrices_first(params)
    return HyperPPaper(params, base=base, **hp)


_SPHERE_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"radius": 0.0}, "radius"),
    ({"radius": -1.0}, "radius"),
    ({"radius": float("nan")}, "radius"),
    ({"sphere_eps": -1e-10}, "sphere_eps"),
    ({"sphere_eps": float("inf")}, "sphere_eps"),
]

HYPERP_ADAMW = OptimCase(
    name="hyperp_adamw",
    cls=bo.HyperPAdamW,
    variants=[
        {},
        {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1, "radius": 2.0},
        {"amsgrad": True, "sphere_eps": 1e-6},
    ],
    reference=lambda params, hp: _hyperp_reference(params, hp, "adamw"),
    state_map={"exp_avg": "m", "exp_avg_sq": "v"},
    errors=_ADAM_LIKE_ERRORS + _SPHERE_ERRORS + [({"amsgrad": 1}, "amsgrad")],
    train_hp={"lr": 0.05},
    # torch.optim.AdamW.step (the base) inserts graph breaks when called from another step
    compile_variants=[],
)

HYPERP_MUON = OptimCase(
    name="hyperp_muon",
    cls=bo.HyperPMuon,
    variants=[
        {"adamw_fallback": True, "ns_dtype": None},
        {
            "adamw_fallback": True,
            "ns_dtype": torch.float64,
            "nesterov": False,
            "momentum": 0.9,
            "lr": 0.05,
            "weight_decay": 0.1,
            "ns_steps": 3,
            "adamw_lr": 1e-3,
            "adamw_betas": (0.8, 0.99),
            "adamw_weight_decay": 0.05,
            "radius": 1.5,
        },
        {"adamw_fallback": True, "ns_dtype": torch.float32},
    ],
    reference=lambda params, hp: _hyperp_reference(params, hp, "muon"),
    state_map={"momentum_buffer": "m", "exp_avg": "m", "exp_avg_sq": "v"},
    errors=_MATRIX_ERRORS
    + _SPHERE_ERRORS
    + [
        ({"momentum": 1.0}, "momentum"),
        ({"nesterov": "yes"}, "nesterov"),
        ({"adamw_lr": -1.0}, "adamw_lr"),
        ({"adamw_betas": (0.9, 1.0)}, "adamw_betas[1]"),
        ({}, "adamw_fallback=True"),
    ],
    train_hp={"adamw_fallback": True, "lr": 0.05, "adamw_lr": 1e-2, "ns_dtype": torch.float32},
    compile_variants=[],
)

CASES: list[OptimCase] = [
    ADABELIEF,
    DIFFGRAD,
    EXADAM,
    ADAMP,
    SGDP,
    SGDSAI,
    MUON,
    SWAN_CASE,
    COSMOS_CASE,
    FRUGAL_CASE,
    SCHEDULE_FREE,
    SCHEDULE_FREE_SGD,
    SOAP_CASE,
    SAM_CASE,
    ASAM_CASE,
    GGPO_CASE,
    REGULARIZED_NEWTON_CASE,
    HYPERP_ADAMW,
    HYPERP_MUON,
]
# ------------------------------------------------------------------ training methods
# saf / mesa: a loss term (basin.train.SAF / MESA) that the harness adds beside the base
# optimizer torch.optim.SGD (momentum 0.9), which torch tests. Their checks -- a float64
# transcription of the authors' loss over epochs, closed forms, state round trips, validation,
# and the harness hook -- are in tests/train/test_saf_mesa.py.

# (name, base optimizer, the file with its checks): saf, mesa (basin.train.saf / .mesa) over
# SGD; tract, tract_adamw (TrAct's first-layer gradient) over SGD / AdamW; nap
# (Normalize-and-Project's projection) over AdamW; reste, biper (binary-network estimators)
# over SGD
_METHODS = [
    ("saf", torch.optim.SGD, "tests/train/test_saf_mesa.py"),
    ("mesa", torch.optim.SGD, "tests/train/test_saf_mesa.py"),
    ("tract", torch.optim.SGD, "tests/train/test_tract.py"),
    ("tract_adamw", torch.optim.AdamW, "tests/train/test_tract.py"),
    ("nap", torch.optim.AdamW, "tests/train/test_nap.py"),
    ("reste", torch.optim.SGD, "tests/train/test_binary_bench.py"),
    ("biper", torch.optim.SGD, "tests/train/test_binary_bench.py"),
]
METHOD_CASES: list[OptimCase] = [
    OptimCase(name=name, cls=cls, variants=[{}], method=True, tested_in=tested_in)
    for name, cls, tested_in in _METHODS
]

CASES_BY_NAME = {c.name: c for c in CASES + METHOD_CASES}
