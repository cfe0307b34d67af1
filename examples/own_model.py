"""Benchmark and tune optimizers on your own model and data with basin.

Run it as a script (a tuned comparison from Python, report in results/own-report/):

    python examples/own_model.py

or hand the workload it defines to the command line:

    basin bench -w examples/own_model.py:workload -o adabelief,adamw,sgd --tune 6 --seeds 3
    basin tune -w examples/own_model.py:workload -o muon --trials 10
    basin landscape -w examples/own_model.py:workload

Everything here is yours: the model (any nn.Module), the data (tensors, or DataLoaders with
Workload.from_loaders), the loss and the metric. basin fingerprints the model and the data, so
editing either reruns instead of serving stored results.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from basin.bench import Store, Workload, make_config, run, sweep
from basin.bench.compare import tuned_configs
from basin.bench.report import write_report

STEPS = int(os.environ.get("BASIN_EXAMPLE_STEPS", "300"))


class SpiralNet(nn.Module):
    """Your model: here a small MLP with LayerNorm."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, width), nn.LayerNorm(width), nn.GELU(),
            nn.Linear(width, width), nn.GELU(),
            nn.Linear(width, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Your data: three interleaved noisy spirals."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    t = torch.rand(n, generator=g) * 3 + 0.3
    angle = t * 2.5 + y * (2 * torch.pi / 3)
    x = torch.stack([t * angle.cos(), t * angle.sin()], 1)
    return x + 0.15 * torch.randn(n, 2, generator=g), y


workload = Workload.from_tensors(
    "spirals",
    SpiralNet,
    train=spirals(3000, seed=0),
    eval=spirals(1000, seed=1),
    loss="cross_entropy",
    metric="accuracy",
    target=0.9,
    steps=STEPS,
    batch_size=128,
)

if __name__ == "__main__":
    # one run: the result hands back the trained model
    r = run(make_config(workload, "adabelief", {"lr": 3e-3}, seed=0))
    print(f"adabelief: {r.status}, accuracy {r.final['metric']:.3f}, "
          f"{sum(p.numel() for p in r.model.parameters())} parameters trained")  # fmt: skip

    # a fair comparison: the same number of tuning trials for each optimizer, then 3 seeds
    storage = "sqlite:///results/own.db"
    configs, choices = tuned_configs([workload], ["adabelief", "adamw", "sgd"], n_trials=4,
                                     seeds=range(3), storage=storage, steps=STEPS)  # fmt: skip
    with Store(storage) as store:
        sweep(configs, store)
        paths = write_report(store, "results/own-report")
    for c in choices:
        print(f"tuned {c.optimizer}: {c.hparams}")
    print("report:", paths["html"])
