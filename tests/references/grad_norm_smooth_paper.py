"""Float64 numpy transcription of Algorithm 1 of Semenov, Jaggi, Doikov, "Gradient-Normalized
Smoothness for Optimization with Approximate Hessians" (arXiv:2506.13710), as in the authors'
``grad_norm_smooth`` (github.com/epfml/grad-norm-smooth, src/methods.py), Euclidean norm.

``lr`` (basin's step scale, not in the paper) moves to ``x + lr * step`` after the search, which
runs on the full step; ``lr=1`` is the authors' iteration unchanged. :class:`RegularizedNewtonPaper`
wraps one iteration per ``step(closure)`` for the optimizer table (tests/optim_db.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch


def algorithm1(
    func: Callable[[np.ndarray], float],
    grad: Callable[[np.ndarray], np.ndarray],
    hess: Callable[[np.ndarray], np.ndarray],
    x0: np.ndarray,
    n_iters: int,
    gamma0: float = 1.0,
    adaptive: bool = True,
    eps: float = 1e-8,
    gamma_min: float = 1e-9,
    max_search: int = 40,
    lr: float = 1.0,
) -> tuple[list[np.ndarray], list[float]]:
    """The iterates x_0..x_n and the gamma_k after each step."""
    x = np.array(x0, dtype=np.float64)
    f, g = func(x), grad(x)
    gamma = gamma0
    xs, gammas = [x.copy()], []
    for _ in range(n_iters):
        a = hess(x)
        gnorm = float(np.sqrt(g @ g))
        for i in range(max_search + 1):
            if i == max_search:
                break
            lam = gnorm / (gamma + eps)
            step = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a + lam * np.eye(len(x))), -g)
            f_new, g_new = func(x + step), grad(x + step)
            if not adaptive:
                break
            if f - f_new >= (g_new @ g_new) / (8 * lam):
                gamma = max(2.0 * gamma, gamma_min)
                break
            gamma *= 0.5
        x = x + lr * step
        f, g = (f_new, g_new) if lr == 1.0 else (func(x), grad(x))
        xs.append(x.copy())
        gammas.append(gamma)
    return xs, gammas


class RegularizedNewtonPaper(torch.optim.Optimizer):
    """One :func:`algorithm1` iteration per ``step(closure)`` on the flat float64 vector of the
    parameters; the Hessian is the dense central-difference matrix of closure gradients
    (step ``eps^(1/3) max(1, ||x||)`` per coordinate, symmetrized), which the table's closures
    allow (they hide the model and batch); basin's products are checked against exact Hessians
    in tests/optim/test_regularized_newton.py. ``curvature`` (a callable called at ``x``,
    returning a function of a flat tensor, as basin's argument) replaces it: the dense matrix
    of its products on the unit vectors, symmetrized."""

    def __init__(self, params: Any, gamma: float = 1.0, **hp: Any) -> None:
        super().__init__(params, {})
        self.gamma = gamma
        self.curvature = hp.get("curvature")
        self.hp = {k: v for k, v in hp.items() if k in ("adaptive", "eps", "gamma_min",
                                                        "max_search", "lr")}  # fmt: skip
        self.hp["lr"] = float(self.hp.get("lr", 1.0))

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _set(self, x: np.ndarray) -> None:
        i = 0
        with torch.no_grad():
            for p in self._params():
                p.copy_(torch.from_numpy(x[i : i + p.numel()]).view_as(p))
                i += p.numel()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
            self._set(x)
            with torch.enable_grad():
                loss = closure()
            g = np.concatenate([p.grad.detach().reshape(-1).numpy() for p in self._params()])
            return float(loss), g.copy()

        def hess(x: np.ndarray) -> np.ndarray:
            if self.curvature is not None:
                self._set(x)
                op = self.curvature()
                a = np.stack([op(torch.from_numpy(e)).numpy() for e in np.eye(len(x))], axis=1)
                return 0.5 * (a + a.T)
            h = np.finfo(np.float64).eps ** (1 / 3) * max(1.0, float(np.linalg.norm(x)))
            cols = []
            for e in np.eye(len(x)):
                cols.append((value_and_grad(x + h * e)[1] - value_and_grad(x - h * e)[1]) / (2 * h))
            a = np.stack(cols, axis=1)
            return 0.5 * (a + a.T)

        x0 = np.concatenate([p.detach().reshape(-1).numpy() for p in self._params()])
        loss = value_and_grad(x0)[0]
        xs, gammas = algorithm1(lambda x: value_and_grad(x)[0], lambda x: value_and_grad(x)[1],
                                hess, x0, 1, gamma0=self.gamma, **self.hp)  # fmt: skip
        self._set(xs[-1])
        self.gamma = gammas[-1]
        return loss
