"""SWAN in float64, transcribed from Ma et al., arXiv:2412.13148 (2024), with the whitening
computed EXACTLY: ``(G G^T)^(-1/2) G`` through an eigendecomposition of the (always ``m x m``)
Gram matrix, pseudo-inverting eigenvalues below ``1e-10 * max`` (so that rank-deficient
gradients, e.g. of square layers after row centering, are whitened on their range). Non-matrix
parameters get Adam with decoupled weight decay, written out in the textbook form."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def grad_norm(G: torch.Tensor, eps: float) -> torch.Tensor:
    n = G.shape[1]
    mu = G.sum(dim=1, keepdim=True) / n
    s = torch.sqrt(((G - mu) ** 2).sum(dim=1, keepdim=True) / n)
    return (G - mu) / (s + eps)


def exact_whitening(G: torch.Tensor, rel_cutoff: float = 1e-10) -> torch.Tensor:
    G = G.double()
    evals, evecs = torch.linalg.eigh(G @ G.T)
    keep = evals > rel_cutoff * evals.max().clamp_min(1e-300)
    inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
    return evecs @ torch.diag(inv_sqrt) @ evecs.T @ G


class SWANPaper(Optimizer):
    def __init__(self, params, lr=1e-3, weight_decay=0.0, eps=1e-8, rescale=True,
                 adamw_lr=1e-3, adamw_betas=(0.9, 0.999), adamw_eps=1e-8, adamw_weight_decay=0.0,
                 **_ignored):  # fmt: skip
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, eps=eps,
                         rescale=rescale, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                         adamw_eps=adamw_eps, adamw_weight_decay=adamw_weight_decay))  # fmt: skip

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.double()
                if p.ndim >= 2:
                    gt = grad_norm(g.reshape(g.shape[0], -1), group["eps"])
                    w = exact_whitening(gt)
                    if group["rescale"]:
                        w = w * torch.linalg.norm(gt) / (torch.linalg.norm(w) + group["eps"])
                    lr, wd = group["lr"], group["weight_decay"]
                    new = p.double() * (1 - lr * wd) - lr * w.reshape(p.shape)
                else:
                    st = self.state[p]
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
