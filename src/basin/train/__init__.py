"""basin.train: training methods that are more than an optimizer step (losses, layers,
test-time adaptation). Each is a plain object a user calls in their own loop; the ones with a
registry entry also run in ``basin bench`` / ``tune`` / ``pbt`` by name (``-o saf``)."""

from __future__ import annotations

from .biper import BiPerConv2d, BiPerLinear, biper_sign, biper_weight, set_biper_stage
from .boosting import BoostedNet, fit_boosted, pseudo_residual
from .convex_relu import ConvexReLUResult, activation_patterns, fit_convex_relu, relu_objective
from .data import IndexedDataset
from .lora import LoRALinear, add_lora, lora_parameters
from .mesa import MESA
from .reste import ReSTEConv2d, ReSTELinear, ReSTESchedule, reste_grad, reste_o, reste_sign
from .saf import SAF
from .sar import SAR
from .tract import TrActConv1d, TrActConv2d, TrActLinear, first_layer, tract, tract_linear

__all__ = [
    "BoostedNet",
    "fit_boosted",
    "pseudo_residual",
    "ConvexReLUResult",
    "activation_patterns",
    "fit_convex_relu",
    "relu_objective",
    "BiPerConv2d",
    "BiPerLinear",
    "ReSTEConv2d",
    "ReSTELinear",
    "ReSTESchedule",
    "biper_sign",
    "biper_weight",
    "reste_grad",
    "reste_o",
    "reste_sign",
    "set_biper_stage",
    "MESA",
    "SAF",
    "SAR",
    "IndexedDataset",
    "LoRALinear",
    "TrActConv1d",
    "TrActConv2d",
    "TrActLinear",
    "add_lora",
    "first_layer",
    "lora_parameters",
    "tract",
    "tract_linear",
]
