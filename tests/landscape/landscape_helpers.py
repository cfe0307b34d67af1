"""Helpers for the landscape tests: dense Hessians computed independently of basin with
torch.autograd.functional.hessian over the flattened parameters, a quadratic with a known
spectrum, and MNIST-1D tensors."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def flat_params(model: nn.Module, names=None) -> torch.Tensor:
    return torch.cat(
        [p.detach().reshape(-1) for n, p in model.named_parameters() if names is None or n in names]
    )


def dense_hessian(model, loss_fn, x, y, names=None) -> torch.Tensor:
    """Dense Hessian of loss_fn(model(x), y) w.r.t. the (named) parameters, on copies of the
    buffers (so BatchNorm running stats are untouched)."""
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    fixed = {
        n: p.detach() for n, p in model.named_parameters() if names is not None and n not in names
    }
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    keys = [n for n, _ in named]

    def f(flat):
        ps = dict(fixed)
        ps.update({k: c.view(s) for k, c, s in zip(keys, flat.split(sizes), shapes)})
        bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
        return loss_fn(functional_call(model, (ps, bufs), (x,)), y)

    h = torch.autograd.functional.hessian(f, flat_params(model, set(keys)))
    return 0.5 * (h + h.T)


def explicit_ggn(model, loss_fn, x, y, names=None) -> torch.Tensor:
    """``J^T H_L J`` formed explicitly: the full Jacobian of the outputs w.r.t. the (named)
    parameters and the dense Hessian of the loss w.r.t. the outputs."""
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in dict(named)}
    keys = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}

    def out_fn(flat):
        ps = dict(fixed)
        ps.update({k: c.view(s) for k, c, s in zip(keys, flat.split(sizes), shapes)})
        return functional_call(model, (ps, bufs), (x,))

    w = flat_params(model, set(keys))
    out = out_fn(w).detach()
    jac = torch.autograd.functional.jacobian(lambda f: out_fn(f).reshape(-1), w)  # (N*C, P)
    h_l = torch.autograd.functional.hessian(
        lambda zz: loss_fn(zz.view(out.shape), y), out.reshape(-1)
    )
    return jac.T @ h_l @ jac


def mnist1d_tensors(n: int = 256, dtype=torch.float64):
    # the demo workload's in-memory copy of MNIST-1D (generated offline once per process)
    from basin.landscape.report import _mnist1d

    x, y = _mnist1d(0)
    return x[:n].to(dtype), y[:n].clone()


class Quadratic(nn.Module):
    """loss(w) = 0.5 w^T A w - b^T w with A = Q diag(eigs) Q^T: the Hessian is A exactly."""

    def __init__(self, eigs: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = eigs.numel()
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("A", (q * eigs) @ q.T)
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.w @ self.A @ self.w - self.b @ self.w + 0 * x.sum()


def quad_loss(out, y):
    return out
