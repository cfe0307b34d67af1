"""MNIST-1D workloads: an MLP, a binary-network MLP and a 1-D CNN.

Data from the ``mnist1d`` package's generator (``make_dataset(get_dataset_args())``: 4000
train / 1000 test sequences of length 40, fixed data seed 42), never its downloading loader.
Metric: test accuracy (maximised).

Reference: Greydanus, Kobak, "Scaling down deep learning with MNIST-1D", arXiv:2011.14439
(2020)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Task, Workload, _Forever, classification_eval, register, train_sample


def _cache_dir() -> Path:
    return Path(os.environ.get("BASIN_CACHE", Path.home() / ".cache" / "basin"))


@cache
def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test) generated offline by ``make_dataset`` (a few
    seconds; the tensors are then cached on disk under ``$BASIN_CACHE`` or
    ``~/.cache/basin``, keyed by the generator's arguments and package version)."""
    from importlib.metadata import version

    # keyed by the package version (whose default arguments make the data), so that a cached
    # set is read without importing mnist1d (which imports matplotlib.pyplot: ~1.5 s a process)
    tag = json.dumps(["get_dataset_args() defaults", version("mnist1d")])
    path = _cache_dir() / f"mnist1d-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            return tuple(torch.load(path, weights_only=True))
        except Exception:  # noqa: BLE001  -- a corrupt cache is regenerated
            pass
    from mnist1d.data import get_dataset_args, make_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        d = make_dataset(get_dataset_args())
    out = (
        torch.as_tensor(d["x"], dtype=torch.float32),
        torch.as_tensor(d["y"], dtype=torch.long),
        torch.as_tensor(d["x_test"], dtype=torch.float32),
        torch.as_tensor(d["y_test"], dtype=torch.long),
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(list(out), tmp)
        tmp.replace(path)
    except OSError:
        pass  # read-only home: regenerate next time
    return out


class MLP(nn.Module):
    def __init__(self, width: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(40, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BNN(nn.Module):
    """A binary-network MLP 40-w-w-w-10 in the ReSTE/BiPer layout: the first and last layers
    real, the two hidden ones :class:`basin.train.BinarizableLinear` (real with ``hardtanh``
    inputs until ``reste`` / ``biper`` binarize them), each after a BatchNorm."""

    def __init__(self, width: int = 100) -> None:
        super().__init__()
        from basin.train import BinarizableLinear

        self.net = nn.Sequential(
            nn.Linear(40, width),
            nn.BatchNorm1d(width),
            BinarizableLinear(width, width),
            nn.BatchNorm1d(width),
            BinarizableLinear(width, width),
            nn.BatchNorm1d(width),
            nn.Linear(width, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, channels: int = 25) -> None:
        super().__init__()
        c = channels
        self.conv1 = nn.Conv1d(1, c, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(c, c, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(c, c, 3, stride=2, padding=1)
        self.fc = nn.Linear(c * 5, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x.unsqueeze(1)))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc(h.flatten(1))


def _builder(make_model):
    def build(seed: int, batch_size: int) -> Task:
        x, y, xt, yt = data()
        model = make_model()
        loss_fn = nn.functional.cross_entropy
        g = torch.Generator().manual_seed(seed)
        probe_idx = torch.randperm(len(x), generator=g)[:256]
        return Task(
            model,
            loss_fn,
            _Forever(x, y, batch_size, seed),
            classification_eval(xt, yt, loss_fn),
            (x[probe_idx], y[probe_idx]),
            evaluate_train=classification_eval(*train_sample(x, y, len(xt)), loss_fn),
        )

    return build


register(
    Workload(
        name="mnist1d_mlp",
        family="mnist1d",
        description="MNIST-1D, MLP 40-100-100-10 (ReLU); metric test accuracy",
        builder=_builder(MLP),
        metric="accuracy",
        metric_mode="max",
        target=0.60,
        batch_size=128,
        steps=1500,
        eval_every=100,
        lr={"adaptive": 3e-3, "sgd": 0.05, "sgdsai": 1e-2},
    )
)
register(
    Workload(
        name="mnist1d_bnn",
        family="mnist1d",
        description="MNIST-1D, binary-network MLP 40-100-100-100-10 (BatchNorm; hidden layers "
        "binarized by reste/biper, hardtanh inputs otherwise); metric test accuracy",
        builder=_builder(BNN),
        metric="accuracy",
        metric_mode="max",
        target=0.40,
        batch_size=128,
        steps=1500,
        eval_every=100,
        lr={"adaptive": 3e-3, "sgd": 0.05, "sgdsai": 1e-2},
    )
)
register(
    Workload(
        name="mnist1d_cnn",
        family="mnist1d",
        description="MNIST-1D, 1-D CNN (3 conv layers of 25 channels + linear); metric test accuracy",
        builder=_builder(CNN),
        metric="accuracy",
        metric_mode="max",
        target=0.85,
        batch_size=128,
        steps=1500,
        eval_every=100,
        lr={"adaptive": 3e-3, "sgd": 0.05, "sgdsai": 1e-2},
    )
)
