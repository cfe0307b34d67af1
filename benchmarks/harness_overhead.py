"""Harness overhead: a workload trained through ``basin.bench.run`` vs a bare PyTorch loop.

Both train the same model on the same batches with the same optimizer for the same number of
steps, log the mean training loss every ``log_every`` steps and evaluate every ``eval_every``
steps; the bare loop does nothing else. Runs alternate (bare, harness, bare, ...) to share the
machine's drift; the overhead is the median over pairs of (harness time / bare time - 1),
target <= 3%. Both wall-clock and process CPU time are measured (CPU time is the robust one on a
shared machine; with one thread it is the work done). Times cover the training loop including
evaluation; building the workload (data generation) is excluded from both.

    python benchmarks/harness_overhead.py [--workload mnist1d_mlp] [--steps 1500] [--pairs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import basin.optim as bo
from basin.bench import make_config, run
from basin.bench import workloads as wl


def bare(cfg) -> tuple[float, float, list[float]]:
    w = wl.get(cfg.workload)
    task = w.build(cfg.seed, cfg.batch_size)
    model, loss_fn, batches = task.model, task.loss_fn, task.batches
    opt = bo.create(cfg.optimizer, model.parameters(), **cfg.hparams)
    logged, window = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(1, cfg.steps + 1):
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            logged.append(float(torch.stack(window).mean()))
            window.clear()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            task.evaluate(model)
    return time.perf_counter() - t0, time.process_time() - c0, logged


def harness(cfg) -> tuple[float, float, list[float]]:
    # run() also builds the workload: time the build separately and subtract it
    w = wl.get(cfg.workload)
    t0, c0 = time.perf_counter(), time.process_time()
    w.build(cfg.seed, cfg.batch_size)
    build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    r = run(cfg)
    wall, cpu = time.perf_counter() - t0 - build, time.process_time() - c0 - build_cpu
    return wall, cpu, r.series["train"]["loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mnist1d_mlp")
    ap.add_argument("--optimizer", default="torch:adamw")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = make_config(args.workload, args.optimizer, steps=args.steps)
    wl.get(args.workload).build(0, cfg.batch_size)  # warm caches (dataset generation)
    bare(make_config(args.workload, args.optimizer, steps=50))  # warm up allocator/kernels
    wall, cpu, tb, th = [], [], [], []
    for i in range(args.pairs):
        b, bc, lb = bare(cfg)
        h, hc, lh = harness(cfg)
        assert lb == lh, "harness and bare loop must train identically"
        wall.append(h / b - 1)
        cpu.append(hc / bc - 1)
        print(
            f"pair {i}: wall bare {b:.3f}s harness {h:.3f}s ({100 * wall[-1]:+.2f}%); "
            f"cpu bare {bc:.3f}s harness {hc:.3f}s ({100 * cpu[-1]:+.2f}%)"
        )
        tb.append((b, bc))
        th.append((h, hc))
    best = [min(t[i] for t in th) / min(t[i] for t in tb) - 1 for i in (0, 1)]
    print(
        f"{args.workload} / {args.optimizer}, {args.steps} steps, {args.threads} thread(s), "
        f"{args.pairs} pairs: harness overhead, median of pair ratios: "
        f"{100 * statistics.median(cpu):+.2f}% CPU time, {100 * statistics.median(wall):+.2f}% "
        f"wall time; ratio of fastest runs: {100 * best[1]:+.2f}% CPU, {100 * best[0]:+.2f}% "
        "wall (target <= 3%)"
    )


if __name__ == "__main__":
    main()
