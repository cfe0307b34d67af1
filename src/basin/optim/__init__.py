"""basin.optim: research optimizers as ``torch.optim.Optimizer`` drop-ins, each verified
against its authors' reference code, plus a registry that builds any optimizer by name."""

from __future__ import annotations

from ._base import NonFiniteGradientError
from .adabelief import AdaBelief
from .adamp import SGDP, AdamP
from .cosmos import COSMOS
from .diffgrad import DiffGrad
from .exadam import EXAdam
from .frugal import FRUGAL
from .ggpo import GGPO
from .hyperp import HyperP, HyperPAdamW, HyperPMuon, hyperp_lr, sphere_groups
from .muon import Muon
from .param_groups import matrix_param_groups, weight_decay_groups
from .registry import (
    OptimInfo,
    Paper,
    available,
    create,
    get_class,
    info,
    infos,
    register,
    resolve,
)
from .regularized_newton import RegularizedNewton
from .sam import SAM
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD
from .sgd_sai import SGDSaI
from .soap import SOAP
from .swan import SWAN

__all__ = [
    "RegularizedNewton",
    "COSMOS",
    "FRUGAL",
    "GGPO",
    "HyperP",
    "HyperPAdamW",
    "HyperPMuon",
    "hyperp_lr",
    "sphere_groups",
    "SAM",
    "SGDP",
    "SOAP",
    "SWAN",
    "AdaBelief",
    "AdamP",
    "DiffGrad",
    "EXAdam",
    "Muon",
    "NonFiniteGradientError",
    "OptimInfo",
    "Paper",
    "SGDSaI",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "available",
    "create",
    "get_class",
    "info",
    "infos",
    "matrix_param_groups",
    "register",
    "resolve",
    "weight_decay_groups",
]
