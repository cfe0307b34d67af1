"""EXAdam transcribed from the paper's equations (Adly, "EXAdam: The Power of Adaptive
Cross-Moments", arXiv:2412.20302, Algorithm 1) in float64, out-of-place and independently of
basin's implementation:

    m_t = beta1 m_{t-1} + (1 - beta1) g_t,      v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    d1 = 1 + (v_t / (v_t + eps)) beta2^t,        d2 = 1 + (m_t^2 / (m_t^2 + eps)) beta1^t
    m~ = m_t / (1 - beta1^t) d1,  v~ = v_t / (1 - beta2^t) d2,  g~ = g_t / (1 - beta1^t) d1
    alpha_t = alpha ln(sqrt(2) sqrt(t + 1))   (alpha_t = alpha when dynamic_step_size=False)
    theta_t = theta_{t-1} - alpha_t (m~ + g~) / (sqrt(v~) + eps)

Decoupled weight decay theta <- theta - alpha lambda theta before the step, as in the authors'
code."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class EXAdamPaper(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 dynamic_step_size=True):  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.dynamic = dynamic_step_size

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
                st["t"] += 1
                t = st["t"]
                g = p.grad.double()
                theta = theta - alpha * lam * theta
                m = beta1 * st["m"] + (1 - beta1) * g
                v = beta2 * st["v"] + (1 - beta2) * g**2
                d1 = 1 + (v / (v + eps)) * beta2**t
                d2 = 1 + (m**2 / (m**2 + eps)) * beta1**t
                m_tilde = m / (1 - beta1**t) * d1
                v_tilde = v / (1 - beta2**t) * d2
                g_tilde = g / (1 - beta1**t) * d1
                alpha_t = (
                    alpha * math.log(math.sqrt(2) * math.sqrt(t + 1)) if self.dynamic else alpha
                )
                theta = theta - alpha_t * (m_tilde + g_tilde) / (torch.sqrt(v_tilde) + eps)
                st["m"], st["v"] = m, v
                p.copy_(theta.to(p.dtype))
