"""basin.train: training methods that are more than an optimizer step (losses, layers,
test-time adaptation). Each is a plain object a user calls in their own loop; the ones with a
registry entry also run in ``basin bench`` / ``tune`` / ``pbt`` by name (``-o saf``); AdAdaGrad's
batch-size controller drives ``basin bench --adaptive-batch``."""

from __future__ import annotations

from .adadagrad import AdaptiveBatchSize, per_sample_gradients
from .data import IndexedDataset
from .lora import LoRALinear, add_lora, lora_parameters
from .mesa import MESA
from .saf import SAF
from .sar import SAR

__all__ = [
    "MESA",
    "SAF",
    "SAR",
    "AdaptiveBatchSize",
    "IndexedDataset",
    "LoRALinear",
    "add_lora",
    "lora_parameters",
    "per_sample_gradients",
]
