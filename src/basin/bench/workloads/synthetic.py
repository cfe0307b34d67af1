"""Synthetic test functions: Rosenbrock, Beale, Rastrigin (2-D) and diffGrad's F1-F3 (1-D).

The "model" holds the point ``x`` as its only parameter; its forward pass ignores the input and
returns ``f(x)``. Evaluation reports ``f(x)`` and the gap ``f(x) - f*`` (the metric, minimised).
There is no randomness: every seed gives the same run (the seed is accepted for uniformity).

diffGrad's functions follow Dubey et al., "diffGrad: An Optimization Method for Convolutional
Neural Networks", arXiv:1909.11015 (2019), eqs. 24-26, started at x0 = -1 with lr 0.1 and
betas (0.95, 0.999) for 300 iterations as in the paper. Gradients come from autograd (the
authors' notebook has a wrong derivative for F2)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor, nn

from . import Task, Workload, register

__all__ = ["FUNCTIONS", "beale", "f1", "f2", "f3", "rastrigin", "rosenbrock"]


def rosenbrock(x: Tensor) -> Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def beale(x: Tensor) -> Tensor:
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def rastrigin(x: Tensor, a: float = 10.0) -> Tensor:
    return a * x.numel() + (x**2 - a * torch.cos(2 * math.pi * x)).sum()


def f1(x: Tensor) -> Tensor:
    t = x[0]
    return torch.where(t <= 0, (t + 0.3) ** 2, (t - 0.2) ** 2 + 0.05)


def f2(x: Tensor) -> Tensor:
    t = x[0]
    return torch.where(t <= -0.9, -40 * t - 35.15, t**3 + t * torch.sin(8 * t) + 0.85)


def f3(x: Tensor) -> Tensor:
    t = x[0]
    return torch.where(
        t <= -0.5,
        t**2,
        torch.where(
            t <= -0.4,
            0.75 + t,
            torch.where(
                t <= 0,
                -7 * t / 8,
                torch.where(t <= 0.4, 7 * t / 8, torch.where(t <= 0.5, 0.75 - t, t**2)),
            ),
        ),
    )


@cache
def _grid_min(name: str) -> float:
    """Global minimum of a 1-D function by a dense float64 grid over [-3, 3] (it is bounded
    below there and grows outside)."""
    fn = FUNCTIONS[name][0]
    xs = torch.linspace(-3, 3, 2_000_001, dtype=torch.float64)
    return float(fn(xs.unsqueeze(0)).min())


# name -> (function, start point, known minimum or None for a grid search)
FUNCTIONS: dict[str, tuple[Callable[[Tensor], Tensor], tuple[float, ...], float | None]] = {
    "rosenbrock": (rosenbrock, (-2.0, 2.0), 0.0),
    "beale": (beale, (-4.5, 4.5), 0.0),
    "rastrigin": (rastrigin, (-2.0, 3.5), 0.0),
    "f1": (f1, (-1.0,), None),
    "f2": (f2, (-1.0,), None),
    "f3": (f3, (-1.0,), None),
}


class Point(nn.Module):
    """A point on a test function; ``forward`` ignores its input and returns f(x)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], start: tuple[float, ...]) -> None:
        super().__init__()
        self.fn = fn
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def forward(self, inputs: Tensor) -> Tensor:  # noqa: ARG002
        return self.fn(self.x)


def _identity_loss(output: Tensor, target: Tensor) -> Tensor:  # noqa: ARG001
    return output


class _Constant:
    def __init__(self, batch: tuple[Tensor, Tensor]) -> None:
        self.batch = batch

    def __iter__(self) -> _Constant:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.batch


def _builder(name: str) -> Callable[[int, int], Task]:
    fn, start, fmin = FUNCTIONS[name]

    def build(seed: int, batch_size: int) -> Task:  # noqa: ARG001  (deterministic)
        model = Point(fn, start)
        f_star = _grid_min(name) if fmin is None else fmin
        batch = (torch.zeros(1), torch.zeros(1))

        def evaluate(m: nn.Module) -> dict[str, float]:
            with torch.no_grad():
                v = float(m(batch[0]))
            return {"eval_loss": v, "metric": v - f_star}

        return Task(model, _identity_loss, _Constant(batch), evaluate, batch)

    return build


_ADAM_BETAS = {"betas": (0.95, 0.999)}
_DIFFGRAD_SETUP = {
    k: _ADAM_BETAS
    for k in ("torch:adam", "torch:adamw", "adabelief", "diffgrad", "pytorch_optimizer:diffgrad")
}

for _name, _desc, _lr, _steps, _target in [
    (
        "rosenbrock",
        "Rosenbrock function from (-2, 2); minimum 0 at (1, 1)",
        (0.02, 2e-4),
        3000,
        1e-3,
    ),
    ("beale", "Beale function from (-4.5, 4.5); minimum 0 at (3, 0.5)", (0.02, 1e-4), 3000, 1e-3),
    ("rastrigin", "Rastrigin (A=10) from (-2, 3.5); minimum 0 at (0, 0)", (0.05, 1e-3), 1000, 1e-3),
]:
    register(
        Workload(
            name=_name,
            family="synthetic",
            description=_desc + "; metric f(x) - f*",
            builder=_builder(_name),
            metric="gap",
            metric_mode="min",
            target=_target,
            batch_size=1,
            steps=_steps,
            eval_every=50,
            lr={"adaptive": _lr[0], "sgd": _lr[1]},
        )
    )

for _name, _desc in [
    ("f1", "diffGrad F1: (x+0.3)^2 for x<=0, (x-0.2)^2+0.05 else; local min at 0.2"),
    ("f2", "diffGrad F2: -40x-35.15 for x<=-0.9, x^3+x sin(8x)+0.85 else"),
    ("f3", "diffGrad F3: piecewise quadratic/linear with a local min at 0"),
]:
    register(
        Workload(
            name=_name,
            family="synthetic",
            description=_desc + "; x0=-1, 300 steps as in the paper; metric f(x) - f*",
            builder=_builder(_name),
            metric="gap",
            metric_mode="min",
            target=1e-3,
            batch_size=1,
            steps=300,
            eval_every=10,
            lr={"adaptive": 0.1, "sgd": 0.01},
            hparams=_DIFFGRAD_SETUP,
        )
    )
