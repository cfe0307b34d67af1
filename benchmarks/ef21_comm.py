"""EF21 against plain allreduce and torch's PowerSGD hook on gloo DDP, in one run: bytes
communicated per step, step time, and the loss reached.

Every method trains the same 2.1M-parameter MLP (512-1024-1024-512-10, float32) from the same
initialisation for the same number of SGD steps (lr 0.05, momentum 0.9), each rank on its own
stream of synthetic teacher-labelled batches (batch 64 per rank, the same streams for every
method):

* ``allreduce``   DDP's built-in averaging (no hook),
* ``powersgd``    torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook (rank 4, error
                  feedback and warm start on, plain allreduce for the first 2 steps),
* ``ef21 d=0.1`` and ``ef21 d=0.01``  basin.distributed.ef21_hook (uncompressed first step).

Bytes are per rank per step, what that rank puts on the wire under a ring algorithm (gloo's):
allreduce of N elements 2 (n-1)/n N bytes-per-element; all_gather of M per rank (n-1) M. They
are counted from the hooks' own calls (PowerSGD: its allreduces of P, Q and the uncompressed
tensors; EF21: its state's ``bytes_sent``) and averaged over all steps, first steps included.
Loss: the mean over ranks of the last 10 steps' training loss. Step time: median wall time of
one step (forward, backward with its communication, SGD update) on rank 0; on one machine over
loopback the wire is nearly free, so step time shows compute overhead (Top-K, PowerSGD's
QR), not what compression saves on a real network.

All methods use one DDP bucket (``bucket_cap_mb=64``): torch's PowerSGD hook issues its second
and third allreduces from future callbacks, so with several buckets two ranks can issue them in
different orders, which gloo aborts on ("Received data size doesn't match expected size"; seen
here with the default 25 MB buckets). ef21_hook issues all its collectives from the hook call
itself, in bucket order, and has no such race.

    python benchmarks/ef21_comm.py                    # 2 ranks, 300 steps (~2 min on 2 cores)
    python benchmarks/ef21_comm.py --world 4 --steps 200
    python benchmarks/ef21_comm.py --quick            # smoke run
"""

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DIMS = (512, 1024, 1024, 512, 10)
BATCH = 64
METHODS = ("allreduce", "powersgd", "ef21 d=0.1", "ef21 d=0.01")


def make_model(dims=DIMS) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def batches(rank: int, steps: int, dims=DIMS):
    gen = torch.Generator().manual_seed(1000)
    teacher = torch.randn(dims[0], dims[-1], generator=gen)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(BATCH, dims[0], generator=gen)
        yield x, (x @ teacher).argmax(1)


def _ring_allreduce(numel: int, elem: int, n: int) -> float:
    return 2 * (n - 1) / n * numel * elem


def _run_method(method: str, rank: int, n: int, steps: int, dims, lr: float) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    from basin.distributed import EF21State, ef21_hook

    net = make_model(dims)
    numel = sum(p.numel() for p in net.parameters())
    ddp = DDP(net, bucket_cap_mb=64)  # one bucket: see the docstring
    counted = {"bytes": 0.0}
    state = None
    if method == "powersgd":
        state = psgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2
        )
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *a, **kw):
            counted["bytes"] += _ring_allreduce(tensor.numel(), tensor.element_size(), n)
            return real_all_reduce(tensor, *a, **kw)

        def hook(st, bucket):
            if st.iter < st.start_powerSGD_iter:  # its plain-allreduce phase
                buf = bucket.buffer()
                counted["bytes"] += _ring_allreduce(buf.numel(), buf.element_size(), n)
            return psgd.powerSGD_hook(st, bucket)

        dist.all_reduce = counting_all_reduce
        ddp.register_comm_hook(state, hook)
    elif method.startswith("ef21"):
        state = EF21State(density=float(method.split("=")[1]))
        ddp.register_comm_hook(state, ef21_hook)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    times, losses = [], []
    try:
        for x, y in batches(rank, steps, dims):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    finally:
        if method == "powersgd":
            dist.all_reduce = real_all_reduce
    if method == "allreduce":
        sent = steps * _ring_allreduce(numel, 4, n)
    elif method == "powersgd":
        sent = counted["bytes"]
    else:
        sent = state.bytes_sent
    final = torch.tensor(statistics.fmean(losses[-10:]))
    dist.all_reduce(final)
    return {
        "method": method,
        "bytes_per_step": sent / steps,
        "step_ms": 1000 * statistics.median(times[1:] if len(times) > 1 else times),
        "final_loss": final.item() / n,
        "first_loss": losses[0],
        "params": numel,
    }


def _worker(rank: int, n: int, store: str, steps: int, dims, out: str, lr: float, methods) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
    rows = []
    for m in methods:
        if os.environ.get("EF21_BENCH_VERBOSE"):
            print(rank, m, flush=True)
        rows.append(_run_method(m, rank, n, steps, dims, lr))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2, help="gloo ranks (2-4)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="small model, 6 steps (smoke run)")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, the first is the baseline"
    )
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if not 2 <= args.world <= 4:
        print(f"--world must be 2, 3 or 4, got {args.world}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in methods if m not in METHODS and not m.startswith("ef21 d=")]
    if bad:
        print(
            f"unknown method(s) {bad}; known: {', '.join(METHODS)}, 'ef21 d=<density>'",
            file=sys.stderr,
        )
        return 2
    steps, dims = (6, (32, 64, 10)) if args.quick else (args.steps, DIMS)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        t0 = time.perf_counter()
        mp.spawn(
            _worker,
            args=(args.world, os.path.join(tmp, "store"), steps, dims, out, args.lr, methods),
            nprocs=args.world,
            join=True,
        )
        rows = json.loads(Path(out).read_text())
    base = rows[0]
    for r in rows:
        r["bytes_vs_allreduce"] = r["bytes_per_step"] / base["bytes_per_step"]
        r["time_vs_allreduce"] = r["step_ms"] / base["step_ms"]
    print(
        f"ef21_comm {dt.date.today()}: {args.world} gloo ranks, {rows[0]['params']:,} params, "
        f"{steps} steps, lr {args.lr}, batch {BATCH}/rank, torch {torch.__version__} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'method':<13}{'MB/step':>10}{'x allreduce':>13}{'ms/step':>10}{'x':>7}{'loss':>9}")
    for r in rows:
        print(
            f"{r['method']:<13}{r['bytes_per_step'] / 1e6:>10.3f}{r['bytes_vs_allreduce']:>13.4f}"
            f"{r['step_ms']:>10.1f}{r['time_vs_allreduce']:>7.2f}{r['final_loss']:>9.4f}"
        )
    print(f"(first-step loss {base['first_loss']:.4f})")
    if args.json:
        args.json.write_text(json.dumps({"world": args.world, "steps": steps, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
