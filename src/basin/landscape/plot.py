"""Plots of landscape results; the only module that imports matplotlib (lazily).

Every function returns a ``matplotlib.figure.Figure`` (built without pyplot, so no display or
global state is needed) and, given ``path``, saves it there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_density", "plot_sharpness", "plot_surface"]


def _figure(figsize=(5.0, 3.6)):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover
        raise ImportError("plotting needs matplotlib: pip install 'basin-optim[plot]'") from exc
    fig = Figure(figsize=figsize, layout="constrained")
    return fig


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def plot_density(result, path: str | Path | None = None, log: bool = True):
    """Spectral density of a :class:`~basin.landscape.DensityResult` (log scale by default),
    outliers marked."""
    fig = _figure()
    ax = fig.add_subplot()
    dens = np.maximum(result.density, 1e-12) if log else result.density
    ax.plot(result.grid, dens, color="C0")
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(1e-8, dens.max() * 1e-8))
    for t in np.asarray(result.outliers)[:10]:
        ax.axvline(t, color="C3", lw=0.6, alpha=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectral density (SLQ, {result.n_hvp} HVPs)")
    return _save(fig, path)


def plot_surface(result, path: str | Path | None = None, log: bool = False):
    """1-D curve or 2-D contour of a :class:`~basin.landscape.SurfaceResult`."""
    fig = _figure()
    ax = fig.add_subplot()
    z = np.log10(np.maximum(result.losses, 1e-12)) if log else result.losses
    if result.betas is None:
        ax.plot(result.alphas, z, marker=".")
        ax.set_xlabel("alpha")
        ax.set_ylabel("log10 loss" if log else "loss")
    else:
        cs = ax.contourf(result.alphas, result.betas, z.T, levels=30, cmap="viridis")
        ax.contour(result.alphas, result.betas, z.T, levels=15, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
        ax.plot([0], [0], "r*")
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
    ax.set_title("loss surface")
    return _save(fig, path)


def plot_sharpness(
    records: Any, path: str | Path | None = None, lr: float | Sequence[float] | None = None
):
    """Sharpness (and trace, if recorded) over training from a
    :class:`~basin.landscape.SharpnessTracker` or its records; ``lr`` draws the ``2/lr``
    edge-of-stability line."""
    recs = getattr(records, "records", records)
    steps = [r.step for r in recs]
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, [r.sharpness for r in recs], marker=".", label="top eigenvalue")
    if lr is not None:
        for v in np.atleast_1d(np.asarray(lr, dtype=float)).tolist():
            ax.axhline(2.0 / v, color="k", ls="--", lw=0.8, label=f"2/lr (lr={v:g})")
    traces = [r.trace for r in recs]
    if any(np.isfinite(traces)):
        ax2 = ax.twinx()
        ax2.plot(steps, traces, color="C1", marker=".", label="trace")
        ax2.set_ylabel("trace", color="C1")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.legend(loc="best", fontsize=8)
    ax.set_title("sharpness over training")
    return _save(fig, path)
