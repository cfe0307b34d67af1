"""EXAdam beyond the generic table: a closed-form first step, pytorch-optimizer's EXAdam as a
second opinion, and the one place it differs from the paper (the dynamic step size)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from optim_db import EXADAM
from test_common import compare_models, compare_states, loss_of, make_data, make_model
from torch import nn

import basin.optim as bo


def test_first_step_closed_form():
    """t=1: m/bc1 = g, v/bc2 = g^2; d1 (from v) scales m and g, d2 (from m) scales v."""
    lr, b1, b2, eps = 0.1, 0.8, 0.95, 1e-3
    g = torch.tensor([-2.0, -0.3, 0.0, 0.01, 1.5], dtype=torch.float64)
    p = nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    bo.EXAdam([p], lr=lr, betas=(b1, b2), eps=eps).step()
    v, m = (1 - b2) * g**2, (1 - b1) * g
    d1 = 1 + b2 * v / (v + eps)
    d2 = 1 + b1 * m**2 / (m**2 + eps)
    numerator = g * d1 + g * d1 / (1 - b1)
    expected = -lr * math.log(2.0) * numerator / (g.abs() * d2.sqrt() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=0)


def _train_pair(ours, ref, model, ref_model, steps=100, ref_lr=None):
    for t, batch in enumerate(make_data(steps), start=1):
        if ref_lr is not None:
            for group in ref.param_groups:
                group["lr"] = ref_lr(t)
        for m, o in ((model, ours), (ref_model, ref)):
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()


@pytest.mark.parametrize(
    "hp,po_foreach",
    [
        ({}, False),
        ({"weight_decay": 0.1}, False),
        ({"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}, True),
    ],
    ids=["default-loop", "wd-loop", "betas,eps,wd-foreach"],
)
def test_pytorch_optimizer_agrees_without_dynamic_step(hp, po_foreach):
    """pytorch-optimizer 4.1.0's EXAdam (loop and foreach paths) equals basin's with
    dynamic_step_size=False, parameters and both moments, over 40 mini-batch steps."""
    from pytorch_optimizer import EXAdam as POEXAdam

    hp = {**hp, "dynamic_step_size": False}
    model = make_model(EXADAM)
    ref_model = copy.deepcopy(model)
    ours = bo.EXAdam(model.parameters(), **hp)
    po_hp = {k: v for k, v in hp.items() if k != "dynamic_step_size"}
    ref = POEXAdam(ref_model.parameters(), foreach=po_foreach, **po_hp)
    _train_pair(ours, ref, model, ref_model, steps=40)
    compare_models(model, ref_model, 1e-10)
    assert compare_states(ours, ref, {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}, 1e-10)


def test_dynamic_step_is_the_only_difference_from_pytorch_optimizer():
    """pytorch-optimizer 4.1.0 (like the authors' later code) has no dynamic step size. Driving
    its lr by the paper's a_t = lr ln(sqrt(2) sqrt(t+1)) reproduces basin's default exactly;
    with its constant lr the trajectories differ."""
    from pytorch_optimizer import EXAdam as POEXAdam

    lr = 1e-3
    model = make_model(EXADAM)
    driven, plain = copy.deepcopy(model), copy.deepcopy(model)
    ours = bo.EXAdam(model.parameters(), lr=lr)
    ref = POEXAdam(driven.parameters(), lr=lr)
    _train_pair(
        ours, ref, model, driven, steps=40, ref_lr=lambda t: lr * math.log(math.sqrt(2 * (t + 1)))
    )
    compare_models(model, driven, 1e-10)

    model2 = make_model(EXADAM)
    ours2 = bo.EXAdam(model2.parameters(), lr=lr)
    _train_pair(ours2, POEXAdam(plain.parameters(), lr=lr), model2, plain, steps=20)
    with pytest.raises(AssertionError, match="relative error"):
        compare_models(model2, plain, 1e-3)


@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_lr_equals_float_lr(foreach):
    """lr given as a 0-d tensor (as torch.optim allows) takes exactly the float-lr steps."""
    results = []
    for lr in (1e-2, torch.tensor(1e-2, dtype=torch.float64)):
        p = nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))
        opt = bo.EXAdam([p], lr=lr, weight_decay=0.1, foreach=foreach)
        for _ in range(3):
            p.grad = torch.sin(3 * p.detach())
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[1], results[0], rtol=1e-14, atol=0)
