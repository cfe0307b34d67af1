"""Sharpness-aware training against its base optimizer, in one run: training-step time and
the sharpness reached. SAM / ASAM (two passes), SAF / MESA (``basin.train``: a trajectory loss,
one backward pass) over SGD with momentum 0.9; GGPO (one pass, a perturbation) over AdamW.

1. Step time: one full training step (forward, backward, update) of SGD with momentum 0.9,
   then of SAM and ASAM over the same SGD (``step(closure)``: two forward/backward passes), of
   SGD plus SAF's loss (the logit bank read and written for the batch, the term active) and
   plus MESA's (one no-grad forward of the EMA model and its update after the step); and of
   AdamW and GGPO over AdamW, on

   * ``mlp``          Linear 256-512-512-10, batch 128 (0.4M parameters),
   * ``transformer``  2-layer nn.TransformerEncoder (d 128, 4 heads, ff 256), embedding and
                      head, sequences of 64 tokens, batch 16 (0.5M parameters).

   Each optimizer gets its own copy of the same model and batch; after warm-up they are
   stepped round-robin (one step each per round, in a shuffled order) and the median per-step time is reported
   with its ratio to the base (SGD; AdamW for GGPO). SAM's two passes: ~2x; SAF / MESA's
   target (the paper's claim): <= 1.15x.

2. Sharpness: ``basin.bench.run`` on ``mnist1d_mlp`` with the same step budget, learning rate
   (the workload's SGD lr) and seeds for ``torch:sgd`` (momentum 0.9), ``sam`` and ``asam``,
   ``landscape=True``: the top Hessian eigenvalue (basin.landscape.hessian_eigenvalues) and
   the Hessian trace of the trained model on the workload's probe batch, with the eval
   accuracy and the generalization gap; ``saf`` and ``mesa`` by their registry names too (the
   harness's defaults: the term on after the first epoch). SAM spends two gradients per step,
   so the same step budget is twice the compute.

    python benchmarks/sam_step.py                  # everything (a few minutes on 2 cores)
    python benchmarks/sam_step.py --quick          # smoke run
    python benchmarks/sam_step.py --time-only --rounds 100
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import random
import statistics
import time

import torch
from torch import nn

import basin
import basin.optim as bo


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 256, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x))).flatten(0, 1)


def _workload(name: str):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))  # fmt: skip
        x = torch.randn(128, 256, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
    else:
        model = TinyTransformer()
        x = torch.randint(0, 256, (16, 64), generator=gen)
        y = torch.randint(0, 256, (16 * 64,), generator=gen)
    return model, x, y


KINDS = ("sgd", "sam", "asam", "saf", "mesa", "adamw", "ggpo")
BASE = {"sam": "sgd", "asam": "sgd", "saf": "sgd", "mesa": "sgd", "ggpo": "adamw"}


def _stepper(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    import basin.train as bt

    if kind in ("sgd", "saf", "mesa"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = bo.create(kind, model, lr=0.01 if kind != "ggpo" else 1e-3)
    n_classes = 10 if x.dim() == 2 and x.dtype.is_floating_point else 256
    idx = torch.arange(len(y))
    saf = bt.SAF(len(y), n_classes, start_epoch=0, memory=1) if kind == "saf" else None
    mesa = bt.MESA(model, start_epoch=0) if kind == "mesa" else None

    def loss_fn() -> torch.Tensor:
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        if saf is not None:  # epoch 2: the term is on (the bank row 1 epoch ago is read)
            loss = loss + saf.penalty(out, idx, 2)
        if mesa is not None:
            loss = loss + mesa.penalty(out, x, 1)
        return loss

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    if kind in ("sam", "asam", "ggpo"):
        return lambda: opt.step(closure)

    def step():
        closure()
        opt.step()
        if mesa is not None:
            mesa.update(model)

    return step


def step_times(quick: bool, rounds: int = 40) -> list[dict]:
    rows = []
    warmup, rounds = (2, 5) if quick else (5, rounds)
    for wl in ("mlp", "transformer"):
        model, x, y = _workload(wl)
        steps = {k: _stepper(k, copy.deepcopy(model), x, y) for k in KINDS}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(warmup):
            for f in steps.values():
                f()
        order = list(steps)
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)  # no optimizer always first (cold caches) or last in a round
            for k in order:
                t = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(ts) for k, ts in times.items()}
        n = sum(p.numel() for p in model.parameters())
        for k, m in med.items():
            base = BASE.get(k, k)
            rows.append({"model": wl, "params": n, "opt": k, "base": base, "ms": 1e3 * m,
                         "ratio": m / med[base]})  # fmt: skip
    return rows


SHARP = ("torch:sgd", "sam", "asam", "saf", "mesa")


def sharpness(quick: bool, steps: int, seeds: list[int]) -> list[dict]:
    from basin.bench import make_config, run

    rows = []
    for opt in SHARP:
        for seed in seeds:
            cfg = make_config("mnist1d_mlp", opt, {"lr": 0.05}, seed=seed, steps=steps,
                              landscape=True, eval_every=steps)  # fmt: skip
            r = run(cfg)
            rows.append({
                "opt": opt, "seed": seed, "status": r.status,
                "top_eig": r.final.get("top_eigenvalue"), "trace": r.final.get("hessian_trace"),
                "acc": r.final.get("metric"), "gap": r.final.get("generalization_gap"),
                "train_s": r.train_seconds,
            })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps (smoke run)")
    ap.add_argument("--steps", type=int, default=1500, help="training steps for part 2")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds of part 1")
    ap.add_argument("--time-only", action="store_true", help="part 1 only")
    args = ap.parse_args()
    torch.manual_seed(0)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# basin {basin.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, {stamp}")  # fmt: skip
    print("\n## step time (forward + backward + update), median ms, ratio to the base")
    print(f"{'model':<12} {'params':>8} {'opt':<6} {'ms':>9} {'x base':>7} base")
    for r in step_times(args.quick, args.rounds):
        print(f"{r['model']:<12} {r['params']:>8} {r['opt']:<6} {r['ms']:>9.2f} "
              f"{r['ratio']:>7.2f} {r['base']}")  # fmt: skip
    if args.time_only:
        return
    steps = 20 if args.quick else args.steps
    seeds = list(range(1 if args.quick else args.seeds))
    print(f"\n## mnist1d_mlp, {steps} steps, lr 0.05 (SGD momentum 0.9 in all), seeds {seeds}")
    print(f"{'opt':<10} {'seed':>4} {'top eig':>9} {'trace':>10} {'acc':>7} {'gap':>7} "
          f"{'train s':>8}")  # fmt: skip
    rows = sharpness(args.quick, steps, seeds)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['opt']:<10} {r['seed']:>4} {r['status']}")
            continue
        print(f"{r['opt']:<10} {r['seed']:>4} {r['top_eig']:>9.3f} {r['trace']:>10.2f} "
              f"{r['acc']:>7.4f} {r['gap']:>7.4f} {r['train_s']:>8.1f}")  # fmt: skip
    base = [r["top_eig"] for r in rows if r["opt"] == "torch:sgd" and r["status"] == "ok"]
    for opt in SHARP:
        ok = [r for r in rows if r["opt"] == opt and r["status"] == "ok"]
        if ok and base:
            eig = statistics.mean(r["top_eig"] for r in ok)
            print(f"mean {opt:<10} top eigenvalue {eig:.3f} ({eig / statistics.mean(base):.2f}x "
                  f"SGD), accuracy {statistics.mean(r['acc'] for r in ok):.4f}, gap "
                  f"{statistics.mean(r['gap'] for r in ok):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
