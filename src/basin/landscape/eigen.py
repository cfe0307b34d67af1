"""Extreme Hessian (or GGN) eigenpairs by Lanczos with full reorthogonalisation.

References: C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
differential and integral operators", J. Res. Nat. Bur. Standards 45, 1950; B. N. Parlett, "The
Symmetric Eigenvalue Problem" (1998), ch. 13 (residual and gap bounds).

Differences from the peers: PyHessian uses power iteration with deflation, which finds the
largest-*magnitude* eigenvalues (a large negative one comes first) and stops on a relative change
of 1e-3, which is not an error bound; here ``which="top"`` are the largest *algebraic* values,
``"bottom"`` the most negative, and every value comes with a residual bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._hvp import CurvatureOperator, full_precision, make_operator
from ._lanczos import error_bounds, lanczos

__all__ = ["EigenResult", "hessian_eigenvalues"]


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of the Hessian (or GGN) of the data loss.

    Attributes:
        eigenvalues: (k,) float64, descending.
        eigenvectors: (k, n) unit vectors over the selected parameters (flattened in
            ``param_names`` order), row ``i`` belongs to ``eigenvalues[i]``.
        residuals: ``||H y_i - lambda_i y_i||`` from the recurrence, floored at
            ``eps * ||H|| * sqrt(n)`` (rounding of the working precision); H has an eigenvalue
            within this of ``eigenvalues[i]``.
        error_bounds: ``min(r, r^2/gap)`` with the Ritz gap: the (much tighter) estimate of
            ``|lambda_i - true|`` once the neighbours have converged.
        converged: per eigenvalue, ``error_bounds <= tol * max(|lambda|, 1e-6 ||H||)``, or the
            residual reached the rounding floor of the working precision (float32).
        n_hvp: curvature-vector products used; n_iter: Lanczos steps; seconds: wall time.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    n_hvp: int
    n_iter: int
    seconds: float
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]

    def vector(self, i: int) -> dict[str, Tensor]:
        """Eigenvector ``i`` as a dict of parameter-shaped tensors."""
        sizes = [math.prod(s) for s in self.param_shapes]
        parts = self.eigenvectors[i].split(sizes)
        return {n: p.view(s) for n, p, s in zip(self.param_names, parts, self.param_shapes)}


def _check_k(k: Any, n: int, which: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    need = 2 * k if which == "both" else k
    if need > n:
        raise ValueError(
            f"k={k} asks for {need} eigenvalues but the selected parameters have only {n} entries"
        )
    return k


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices (into ascending ``theta``) of the wanted Ritz values, descending by value."""
    m = theta.size
    if which == "top":
        idx = list(range(m - 1, max(m - k, 0) - 1, -1))
    elif which == "bottom":
        idx = list(range(min(k, m) - 1, -1, -1))
    else:
        top = list(range(m - 1, max(m - k, 0) - 1, -1))
        bottom = [i for i in range(min(k, m) - 1, -1, -1) if i not in top]
        idx = top + bottom
    return np.asarray(idx, dtype=int)


@full_precision
def hessian_eigenvalues(
    model: nn.Module | CurvatureOperator,
    loss_fn=None,
    data: Any = None,
    k: int = 1,
    *,
    which: str = "top",
    params: str | Sequence[str] | None = None,
    kind: str | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    init: Tensor | None = None,
) -> EigenResult:
    """Top-k (largest algebraic), bottom-k (most negative) or both extreme eigenpairs.

    Args:
        model: the network; or a ``CurvatureOperator``, to reuse its cached graphs.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        data: one batch or an iterable of batches (see
            :class:`~basin.landscape.CurvatureOperator`).
        k: eigenpairs per end. which: ``"top"``, ``"bottom"`` or ``"both"`` (2k values).
        params: parameter names / prefixes for a per-layer spectrum (default: all).
        kind: ``"hessian"`` (default) or ``"ggn"`` (the generalised Gauss-Newton matrix). With
            an operator, ``params`` and ``kind`` may only repeat its own (else ``ValueError``).
        tol: stop when every wanted value has ``error_bound <= tol * max(|lambda|, 1e-6 ||H||)``.
        max_iter: cap on Lanczos steps (= products); default ``min(n, max(200, 20 k))``.
        seed: seeds the random start vector and the random ops of the forward (Dropout in
            train mode: one fixed draw of masks per batch, the same at every product, so the
            bounds hold for that operator and the same seed gives the same answer; the global
            RNG is left as it was). An operator keeps the seed it was built with for its
            forward. init: optional start vector (e.g. the previous top eigenvector, to
            warm-start a tracker).
    """
    t0 = time.perf_counter()
    if which not in ("top", "bottom", "both"):
        raise ValueError(f"which must be 'top', 'bottom' or 'both', got {which!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    op = make_operator(model, loss_fn, data, params=params, kind=kind, seed=seed)
    k = _check_k(k, op.n, which)
    n_wanted = 2 * k if which == "both" else k
    if max_iter is None:
        max_iter = min(op.n, max(200, 20 * k))
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < n_wanted:
        raise ValueError(f"max_iter must be an integer >= {n_wanted}, got {max_iter!r}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    if init is None:
        v0 = torch.randn(op.n, dtype=op.dtype, device=op.device, generator=gen)
    else:
        v0 = init.reshape(-1).to(dtype=op.dtype, device=op.device).clone()
        if v0.numel() != op.n:
            raise ValueError(f"init has {v0.numel()} entries, the parameters have {op.n}")
    # a floor on the steps, so a Ritz gap measured before the neighbours appear cannot make the
    # gap-based bound look converged too early
    min_iter = min(op.n, max(2 * n_wanted + 4, 8))
    start = op.n_products

    eps = torch.finfo(op.dtype).eps

    def converged(theta, resid):
        idx = _select(theta, k, which)
        norm = float(np.max(np.abs(theta)))
        # the recurrence cannot see rounding in the products themselves: floor the bounds at
        # what rounding in the working precision can hide; a value whose residual reached that
        # floor has converged as far as the precision allows
        floor_r = eps * norm * math.sqrt(op.n)
        at_floor = resid[idx] <= floor_r
        eb = error_bounds(theta, np.maximum(resid, floor_r))[idx]
        scale = np.maximum(np.abs(theta[idx]), 1e-6 * norm)
        return eb, (eb <= tol * scale) | at_floor, idx

    def stop(state) -> bool:
        if state.m < min_iter:
            return False
        theta, _, resid = state.ritz()
        if theta.size < n_wanted:
            return False
        _, ok, _ = converged(theta, resid)
        return bool(ok.all())

    state = lanczos(op.matvec, v0, max_iter, stop=stop, generator=gen)
    theta, s, resid = state.ritz()
    eb, ok, idx = converged(theta, resid)
    resid = np.maximum(resid, eps * float(np.max(np.abs(theta))) * math.sqrt(op.n))
    vecs = state.ritz_vectors(s[:, idx])
    return EigenResult(
        eigenvalues=torch.as_tensor(theta[idx], dtype=torch.float64),
        eigenvectors=vecs,
        residuals=torch.as_tensor(resid[idx], dtype=torch.float64),
        error_bounds=torch.as_tensor(eb, dtype=torch.float64),
        converged=torch.as_tensor(ok),
        n_hvp=op.n_products - start,
        n_iter=state.m,
        seconds=time.perf_counter() - t0,
        param_names=tuple(op.names),
        param_shapes=tuple(op.shapes),
    )
