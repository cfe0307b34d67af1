"""AdaBelief transcribed from the paper's equations (Zhuang et al. 2020, Alg. 2) plus RAdam's
rectification, written out-of-place and independently of basin's implementation. Used where
the authors' package deviates from the paper (amsgrad together with rectify)."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class AdaBeliefPaper(Optimizer):
    def __init__(self, params, lr, betas, eps, weight_decay, amsgrad, weight_decouple,
                 fixed_decay, rectify, degenerated_to_sgd):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, wd=weight_decay))
        self.amsgrad, self.decouple, self.fixed = amsgrad, weight_decouple, fixed_decay
        self.rectify, self.degenerate = rectify, degenerated_to_sgd

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["wd"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["t"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_var"] = torch.zeros_like(p)
                    st["max_exp_avg_var"] = torch.zeros_like(p)
                st["t"] += 1
                t = st["t"]
                g = p.grad.clone()
                if self.decouple:
                    p.copy_(p * (1 - (wd if self.fixed else lr * wd)))
                else:
                    g = g + wd * p
                m = b1 * st["exp_avg"] + (1 - b1) * g
                s = b2 * st["exp_avg_var"] + (1 - b2) * (g - m) ** 2 + eps
                smax = torch.maximum(st["max_exp_avg_var"], s)
                st["exp_avg"], st["exp_avg_var"], st["max_exp_avg_var"] = m, s, smax
                s_hat = smax if self.amsgrad else s
                c1, c2 = 1 - b1**t, 1 - b2**t
                if not self.rectify:
                    p.copy_(p - lr * (m / c1) / (torch.sqrt(s_hat / c2) + eps))
                    continue
                rho_inf = 2 / (1 - b2) - 1
                rho = rho_inf - 2 * t * b2**t / c2
                if rho >= 5:
                    r = math.sqrt(
                        (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
                    )
                    p.copy_(p - lr * r * math.sqrt(c2) / c1 * m / (torch.sqrt(s_hat) + eps))
                elif self.degenerate:
                    p.copy_(p - lr * m / c1)
