"""basin.optim: research optimizers as ``torch.optim.Optimizer`` drop-ins, each verified
against its authors' reference code, plus a registry that builds any optimizer by name."""

from __future__ import annotations

from .adabelief import AdaBelief
from .cosmos import COSMOS
from .frugal import FRUGAL
from .param_groups import weight_decay_groups
from .registry import OptimInfo, Paper, available, create, get_class, info, infos, register

__all__ = [
    "COSMOS",
    "FRUGAL",
    "AdaBelief",
    "OptimInfo",
    "Paper",
    "available",
    "create",
    "get_class",
    "info",
    "infos",
    "register",
    "weight_decay_groups",
]

_ALL_CAPS = frozenset({"foreach", "compile", "maximize", "param_groups", "closure"})

register(
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
    )
)

register(
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
        capabilities=frozenset({"compile", "maximize", "param_groups", "closure"}),
        state_note=(
            "matrices: 1 + r/n + r/m + r^2/(mn) (1.13 for 1024x1024, r=64); "
            "AdamW fallback params: 2"
        ),
    )
)

register(
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
        capabilities=frozenset({"maximize", "param_groups", "closure"}),
        state_note=(
            "projected matrices: 2*density (0.5) + the projector (density*min(m,n)/max(m,n); "
            "an index vector for randperm); other params: AdamW, 2"
        ),
    )
)
