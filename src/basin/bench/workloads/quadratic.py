"""DeepOBS-style noisy quadratic (``quadratic_deep``) in 100 dimensions.

Per-sample loss ``0.5 (w - x)^T Q (w - x)`` with ``x ~ N(0, I)``, ``Q = R diag(lam) R^T``:
90% of the eigenvalues drawn from U(0, 1), 10% from U(30, 60), ``R`` a random rotation (fixed
problem seed; the run seed drives the noise). Start ``w = 1``. The metric is the excess of the
expected loss over its minimum, ``0.5 w^T Q w`` (minimised).

Reference: Schneider, Balles, Hennig, "DeepOBS: A Deep Learning Optimizer Benchmark Suite",
arXiv:1903.05499 (2019)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from . import Task, Workload, register

DIM = 100
PROBLEM_SEED = 42


def hessian(dim: int = DIM, seed: int = PROBLEM_SEED) -> Tensor:
    """The fixed Hessian ``Q`` (float64): the given spectrum in a random orthonormal basis."""
    g = torch.Generator().manual_seed(seed)
    n_big = dim // 10
    lam = torch.cat(
        [
            torch.rand(dim - n_big, generator=g, dtype=torch.float64),
            30 + 30 * torch.rand(n_big, generator=g, dtype=torch.float64),
        ]
    )
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a Haar-distributed rotation
    return (q * lam) @ q.T


class Quadratic(nn.Module):
    def __init__(self, q: Tensor) -> None:
        super().__init__()
        self.q: Tensor
        self.register_buffer("q", q.float())
        self.w = nn.Parameter(torch.ones(q.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        d = self.w - x  # (batch, dim)
        return 0.5 * ((d @ self.q) * d).sum(-1)


def _mean_loss(output: Tensor, target: Tensor) -> Tensor:  # noqa: ARG001
    return output.mean()


class _Noise:
    def __init__(self, batch_size: int, seed: int) -> None:
        self.bs = batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> _Noise:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return torch.randn(self.bs, DIM, generator=self.gen), torch.zeros(self.bs)


def _build(seed: int, batch_size: int) -> Task:
    model = Quadratic(hessian())
    probe = next(_Noise(batch_size, seed + 1_000_003))

    def evaluate(m: nn.Module) -> dict[str, float]:
        w, q = cast(Tensor, m.w), cast(Tensor, m.q)
        with torch.no_grad():
            excess = float(0.5 * (w @ q @ w))
        # expected loss = excess + 0.5 tr(Q) for x ~ N(0, I)
        return {"eval_loss": excess + 0.5 * float(torch.trace(q)), "metric": excess}

    return Task(model, _mean_loss, _Noise(batch_size, seed), evaluate, probe)


register(
    Workload(
        name="quadratic_deep",
        family="quadratic",
        description="DeepOBS noisy 100-D quadratic (eigenvalues 90% U(0,1), 10% U(30,60)); "
        "metric 0.5 w^T Q w",
        builder=_build,
        metric="excess_loss",
        metric_mode="min",
        target=0.5,
        batch_size=128,
        steps=1000,
        eval_every=50,
        lr={"adaptive": 0.05, "sgd": 0.005},
    )
)
