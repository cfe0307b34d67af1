"""Hessian spectral density by stochastic Lanczos quadrature (SLQ).

References: L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices",
SIAM Review 2016 (arXiv:1308.5467); B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into
Neural Net Optimization via Hessian Eigenvalue Density", arXiv:1901.10159, 2019.

For each of ``n_probes`` random unit vectors ``v``, ``m`` Lanczos steps give nodes ``theta_j``
(Ritz values) and weights ``tau_j = s_j[0]^2`` such that ``sum_j tau_j f(theta_j) = v^T f(H) v``
exactly for every polynomial of degree < 2m (Gauss quadrature); averaged over probes this is an
unbiased estimate of ``(1/n) tr f(H)``. The density is ``mean_v sum_j tau_j N(t; theta_j, sigma^2)``
on a grid padded by ``5 sigma`` beyond the extreme nodes, renormalised by the trapezoid rule so it
integrates to 1 (the truncated tails hold < 1e-6 of the mass).

Converged values: Ritz values of the probes that converged to eigenvalues of H (gap-based
error bound <= ``outlier_tol`` times the spectral norm, at least 100 machine epsilons of the
working precision), merged across probes; Lanczos finds these first at the edges of the
spectrum, whether or not anything stands out there.

Outliers, by this rule. Sort the distinct nodes of all probes (each converged value counted
once) descending, ``t_1 > t_2 > ... > t_M``. The top ``j`` values are outliers when all of
``t_1 .. t_j`` converged and the gap below them is wider than ``outlier_gap`` times the width of
the bulk they leave: ``t_j - t_{j+1} > outlier_gap * (t_{j+1} - lo)``, with ``lo`` the bottom
edge of the bulk; the largest such ``j`` is taken (so a cluster of outliers above one wide gap
counts whole, as in Sagun et al.'s bulk-plus-outliers spectra). The bottom end is treated the
same way with the top edge of the bulk, and the two edges are refined in turn (twice). A
continuous spectrum, whose edge eigenvalues are spaced a small fraction of its width apart, has
no outliers. ``bulk_edges`` reports ``(lo, hi)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._hvp import CurvatureOperator, full_precision, make_operator
from ._lanczos import error_bounds, lanczos

__all__ = ["DensityResult", "hessian_density", "slq_nodes"]


@dataclass(frozen=True)
class DensityResult:
    """``grid`` and ``density`` (integrates to 1 on the grid), the quadrature ``nodes`` and
    ``weights`` (n_probes, m), the Gaussian width ``sigma``, the eigenvalues that stand out of
    the bulk by the rule of the module notes, ``outliers`` (descending) with their
    ``outlier_bounds``, ``n_hvp`` and ``seconds``; ``converged`` / ``converged_bounds``: every
    converged Ritz value (descending, merged across probes), outliers or not; ``bulk_edges``:
    ``(lo, hi)`` of the bulk the outliers stand out of."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    outliers: np.ndarray
    outlier_bounds: np.ndarray
    n_hvp: int
    seconds: float
    converged: np.ndarray = field(default_factory=lambda: np.zeros(0))
    converged_bounds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    bulk_edges: tuple[float, float] = (math.nan, math.nan)


def slq_nodes(matvec, probes: Tensor, m: int, gen=None):
    """Gauss quadrature nodes, weights and error bounds for each row of ``probes``."""
    nodes, weights, bounds = [], [], []
    for v in probes:
        st = lanczos(matvec, v, m, generator=gen)
        theta, s, resid = st.ritz()
        w = s[0, :] ** 2
        nodes.append(theta)
        weights.append(w)
        bounds.append(error_bounds(theta, resid))
    return nodes, weights, bounds


def gaussian_density(grid: np.ndarray, nodes, weights, sigma: float) -> np.ndarray:
    dens = np.zeros_like(grid)
    for th, w in zip(nodes, weights):
        z = (grid[:, None] - th[None, :]) / sigma
        dens += (np.exp(-0.5 * z * z) * w[None, :]).sum(axis=1)
    dens /= len(nodes) * sigma * np.sqrt(2 * np.pi)
    return dens


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


@full_precision
def hessian_density(
    model: nn.Module | CurvatureOperator,
    loss_fn=None,
    data: Any = None,
    *,
    n_probes: int = 5,
    n_iter: int = 80,
    sigma: float | None = None,
    grid_size: int = 1000,
    params: str | Sequence[str] | None = None,
    kind: str | None = None,
    outlier_tol: float = 1e-6,
    outlier_gap: float = 0.25,
    seed: int = 0,
) -> DensityResult:
    """Spectral density of the Hessian (or GGN) by SLQ with ``n_probes`` x ``n_iter`` products.

    ``sigma`` (the Gaussian smoothing width) defaults to 1% of the spectral range.
    ``outlier_tol``: relative error bound for a Ritz value to count as converged;
    ``outlier_gap``: a converged extreme eigenvalue is an outlier when the gap between it (or
    the cluster it tops) and the bulk exceeds this fraction of the bulk's width (see the module
    notes for the exact rule)."""
    t0 = time.perf_counter()
    for name, v, lo in (
        ("n_probes", n_probes, 1),
        ("n_iter", n_iter, 2),
        ("grid_size", grid_size, 10),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    if isinstance(outlier_gap, bool) or not (
        isinstance(outlier_gap, (int, float)) and outlier_gap > 0
    ):
        raise ValueError(f"outlier_gap must be > 0, got {outlier_gap!r}")
    op = make_operator(model, loss_fn, data, params=params, kind=kind, seed=seed)
    gen = torch.Generator(device=op.device).manual_seed(seed)
    probes = torch.randn(n_probes, op.n, dtype=op.dtype, device=op.device, generator=gen)
    start = op.n_products
    nodes, weights, bounds = slq_nodes(op.matvec, probes, min(n_iter, op.n), gen)
    lo_, hi_ = min(t.min() for t in nodes), max(t.max() for t in nodes)
    spread = hi_ - lo_
    norm = max(abs(lo_), abs(hi_), 1e-300)
    if sigma is None:
        sigma = 0.01 * spread if spread > 0 else 0.01 * max(norm, 1e-12)
    grid = np.linspace(lo_ - 5 * sigma, hi_ + 5 * sigma, grid_size)
    dens = gaussian_density(grid, nodes, weights, sigma)
    dens /= _trapezoid(dens, grid)
    # converged Ritz values, merged across probes (the same eigenvalue found by several probes)
    eps = torch.finfo(op.dtype).eps
    tol_eff = max(outlier_tol, 100 * eps)
    merge = 100 * eps * norm
    cand = sorted(
        (
            (float(t), float(b))
            for th, bd in zip(nodes, bounds)
            for t, b in zip(th, bd)
            if b <= tol_eff * norm
        ),
        key=lambda tb: -tb[0],
    )
    outs: list[tuple[float, float]] = []
    for t, b in cand:
        if outs and abs(outs[-1][0] - t) <= max(outs[-1][1], b, merge):
            if b < outs[-1][1]:
                outs[-1] = (t, b)
            continue
        outs.append((t, b))
    picked, edges = _outliers(outs, nodes, merge, float(outlier_gap))
    return DensityResult(
        grid=grid,
        density=dens,
        nodes=np.stack([np.asarray(t) for t in nodes]),
        weights=np.stack([np.asarray(w) for w in weights]),
        sigma=float(sigma),
        outliers=np.asarray([outs[i][0] for i in picked]),
        outlier_bounds=np.asarray([outs[i][1] for i in picked]),
        n_hvp=op.n_products - start,
        seconds=time.perf_counter() - t0,
        converged=np.asarray([t for t, _ in outs]),
        converged_bounds=np.asarray([b for _, b in outs]),
        bulk_edges=edges,
    )


def _outliers(conv, nodes, merge: float, ratio: float) -> tuple[list[int], tuple[float, float]]:
    """Indices into ``conv`` (converged ``(value, bound)``, descending) of the outliers by the
    rule of the module notes, and the bulk edges ``(lo, hi)``."""
    if not conv:
        allv = np.concatenate([np.asarray(t) for t in nodes])
        return [], (float(allv.min()), float(allv.max()))
    # distinct nodes: each converged value once, other nodes unless they are a copy of one
    vals = [(t, i) for i, (t, _) in enumerate(conv)]
    for th in nodes:
        for t in np.asarray(th, dtype=float):
            if all(abs(t - c) > max(b, merge) for c, b in conv):
                vals.append((float(t), -1))
    vals.sort(key=lambda tv: -tv[0])
    v = np.asarray([t for t, _ in vals])
    tag = [i for _, i in vals]
    m = len(v)

    def top_count(lo_idx: int) -> int:  # outliers at the top, bulk bottom edge v[lo_idx]
        best = 0
        for j in range(1, lo_idx):  # t_1..t_j above, t_{j+1} = v[j] the bulk's top
            if tag[j - 1] < 0:
                break
            if v[j - 1] - v[j] > ratio * (v[j] - v[lo_idx]):
                best = j
        return best

    def bottom_count(hi_idx: int) -> int:  # outliers at the bottom, bulk top edge v[hi_idx]
        best = 0
        for j in range(1, m - 1 - hi_idx):
            if tag[m - j] < 0:
                break
            if v[m - j - 1] - v[m - j] > ratio * (v[hi_idx] - v[m - j - 1]):
                best = j
        return best

    n_top, n_bot = 0, 0
    for _ in range(2):
        n_top = top_count(m - 1 - n_bot)
        n_bot = bottom_count(n_top)
    picked = [tag[i] for i in range(n_top)] + [tag[m - 1 - i] for i in range(n_bot)][::-1]
    return sorted(picked), (float(v[m - 1 - n_bot]), float(v[n_top]))
