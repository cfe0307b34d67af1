"""Learning-rate transfer across width: HyperP (over Muon) vs AdamW on a small MLP.

Sweeps the learning rate of a bias-free MLP (in -> width -> LayerNorm -> ReLU -> width ->
LayerNorm -> ReLU -> classes, LayerNorm without affine parameters, PyTorch's default init) at two
widths on a fixed teacher-labelled data set (full batch), and reports each
method's best learning rate per width and the shift ``|log2 lr*(w_small) - log2 lr*(w_large)|``.
HyperP's claim (arXiv:2603.28743) is that one base learning rate fits every width, so its shift
should be smaller than AdamW's (numbers in docs/training-methods.md, HyperP section;
tests/optim/test_hyperp.py runs a narrowed grid). HyperP here is over Muon with every weight
matrix on its sphere; AdamW steps everything.

    python benchmarks/hyperp_width_transfer.py [--widths 64 256] [--steps 30]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from basin.optim import HyperP, Muon

LRS = {
    "adamw": [2.0**k for k in range(-14, -1)],
    "hyperp": [2.0**k for k in range(-9, 0)],
}


def data(n: int = 512, d_in: int = 16, classes: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, 32, generator=g), torch.randn(32, classes, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(-1)
    return x, y


def mlp(width: int, d_in: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, width, bias=False),
        nn.LayerNorm(width, elementwise_affine=False),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.LayerNorm(width, elementwise_affine=False),
        nn.ReLU(),
        nn.Linear(width, classes, bias=False),
    )


def final_loss(method: str, width: int, lr: float, steps: int, seed: int = 0) -> float:
    x, y = data()
    model = mlp(width, x.shape[1], int(y.max()) + 1, seed)
    if method == "adamw":
        opt: torch.optim.Optimizer | HyperP = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=0.0
        )
    else:
        base = Muon(model.parameters(), lr=lr, momentum=0.95, ns_dtype=torch.float32)
        opt = HyperP(base)  # every weight matrix on its sphere
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = float(nn.functional.cross_entropy(model(x), y))
    return out if math.isfinite(out) else math.inf


def best_lrs(
    method: str, widths: tuple[int, ...], steps: int, lrs: list[float] | None = None
) -> dict[int, float]:
    grid = LRS[method] if lrs is None else lrs
    out = {}
    for w in widths:
        losses = [final_loss(method, w, lr, steps) for lr in grid]
        out[w] = grid[min(range(len(grid)), key=losses.__getitem__)]
    return out


def shift(best: dict[int, float]) -> float:
    lo, hi = min(best), max(best)
    return abs(math.log2(best[lo]) - math.log2(best[hi]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs=2, default=[64, 256])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for method in ("adamw", "hyperp"):
        best = best_lrs(method, tuple(args.widths), args.steps)
        print(f"{method:7s} best lr by width {best}  shift {shift(best):.1f} octaves")


if __name__ == "__main__":
    main()
