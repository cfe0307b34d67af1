"""diffGrad transcribed from the paper's equations (Dubey et al., arXiv:1909.11015, Sec. 3) in
float64, out-of-place and independently of basin's implementation.

    g_t (+ lambda * theta for L2),  m_t, v_t as in Adam,
    Delta g_t = g_{t-1} - g_t (g_0 = 0),  xi_t = AbsSig(Delta g_t) = 1 / (1 + exp(-|Delta g_t|)),
    theta_{t+1} = theta_t - alpha_t * xi_t * m_t / (sqrt(v_t) + eps_hat),
    alpha_t = alpha * sqrt(1 - beta2^t) / (1 - beta1^t)

(Adam's "efficient" ordering, which the authors' code uses). Each step works on a float64 copy
of the parameter; the previous gradient is kept as its own tensor."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class DiffGradPaper(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            alpha, (beta1, beta2) = group["lr"], group["betas"]
            eps, lam = group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                theta = p.detach().double()
                if not st:
                    st["t"] = 0
                    st["m"] = torch.zeros_like(theta)
                    st["v"] = torch.zeros_like(theta)
                    st["g_prev"] = torch.zeros_like(theta)
                st["t"] += 1
                t = st["t"]
                g = p.grad.double() + lam * theta
                m = beta1 * st["m"] + (1 - beta1) * g
                v = beta2 * st["v"] + (1 - beta2) * g * g
                xi = 1.0 / (1.0 + torch.exp(-torch.abs(st["g_prev"] - g)))
                alpha_t = alpha * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                theta = theta - alpha_t * xi * m / (torch.sqrt(v) + eps)
                st["m"], st["v"], st["g_prev"] = m, v, g.clone()
                p.copy_(theta.to(p.dtype))
