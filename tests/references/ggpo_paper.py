"""float64 transcription of LoRA-GGPO (Chang et al., arXiv:2502.14538v1) over AdamW
(Loshchilov & Hutter, arXiv:1711.05101, Algorithm 2), written from the equations (the authors'
code is not public), nothing of basin used:

    s_i = sqrt(sigma^2 / n ||W_i||^2 + beta ||g_i||^2)       (variant "paper")
    s_i = sigma ||W_i|| + beta ||g_i||^2                      (variant "port")
    W~ = W + s_i z_ij,  z ~ N(0, 1);  g = grad L(W~);  W back to its saved value
    W <- W (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    W <- W - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

``g_i`` is row i of the previous step's gradient (zero before the first step); rows are dim 0,
the other dims flattened (n = their product). Only tensors with ndim >= 2 are perturbed. The
draws are the same numbers basin uses (float32 standard normals from a generator seeded with
``seed``, one tensor per perturbed parameter in order), converted to float64. ``step(closure)``:
perturb, closure, restore, AdamW. ``perturb()`` before the forward, then ``step()``: restore,
AdamW (without ``perturb()``: AdamW alone).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class GGPOPaper(Optimizer):
    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        sigma=0.03,
        beta=0.01,
        variant="paper",
        seed=0,
        maximize=False,
    ):
        super().__init__(params, dict(lr=lr))
        self.b1, self.b2 = betas
        self.eps, self.wd, self.sigma, self.beta = eps, weight_decay, sigma, beta
        self.variant, self.maximize = variant, maximize
        self.gen = torch.Generator().manual_seed(seed)
        self.saved = {}
        self.gsq = {}
        self.t = 0
        self.last_scales = {}

    def params(self):
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def perturb(self):
        if self.saved:
            return
        for p in self.params():
            if p.ndim < 2:
                continue
            rows = p.shape[0]
            n = p.numel() // rows
            W = p.reshape(rows, n).double()
            zero = torch.zeros(rows, n, dtype=torch.float64)
            G = self.gsq.get(p, zero).reshape(rows, n).double()
            z = torch.randn(p.shape, generator=self.gen, dtype=torch.float32).double()
            z = z.reshape(rows, n)
            eps = torch.empty(rows, n, dtype=torch.float64)
            scales = []
            for i in range(rows):
                w_norm_sq = sum(float(W[i, j]) ** 2 for j in range(n))
                g_norm_sq = sum(float(G[i, j]) ** 2 for j in range(n))
                if self.variant == "paper":
                    s = math.sqrt(self.sigma**2 / n * w_norm_sq + self.beta * g_norm_sq)
                else:
                    s = self.sigma * math.sqrt(w_norm_sq) + self.beta * g_norm_sq
                scales.append(s)
                eps[i] = s * z[i]
            self.last_scales[p] = torch.tensor(scales, dtype=torch.float64)
            self.saved[p] = p.clone()
            p.add_(eps.reshape(p.shape).to(p.dtype))

    @torch.no_grad()
    def restore(self):
        for p, w in self.saved.items():
            p.copy_(w)
        self.saved = {}

    @torch.no_grad()
    def adamw(self):
        self.t += 1
        lr = float(self.param_groups[0]["lr"])
        for p in self.params():
            if p.grad is None:
                continue
            g = p.grad.double()
            if self.maximize:
                g = -g
            st = self.state[p]
            if not st:
                st["m"] = torch.zeros_like(g)
                st["v"] = torch.zeros_like(g)
            w = p.double() * (1 - lr * self.wd)
            st["m"] = self.b1 * st["m"] + (1 - self.b1) * g
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * g * g
            m_hat = st["m"] / (1 - self.b1**self.t)
            v_hat = st["v"] / (1 - self.b2**self.t)
            p.copy_(w - lr * m_hat / (v_hat.sqrt() + self.eps))
            if p.ndim >= 2:
                self.gsq[p] = p.grad.double().clone()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            self.restore()
            self.adamw()
            return None
        self.perturb()
        with torch.enable_grad():
            loss = closure()
        self.restore()
        self.adamw()
        return loss
