"""Float64 transcription of BO-REP (arXiv:2401.09587) on ridge regression with one penalty per
weight, written from the algorithm's equations with explicit matrices (no autograd): upper
variable t in R^d (lambda_i = e^{t_i}), lower g_S(t, w) = ||X_S w - y_S||^2 / (2|S|)
+ sum_i e^{t_i} w_i^2 / 2, upper F_S(t, w) = ||Xv_S w - yv_S||^2 / (2|S|) + rho/2 ||t||^2.
"""

from __future__ import annotations

import torch


def _gw(X, y, S, t, w):
    XS, yS = X[S], y[S]
    return XS.T @ (XS @ w - yS) / len(S) + t.exp() * w


def _H(X, S, t):
    XS = X[S]
    return XS.T @ XS / len(S) + torch.diag(t.exp())


def borep_ridge(
    X,
    y,
    Xv,
    yv,
    t0,
    w0,
    upper_idx,
    lower_idx,
    *,
    lr,
    beta,
    lower_lr,
    period,
    lower_steps,
    neumann_terms,
    neumann_alpha,
    refine_epochs,
    refine_steps,
    refine_lr,
    rho,
):
    """Returns the list of t after each iteration; upper_idx[k] is xi_k, lower_idx an iterator."""
    t, w, m = t0.clone(), w0.clone(), torch.zeros_like(t0)
    out = []
    for k, S_up in enumerate(upper_idx):
        if k == 0:
            for e in range(refine_epochs):
                T, eta = refine_steps * 2**e, refine_lr / 2**e
                tot = torch.zeros_like(w)
                for _ in range(T):
                    tot += w
                    w = w - eta * _gw(X, y, next(lower_idx), t, w)
                w = tot / T
        elif k % period == 0:
            for _ in range(lower_steps):
                w = w - lower_lr * _gw(X, y, next(lower_idx), t, w)
        XvS, yvS = Xv[S_up], yv[S_up]
        gF = XvS.T @ (XvS @ w - yvS) / len(S_up)
        S0 = next(lower_idx)
        v, acc = gF.clone(), gF.clone()
        for _ in range(neumann_terms - 1):
            v = v - neumann_alpha * (_H(X, next(lower_idx), t) @ v)
            acc = acc + v
        z = neumann_alpha * acc
        del S0  # d/dt_i grad_w g_S0 = e^{t_i} w_i e_i for every batch
        h = rho * t - t.exp() * w * z
        m = beta * m + (1 - beta) * h
        if float(m.norm()) != 0.0:
            t = t - lr * m / m.norm()
        out.append(t.clone())
    return out
