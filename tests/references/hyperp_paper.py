"""float64 transcription of HyperP (Ren, Liu, Shen, Chen, arXiv:2603.28743; the authors' MuonH in
microsoft/ArchScale ``lit_gpt/optim/muon.py``, and AdamH with Adam's direction in its place),
written from the equations, nothing of basin used. For a sphere weight ``W`` of radius ``R``
(its norm before its first step, or ``radius``) and the base optimizer's step ``W -> W'``::

    D = W - W'
    W <- W - lr R D / ||D||_F;   W <- W R / ||W||_F

The bases, as the equations (torch's AdamW; Muon with the momentum ``m <- mu m + (1 - mu) g``
that basin keeps, which the authors' sum ``m <- mu m + g`` only rescales):

    AdamW:  m, v moments;  W' = W (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    Muon:   u = (1 - mu) g + mu m  (nesterov) or m;  O = NS5(u) sqrt(max(1, rows / cols));
            W' = W (1 - lr wd) - lr O   (NS5: Jordan's quintic, 1e-7 in the first normalization)

``base="adamw"``: every ``ndim >= 2`` tensor on the sphere, the rest AdamW's. ``base="muon"``:
``ndim >= 2`` tensors on the sphere over Muon, the rest on an AdamW with the ``adamw_*``
hyperparameters (Muon's fallback, automatic routing).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

NS = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic coefficients


def ns5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    a, b, c = NS
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def sphere_step(w: torch.Tensor, d: torch.Tensor, lr: float, r: float) -> torch.Tensor:
    w = w - lr * r * d / torch.linalg.matrix_norm(d)
    return w * (r / torch.linalg.matrix_norm(w))


class HyperPPaper(Optimizer):
    def __init__(
        self,
        params,
        base="adamw",
        lr=0.02,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.95,
        nesterov=True,
        ns_steps=5,
        adamw_lr=3e-4,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-10,
        adamw_weight_decay=0.0,
        radius=None,
    ):
        super().__init__(params, dict(lr=lr))
        self.base, self.lr, self.wd, self.radius = base, lr, weight_decay, radius
        self.betas, self.eps = betas, eps
        self.mu, self.nesterov, self.ns_steps = momentum, nesterov, ns_steps
        self.fallback = (adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay)
        self.t = 0

    def _adam(self, p, g, lr, betas, eps, wd):
        st = self.state[p]
        if not st:
            st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
        b1, b2 = betas
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g * g
        step = (st["m"] / (1 - b1**self.t)) / ((st["v"] / (1 - b2**self.t)).sqrt() + eps)
        return p * (1 - lr * wd) - lr * step

    def _muon(self, p, g):
        st = self.state[p]
        if not st:
            st["m"] = torch.zeros_like(p)
        st["m"] = self.mu * st["m"] + (1 - self.mu) * g
        u = (1 - self.mu) * g + self.mu * st["m"] if self.nesterov else st["m"]
        rows, cols = p.shape[0], p[0].numel()
        o = ns5(u.reshape(rows, cols), self.ns_steps).reshape(p.shape)
        o = o * math.sqrt(max(1.0, rows / cols))
        return p * (1 - self.lr * self.wd) - self.lr * o

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for p in (q for grp in self.param_groups for q in grp["params"]):
            if p.grad is None:
                continue
            g = p.grad
            if p.ndim < 2:
                if self.base == "adamw":
                    p.copy_(self._adam(p, g, self.lr, self.betas, self.eps, self.wd))
                else:
                    p.copy_(self._adam(p, g, *self.fallback))
                continue
            if "r" not in self.state[p]:
                r = self.radius or float(torch.linalg.matrix_norm(p.reshape(p.shape[0], -1)))
            else:
                r = self.state[p]["r"]
            if self.base == "adamw":
                new = self._adam(p, g, self.lr, self.betas, self.eps, self.wd)
            else:
                new = self._muon(p, g)
            self.state[p]["r"] = r
            d = (p - new).reshape(p.shape[0], -1)
            p.copy_(sphere_step(p.reshape(p.shape[0], -1), d, self.lr, r).reshape(p.shape))
        return None
