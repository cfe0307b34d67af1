"""LoRA (Hu et al., 2021): a frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha/r) B A``.

basin's own small layer rather than ``peft``: no new dependency (peft 0.21 would pull
transformers/accelerate/safetensors into the core install), and the optimizer-facing contract
is two plain matrix parameters per layer (``lora_A``, ``lora_B``), which is all
:class:`basin.optim.GGPO` needs. Models already wrapped by peft work with GGPO too: their LoRA
matrices are matrix parameters that require gradients.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "add_lora", "lora_parameters"]


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * dropout(x) A^T B^T`` with ``base`` frozen.

    ``A`` (``r x in``) is initialised as ``nn.Linear`` initialises weights (Kaiming uniform,
    ``a = sqrt(5)``, as in the LoRA reference code and peft), ``B`` (``out x r``) with zeros, so
    the layer equals ``base`` at initialisation. Args: ``base`` (an ``nn.Linear``), ``r`` >= 1,
    ``alpha`` > 0 (scaling ``alpha / r``), ``dropout`` in [0, 1) on the LoRA branch's input.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        update = self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()
        return self.base(x) + self.scaling * update

    def merged_weight(self) -> Tensor:
        """``W + (alpha / r) B A``."""
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight (and the base's bias)."""
        w = self.base.weight
        out = nn.Linear(
            self.in_features, self.out_features, self.base.bias is not None, w.device, w.dtype
        )
        out.weight.copy_(self.merged_weight())
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


def _matches(name: str, targets: str | Iterable[str] | None) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    freeze: bool = True,
) -> nn.Module:
    """Replace the matching ``nn.Linear`` modules of ``model`` (in place) by
    :class:`LoRALinear` and return ``model``.

    ``targets``: ``None`` (every ``nn.Linear``), a list of module names or name suffixes
    (``["q_proj", "v_proj"]`` matches ``layers.0.attn.q_proj``), or a regular expression that
    must match the whole module name. ``freeze``: every other parameter of the model stops
    requiring gradients (LoRA fine-tuning), so only the ``A``/``B`` matrices train.
    ``ValueError`` when nothing matches."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name and _matches(name, targets)
    ]
    if not found and isinstance(model, nn.Linear) and targets is None:
        raise ValueError("add_lora replaces submodules: wrap a bare nn.Linear in LoRALinear")
    if not found:
        raise ValueError(f"add_lora: no nn.Linear module matches targets={targets!r}")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(m, r=r, alpha=alpha, dropout=dropout))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` and ``lora_B`` matrices of every :class:`LoRALinear` in ``model``."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
