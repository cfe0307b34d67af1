"""Convex training of a two-layer ReLU network (basin.train.fit_convex_relu, cvxpy) against
SGD and Adam on the same non-convex objective ``1/2 ||f(X) - y||^2 + beta/2 (||U||^2 +
||alpha||^2)``, full batch, float64, on the same data (``n`` x ``d`` Gaussian inputs, a
planted ReLU teacher plus noise).

The convex program uses ``--patterns`` sampled activation patterns: its value is the optimum
of the network restricted to those patterns (an upper bound on the global one, equal to it
when every pattern is present). With ``d = 2`` there are at most ``2n`` patterns and the
default 2,000 samples find them all (with high probability), so the convex value is the
global optimum; with ``--d 5`` (O(n^5) patterns) 200 samples give a network that Adam beats. SGD and Adam get ``2 x`` the convex solution's neuron count,
``--runs`` random inits each, and report the best and the median objective reached after
each checkpoint of epochs, with the seconds spent.

    python benchmarks/convex_relu.py [--n 60] [--d 2] [--beta 0.01] [--patterns 2000] [--long]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from basin.train import fit_convex_relu, relu_objective


def data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    U, a = rng.standard_normal((d, 4)), rng.standard_normal(4)
    return X, np.maximum(X @ U, 0) @ a + 0.1 * rng.standard_normal(n)


def train(X, y, beta, m, runs, opt_name, lr, checkpoints, seed):
    g = torch.Generator().manual_seed(seed)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    U = torch.randn(runs, m, X.shape[1], generator=g, dtype=torch.float64) / math.sqrt(X.shape[1])
    a = torch.randn(runs, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    U.requires_grad_()
    a.requires_grad_()

    def objs():
        f = (torch.relu(torch.einsum("nd,rmd->rnm", Xt, U)) * a[:, None, :]).sum(-1)
        return 0.5 * ((f - yt) ** 2).sum(1) + 0.5 * beta * ((U**2).sum((1, 2)) + (a**2).sum(1))

    opt = (
        torch.optim.Adam([U, a], lr=lr)
        if opt_name == "adam"
        else torch.optim.SGD([U, a], lr=lr, momentum=0.9)
    )
    out, t0, done = [], time.perf_counter(), 0
    for c in checkpoints:
        for _ in range(c - done):
            opt.zero_grad()
            objs().sum().backward()
            opt.step()
        done = c
        with torch.no_grad():
            v = objs().numpy()
        out.append((c, float(np.nanmin(v)), float(np.nanmedian(v)), time.perf_counter() - t0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--d", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--patterns", type=int, default=2000)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long", action="store_true", help="also train for 20,000 epochs")
    args = p.parse_args()
    torch.set_num_threads(1)
    X, y = data(args.n, args.d, args.seed)
    t0 = time.perf_counter()
    res = fit_convex_relu(X, y, args.beta, n_patterns=args.patterns, seed=args.seed)
    secs = time.perf_counter() - t0
    check = relu_objective(res.model, X, y, args.beta)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"n={args.n} d={args.d} beta={args.beta} patterns={res.patterns.shape[1]}")
    print(
        f"convex ({res.status}): objective {res.objective:.6f} "
        f"(recovered net {check:.6f}), {res.n_neurons} neurons, {secs:.2f} s"
    )
    m = max(2 * res.n_neurons, 2)
    ckpts = [100, 1000, 5000, 20000] if args.long else [100, 1000, 5000]
    for name, lr in (("sgd", 1e-3), ("adam", 1e-2)):
        print(f"{name} (lr {lr}, {m} neurons, {args.runs} inits): epochs  best  median  seconds")
        for c, best, med, s in train(X, y, args.beta, m, args.runs, name, lr, ckpts, args.seed):
            gap = (best - res.objective) / res.objective
            print(f"  {c:6d}  {best:.6f}  {med:.6f}  {s:7.2f}   best vs convex {gap:+.2e}")


if __name__ == "__main__":
    main()
