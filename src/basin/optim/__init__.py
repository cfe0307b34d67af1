"""basin.optim: research optimizers as ``torch.optim.Optimizer`` drop-ins, each verified
against its authors' reference code, plus a registry that builds any optimizer by name."""

from __future__ import annotations

from .adabelief import AdaBelief
from .adamp import SGDP, AdamP
from .cosmos import COSMOS
from .diffgrad import DiffGrad
from .exadam import EXAdam
from .frugal import FRUGAL
from .muon import Muon
from .param_groups import matrix_param_groups, weight_decay_groups
from .registry import OptimInfo, Paper, available, create, get_class, info, infos, register
from .sgd_sai import SGDSaI
from .swan import SWAN

__all__ = [
    "COSMOS",
    "FRUGAL",
    "SGDP",
    "SWAN",
    "AdaBelief",
    "AdamP",
    "DiffGrad",
    "EXAdam",
    "Muon",
    "OptimInfo",
    "Paper",
    "SGDSaI",
    "available",
    "create",
    "get_class",
    "info",
    "infos",
    "matrix_param_groups",
    "register",
    "weight_decay_groups",
]

_ALL_CAPS = frozenset({"foreach", "compile", "maximize", "param_groups", "closure"})
_ADAMP_PAPER = Paper(
    "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
    "Heo et al.",
    "2006.08217",
    2021,
)

for _info in (
    OptimInfo(
        name="adabelief",
        cls=AdaBelief,
        paper=Paper(
            "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
            "Zhuang et al.",
            "2010.07468",
            2020,
        ),
        state_memory=2.0,
        capabilities=_ALL_CAPS | {"amsgrad", "rectify"},
        state_note="+1 with amsgrad",
    ),
    OptimInfo(
        name="diffgrad",
        cls=DiffGrad,
        paper=Paper(
            "diffGrad: An Optimization Method for Convolutional Neural Networks",
            "Dubey et al.",
            "1909.11015",
            2019,
        ),
        state_memory=3.0,
        capabilities=_ALL_CAPS,
    ),
    OptimInfo(
        name="exadam",
        cls=EXAdam,
        paper=Paper("EXAdam: The Power of Adaptive Cross-Moments", "Adly", "2412.20302", 2024),
        state_memory=2.0,
        capabilities=_ALL_CAPS,
    ),
    OptimInfo(
        name="adamp",
        cls=AdamP,
        paper=_ADAMP_PAPER,
        state_memory=2.0,
        capabilities=_ALL_CAPS | {"nesterov", "projection"},
    ),
    OptimInfo(
        name="sgdp",
        cls=SGDP,
        paper=_ADAMP_PAPER,
        state_memory=1.0,
        capabilities=_ALL_CAPS | {"nesterov", "projection"},
        state_note="with momentum > 0; 0 with momentum = 0 (the default)",
    ),
    OptimInfo(
        name="sgdsai",
        cls=SGDSaI,
        paper=Paper(
            "No More Adam: Learning Rate Scaling at Initialization is All You Need",
            "Xu et al.",
            "2412.11768",
            2024,
        ),
        state_memory=1.0,
        capabilities=_ALL_CAPS,
        state_note="+1 scalar (g-SNR) per tensor; 0 + scalar with momentum = 0",
    ),
    OptimInfo(
        name="muon",
        cls=Muon,
        paper=Paper(
            "Muon is Scalable for LLM Training (Muon: Jordan et al., blog, 2024)",
            "Liu et al.",
            "2502.16982",
            2025,
        ),
        state_memory=1.0,
        capabilities=_ALL_CAPS | {"matrix", "fallback", "nesterov"},
        state_note="matrices: momentum (1.0); AdamW fallback params (embeddings, head, ndim<2): 2.0",
    ),
    OptimInfo(
        name="swan",
        cls=SWAN,
        paper=Paper(
            "SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training",
            "Ma et al.",
            "2412.13148",
            2024,
        ),
        state_memory=0.0,
        capabilities=_ALL_CAPS | {"matrix", "fallback", "stateless"},
        state_note="matrices: stateless (0.0); Adam fallback params (embeddings, head, ndim<2): 2.0",
    ),
    OptimInfo(
        name="cosmos",
        cls=COSMOS,
        paper=Paper(
            "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of LLMs",
            "Liu et al.",
            "2502.17410",
            2025,
        ),
        state_memory=1.13,
        capabilities=frozenset(
            {"compile", "maximize", "param_groups", "closure", "matrix", "fallback"}
        ),
        state_note="matrices: 1 + r/n + r/m + r^2/(mn) (1.13 for 1024x1024, r=64); "
        "AdamW fallback params: 2",
    ),
    OptimInfo(
        name="frugal",
        cls=FRUGAL,
        paper=Paper(
            "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable "
            "Training",
            "Zmushko et al.",
            "2411.07837",
            2024,
        ),
        state_memory=0.5,
        capabilities=frozenset({"maximize", "param_groups", "closure", "matrix", "fallback"}),
        state_note="projected matrices: 2*density (0.5) + the projector; other params: AdamW, 2",
    ),
):
    register(_info)
del _info
