"""Muon in float64, transcribed from the update rule (Jordan et al., 2024 blog; Liu et al.,
arXiv:2502.16982) for the high-precision Newton-Schulz path, written differently from basin's:
the quintic iteration is not run on the matrix but applied to its singular values through an
SVD, ``U diag(p(p(p(p(p(s / ||G||_F)))))) V^T`` with ``p(x) = a x + b x^3 + c x^5``, which is
what the matrix iteration computes in exact arithmetic. Non-matrix parameters get AdamW written
out in the textbook form."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

A, B, C = 3.4445, -4.7750, 2.0315


def quintic_polar(G: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    G = G.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (torch.sqrt((S**2).sum()) + eps)  # Frobenius norm from the singular values
    for _ in range(steps):
        x = A * x + B * x**3 + C * x**5
    return U @ torch.diag(x) @ Vh


class MuonPaper(Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True,
                 ns_steps=5, adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-10,
                 adamw_weight_decay=0.0):  # fmt: skip
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, ns_steps=ns_steps, adamw_lr=adamw_lr,
                         adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay))  # fmt: skip

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.double()
                st = self.state[p]
                if p.ndim >= 2:
                    if not st:
                        st["momentum_buffer"] = torch.zeros_like(g)
                    b = group["momentum"]
                    m = b * st["momentum_buffer"] + (1 - b) * g
                    st["momentum_buffer"] = m
                    u = (1 - b) * g + b * m if group["nesterov"] else m
                    mat = u.reshape(u.shape[0], -1)
                    rows, cols = mat.shape
                    o = quintic_polar(mat, group["ns_steps"]) * math.sqrt(max(1.0, rows / cols))
                    lr, wd = group["lr"], group["weight_decay"]
                    new = p.double() * (1 - lr * wd) - lr * o.reshape(p.shape)
                else:
                    if not st:
                        st["step"] = 0
                        st["exp_avg"] = torch.zeros_like(g)
                        st["exp_avg_sq"] = torch.zeros_like(g)
                    st["step"] += 1
                    t = st["step"]
                    b1, b2 = group["adamw_betas"]
                    lr, wd = group["adamw_lr"], group["adamw_weight_decay"]
                    st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                    st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                    m_hat = st["exp_avg"] / (1 - b1**t)
                    v_hat = st["exp_avg_sq"] / (1 - b2**t)
                    new = p.double() * (1 - lr * wd) - lr * m_hat / (
                        v_hat.sqrt() + group["adamw_eps"]
                    )
                p.copy_(new)
