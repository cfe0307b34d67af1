"""A float64 transcription of one STN cycle (MacKay et al. 2019, Alg. 1) for a two-layer
network ``x -> STNLinear -> tanh -> STNLinear``, written with explicit per-example weight
matrices ``W(h) = W_elem + diag(V h) W_hyper`` and hand-written SGD-momentum / Adam updates.
Autograd is used only for the gradient of each scalar loss of this transcription.

Parameters are a dict of float64 tensors: ``We1 Wh1 be1 bh1 V1 We2 Wh2 be2 bh2 V2`` (``V`` has
``2 * out`` rows: the first ``out`` scale the weight rows, the rest the bias).
"""

from __future__ import annotations

import math

import torch

NAMES = ("We1", "Wh1", "be1", "bh1", "V1", "We2", "Wh2", "be2", "bh2", "V2")


def layer_matrices(P, k: int, h):
    """W(h), b(h) of layer k for one hyperparameter vector h (shape (H,))."""
    V = P[f"V{k}"]
    out = P[f"We{k}"].shape[0]
    s = [sum(V[i, j] * h[j] for j in range(len(h))) for i in range(2 * out)]
    W = torch.stack([P[f"We{k}"][i] + s[i] * P[f"Wh{k}"][i] for i in range(out)])
    b = torch.stack([P[f"be{k}"][i] + s[out + i] * P[f"bh{k}"][i] for i in range(out)])
    return W, b


def net_and_penalty(P, X, hs):
    """Outputs (one row per example, example i using hs[i]) and the mean over examples of
    exp(h_0) / 2 ||W1(h)||^2 + exp(h_1) / 2 ||W2(h)||^2."""
    outs, pens = [], []
    for i in range(X.shape[0]):
        W1, b1 = layer_matrices(P, 1, hs[i])
        W2, b2 = layer_matrices(P, 2, hs[i])
        z = torch.tanh(W1 @ X[i] + b1)
        outs.append(W2 @ z + b2)
        pens.append(
            torch.exp(hs[i][0]) / 2 * (W1 * W1).sum() + torch.exp(hs[i][1]) / 2 * (W2 * W2).sum()
        )
    return torch.stack(outs), sum(pens) / len(pens)


def per_example(h, n: int, per_row: bool):
    return [h[i] for i in range(n)] if per_row else [h for _ in range(n)]


def cycle(P, lam, rho, data, gen, cfg, state):
    """One cycle: cfg["train_steps"] weight steps, then cfg["val_steps"] hyper steps. Updates P,
    lam, rho and the optimizer state in place; draws noise from gen as STN does."""
    X, Y, Xv, Yv = data
    n = X.shape[0]
    H = lam.shape[0]
    per_row = cfg["samples"] is not None
    shape = (cfg["samples"], H) if per_row else (H,)
    for _ in range(cfg["train_steps"]):
        sigma = torch.log1p(torch.exp(rho))
        eps = torch.randn(shape, generator=gen, dtype=torch.float64)
        h = lam + sigma * eps
        leaves = {k: P[k].clone().requires_grad_(True) for k in NAMES}
        out, pen = net_and_penalty(leaves, X, per_example(h, n, per_row))
        loss = ((out - Y) ** 2).sum() / (2 * n) + pen
        grads = torch.autograd.grad(loss, [leaves[k] for k in NAMES])
        for k, g in zip(NAMES, grads):
            if k in state["buf"]:
                state["buf"][k] = cfg["momentum"] * state["buf"][k] + g
            else:
                state["buf"][k] = g.clone()
            P[k] = P[k] - cfg["lr"] * state["buf"][k]
    for _ in range(cfg["val_steps"]):
        lam_l = lam.clone().requires_grad_(True)
        rho_l = rho.clone().requires_grad_(True)
        sigma = torch.log1p(torch.exp(rho_l))
        eps = torch.randn(shape, generator=gen, dtype=torch.float64)
        h = lam_l + sigma * eps
        out, _ = net_and_penalty(P, Xv, per_example(h, Xv.shape[0], per_row))
        F = ((out - Yv) ** 2).sum() / (2 * Xv.shape[0])
        entropy = sum(torch.log(sigma[j] * math.sqrt(2 * math.pi * math.e)) for j in range(H))
        g_lam, g_rho = torch.autograd.grad(F - cfg["tau"] * entropy, [lam_l, rho_l])
        lam = _adam(lam, g_lam, state["adam_lam"], cfg["hyper_lr"])
        rho = _adam(rho, g_rho, state["adam_rho"], cfg["scale_lr"])
    return P, lam, rho


def _adam(p, g, st, lr, b1=0.9, b2=0.999, eps=1e-8):
    st["t"] = st.get("t", 0) + 1
    st["m"] = b1 * st.get("m", torch.zeros_like(p)) + (1 - b1) * g
    st["v"] = b2 * st.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    mhat = st["m"] / (1 - b1 ** st["t"])
    vhat = st["v"] / (1 - b2 ** st["t"])
    return p - lr * mhat / (torch.sqrt(vhat) + eps)
