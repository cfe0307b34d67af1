"""basin.landscape vs PyHessian 0.1: top-1 / top-5 Hessian eigenvalues and the trace.

For each method: Hessian-vector products used, seconds, and relative error against the truth:
the dense float64 Hessian for the small model (40-32-10 tanh MLP, 1,642 parameters, 512 MNIST-1D
examples); a long float64 Lanczos run (tol 1e-10) and a float64 ``gn-split`` trace with 400
residual products (exact Gauss-Newton part; its standard error is printed) for the large one
(40-300-300-10, 105,610 parameters, 1,000 examples). Both libraries run in float32 on the CPU on
the same model and batch; PyHessian with its defaults (power iteration, tol 1e-3; Hutchinson, tol
1e-3). basin's trace gets half of PyHessian's products, with Hutch++, XTrace, ``gn-split`` and
``gn-xtrace`` (what ``method="auto"`` picks here; the split methods also make one per-example
Jacobian pass per class: the "J" column; compare the seconds). Errors are medians over
``--seeds`` seeds; "rel.se" is the median reported standard error over the true trace.
``--trace-only`` skips the eigenvalues (and the large model's Lanczos truth).

    python benchmarks/hessian.py [--seeds 3] [--no-large] [--no-small] [--trace-only]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from basin.landscape import hessian_eigenvalues, hessian_trace


def mnist1d(n: int):
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return torch.tensor(d["x"][:n], dtype=torch.float32), torch.tensor(d["y"][:n])


def trained_mlp(widths, x, y, steps=100, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def pyhessian_counted(model, x, y):
    import sys

    import pyhessian  # noqa: F401  (the package re-exports the class under the module's name)

    ph = sys.modules["pyhessian.hessian"]
    count = {"n": 0}
    orig = ph.hessian_vector_product

    def counted(*a, **k):
        count["n"] += 1
        return orig(*a, **k)

    ph.hessian_vector_product = counted
    h = ph.hessian(copy.deepcopy(model), nn.functional.cross_entropy, data=(x, y), cuda=False)
    return h, count, lambda: setattr(ph, "hessian_vector_product", orig)


def truth_small(model, x, y, trace_only=False):
    m = copy.deepcopy(model).double()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    sizes = [p.numel() for p in m.parameters()]
    xd = x.double()

    def f(flat):
        ps = {k: c.view(s) for k, c, s in zip(names, flat.split(sizes), shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(m, ps, (xd,)), y)

    w = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    h = torch.autograd.functional.hessian(f, w)
    ev = torch.linalg.eigvalsh(0.5 * (h + h.T))
    return ev.flip(0)[:5], float(h.trace()), 0.0


def truth_large(model, x, y, trace_only=False):
    m = copy.deepcopy(model).double()
    data = (x.double(), y)
    if trace_only:
        eig = None
    else:
        eig = hessian_eigenvalues(
            m, nn.functional.cross_entropy, data, k=5, tol=1e-10, max_iter=400
        )
        assert bool(eig.converged.all()), "truth run did not converge"
    tr = hessian_trace(m, nn.functional.cross_entropy, data, n_hvp=400, method="gn-split", seed=123)
    return (None if eig is None else eig.eigenvalues), tr.trace, tr.stderr


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def run_case(label, model, x, y, truth, seeds, trace_only=False):
    top5, tr_true, tr_se = truth
    rows = []
    lf = nn.functional.cross_entropy
    data = (x, y)
    # ---- PyHessian
    keys = ("trace",) if trace_only else ("top1", "top5", "trace")
    res = {k: [] for k in keys}
    for s in range(seeds):
        torch.manual_seed(s)
        h, count, restore = pyhessian_counted(model, x, y)
        try:
            for key in keys:
                count["n"] = 0
                t0 = time.perf_counter()
                if key == "trace":
                    samples = h.trace()
                    val = [sum(samples) / len(samples)]
                else:
                    val = h.eigenvalues(top_n=1 if key == "top1" else 5)[0]
                sec = time.perf_counter() - t0
                if key == "top1":
                    err = rel(val[0], top5[0])
                elif key == "top5":
                    # PyHessian returns them in the order found (largest magnitude first)
                    val = sorted(val, reverse=True)
                    err = max(rel(v, t) for v, t in zip(val, top5))
                else:
                    err = rel(val[0], tr_true)
                res[key].append((count["n"], 0, sec, err, float("nan")))
        finally:
            restore()
    ph = {k: [statistics.median(c) for c in zip(*v)] for k, v in res.items()}
    # ---- basin: tol=1e-3 on the relative error *bound*, the accuracy PyHessian aims at
    bres = {k: [] for k in keys}
    nan = float("nan")
    for s in range(seeds):
        if not trace_only:
            e1 = hessian_eigenvalues(model, lf, data, k=1, tol=1e-3, seed=s)
            bres["top1"].append((e1.n_hvp, 0, e1.seconds, rel(e1.eigenvalues[0], top5[0]), nan))
            e5 = hessian_eigenvalues(model, lf, data, k=5, tol=1e-3, seed=s)
            err5 = max(rel(a, b) for a, b in zip(e5.eigenvalues, top5))
            bres["top5"].append((e5.n_hvp, 0, e5.seconds, err5, nan))
        budget = max(4, int(ph["trace"][0]) // 2)
        for key, method, n in TRACE_RUNS:
            n = budget if n is None else n
            t = hessian_trace(model, lf, data, n_hvp=n, method=method, seed=s)
            bres.setdefault(key, []).append(
                (
                    t.n_hvp,
                    t.n_jacobian_passes,
                    t.seconds,
                    rel(t.trace, tr_true),
                    t.stderr / abs(tr_true),
                )
            )
    bs = {k: [statistics.median(c) for c in zip(*v)] for k, v in bres.items()}
    for key in keys:
        rows.append((label, key, "pyhessian", *ph[key]))
        rows.append((label, key, "basin", *bs[key]))
    for key, _, _ in TRACE_RUNS[1:]:
        rows.append((label, "trace", f"basin {key}", *bs[key]))
    return rows


# (row key, method, products: None = half of PyHessian's); the first is the "basin" row
TRACE_RUNS = (
    ("trace", "hutch++", None),
    ("xtrace", "xtrace", None),
    ("gn-split", "gn-split", None),
    ("gn-xtrace", "gn-xtrace", None),
    ("hutch++ 99", "hutch++", 99),
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-large", action="store_true")
    ap.add_argument("--no-small", action="store_true")
    ap.add_argument("--trace-only", action="store_true", help="skip the eigenvalues")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = mnist1d(1000)
    cases = [] if args.no_small else [("mlp-1642", [40, 32, 10], 512, truth_small)]
    if not args.no_large:
        cases.append(("mlp-105k", [40, 300, 300, 10], 1000, truth_large))
    rows = []
    for label, widths, n, truth_fn in cases:
        xs, ys = x[:n], y[:n]
        model = trained_mlp(widths, xs, ys)
        t0 = time.perf_counter()
        truth = truth_fn(model, xs, ys, args.trace_only)
        print(
            f"# {label}: {sum(p.numel() for p in model.parameters())} params, truth in {time.perf_counter() - t0:.1f}s;"
            f" top-5 {None if truth[0] is None else [round(float(v), 6) for v in truth[0]]},"
            f" trace {truth[1]:.6g} (+- {truth[2]:.2g})",
            flush=True,
        )
        rows += run_case(label, model, xs, ys, truth, args.seeds, args.trace_only)
    print(
        f"\n{time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  torch {torch.__version__}"
        f"  threads {torch.get_num_threads()}  medians over {args.seeds} seeds"
    )
    print(
        f"{'model':10s} {'quantity':8s} {'method':16s} {'HVPs':>6s} {'J':>4s} {'seconds':>8s}"
        f" {'rel.err':>9s} {'rel.se':>9s}"
    )
    for label, key, meth, n, nj, sec, err, se in rows:
        print(f"{label:10s} {key:8s} {meth:16s} {n:6.0f} {nj:4.0f} {sec:8.3f} {err:9.1e} {se:9.1e}")
    for label in dict.fromkeys(r[0] for r in rows):
        for key in ("top1", "top5", "trace"):
            p = next((r for r in rows if r[:3] == (label, key, "pyhessian")), None)
            if p is None:  # --trace-only
                continue
            for meth in ("basin", *(f"basin {k}" for k, _, _ in TRACE_RUNS[1:])):
                b = next((r for r in rows if r[:3] == (label, key, meth)), None)
                if b is not None:
                    print(
                        f"{label} {key} {meth}: products {b[3] / p[3]:.2f}x, seconds"
                        f" {b[5] / p[5]:.2f}x, error {b[6] / p[6]:.2g}x pyhessian's"
                    )


if __name__ == "__main__":
    main()
