"""SGDP transcribed from the paper (Heo et al. 2021, arXiv:2006.08217, Algorithm 1 with the
channel-then-layer test of Sec. 3.3), out-of-place and independently of basin's implementation.
Unlike the authors' package it leaves the momentum buffer unprojected (the paper projects only
the update q_t)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.optim import Optimizer


def _project(w, g, p, delta, eps):
    """Returns (q, projected?) following the paper: channel view first, then the layer view."""
    for rows in (w.shape[0], 1):
        W, G, P = w.reshape(rows, -1), g.reshape(rows, -1), p.reshape(rows, -1)
        cos = F.cosine_similarity(G, W, dim=1, eps=eps).abs()
        if bool((cos < delta / math.sqrt(W.shape[1])).all()):
            unit = W / (W.norm(dim=1, keepdim=True) + eps)
            Q = P - unit * (unit * P).sum(dim=1, keepdim=True)
            return Q.reshape(w.shape), True
    return p, False


class SGDPPaper(Optimizer):
    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1):  # fmt: skip
        super().__init__(params, dict(lr=lr))
        self.mu, self.damp, self.wd, self.nesterov = momentum, dampening, weight_decay, nesterov
        self.eps, self.delta, self.wd_ratio = eps, delta, wd_ratio
        self.n_projected = 0

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr = group["lr"]
            for w in group["params"]:
                g = w.grad.clone()
                st = self.state[w]
                v = self.mu * st.get("momentum", torch.zeros_like(w)) + (1 - self.damp) * g
                st["momentum"] = v
                p = g + self.mu * v if self.nesterov else v
                ratio = 1.0
                if w.dim() > 1:
                    p, hit = _project(w, g, p, self.delta, self.eps)
                    if hit:
                        ratio = self.wd_ratio
                        self.n_projected += 1
                w.copy_(w - lr * p - lr * self.wd * ratio / (1 - self.mu) * w)
