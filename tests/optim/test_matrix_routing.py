"""The routing shared by the matrix optimizers (basin.optim._matrix): one ``matrix_rule`` key,
one AdamW fallback, one validation path and one param-group helper for Muon, SWAN, COSMOS and
FRUGAL."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import basin.optim as bo

# small enough for every matrix rule (COSMOS rank <= min(rows, cols))
_HP = {
    "muon": {"ns_dtype": torch.float32},
    "swan": {},
    "cosmos": {"rank": 2},
    "frugal": {},
}
NAMES = list(_HP)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("name", NAMES)
def test_vector_in_a_matrix_group_raises_the_same_message(name: str) -> None:
    model = nn.Linear(3, 4)
    groups = [{"params": list(model.named_parameters()), "matrix_rule": True}]
    with pytest.raises(ValueError) as info:
        bo.create(name, groups, **_HP[name])
    msg = str(info.value)
    assert "'bias'" in msg and "(4,)" in msg and "param group 0" in msg
    assert "matrix_rule=False" in msg and "matrix_param_groups" in msg and "matrix_rule=None" in msg
    with pytest.raises(ValueError, match="matrix_rule must be None, True or False"):
        bo.create(name, [{"params": [model.weight], "matrix_rule": 1}], **_HP[name])


@pytest.mark.parametrize("name", NAMES)
def test_matrix_param_groups_for_every_matrix_optimizer(name: str) -> None:
    """Hidden matrix -> matrix rule; embedding, head and biases -> AdamW state (exp_avg and
    exp_avg_sq of the parameter's shape), with the fallback group's own lr."""
    model = _net()
    groups = bo.matrix_param_groups(model, fallback={"lr": 1e-3})
    opt = bo.create(name, groups, **_HP[name])
    assert [g["matrix_rule"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == 1e-3
    x = torch.randint(0, 7, (8,))
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    hidden = model[1].weight
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(hidden)]
    for p in opt.param_groups[1]["params"]:
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape
    assert "exp_avg_sq" not in opt.state[hidden] or opt.state[hidden]["exp_avg_sq"].shape != (
        hidden.shape
    )  # matrix state, not AdamW's


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("foreach", [False, True])
def test_fallback_is_torch_adamw_in_both_paths(name: str, foreach: bool) -> None:
    """matrix_rule=False: single- and multi-tensor AdamW equal torch.optim.AdamW (float64,
    20 steps, 1e-12; the arithmetic order differs)."""
    model = _net().double()
    ref_model = copy.deepcopy(model)
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    group = {"params": model.parameters(), "matrix_rule": False, **hp}
    opt = bo.create(name, [group], foreach=foreach, **_HP[name])
    ref = torch.optim.AdamW(ref_model.parameters(), **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(0, 7, (8,), generator=gen)
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["muon", "swan"])
def test_automatic_group_moves_vectors_to_a_companion_group(name: str) -> None:
    """matrix_rule=None on a group of Muon/SWAN (whose AdamW has its own defaults): the matrices
    stay, the rest move to a matrix_rule=False group right after it."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    fallback_lr = {"muon": {"adamw_lr": 0.5}, "swan": {"adamw_lr": 0.5}}[name]
    groups = [{"params": model.parameters(), "matrix_rule": None}]
    opt = bo.create(name, groups, **_HP[name], **fallback_lr)
    mg, ag = opt.param_groups
    assert mg["matrix_rule"] is True and [p.ndim for p in mg["params"]] == [2, 2]
    assert ag["matrix_rule"] is False and [p.ndim for p in ag["params"]] == [1, 1]
    assert "betas" in ag and ag["lr"] == 0.5 and mg["lr"] != 0.5


@pytest.mark.parametrize("name", ["cosmos", "frugal"])
def test_automatic_group_keeps_vectors_in_place(name: str) -> None:
    """COSMOS/FRUGAL: their lr, betas, eps, weight_decay are AdamW's, so automatic routing keeps
    one group; a bad fallback hyperparameter of a group names the group."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
    opt = bo.create(name, model.parameters(), **_HP[name])
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["matrix_rule"] is None
    with pytest.raises(ValueError, match=r"param group 1: eps"):
        bo.create(
            name,
            [{"params": [model[0].weight]}, {"params": [model[0].bias], "eps": -1.0}],
            **_HP[name],
        )
