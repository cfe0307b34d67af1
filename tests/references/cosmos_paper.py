"""COSMOS (Liu et al. 2025, arXiv:2502.17410; update as in the authors' COSMOS_optim.py)
transcribed in float64, out of place and along different code paths from basin's
implementation:

* t = 1: the subspace is the top-r eigenvectors of ``G^T G`` from ``torch.linalg.eigh``
  (basin: SVD of ``G``); eigenvector signs therefore differ between the two.
* t > 1: QR by classical Gram-Schmidt with re-orthogonalisation (positive diagonal of R;
  basin: Householder QR from ``torch.linalg.qr``, whose column signs differ).
* NS5 of the residual as ``U diag(q(s)) V^T`` from an SVD, with ``q`` the 5-fold composition
  of the scalar quintic ``x -> a x + b x^3 + c x^5`` on the singular values of ``X/||X||_F``:
  the matrix iteration acts on each singular value exactly like that.

The update depends on the subspace only through sign-invariant quantities (``P P^T``, the
element-wise squares in ``V``, and QR of ``X D`` spanning the same columns as QR of ``X`` up to
column signs), so parameters must agree even though the stored ``P`` and ``S`` differ by
column signs. Non-matrix parameters: AdamW.

``variant="paper"`` transcribes the paper's algorithm box instead, as read through the
third-party renderings named in ``basin.optim.cosmos`` (basin: a branch of the same functional): EMA momentum ``M_t = b1 M + (1-b1) G`` with the Nesterov look-ahead written as one
more EMA step ``b1 M_t + (1-b1) G`` bias-corrected by ``1 - b1^(t+1)``, the SOAP denominator
``sqrt((V + eps) / (1 - b2^t))``, and the Muon part from ``M_t (I - P P^T)``."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def gram_schmidt(X: torch.Tensor) -> torch.Tensor:
    cols = []
    for j in range(X.shape[1]):
        v = X[:, j].clone()
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            for q in cols:
                v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


def quintic_polar_via_svd(X: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    a, b, c = NS_COEFFS
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    s = s / (X.norm() + eps)
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag(s) @ Vh


class COSMOSPaper(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, lr_ratio=0.1, rank=64,
                 weight_decay=0.0, gamma=0.2, nesterov=True, ns_steps=5, max_rows=10000,
                 variant="code"):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, wd=weight_decay))
        self.ratio, self.rank, self.gamma = lr_ratio, rank, gamma
        self.nesterov, self.ns_steps, self.max_rows = nesterov, ns_steps, max_rows
        self.paper = variant == "paper"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["wd"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                G = p.grad.clone()
                st["t"] = t = st.get("t", 0) + 1
                if p.ndim != 2 or p.shape[0] > self.max_rows:
                    m = b1 * st.get("exp_avg", 0) + (1 - b1) * G
                    v = b2 * st.get("exp_avg_sq", 0) + (1 - b2) * G * G
                    st["exp_avg"], st["exp_avg_sq"] = m, v
                    mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
                    p.copy_(p * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps))
                    continue
                rows, cols = G.shape
                if self.paper:
                    M = b1 * st.get("exp_avg", 0) + (1 - b1) * G
                else:
                    M = b1 * st.get("exp_avg", 0) + G
                GtG = G.T @ G
                if t == 1:
                    evals, evecs = torch.linalg.eigh(GtG)
                    order = torch.argsort(evals, descending=True)[: self.rank]
                    P = evecs[:, order]
                    S = (1 - b2) * P.T @ GtG @ P
                else:
                    P_old, S_old = st["subspace"], st["subspace_cov"]
                    P = gram_schmidt(b2 * P_old @ S_old + (1 - b2) * GtG @ P_old)
                    R = P_old.T @ P
                    S = b2 * R.T @ S_old @ R + (1 - b2) * P.T @ GtG @ P
                V = b2 * st.get("exp_avg_sq", 0) + (1 - b2) * (G @ P) ** 2
                st["exp_avg"], st["exp_avg_sq"], st["subspace"], st["subspace_cov"] = M, V, P, S

                c2 = 1 - b2**t
                proj = P @ P.T
                if self.paper:
                    if self.nesterov:
                        Gt = (b1 * M + (1 - b1) * G) / (1 - b1 ** (t + 1))
                    else:
                        Gt = M / (1 - b1**t)
                    A = ((Gt @ P) / torch.sqrt((V + eps) / c2)) @ P.T
                    eye = torch.eye(cols, dtype=G.dtype)
                    B = quintic_polar_via_svd(M @ (eye - proj), self.ns_steps)
                else:
                    c1 = sum(b1**k for k in range(t))  # (1 - b1^t) / (1 - b1)
                    if self.nesterov:
                        Gt = (G + b1 * M) / (1 + b1 * c1)
                    else:
                        Gt = M / c1
                    A = ((Gt @ P) / (torch.sqrt(V / c2) + eps)) @ P.T
                    B = quintic_polar_via_svd(Gt - Gt @ proj, self.ns_steps)
                size = math.sqrt(rows * cols)
                B = size * B / (B.norm() + eps)
                U = A + self.gamma * B
                p.copy_(p * (1 - lr * wd) - lr * self.ratio * size * U / (U.norm() + eps))
