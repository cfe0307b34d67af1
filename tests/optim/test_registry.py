from __future__ import annotations

import pytest
import torch
from torch import nn

import basin.optim as bo


def test_available_covers_basin_torch_and_pytorch_optimizer() -> None:
    names = bo.available()
    assert "adabelief" in names
    assert "torch:adamw" in names and "torch:sgd" in names
    assert "pytorch_optimizer:lion" in names


@pytest.mark.parametrize(
    "name,cls_name",
    [("AdaBelief", "AdaBelief"), ("torch:AdamW", "AdamW"), ("pytorch_optimizer:lion", "Lion")],
)
def test_create_by_name(name: str, cls_name: str) -> None:
    opt = bo.create(name, nn.Linear(3, 2).parameters(), lr=1e-3)
    assert type(opt).__name__ == cls_name


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="did you mean.*adabelief"):
        bo.create("adabelif", nn.Linear(3, 2).parameters())
    with pytest.raises(ValueError, match="torch:adamw"):
        bo.create("torch:adamww", nn.Linear(3, 2).parameters())


def test_unknown_hyperparameter_is_named() -> None:
    with pytest.raises(ValueError, match="learning_rate"):
        bo.create("adabelief", nn.Linear(3, 2).parameters(), learning_rate=1e-3)


def test_weight_decay_groups_exclude_biases_and_norms() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 3), nn.BatchNorm1d(4))
    decay, no_decay = bo.weight_decay_groups(model, 0.1, lr=0.5)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 0.5
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 6
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    torch.optim.AdamW(bo.weight_decay_groups(model, 0.1))
