"""``run_landscape``: the diagnostics of ``basin landscape`` as one Python call, and the small
built-in demo workload the command can run without :mod:`basin.bench`."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._hvp import CurvatureOperator
from .density import DensityResult, hessian_density
from .eigen import EigenResult, hessian_eigenvalues
from .surface import SurfaceResult, loss_surface
from .trace import TraceResult, hessian_trace

__all__ = ["DemoWorkload", "LandscapeReport", "demo_workload", "run_landscape"]


@dataclass(frozen=True)
class LandscapeReport:
    eigen: EigenResult
    trace: TraceResult
    density: DensityResult | None
    surface: SurfaceResult | None
    files: tuple[Path, ...]
    seconds: float


def run_landscape(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    out_dir: str | Path | None,
    *,
    k: int = 5,
    trace_hvp: int = 99,
    density_probes: int = 3,
    surface_steps: int = 21,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> LandscapeReport:
    """Top-k and bottom-k eigenvalues, the Hutch++ trace, the spectral density (``density_probes``
    SLQ probes of 60 steps; 0 skips it) and a 1-D surface slice (``surface_steps`` points; 0 skips
    it); prints the figures through ``echo`` and, if ``out_dir`` is given, writes
    ``density.png`` and ``surface_1d.png`` there."""
    t0 = time.perf_counter()
    op = CurvatureOperator(model, loss_fn, data)
    echo(
        f"parameters: {op.n}   examples: {op.total}   mode: {'train' if model.training else 'eval'}"
    )
    loss, _ = op.loss_and_gradient()
    echo(f"loss: {loss:.6g}")
    eig = hessian_eigenvalues(op, k=min(k, op.n // 2), which="both", tol=1e-6, seed=seed)
    echo(f"Hessian eigenvalues (Lanczos, {eig.n_hvp} HVPs, error bound in brackets):")
    for lam, b in zip(eig.eigenvalues.tolist(), eig.error_bounds.tolist()):
        echo(f"  {lam: .6e}  [{b:.1e}]")
    tr = hessian_trace(op, n_hvp=trace_hvp, seed=seed)
    echo(f"trace (Hutch++, {tr.n_hvp} HVPs): {tr.trace:.6g} +- {tr.stderr:.2g}")
    files: list[Path] = []
    out = Path(out_dir) if out_dir is not None else None
    dens = surf = None
    if density_probes:
        dens = hessian_density(op, n_probes=density_probes, n_iter=min(60, op.n), seed=seed)
        echo(
            f"density (SLQ, {dens.n_hvp} HVPs): {len(dens.outliers)} outliers beyond the bulk "
            f"[{dens.bulk_edges[0]:.4g}, {dens.bulk_edges[1]:.4g}], "
            f"largest {dens.outliers[:3].round(6).tolist()}"
        )
    if surface_steps:
        surf = loss_surface(model, loss_fn, data, steps=surface_steps, seed=seed)
        echo(
            f"1-D filter-normalised slice: min loss {surf.losses.min():.6g} at alpha="
            f"{surf.alphas[surf.losses.argmin()]:.3g}, loss at alpha=+-1: "
            f"{surf.losses[0]:.6g} / {surf.losses[-1]:.6g}"
        )
    if out is not None:
        from . import plot

        out.mkdir(parents=True, exist_ok=True)
        if dens is not None:
            files.append(out / "density.png")
            plot.plot_density(dens, files[-1])
        if surf is not None:
            files.append(out / "surface_1d.png")
            plot.plot_surface(surf, files[-1])
        for f in files:
            echo(f"wrote {f}")
    return LandscapeReport(eig, tr, dens, surf, tuple(files), time.perf_counter() - t0)


@functools.lru_cache(maxsize=4)
def _mnist1d(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return (
        torch.tensor(d["x"][:512], dtype=torch.float32),
        torch.tensor(d["y"][:512], dtype=torch.long),
    )


@dataclass
class DemoWorkload:
    name: str
    model: nn.Module
    loss_fn: Callable
    data: Any
    extras: dict = field(default_factory=dict)


def demo_workload(name: str = "demo-mlp", seed: int = 0, train_steps: int = 100) -> DemoWorkload:
    """A 1,642-parameter MLP (40-32-10, tanh) on 512 MNIST-1D examples, trained briefly with
    full-batch Adam so the landscape is that of a partly trained network. Offline and
    deterministic."""
    if name != "demo-mlp":
        raise ValueError(f"unknown demo workload {name!r} (built in: demo-mlp)")
    x, y = _mnist1d(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return DemoWorkload(name, model, loss_fn, (x, y))
