"""Data helpers for training methods that need to know which sample is which."""

from __future__ import annotations

from typing import Any

__all__ = ["IndexedDataset"]


class IndexedDataset:
    """``IndexedDataset(dataset)[i] == (x, y, i)``: wraps any map-style dataset of ``(x, y)``
    pairs so that a ``DataLoader`` over it yields ``(x, y, indices)``, the per-sample indices
    :class:`basin.train.SAF` keys its logit bank on::

        loader = DataLoader(basin.train.IndexedDataset(train_set), batch_size=128, shuffle=True)
        for x, y, idx in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y) + saf.penalty(logits, idx, epoch)
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError("IndexedDataset needs a map-style dataset (__getitem__, __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[i]
        return x, y, i
