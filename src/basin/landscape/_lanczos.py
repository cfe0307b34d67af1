"""Lanczos tridiagonalisation with full reorthogonalisation, shared by eigen.py and density.py.

Lanczos (1950) builds an orthonormal basis ``Q`` of the Krylov space of a symmetric operator and
the tridiagonal ``T = Q^T H Q``; the eigenpairs ``(theta_i, s_i)`` of ``T`` (Ritz pairs, with Ritz
vectors ``y_i = Q s_i``) satisfy ``||H y_i - theta_i y_i|| = beta_m |s_i[m-1]|`` in exact
arithmetic; with full reorthogonalisation (two Gram-Schmidt passes per step, "twice is enough")
this holds to rounding, so it is the residual bound reported per eigenvalue. Symmetric-matrix
theory turns it into error bounds: some eigenvalue lies within ``r_i`` of ``theta_i``, and
within ``r_i^2 / gap_i`` when ``gap_i`` separates ``theta_i`` from the rest of the spectrum
(Kato-Temple; the Ritz gap is used as the estimate of ``gap_i``).

When the Krylov space becomes invariant (``beta`` ~ 0, e.g. a low-rank Hessian), the iteration
restarts from a random vector orthogonal to the basis, so the rest of the spectrum is still
reached; ``T`` is then block diagonal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor


@dataclass
class LanczosState:
    alpha: list[float]
    beta: list[float]  # beta[j] couples q_j and q_{j+1}; beta[-1] is the residual norm
    Q: Tensor  # (max_iter, n); rows [: m] are the basis

    @property
    def m(self) -> int:
        return len(self.alpha)

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of T (columns), residual norms."""
        a = np.asarray(self.alpha, dtype=np.float64)
        b = np.asarray(self.beta[: self.m - 1], dtype=np.float64)
        if self.m == 1:
            theta, s = a.copy(), np.ones((1, 1))
        else:
            theta, s = eigh_tridiagonal(a, b)
        resid = abs(self.beta[self.m - 1]) * np.abs(s[-1, :])
        return theta, s, resid

    def ritz_vectors(self, s: np.ndarray) -> Tensor:
        """Ritz vectors ``(s^T Q)`` for the columns of ``s`` -> (len, n)."""
        S = torch.as_tensor(s.T, dtype=self.Q.dtype, device=self.Q.device)
        return S @ self.Q[: self.m]


def error_bounds(theta: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """min(r, r^2/gap) per Ritz value, ``gap`` the distance to the nearest other Ritz value."""
    if theta.size == 1:
        return resid.copy()
    gaps = np.empty_like(theta)
    d = np.diff(theta)
    gaps[0] = d[0]
    gaps[-1] = d[-1]
    if theta.size > 2:
        gaps[1:-1] = np.minimum(d[:-1], d[1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        kt = np.where(gaps > 0, resid**2 / gaps, np.inf)
    return np.minimum(resid, kt)


def _orthogonalize(w: Tensor, Q: Tensor) -> Tensor:
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    max_iter: int,
    stop: Callable[[LanczosState], bool] | None = None,
    generator: torch.Generator | None = None,
) -> LanczosState:
    """Run up to ``max_iter`` Lanczos steps from ``v0``; after each step ``stop(state)`` may end
    the run. Every step costs exactly one ``matvec``."""
    n = v0.numel()
    max_iter = min(max_iter, n)
    Q = torch.zeros(max_iter, n, dtype=v0.dtype, device=v0.device)
    nrm = torch.linalg.vector_norm(v0)
    if not torch.isfinite(nrm) or nrm == 0:
        raise ValueError("the Lanczos start vector must be nonzero and finite")
    Q[0] = v0 / nrm
    state = LanczosState([], [], Q)
    scale = 0.0
    for j in range(max_iter):
        w = matvec(Q[j])
        if not torch.isfinite(w).all():
            raise ValueError("the curvature product returned non-finite values (inf/nan loss?)")
        a = float(Q[j] @ w)
        w = w - a * Q[j]
        if j > 0:
            w = w - state.beta[j - 1] * Q[j - 1]
        w = _orthogonalize(w, Q[: j + 1])
        b = float(torch.linalg.vector_norm(w))
        state.alpha.append(a)
        scale = max(scale, abs(a) + b + (state.beta[j - 1] if j > 0 else 0.0))
        if j + 1 == n:
            state.beta.append(0.0)  # the whole space: T is exactly similar to H
            break
        if b <= 1e-10 * max(scale, 1e-300):
            # invariant subspace: restart with a fresh direction orthogonal to the basis
            state.beta.append(0.0)
            if j + 1 < max_iter:
                for _ in range(5):
                    r = torch.randn(n, dtype=Q.dtype, device=Q.device, generator=generator)
                    r = _orthogonalize(r, Q[: j + 1])
                    rn = torch.linalg.vector_norm(r)
                    if rn > 1e-8:
                        Q[j + 1] = r / rn
                        break
                else:  # pragma: no cover - numerically exhausted
                    break
        else:
            state.beta.append(b)
            if j + 1 < max_iter:
                Q[j + 1] = w / b
        if stop is not None and stop(state):
            break
    return state
