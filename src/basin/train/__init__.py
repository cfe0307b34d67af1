"""basin.train: training methods that are more than an optimizer step."""

from __future__ import annotations

from .lora import LoRALinear, add_lora, lora_parameters
from .sar import SAR

__all__ = ["SAR", "LoRALinear", "add_lora", "lora_parameters"]
