"""float64 transcription of SAM (Foret et al., arXiv:2010.01412, Algorithm 1 / eq. 2) and ASAM
(Kwon et al., arXiv:2102.11600, eq. 9 with T_w = |w| + eta), over heavy-ball SGD, written from
the papers' equations (not from any code):

    e(w) = rho g / ||g||                                   (SAM, g = grad L(w))
    e(w) = rho T_w^2 g / ||T_w g||,  T_w = diag(|w| + eta)  (ASAM; T = 1 for non-weight params)
    g' = grad L(w + e(w))
    buf <- momentum buf + (g' + wd w)   (buf = g' + wd w on the first step), w <- w - lr buf
    (nesterov: w <- w - lr (g' + wd w + momentum buf))

Every quantity is recomputed from scratch in float64 Python lists of tensors; nothing of
basin is used. ``step(closure)`` runs both passes; ``step()`` without a closure runs the next
phase with the gradients already in ``p.grad`` (the same two-phase protocol as basin's SAM).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class SAMPaper(Optimizer):
    def __init__(
        self,
        params,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        nesterov=False,
        rho=0.05,
        adaptive=False,
        eta=0.01,
        norm_eps=None,
        names=None,
        maximize=False,
    ):
        super().__init__(params, dict(lr=lr))
        self.momentum, self.wd, self.nesterov = momentum, weight_decay, nesterov
        self.rho, self.adaptive, self.eta, self.maximize = rho, adaptive, eta, maximize
        self.norm_eps = (1e-16 if adaptive else 0.0) if norm_eps is None else norm_eps
        self.names = names
        self.saved = None
        self.bufs = {}

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _T(self, i, w):
        if not self.adaptive:
            return torch.ones_like(w)
        if self.names is not None and "weight" not in self.names[i]:
            return torch.ones_like(w)
        return w.abs() + self.eta

    @torch.no_grad()
    def ascend(self):
        ps = self._params()
        ws = [p.detach().double().clone() for p in ps]
        gs = [p.grad.double() * (-1 if self.maximize else 1) for p in ps]
        Ts = [self._T(i, w) for i, w in enumerate(ws)]
        norm = math.sqrt(sum(float(((T * g) ** 2).sum()) for T, g in zip(Ts, gs)))
        for p, w, T, g in zip(ps, ws, Ts, gs):
            e = self.rho * T * T * g / (norm + self.norm_eps) if norm > 0 else torch.zeros_like(w)
            p.copy_(w + e)
        self.saved = ws

    @torch.no_grad()
    def descend(self):
        lr = self.param_groups[0]["lr"]
        for i, (p, w) in enumerate(zip(self._params(), self.saved)):
            d = p.grad.double() * (-1 if self.maximize else 1) + self.wd * w
            if self.momentum:
                buf = self.bufs.get(i)
                buf = d.clone() if buf is None else self.momentum * buf + d
                self.bufs[i] = buf
                d = d + self.momentum * buf if self.nesterov else buf
            p.copy_(w - lr * d)
        self.saved = None

    def step(self, closure=None):
        if closure is None:
            (self.ascend if self.saved is None else self.descend)()
            return None
        with torch.enable_grad():
            loss = closure()
        self.ascend()
        with torch.enable_grad():
            closure()
        self.descend()
        return loss
