"""Step Law: the fitted optimal peak learning rate and batch size of LLM pretraining.

Li et al., "Predictable Scale: Part I -- Optimal Hyperparameter Scaling Law in Large Language
Model Pretraining", arXiv:2503.04715, 2025::

    lr(N, D) = 1.79 * N**-0.713 * D**0.307          B(D) = 0.58 * D**0.571 tokens

``N``: non-embedding parameters, ``D``: training tokens. The constants are the means of the
authors' 1000 bootstrap fits (step-law/steplaw, ``data/1004_fitted_lr_bs_scaling_model_
parameters.csv``, natural-log intercepts). The setting: decoder-only transformers (gated
FFN; N = layers x (4 h^2 + 3 h d_ff), no embeddings, head or norms) pretrained with AdamW to a
fixed final learning rate of 1e-5, sequences of 2048 tokens; the released dense grid spans
N = 2.1e8..1.1e9 and D = 4e9..1e11. The learning rate is AdamW's peak learning rate there; far
outside it (basin's small workloads) it is an extrapolation (docs/training-methods.md).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = [
    "STEPLAW",
    "non_embedding_params",
    "steplaw_batch_size",
    "steplaw_hparams",
    "steplaw_lr",
    "steplaw_tokens",
]

# mean of the authors' 1000 bootstrap fits: log lr = a + b log N + c log D, log B = d + e log D
STEPLAW = {
    "lr_intercept": 0.5863077907399267,
    "lr_coef_n": -0.7129222911869904,
    "lr_coef_d": 0.30749095041206964,
    "bs_intercept": -0.5435421736103339,
    "bs_coef_d": 0.5709443646895044,
}


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def steplaw_lr(n_params: float, n_tokens: float) -> float:
    """Step Law's optimal peak learning rate ``exp(a) N**b D**c`` (about
    ``1.79 N**-0.713 D**0.307``) for ``n_params`` non-embedding parameters trained on
    ``n_tokens`` tokens (arXiv:2503.04715; an AdamW learning rate)."""
    n = _positive("n_params", n_params)
    d = _positive("n_tokens", n_tokens)
    c = STEPLAW
    return math.exp(c["lr_intercept"] + c["lr_coef_n"] * math.log(n) + c["lr_coef_d"] * math.log(d))


def steplaw_batch_size(n_tokens: float) -> float:
    """Step Law's optimal batch size in tokens, ``exp(d) D**e`` (about ``0.58 D**0.571``),
    for a run on ``n_tokens`` tokens (arXiv:2503.04715); divide by the sequence length for
    sequences."""
    d = _positive("n_tokens", n_tokens)
    return math.exp(STEPLAW["bs_intercept"] + STEPLAW["bs_coef_d"] * math.log(d))


def non_embedding_params(model: nn.Module) -> int:
    """Trainable parameters outside ``nn.Embedding`` / ``nn.EmbeddingBag`` modules (each
    parameter counted once). Step Law's N also leaves out the output head, norms and biases
    (``layers * (4 h^2 + 3 h d_ff)``); pass that count to :func:`steplaw_lr` where it matters."""
    skip = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
        for p in m.parameters(recurse=False)
    }
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def steplaw_tokens(workload: Any, steps: int | None, batch_size: int | None) -> int:
    """D = steps x batch size x tokens per sample of ``workload`` (a
    :class:`basin.bench.Workload`; None: its defaults). ``ValueError`` for a workload that
    declares no ``tokens_per_sample``: Step Law counts tokens of language-model pretraining,
    and basin does not guess a token count for other data."""
    tps = getattr(workload, "tokens_per_sample", None)
    if tps is None:
        raise ValueError(
            f"workload {workload.name!r} declares no tokens_per_sample: Step Law was fitted on "
            "language-model pretraining and needs D in tokens (steps x batch x tokens per "
            "sample). Give the workload tokens_per_sample, or use --scale-lr instead"
        )
    steps = workload.steps if steps is None else steps
    batch = workload.batch_size if batch_size is None else batch_size
    return int(steps) * int(batch) * int(tps)


def steplaw_hparams(
    workload: Any,
    optimizer: str,
    steps: int | None = None,
    batch_size: int | None = None,
    *,
    n_params: int | None = None,
) -> dict[str, float]:
    """The learning rates Step Law sets for ``optimizer`` on ``workload``: every
    learning-rate hyperparameter that takes the workload's ``"adaptive"`` (Adam-like) entry
    (:attr:`basin.optim.OptimInfo.lr_from`) gets :func:`steplaw_lr` of the model's
    :func:`non_embedding_params` (or ``n_params``) and :func:`steplaw_tokens`; SGD-type
    learning rates are not set (``{}``: the optimizer keeps its defaults), since the law was
    fitted for AdamW."""
    from basin.optim import info

    keys = [k for k, entries in info(optimizer).lr_from.items() if "adaptive" in entries]
    if not keys:
        return {}
    d = steplaw_tokens(workload, steps, batch_size)
    n = non_embedding_params(workload.build(0, 1).model) if n_params is None else n_params
    lr = steplaw_lr(n, d)
    return dict.fromkeys(keys, lr)
