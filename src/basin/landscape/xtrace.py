"""XTrace and XNysTrace: exchangeable trace estimators with their own error estimate.

Reference: E. N. Epperly, J. A. Tropp, R. J. Webber, "XTrace: Making the most of every sample
in stochastic trace estimation", SIAM J. Matrix Anal. Appl., 2024, arXiv:2301.07825.

Both draw ``s`` Gaussian test vectors ``omega_1..omega_s``, form ``Y = A Omega``, and average
``s`` estimates, the ``i``-th built from a low-rank approximation that leaves ``omega_i`` out
plus one Hutchinson term on ``omega_i`` for what that approximation misses. The estimates are
exchangeable, so their spread over the ``s`` leave-one-out terms is the error estimate
(``std / sqrt(s)``). Every leave-one-out quantity is a rank-one downdate of the full one, so
the cost is that of a single approximation.

XTrace (any symmetric ``A``, ``2s`` products): ``Q_i`` an orthonormal basis of
``A Omega_{-i}``, ``u_i = (I - Q_i Q_i^T) omega_i`` and
``t_i = tr(Q_i^T A Q_i) + (n - s + 1) u_i^T A u_i / |u_i|^2`` (``u_i / |u_i|`` is uniform on the
unit sphere of the ``n - s + 1``-dimensional complement of ``Q_i``, so the second term is
unbiased for the trace that ``Q_i`` misses). Exact when ``rank(A) <= s - 1``.

XNysTrace (positive semidefinite ``A``, ``s`` products): the Nystrom approximation
``A<Omega_{-i}> = Y_{-i} (Omega_{-i}^T Y_{-i})^{-1} Y_{-i}^T`` and
``t_i = tr(A<Omega_{-i}>) + omega_i^T (A - A<Omega_{-i}>) omega_i``; with ``K = (Omega^T Y)^{-1}``
this is ``tr(Y K Y^T) - |Y K e_i|^2 / K_ii + 1 / K_ii``. Exact when ``rank(A) <= s - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["xnystrace", "xtrace"]


def _dense_dtype(device: torch.device) -> torch.dtype:
    """float64 for the small dense parts (QR, Cholesky, the downdates, which cancel), except
    where the device has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _apply(matvec: Callable[[Tensor], Tensor], V: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.stack([matvec(V[:, j].to(dtype)).to(V.dtype) for j in range(V.shape[1])], 1)


def _gaussian(n: int, s: int, device, gen, dtype) -> Tensor:
    return torch.randn(n, s, generator=gen, device=device, dtype=dtype)


def _mean_err(ests: Tensor) -> tuple[float, float]:
    s = ests.numel()
    return float(ests.mean()), float(ests.std(unbiased=True) / math.sqrt(s))


def xtrace_from(Om: Tensor, Y: Tensor, Q: Tensor, R: Tensor, Z: Tensor) -> Tensor:
    """The ``s`` leave-one-out XTrace estimates from ``Y = A Omega = QR`` and ``Z = A Q``."""
    n, s = Om.shape
    H = Q.T @ Z
    H = 0.5 * (H + H.T)
    W = Q.T @ Om  # (s, s): coordinates of each omega_i in range(Q)
    S = torch.linalg.solve_triangular(
        R.T, torch.eye(s, dtype=R.dtype, device=R.device), upper=False
    )
    S = S / S.norm(dim=0, keepdim=True)  # column i: the direction of range(Q) that Q_i drops
    c = (S * W).sum(0)  # s_i^T W_i
    V = W - S * c  # u_i = omega_i - Q v_i
    HV = H @ V
    dropped = (S * (H @ S)).sum(0)  # s_i^T H s_i: tr(Q_i^T A Q_i) = tr(H) - s_i^T H s_i
    wAw = (Om * Y).sum(0)
    # u^T A u = w^T A w - 2 w^T A Q v + v^T H v, with w_i^T A Q = Y_i^T Q = R_i^T
    uAu = wAw - 2 * (R * V).sum(0) + (V * HV).sum(0)
    uu = (Om * Om).sum(0) - (W * W).sum(0) + c * c
    return torch.trace(H) - dropped + (n - s + 1) * uAu / uu


def xtrace(
    matvec: Callable[[Tensor], Tensor], n: int, m: int, dtype, device, gen
) -> tuple[float, float, list[float]]:
    """XTrace with ``2 * (m // 2)`` products -> (estimate, error estimate, the ``s`` estimates)."""
    s = m // 2
    work = _dense_dtype(device)
    Om = _gaussian(n, s, device, gen, work)
    Y = _apply(matvec, Om, dtype)
    Q, R = torch.linalg.qr(Y)
    Z = _apply(matvec, Q, dtype)
    ests = xtrace_from(Om, Y, Q, R, Z)
    mean, err = _mean_err(ests)
    return mean, err, ests.tolist()


def xnystrace_from(Om: Tensor, Y: Tensor) -> Tensor:
    """The ``s`` leave-one-out XNysTrace estimates from ``Y = A Omega`` (``A`` PSD).

    A shift ``nu`` of the order of the rounding of ``Y`` makes ``Omega^T (Y + nu Omega)``
    numerically positive definite; the estimates are of ``tr(A + nu I)``, less ``nu n``."""
    n, s = Om.shape
    nu = torch.finfo(Y.dtype).eps * math.sqrt(n) * float(Y.norm())
    Yn = Y + nu * Om
    M = Om.T @ Yn
    M = 0.5 * (M + M.T)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise ValueError(
            "method='xnystrace' needs a positive semidefinite operator (Omega^T A Omega is not); "
            "use method='xtrace'"
        )
    K = torch.cholesky_inverse(L)
    B = torch.linalg.solve_triangular(L, Yn.T, upper=False)  # tr(Y K Y^T) = |L^{-1} Y^T|_F^2
    YK = Yn @ K
    d = torch.diagonal(K)
    return B.square().sum() - YK.square().sum(0) / d + 1.0 / d - nu * n


def xnystrace(
    matvec: Callable[[Tensor], Tensor], n: int, m: int, dtype, device, gen
) -> tuple[float, float, list[float]]:
    """XNysTrace with ``m`` products (``A`` PSD) -> (estimate, error estimate, estimates)."""
    work = _dense_dtype(device)
    Om = _gaussian(n, m, device, gen, work)
    Y = _apply(matvec, Om, dtype)
    ests = xnystrace_from(Om, Y)
    mean, err = _mean_err(ests)
    return mean, err, ests.tolist()
