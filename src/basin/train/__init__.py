"""basin.train: training methods that are more than an optimizer step (losses, layers,
test-time adaptation). Each is a plain object a user calls in their own loop; the ones with a
registry entry also run in ``basin bench`` / ``tune`` / ``pbt`` by name (``-o saf``)."""

from __future__ import annotations

from .data import IndexedDataset
from .lora import LoRALinear, add_lora, lora_parameters
from .mesa import MESA
from .saf import SAF
from .sar import SAR
from .tract import TrActConv1d, TrActConv2d, TrActLinear, first_layer, tract, tract_linear

__all__ = [
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
