"""Gradient statistics: noise scale, per-example coherence, GraNd and EL2N example scores.

References: S. McCandlish, J. Kaplan, D. Amodei, "An Empirical Model of Large-Batch Training",
arXiv:1812.06162, 2018 (B_simple = tr(Sigma) / |G|^2 and its two-batch-size estimator, appendix
A.1); S. Chatterjee, "Coherent Gradients", arXiv:2002.10657, 2020, and S. Chatterjee, P.
Zielinski, "On the Generalization Mystery in Deep Learning", arXiv:2203.10036, 2022 (coherence
``alpha = |E g_i|^2 / E |g_i|^2``); M. Paul, S. Ganguli, G. K. Dziugaite, "Deep Learning on a Data
Diet", arXiv:2107.07075, 2021 (GraNd = ||grad of the example's loss||, EL2N = ||softmax(f(x)) -
onehot(y)||).

Two-batch-size estimator: with ``B_small`` and ``B_big``, ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``
gives the unbiased ``|G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2)/(B_big - B_small)`` and
``tr(Sigma) ~ (|G_small|^2 - |G_big|^2)/(1/B_small - 1/B_big)``. Each big batch of ``data`` is cut
into consecutive small batches of ``b_small`` examples; ``|G_small|^2`` is averaged over them and
``G_big`` is their mean. Over several big batches both parts are averaged (or exponentially
averaged with ``ema``) before dividing, as McCandlish et al. advise.

Finite data sets. Those formulas assume batches drawn from an infinite population (or with
replacement). Batches drawn without replacement from a data set of ``N`` examples have less
noise: the mean ``g_b`` of ``b`` examples has ``Cov(g_b) = (N - b) / ((N - 1) b) Sigma``
(``Sigma`` the covariance of the ``N`` per-example gradients, ``(1/N) sum_i (g_i - G)(g_i - G)^T``;
the classical ``(1 - b/N) S^2 / b`` with ``S^2 = N/(N-1) Sigma``). So ``E|g_b|^2 = |G|^2 +
f(b) tr(Sigma)`` with ``f(b) = (N - b) / ((N - 1) b)`` in place of ``1/b``, and
``tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (f(b_small) - f(b_big))``,
``|G|^2 ~ |G_big|^2 - f(b_big) tr(Sigma)``: both unbiased. Without the correction ``|G|^2`` is
underestimated by ``tr(Sigma) / N`` (``B_simple`` biased upward; with the whole set as the big
batch ``G_big = G`` exactly, and the correction makes ``|G|^2 = |G_big|^2``). Pass
``dataset_size=N`` to apply it.

Standard error of ``B_simple`` (delta method). ``B = T / (b2 - f(B_big) T)`` with
``T = (s2 - b2) / D`` is a smooth function of the small-batch mean ``s2`` and the big-batch norm
``b2``; to first order its error is the mean over small batches ``k`` of
``psi_k = dB/dT * |g_k - G_big|^2 / D + dB/db2 * 2 G_big.(g_k - G_big) * sqrt(c)``, with
``c = (N - B_big) / (N - b_small)`` the finite-population factor of the big-batch mean (1 for
an infinite population, 0 for the whole set), so ``stderr^2 = sum_j w_j^2 var_k(psi_jk) / k``
over big batches ``j`` with averaging weights ``w_j``. Treating the small batches as independent
makes it conservative when the big batch is most of the data set (measured: 0.54 vs 0.47 for
the whole set, calibrated within 5% for ``B_big <= N / 4``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ._hvp import (
    batch_seed,
    functional_forward,
    normalize_batches,
    seeded_rng,
    select_parameters,
)

__all__ = [
    "CoherenceResult",
    "ExampleScores",
    "NoiseScaleResult",
    "example_scores",
    "gradient_coherence",
    "gradient_noise_scale",
    "per_example_gradients",
]


@dataclass(frozen=True)
class NoiseScaleResult:
    """``b_simple`` = ``trace_sigma / grad_norm_sq``; ``trace_sigma_stderr`` from the spread of
    the centred small-batch gradient norms ``|g_k - G_big|^2``; ``b_small``, ``b_big``,
    ``n_grads`` (gradient evaluations) and ``seconds``; ``b_simple_stderr`` (delta method, see
    the module notes) and ``dataset_size`` (``N`` of the finite-population correction, None
    for none)."""

    b_simple: float
    trace_sigma: float
    grad_norm_sq: float
    trace_sigma_stderr: float
    b_small: int
    b_big: int
    n_grads: int
    seconds: float
    b_simple_stderr: float = math.nan
    dataset_size: int | None = None


def _flat_grad(forward, loss_fn, x, y, leaves, names) -> Tensor:
    with torch.enable_grad():
        loss = loss_fn(forward(leaves, x), y)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        g = torch.autograd.grad(
            loss.reshape(()), [leaves[n] for n in names], allow_unused=True, materialize_grads=True
        )
    return torch.cat([t.reshape(-1) for t in g])


def gradient_noise_scale(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    b_small: int | None = None,
    ema: float | None = None,
    params: str | Sequence[str] | None = None,
    dataset_size: int | None = None,
) -> NoiseScaleResult:
    """Simple noise scale ``B_simple`` from one big batch or an iterable of big batches of
    equal size (``b_small`` defaults to big batch // 16, at least 1).

    ``dataset_size``: the number ``N`` of examples of the finite data set the big batches were
    drawn from without replacement (shuffled; the whole set as one batch is allowed): applies
    the finite-population correction, so ``trace_sigma`` and ``grad_norm_sq`` are unbiased for
    the covariance ``(1/N) sum_i (g_i - G)(g_i - G)^T`` and the norm ``|G|^2`` of the
    per-example gradients of that set. ``None``: batches from an infinite population. The order
    of each big batch must be random (its consecutive small batches are used)."""
    t0 = time.perf_counter()
    batches = normalize_batches(data)
    b_big = batches[0][2]
    if any(nb != b_big for _, _, nb in batches):
        raise ValueError("gradient_noise_scale needs big batches of equal size")
    if b_small is None:
        b_small = max(1, b_big // 16)
    if isinstance(b_small, bool) or not isinstance(b_small, int) or not 1 <= b_small <= b_big // 2:
        raise ValueError(
            f"b_small must be an integer in [1, {b_big // 2}] (big batch {b_big}), got {b_small!r}"
        )
    if ema is not None and not (isinstance(ema, (int, float)) and 0 <= ema < 1):
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")
    k = b_big // b_small
    used = k * b_small
    if dataset_size is not None and (
        isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < used
    ):
        raise ValueError(
            f"dataset_size must be an integer >= the big batch ({used} examples used), "
            f"got {dataset_size!r}"
        )
    chosen = select_parameters(model, params)
    names = [n for n, _ in chosen]
    leaves = {n: p.detach().requires_grad_(True) for n, p in chosen}
    forward = functional_forward(model)
    device = chosen[0][1].device
    small_sq, big_sq, all_small, cross = [], [], [], []
    for j, (x, y, _) in enumerate(batches):
        with seeded_rng(batch_seed(0, j), device):
            gs = torch.stack(
                [
                    _flat_grad(
                        forward,
                        loss_fn,
                        x[i * b_small : (i + 1) * b_small],
                        y[i * b_small : (i + 1) * b_small],
                        leaves,
                        names,
                    )
                    for i in range(k)
                ]
            ).double()
        sq = (gs * gs).sum(1)
        mean = gs.mean(0)
        # mean|g_k|^2 - |mean g|^2 = mean|g_k - mean g|^2: the spread of these centred norms
        # (not of |g_k|^2, whose G.e_k term cancels in the estimator) gives the standard error
        dev = gs - mean
        all_small.append(dev.pow(2).sum(1))
        cross.append(dev @ mean)
        small_sq.append(float(sq.mean()))
        big_sq.append(float(mean.pow(2).sum()))

    # averaging weights of the big batches (plain mean, or the EMA recursion unrolled)
    nbig = len(batches)
    if ema is None or nbig == 1:
        weights = [1 / nbig] * nbig
    else:
        weights = [ema ** (nbig - 1)] + [(1 - ema) * ema ** (nbig - 1 - j) for j in range(1, nbig)]
    s2 = sum(w * v for w, v in zip(weights, small_sq))
    b2 = sum(w * v for w, v in zip(weights, big_sq))

    n_pop = dataset_size

    def f(b: int) -> float:  # Cov(mean of b examples) = f(b) Sigma
        return 1 / b if n_pop is None else (n_pop - b) / ((n_pop - 1) * b)

    denom = f(b_small) - f(used)
    tr = (s2 - b2) / denom
    g2 = b2 - f(used) * tr  # = (used b2 - b_small s2) / (used - b_small) when n_pop is None
    sq = torch.cat(all_small)
    se = (
        float(sq.std(unbiased=True) / math.sqrt(sq.numel())) / denom if sq.numel() > 1 else math.inf
    )
    b_simple = tr / g2 if g2 != 0 else math.inf
    if k > 1 and g2 != 0:
        d_tr = 1 / g2 + tr * f(used) / g2**2
        d_b2 = -tr / g2**2
        c = 1.0 if n_pop is None else (n_pop - used) / (n_pop - b_small)
        var = 0.0
        for w, a, cr in zip(weights, all_small, cross):
            psi = d_tr * a / denom + d_b2 * 2 * math.sqrt(c) * cr
            var += w * w * float(psi.var(unbiased=True)) / k
        b_se = math.sqrt(var)
    else:
        b_se = math.inf
    return NoiseScaleResult(
        b_simple=b_simple,
        trace_sigma=tr,
        grad_norm_sq=g2,
        trace_sigma_stderr=se,
        b_small=b_small,
        b_big=used,
        n_grads=k * len(batches),
        seconds=time.perf_counter() - t0,
        b_simple_stderr=b_se,
        dataset_size=dataset_size,
    )


def per_example_gradients(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    params: str | Sequence[str] | None = None,
    chunk_size: int | None = 256,
) -> Tensor:
    """(N, n_params) per-example gradients of ``loss_fn`` on each example alone (a batch of
    one), via ``torch.func.vmap(grad)``. The model must not mix examples (BatchNorm in train mode
    does: use eval mode)."""
    chosen = select_parameters(model, params)
    names = [n for n, _ in chosen]
    forward = functional_forward(model)

    def one(p, x, y):
        out = forward(p, x.unsqueeze(0))
        loss = loss_fn(out, y.unsqueeze(0))
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        return loss.reshape(())

    g_fn = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk_size)
    p = {n: t.detach() for n, t in chosen}
    rows = []
    for x, y, _ in normalize_batches(data):
        g = g_fn(p, x, y)
        rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1))
    return torch.cat(rows)


@dataclass(frozen=True)
class CoherenceResult:
    """``coherence`` = |mean g_i|^2 / mean |g_i|^2 in [1/N, 1] (1: all example gradients equal);
    ``m_coherence`` = N * coherence (Chatterjee & Zielinski's m-coherence, ~1 for orthogonal
    gradients); ``n_examples``; ``seconds``."""

    coherence: float
    m_coherence: float
    n_examples: int
    seconds: float


def gradient_coherence(
    model: nn.Module, loss_fn: Callable, data: Any, params: str | Sequence[str] | None = None
) -> CoherenceResult:
    """Per-example gradient coherence over all examples of ``data``."""
    t0 = time.perf_counter()
    g = per_example_gradients(model, loss_fn, data, params).double()
    mean_sq = float(g.mean(0).pow(2).sum())
    sq_mean = float(g.pow(2).sum(1).mean())
    c = mean_sq / sq_mean if sq_mean > 0 else float("nan")
    return CoherenceResult(c, c * g.shape[0], g.shape[0], time.perf_counter() - t0)


@dataclass(frozen=True)
class ExampleScores:
    """Per-example ``grand`` (gradient norm), ``el2n`` (error-vector norm; None unless the
    outputs are (N, C) logits and the targets class indices) and ``losses``."""

    grand: Tensor
    el2n: Tensor | None
    losses: Tensor
    seconds: float


def example_scores(
    model: nn.Module, loss_fn: Callable, data: Any, params: str | Sequence[str] | None = None
) -> ExampleScores:
    """GraNd and EL2N scores (Paul et al. 2021) of every example of ``data`` at the current
    weights (the paper averages them over several initialisations: call this per model and
    average)."""
    t0 = time.perf_counter()
    g = per_example_gradients(model, loss_fn, data, params)
    grand = torch.linalg.vector_norm(g, dim=1)
    el2n_rows, loss_rows, ok = [], [], True
    forward = functional_forward(model)
    with torch.no_grad():
        for x, y, _ in normalize_batches(data):
            out = forward({}, x)
            loss_rows.append(
                torch.stack(
                    [loss_fn(out[i : i + 1], y[i : i + 1]).reshape(()) for i in range(out.shape[0])]
                )
            )
            if out.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
                err = torch.softmax(out, dim=1) - nn.functional.one_hot(y, out.shape[1]).to(
                    out.dtype
                )
                el2n_rows.append(torch.linalg.vector_norm(err, dim=1))
            else:
                ok = False
    return ExampleScores(
        grand=grand,
        el2n=torch.cat(el2n_rows) if ok else None,
        losses=torch.cat(loss_rows),
        seconds=time.perf_counter() - t0,
    )
