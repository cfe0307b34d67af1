"""scikit-learn's bundled digits (8x8 images, 10 classes, offline): a small CNN.

Fixed split (data seed 0): 1437 train / 360 test images, pixels scaled to [0, 1].
Metric: test accuracy (maximised)."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Task, Workload, _Forever, classification_eval, register, train_sample


@cache
def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError(
            "the digits_cnn workload needs scikit-learn: pip install scikit-learn"
        ) from None

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = 360
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def _build(seed: int, batch_size: int) -> Task:
    x, y, xt, yt = data()
    model = SmallCNN()
    loss_fn = F.cross_entropy
    probe_idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:256]
    return Task(
        model,
        loss_fn,
        _Forever(x, y, batch_size, seed),
        classification_eval(xt, yt, loss_fn),
        (x[probe_idx], y[probe_idx]),
        evaluate_train=classification_eval(*train_sample(x, y, len(xt)), loss_fn),
    )


register(
    Workload(
        name="digits_cnn",
        family="digits",
        description="scikit-learn digits 8x8, CNN conv16-conv32(s2)-linear; metric test accuracy",
        builder=_build,
        metric="accuracy",
        metric_mode="max",
        target=0.97,
        batch_size=64,
        steps=600,
        eval_every=50,
        lr={"adaptive": 3e-3, "sgd": 0.05, "sgdsai": 1e-2},
    )
)
