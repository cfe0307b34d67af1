"""FRUGAL (Zmushko et al. 2024, arXiv:2411.07837; details as in the authors' GaloreAdamW of
fzmushko/FRUGAL) transcribed in float64 with explicit dense matrices, independently of basin:

* svd projector: eigenvectors of ``G^T G`` ("right") or ``G G^T`` ("left") from
  ``torch.linalg.eigh``, descending, each column's largest-magnitude entry made positive;
* random projector: Gram-Schmidt of the same Gaussian draws (per-parameter generator seeded
  ``seed + parameter index``, float64 ``randn(dim, r)``), i.e. the QR factor with positive R;
* randperm projector: a dense 0/1 selection matrix of the first r entries of ``randperm(dim)``;
* residual as ``(I - Q Q^T)`` applied densely; AdamW written out of place;
* block variant (``proj_type="block"``): per group, a 0/1 mask over its 2-D tensors whose ones
  are the first ``k = max(1, round(density * n))`` entries of ``randperm(n)`` drawn from the
  generator of the group's first 2-D tensor, redrawn every ``update_gap`` group steps; masked-in
  tensors take AdamW on the whole gradient (moments restarted when they enter, deleted when
  they leave, with ``reset_statistics``), the others the residual rule on the whole
  gradient. ``block_order`` other than ``"random"`` follows the authors' BlockOptimizer: a
  cursor kept across re-selections (ascending: from 0, k blocks upwards, cursor += k;
  descending: from n - 1, k blocks downwards, cursor -= k; mirror: from 0 within the first
  n // 2, k / 2 blocks upwards each with its mirror n - 1 - i, cursor += k / 2), each wrapped
  by one subtraction / addition of the range."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def _gram_schmidt(X):
    cols = []
    for j in range(X.shape[1]):
        v = X[:, j].clone()
        for _ in range(2):
            for q in cols:
                v = v - (q @ v) * q
        cols.append(v / v.norm())
    return torch.stack(cols, dim=1)


class FRUGALPaper(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 density=0.25, update_gap=200, proj_type="svd", proj_side="std",
                 inactive_update_rule="sign_sgd", inactive_lr_scale=1.0,
                 proj_params_lr_scale=1.0, reset_statistics=True, block_order="random",
                 seed=0):  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, wd=weight_decay))
        self.density, self.gap, self.kind, self.side = density, update_gap, proj_type, proj_side
        self.rule, self.in_scale, self.p_scale = (
            inactive_update_rule,
            inactive_lr_scale,
            proj_params_lr_scale,
        )
        self.reset = reset_statistics
        self.order = block_order
        self.cursor = {}
        self.block_t = [0] * len(self.param_groups)
        self.mask = {}
        self.gens = {}
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                self.gens[p] = torch.Generator().manual_seed(seed + idx)
                idx += 1

    def _projector(self, p, G, right, r):
        dim = G.shape[1] if right else G.shape[0]
        if self.kind == "svd":
            gram = G.T @ G if right else G @ G.T
            evals, evecs = torch.linalg.eigh(gram)
            Q = evecs[:, torch.argsort(evals, descending=True)[:r]]
            for j in range(r):
                if Q[Q[:, j].abs().argmax(), j] < 0:
                    Q[:, j] = -Q[:, j]
            return Q
        if self.kind == "random":
            return _gram_schmidt(torch.randn(dim, r, generator=self.gens[p], dtype=torch.float64))
        perm = torch.randperm(dim, generator=self.gens[p])[:r]
        E = torch.zeros(dim, r, dtype=torch.float64)
        for j, i in enumerate(perm.tolist()):
            E[i, j] = 1.0
        return E

    def _redraw_blocks(self, gi, group):
        mats = [p for p in group["params"] if p.ndim == 2]
        if not mats:
            return
        if self.block_t[gi] % self.gap == 0:
            n = len(mats)
            k = max(1, round(self.density * n))
            mask = torch.zeros(n)
            if self.order == "random":
                mask[torch.randperm(n, generator=self.gens[mats[0]])[:k]] = 1.0
            else:
                self._cursor_blocks(gi, n, k, mask)
            for j, p in enumerate(mats):
                st = self.state[p]
                self.mask[p] = bool(mask[j] == 1.0)
                if self.mask[p] and (self.reset or "exp_avg" not in st):
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, 0.0, 0.0
                elif not self.mask[p] and self.reset:
                    st.clear()
        self.block_t[gi] += 1

    def _cursor_blocks(self, gi, n, k, mask):
        if self.order == "ascending":
            c = self.cursor.setdefault(gi, 0)
            for j in range(c, c + k):
                mask[j % n] = 1.0
            c += k
            self.cursor[gi] = c - n if c >= n else c
        elif self.order == "descending":
            c = self.cursor.setdefault(gi, n - 1)
            for j in range(c, c - k, -1):
                mask[j % n] = 1.0
            c -= k
            self.cursor[gi] = c + n if c < 0 else c
        else:  # mirror
            assert k % 2 == 0
            half = n // 2
            c = self.cursor.setdefault(gi, 0)
            for j in range(c, c + k // 2):
                mask[j % half] = 1.0
                mask[n - 1 - j % half] = 1.0
            c += k // 2
            self.cursor[gi] = c - half if c >= half else c

    @torch.no_grad()
    def step(self):
        for gi, group in enumerate(self.param_groups):
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["wd"]
            if self.kind == "block":
                self._redraw_blocks(gi, group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                G = p.grad.clone()
                p.copy_(p * (1 - lr * wd))
                if p.ndim == 2 and self.kind == "block":
                    s = lr * self.p_scale
                    if self.mask[p]:
                        t = st["step"] = st["step"] + 1
                        m = b1 * st["exp_avg"] + (1 - b1) * G
                        v = b2 * st["exp_avg_sq"] + (1 - b2) * G * G
                        st["exp_avg"], st["exp_avg_sq"] = m, v
                        p.copy_(p - s * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps))
                    elif self.rule == "sign_sgd":
                        p.copy_(p - s * self.in_scale * torch.sign(G))
                    elif self.rule == "sgd":
                        p.copy_(p - s * self.in_scale * G)
                    continue
                if p.ndim != 2:
                    t = st["step"] = st.get("step", 0) + 1
                    m = b1 * st.get("exp_avg", 0) + (1 - b1) * G
                    v = b2 * st.get("exp_avg_sq", 0) + (1 - b2) * G * G
                    st["exp_avg"], st["exp_avg_sq"] = m, v
                    p.copy_(p - lr / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps))
                    continue
                rows, cols = G.shape
                right = (rows >= cols) if self.side == "std" else self.side == "right"
                gstep = st.get("global_step", 0)
                if gstep % self.gap == 0:
                    r = max(1, round(self.density * (cols if right else rows)))
                    if self.kind == "svd":
                        r = min(r, rows, cols)
                    st["Q"] = self._projector(p, G, right, r)
                    if self.reset or "exp_avg" not in st:
                        st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, 0.0, 0.0
                st["global_step"] = gstep + 1
                t = st["step"] = st["step"] + 1
                Q = st["Q"]
                low = G @ Q if right else Q.T @ G
                m = b1 * st["exp_avg"] + (1 - b1) * low
                v = b2 * st["exp_avg_sq"] + (1 - b2) * low * low
                st["exp_avg"], st["exp_avg_sq"] = m, v
                u = (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
                full = u @ Q.T if right else Q @ u
                step = lr * self.p_scale * full
                if self.rule != "no" and Q.shape[1] < Q.shape[0]:  # Q square: residual is 0
                    dense = torch.eye(cols if right else rows, dtype=G.dtype) - Q @ Q.T
                    resid = G @ dense if right else dense @ G
                    if self.rule == "sign_sgd":
                        resid = torch.sign(resid)
                    step = step + lr * self.p_scale * self.in_scale * resid
                p.copy_(p - step)
