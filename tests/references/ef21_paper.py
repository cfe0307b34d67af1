"""float64 single-process simulation of EF21 (Richtárik, Sokolov, Fatkhullin, arXiv:2106.05203,
Algorithm 1) and EF21-W (Richtárik, Gasanov, Burlachenko, arXiv:2402.10774) driving plain
gradient descent, written from the equations (nothing of basin is used)::

    x^{t+1} = x^t - lr g^t
    c_i^t   = TopK( grad f_i(x^{t+1}) / (n w_i) - g_i^t )      (EF21: w_i = 1/n)
    g_i^{t+1} = g_i^t + c_i^t
    g^{t+1}   = g^t + sum_i w_i c_i^t                          (EF21: g^t + mean_i c_i^t)
    g_i^0 = grad f_i(x^0) / (n w_i),  g^0 = sum_i w_i g_i^0 = mean_i grad f_i(x^0)

applied per DDP bucket: each bucket is the concatenation of its parameters' gradients, in the
order the hook saw them at that step (``layouts[t]``, recorded from the real run: DDP decides
the buckets, not EF21). Steps t < warmup_steps are plain averaging; the initialisation above
happens at the first step after the warm-up and again for any bucket whose parameter list
differs from the previous step (DDP's bucket rebuild), as the hook documents.
"""

from __future__ import annotations

import math

import torch


def topk(v: torch.Tensor, k: int) -> torch.Tensor:
    """The K entries of largest magnitude of v, the others zero."""
    out = torch.zeros_like(v)
    idx = torch.argsort(v.abs(), descending=True, stable=True)[:k]
    out[idx] = v[idx]
    return out


def bucket_k(numel: int, density: float | None, k: int | None) -> int:
    if k is not None:
        return k
    return max(1, min(numel, math.ceil(density * numel)))


def simulate(
    grad_fn,
    x0: dict[str, torch.Tensor],
    n: int,
    layouts: list[list[list[str]]],
    lr: float,
    density: float | None = None,
    k: int | None = None,
    warmup_steps: int = 0,
    smoothness: list[float] | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Run len(layouts) steps; ``grad_fn(x, i)`` is rank i's gradient (dict name -> tensor).

    Returns (the global gradient estimate g^t per step, the parameters after each step)."""
    w = [1.0 / n] * n if smoothness is None else [L / sum(smoothness) for L in smoothness]
    x = {name: t.double().clone() for name, t in x0.items()}
    g_i: dict[tuple, list[torch.Tensor]] = {}  # key: the bucket's parameter names
    g: dict[tuple, torch.Tensor] = {}
    previous: dict[int, tuple] = {}
    estimates, params = [], []
    for t, layout in enumerate(layouts):
        grads = [grad_fn(x, i) for i in range(n)]
        step_g: dict[str, torch.Tensor] = {}
        for b, names in enumerate(layout):
            key = tuple(names)
            v = [torch.cat([grads[i][p].reshape(-1).double() for p in names]) for i in range(n)]
            d = v[0].numel()
            kk = bucket_k(d, density, k)
            if t < warmup_steps:
                G = sum(v) / n
            elif previous.get(b) != key or kk == d:
                g_i[key] = [v[i] / (n * w[i]) for i in range(n)]
                g[key] = sum(w[i] * g_i[key][i] for i in range(n))
                G = g[key]
            else:
                c = [topk(v[i] / (n * w[i]) - g_i[key][i], kk) for i in range(n)]
                for i in range(n):
                    g_i[key][i] = g_i[key][i] + c[i]
                g[key] = g[key] + sum(w[i] * c[i] for i in range(n))
                G = g[key]
            if t >= warmup_steps:
                previous[b] = key
            off = 0
            for p in names:
                m = x[p].numel()
                step_g[p] = G[off : off + m].reshape(x[p].shape).clone()
                off += m
        for p in x:
            x[p] = x[p] - lr * step_g[p]
        estimates.append(step_g)
        params.append({p: v.clone() for p, v in x.items()})
    return estimates, params
