"""Hugging Face models into every landscape function: :func:`hf_adapter`.

``basin.landscape`` calls ``loss_fn(model(inputs), targets)``. A transformers model takes its
inputs as keyword arguments (``input_ids=``, ``attention_mask=``), returns a ``ModelOutput``
and, for causal language models, shifts its labels itself; its attention may run through a
fused scaled-dot-product kernel that has no second derivative. :func:`hf_adapter` bridges all
of that without importing transformers::

    module, loss_fn = basin.landscape.hf_adapter(model, loss="causal_lm")
    batch = ({"input_ids": ids, "attention_mask": mask}, labels)   # labels: -100 = ignored
    basin.landscape.hessian_eigenvalues(module, loss_fn, batch, k=2)
    basin.landscape.hessian_trace(module, loss_fn, batch, kind="ggn")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HFModule", "causal_lm_loss", "classification_loss", "hf_adapter", "logits_of"]

LOSSES = ("causal_lm", "classification")


def _math_attention() -> contextlib.AbstractContextManager:
    """Scaled dot-product attention on its math backend (twice differentiable; the fused flash
    and memory-efficient kernels have no double backward, which Hessian products need)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: only the old, deprecated switch
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel(SDPBackend.MATH)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)
    wrappers: the landscape functions call the model functionally, which needs the plain
    module and its own parameter names."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def logits_of(out: Any) -> Tensor:
    """The logits of a model output: a tensor itself, a ``ModelOutput``/dict's ``"logits"``,
    or the first element of a tuple (``return_dict=False``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"cannot find logits in a model output of type {type(out).__name__}")


class HFModule(nn.Module):
    """``model`` as the landscape functions call it: ``HFModule(model)(inputs)`` is
    ``model(**inputs)`` for a dict of inputs (a ``labels`` entry is dropped: the loss is
    ``loss_fn``'s) or ``model(inputs)`` for a tensor of input ids, returns the logits, and
    runs attention on the math SDPA backend. ``model`` is its only child, so parameter names
    are the model's prefixed with ``model.`` (``params="model.transformer.h.0"``). The
    wrapper has no mode of its own that matters: ``model``'s train/eval mode is used (call
    ``model.eval()`` for a deterministic, dropout-free network)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = model.training

    def forward(self, inputs: Any) -> Tensor:
        with _math_attention():
            if isinstance(inputs, Mapping):
                kwargs = {k: v for k, v in inputs.items() if k != "labels"}
                out = self.model(**kwargs)
            else:
                out = self.model(inputs)
        return logits_of(out)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy as transformers' causal LMs compute it: the logits at position
    ``t`` predict ``labels[t + 1]`` (labels are the input ids, unshifted), positions whose label
    is ``ignore_index`` do not count, mean over the counted tokens of the batch."""
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal_lm loss needs logits (batch, seq, vocab) and labels (batch, seq), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shifted = logits[:, :-1, :].reshape(-1, logits.size(-1))
    target = labels[:, 1:].reshape(-1).to(shifted.device)
    return F.cross_entropy(shifted, target, ignore_index=ignore_index)


def classification_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy of ``(batch, classes)`` logits against class indices (mean)."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"classification loss needs logits (batch, classes) and labels (batch,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits, labels.to(logits.device), ignore_index=ignore_index)


def hf_adapter(
    model: nn.Module, loss: str = "causal_lm", *, ignore_index: int = -100
) -> tuple[HFModule, Callable[[Tensor, Tensor], Tensor]]:
    """``(module, loss_fn)`` for a transformers model, to pass to every landscape function
    (``hessian_eigenvalues(module, loss_fn, data, ...)``, ``hessian_trace``, ...).

    ``module`` (:class:`HFModule`) calls ``model(**inputs)`` for dict inputs, returns the
    logits of the ``ModelOutput`` and runs attention on the math SDPA backend (the fused
    kernels are not twice differentiable); a ``torch.compile``'d or DDP-wrapped model is
    unwrapped first (the curvature products call the module functionally). ``loss_fn``:

    * ``"causal_lm"``: :func:`causal_lm_loss`, next-token cross-entropy with the labels shifted
      by one and ``ignore_index`` (-100) positions left out, as ``model(labels=...)`` computes
      it; targets are ``(batch, seq)`` labels (usually the input ids, padding set to -100).
    * ``"classification"``: :func:`classification_loss` for sequence classifiers,
      ``(batch,)`` class labels.

    ``data`` is a batch ``(inputs, labels)`` (inputs: a dict such as a tokenizer's output, or
    the input-id tensor) or an iterable of them. Over several batches the landscape functions
    weight each batch by its number of sequences, not of counted tokens: with varying padding
    the result differs slightly from the token mean over all the data."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    base = causal_lm_loss if loss == "causal_lm" else classification_loss

    def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
        return base(logits, labels, ignore_index)

    loss_fn.__name__ = f"{loss}_loss"
    return HFModule(unwrap(model)), loss_fn
