"""Float64 numpy transcription of Algorithm 1 of Semenov, Jaggi, Doikov, "Gradient-Normalized
Smoothness for Optimization with Approximate Hessians" (arXiv:2506.13710), as in the authors'
``grad_norm_smooth`` (github.com/epfml/grad-norm-smooth, src/methods.py), Euclidean norm."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg


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
        x = x + step
        f, g = f_new, g_new
        xs.append(x.copy())
        gammas.append(gamma)
    return xs, gammas
