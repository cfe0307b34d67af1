"""SOAP transcribed from the authors' code (github.com/nikhilvyas/SOAP, soap.py at a1e5535,
"momentum change": the first moment lives in the eigenbasis and is rotated at each refresh),
step for step, in the parameter's dtype: the authors keep the preconditioners in torch's default
dtype and take eigh/QR in float32, so their code cannot run a float64 trajectory; here every
operation is the authors' own, at float64. channels_first only (data_format is not
transcribed)."""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim import Optimizer


def _merge_shape(shape, max_precond_dim):
    new_shape, curr = [], 1
    for sh in shape:
        temp = curr * sh
        if temp > max_precond_dim:
            if curr > 1:
                new_shape.append(curr)
                curr = sh
            else:
                new_shape.append(sh)
                curr = 1
        else:
            curr = temp
    if curr > 1 or len(new_shape) == 0:
        new_shape.append(curr)
    return new_shape


class SOAPPaper(Optimizer):
    def __init__(self, params, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8,
                 weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
                 merge_dims=False, precondition_1d=False, normalize_grads=False,
                 correct_bias=True):  # fmt: skip
        super().__init__(params, dict(
            lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
            precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
            merge_dims=merge_dims, precondition_1d=precondition_1d,
            normalize_grads=normalize_grads, correct_bias=correct_bias,
        ))  # fmt: skip

    def _merge(self, g, group):
        return g.reshape(_merge_shape(g.shape, group["max_precond_dim"]))

    def _rotate(self, g, state, group, back):
        shape = g.shape
        if group["merge_dims"]:
            g = self._merge(g, group)
        for mat in state["Q"]:
            if len(mat) > 0:
                g = torch.tensordot(g, mat, dims=[[0], [1 if back else 0]])
            else:
                g = g.permute(list(range(1, len(g.shape))) + [0])
        return g.reshape(shape) if group["merge_dims"] else g

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                if "Q" not in state:
                    sb = group["shampoo_beta"]
                    state["shampoo_beta"] = sb if sb >= 0 else group["betas"][1]
                    state["GG"] = []
                    dims = (
                        [grad.shape[0]]
                        if grad.dim() == 1
                        else (self._merge(grad, group) if group["merge_dims"] else grad).shape
                    )
                    for sh in dims:
                        skip = sh > group["max_precond_dim"] or (
                            grad.dim() == 1 and not group["precondition_1d"]
                        )
                        state["GG"].append([] if skip else torch.zeros(sh, sh, dtype=grad.dtype))
                    state["Q"] = None
                    self._update_preconditioner(grad, state, group)
                    continue  # the first gradient only seeds the preconditioner

                gp = self._rotate(grad, state, group, back=False)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(gp, alpha=(1.0 - beta1))
                exp_avg_sq.mul_(beta2).add_(gp.square(), alpha=(1.0 - beta2))
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    bc1 = 1.0 - beta1 ** state["step"]
                    bc2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * (bc2**0.5) / bc1
                norm_grad = self._rotate(exp_avg / denom, state, group, back=True)
                if group["normalize_grads"]:
                    norm_grad = norm_grad / (1e-30 + torch.mean(norm_grad**2) ** 0.5)
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))
                self._update_preconditioner(grad, state, group)

    def _update_preconditioner(self, grad, state, group):
        if state["Q"] is not None:
            state["exp_avg"] = self._rotate(state["exp_avg"], state, group, back=True)
        if grad.dim() == 1:
            if group["precondition_1d"] and grad.shape[0] <= group["max_precond_dim"]:
                state["GG"][0].lerp_(
                    grad.unsqueeze(1) @ grad.unsqueeze(0), 1 - state["shampoo_beta"]
                )
        else:
            g = self._merge(grad, group) if group["merge_dims"] else grad
            for idx, sh in enumerate(g.shape):
                if sh <= group["max_precond_dim"]:
                    outer = torch.tensordot(
                        g, g, dims=[[*chain(range(idx), range(idx + 1, len(g.shape)))]] * 2
                    )
                    state["GG"][idx].lerp_(outer, 1 - state["shampoo_beta"])
        if state["Q"] is None:
            state["Q"] = self._eigh(state["GG"])
        if state["step"] > 0 and state["step"] % group["precondition_frequency"] == 0:
            state["Q"] = self._qr(state, group)
        if state["step"] > 0:
            state["exp_avg"] = self._rotate(state["exp_avg"], state, group, back=False)

    @staticmethod
    def _eigh(mats):
        out = []
        for m in mats:
            if len(m) == 0:
                out.append([])
                continue
            _, q = torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], dtype=m.dtype))
            out.append(torch.flip(q, [1]))
        return out

    def _qr(self, state, group):
        shape = state["exp_avg_sq"].shape
        v = self._merge(state["exp_avg_sq"], group) if group["merge_dims"] else state["exp_avg_sq"]
        out = []
        for ind, (m, o) in enumerate(zip(state["GG"], state["Q"])):
            if len(m) == 0:
                out.append([])
                continue
            est_eig = torch.diag(o.T @ m @ o)
            sort_idx = torch.argsort(est_eig, descending=True)
            v = v.index_select(ind, sort_idx)
            o = o[:, sort_idx]
            q, _ = torch.linalg.qr(m @ o)
            out.append(q)
        state["exp_avg_sq"] = v.reshape(shape) if group["merge_dims"] else v
        return out
