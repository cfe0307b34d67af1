"""SGD-SaI transcribed from the paper (Xu et al. 2024, arXiv:2412.11768, Algorithm 1) with the
g-SNR of the paper-era code (sgd-sai 1.0.3), out-of-place and independently of basin's
implementation. Works for momentum = 0, where the 1.0.3 package crashes."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


def _gsnr(g: torch.Tensor, eps: float) -> float:
    flat = g.reshape(-1).tolist()
    n = len(flat)
    norm = math.sqrt(sum(x * x for x in flat))
    if n < 2:
        return norm / eps
    mean = sum(flat) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (n - 1))
    return norm / (std + eps)


class SGDSaIPaper(Optimizer):
    def __init__(self, params, lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr))
        self.mu, self.eps, self.wd = momentum, eps, weight_decay

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                g = p.grad.clone()
                st = self.state[p]
                if not st:
                    st["gsnr"] = torch.tensor(_gsnr(g, self.eps), dtype=torch.float64)
                    st["momentum_buffer"] = g
                else:
                    st["momentum_buffer"] = self.mu * st["momentum_buffer"] + (1 - self.mu) * g
                p.copy_(p - lr * self.wd * p - lr * st["gsnr"].item() * st["momentum_buffer"])
