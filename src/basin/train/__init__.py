"""basin.train: training methods that are more than an optimizer step (losses, layers,
test-time adaptation). Each is a plain object a user calls in their own loop; the ones with a
registry entry also run in ``basin bench`` / ``tune`` / ``pbt`` by name (``-o saf``); AdAdaGrad's
batch-size controller drives ``basin bench --adaptive-batch``."""

from __future__ import annotations

from ._common import BinarizableLinear
from .adadagrad import AdaptiveBatchSize, per_sample_gradients
from .bilevel import conjugate_gradient, implicit_hypergradient, neumann_series
from .biper import BiPerConv2d, BiPerLinear, biper_sign, biper_weight, set_biper_stage
from .boosting import BoostedNet, fit_boosted, pseudo_residual
from .borep import BOREP
from .convex_relu import ConvexReLUResult, activation_patterns, fit_convex_relu, relu_objective
from .data import IndexedDataset
from .lora import LoRALinear, add_lora, lora_parameters
from .mesa import MESA
from .nap import NormalizeAndProject, insert_layernorm
from .odice import orthogonal_gradient, orthogonal_gradient_
from .reste import ReSTEConv2d, ReSTELinear, ReSTESchedule, reste_grad, reste_o, reste_sign
from .saf import SAF
from .sar import SAR
from .stn import STN, STNConv2d, STNLinear
from .tract import TrActConv1d, TrActConv2d, TrActLinear, first_layer, tract, tract_linear

__all__ = [
    "AdaptiveBatchSize",
    "BOREP",
    "BiPerConv2d",
    "BinarizableLinear",
    "BiPerLinear",
    "BoostedNet",
    "ConvexReLUResult",
    "IndexedDataset",
    "LoRALinear",
    "MESA",
    "NormalizeAndProject",
    "ReSTEConv2d",
    "ReSTELinear",
    "ReSTESchedule",
    "SAF",
    "SAR",
    "STN",
    "STNConv2d",
    "STNLinear",
    "TrActConv1d",
    "TrActConv2d",
    "TrActLinear",
    "activation_patterns",
    "add_lora",
    "conjugate_gradient",
    "biper_sign",
    "biper_weight",
    "first_layer",
    "implicit_hypergradient",
    "fit_boosted",
    "fit_convex_relu",
    "insert_layernorm",
    "lora_parameters",
    "neumann_series",
    "orthogonal_gradient",
    "orthogonal_gradient_",
    "per_sample_gradients",
    "pseudo_residual",
    "relu_objective",
    "reste_grad",
    "reste_o",
    "reste_sign",
    "set_biper_stage",
    "tract",
    "tract_linear",
]
