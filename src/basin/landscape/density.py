"""Hessian spectral density by stochastic Lanczos quadrature (SLQ).

References: L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large matrices",
SIAM Review 2016 (arXiv:1308.5467); B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into
Neural Net Optimization via Hessian Eigenvalue Density", arXiv:1901.10159, 2019.

For each of ``n_probes`` random unit vectors ``v``, ``m`` Lanczos steps give nodes ``theta_j``
(Ritz values) and weights ``tau_j = s_j[0]^2`` such that ``sum_j tau_j f(theta_j) = v^T f(H) v``
exactly for every polynomial of degree < 2m (Gauss quadrature); averaged over probes this is an
unbiased estimate of ``(1/n) tr f(H)``. The density is ``mean_v sum_j tau_j N(t; theta_j, sigma^2)``
on a grid padded by ``5 sigma`` beyond the extreme nodes, renormalised by the trapezoid rule so it
integrates to 1 (the truncated tails hold < 1e-6 of the mass). Outliers: Ritz values of the
probes that converged to eigenvalues of H (gap-based error bound <= ``outlier_tol`` times the
spectral norm, at least 100 machine epsilons of the working precision), merged across probes;
Lanczos finds these first at the edges of the spectrum.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
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
    ``weights`` (n_probes, m), the Gaussian width ``sigma``, the converged extreme eigenvalues
    ``outliers`` (descending) with their ``outlier_bounds``, ``n_hvp`` and ``seconds``."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    outliers: np.ndarray
    outlier_bounds: np.ndarray
    n_hvp: int
    seconds: float


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
    seed: int = 0,
) -> DensityResult:
    """Spectral density of the Hessian (or GGN) by SLQ with ``n_probes`` x ``n_iter`` products.

    ``sigma`` (the Gaussian smoothing width) defaults to 1% of the spectral range."""
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
    return DensityResult(
        grid=grid,
        density=dens,
        nodes=np.stack([np.asarray(t) for t in nodes]),
        weights=np.stack([np.asarray(w) for w in weights]),
        sigma=float(sigma),
        outliers=np.asarray([t for t, _ in outs]),
        outlier_bounds=np.asarray([b for _, b in outs]),
        n_hvp=op.n_products - start,
        seconds=time.perf_counter() - t0,
    )
