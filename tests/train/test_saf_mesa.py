"""SAF and MESA (basin.train) against a literal transcription of the authors' loss
(tests/references/saf_paper.py), closed forms, state round trips, validation, and the harness
hook that runs them by name."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from references.saf_paper import ModelEmaV2Paper, SAFPaper, mesa_paper_loss
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import basin.optim as bo
import basin.train as bt
from basin.bench import Workload, make_config, run

N, D, C, BS = 96, 6, 4, 16


def _data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    return TensorDataset(x, y)


def _mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(3)
    layers = [nn.Linear(D, 12)] + ([nn.BatchNorm1d(12)] if bn else []) + [nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(12, C)).double()


def _loader(seed: int = 5) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(bt.IndexedDataset(_data()), batch_size=BS, shuffle=True, generator=g)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ SAF


def test_saf_matches_the_authors_loss_over_epochs() -> None:
    """Seven epochs of a shuffled indexed loader (bank E=2, active for 1 < epoch < 6): the loss,
    every gradient and the weights equal the transcription's at float64 precision."""
    hp = {"lam": 0.3, "tau": 2.0, "memory": 2, "start_epoch": 1, "end_epoch": 6}
    ours, ref = _mlp(), _mlp()
    saf = bt.SAF(N, C, dtype=torch.float64, **hp)
    paper = SAFPaper(N, C, 0.3, 2.0, kl_start_epoch=1, minus_epoch=2, kl_end_epoch=6)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.2, momentum=0.9)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    active_terms = 0
    for epoch in range(7):
        for x, y, idx in _loader(seed=epoch):
            out = ours(x)
            pen = saf.penalty(out, idx, epoch)
            loss_a = F.cross_entropy(out, y) + pen
            loss_b = paper.loss(ref(x), y, idx, epoch)
            torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-14)
            if paper.kl is None:
                assert float(pen) == 0.0
            else:
                assert float(paper.kl.detach()) > 1e-6  # the term is really there
                torch.testing.assert_close(pen, 0.3 * paper.kl, rtol=1e-12, atol=1e-15)
                active_terms += 1
            opt_a.zero_grad()
            opt_b.zero_grad()
            loss_a.backward()
            loss_b.backward()
            _close(_grads(ours), _grads(ref))
            opt_a.step()
            opt_b.step()
    assert active_terms == 4 * (N // BS)  # epochs 2, 3, 4, 5
    _close(list(ours.parameters()), list(ref.parameters()))
    _close([saf.bank], [paper.train_logits])


def test_saf_closed_forms() -> None:
    lam, tau = 0.7, 3.0
    saf = bt.SAF(4, 3, lam=lam, tau=tau, memory=2, start_epoch=0, end_epoch=5)
    idx = torch.arange(4)
    z0, z1, z2 = (torch.randn(4, 3, generator=torch.Generator().manual_seed(s)) for s in range(3))
    # inactive at epoch 0 (start_epoch < epoch is strict), but recorded
    assert float(saf.penalty(z0, idx, 0)) == 0.0
    assert torch.equal(saf.bank[:, 0], z0)
    # epoch 1: two epochs back is epoch -1: a slot never written, zeros, a uniform target
    p = saf.penalty(z1, idx, 1)
    q = F.softmax(z1 / tau, -1)
    want = lam * tau**2 * (-(q.log() + math.log(3)).sum(-1) / 3).mean()
    torch.testing.assert_close(p, want)
    # epoch 2: the reference is epoch 0's logits, closed-form KL(p0 || p2) with tau^2
    p = saf.penalty(z2, idx, 2)
    a, b = F.softmax(z0 / tau, -1), F.softmax(z2 / tau, -1)
    want = lam * tau**2 * (a * (a.log() - b.log())).sum(-1).mean()
    torch.testing.assert_close(p, want)
    # equal logits: zero; epoch >= end_epoch: inactive
    saf2 = bt.SAF(4, 3, lam=lam, tau=tau, memory=1, start_epoch=0, end_epoch=5)
    saf2.penalty(z1, idx, 3)
    assert float(saf2.penalty(z1, idx, 4)) == pytest.approx(0.0, abs=1e-7)
    assert float(saf2.penalty(z2, idx, 5)) == 0.0


def test_saf_tau_squared_scaling() -> None:
    """At tau -> large the softened KL is ~ ||dz - mean||^2 / (2 C tau^2): tau^2 keeps the
    term's scale, as in distillation."""
    idx = torch.arange(8)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(8, 5, generator=g, dtype=torch.float64)
    z1 = z0 + 0.01 * torch.randn(8, 5, generator=g, dtype=torch.float64)
    vals = []
    for tau in (50.0, 100.0):
        s = bt.SAF(8, 5, lam=1.0, tau=tau, memory=1, start_epoch=-1, dtype=torch.float64)
        s.penalty(z0, idx, 0)
        vals.append(float(s.penalty(z1, idx, 1)))
    d = (z1 - z0) - (z1 - z0).mean(-1, keepdim=True)
    limit = float((d.square().sum(-1) / (2 * 5)).mean())
    assert vals[0] == pytest.approx(limit, rel=0.05) and vals[1] == pytest.approx(limit, rel=0.02)


def test_saf_state_dict_round_trip_continues_bit_identically() -> None:
    def train(model, opt, saf, epochs):
        for epoch in epochs:
            for x, y, idx in _loader(seed=epoch):
                out = model(x)
                loss = F.cross_entropy(out, y) + saf.penalty(out, idx, epoch)
                opt.zero_grad()
                loss.backward()
                opt.step()

    hp = {"memory": 1, "start_epoch": 0}
    m = _mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    saf = bt.SAF(N, C, dtype=torch.float64, **hp)
    train(m, opt, saf, range(2))
    saved = (
        {k: v.clone() for k, v in m.state_dict().items()},
        copy.deepcopy(opt.state_dict()),  # torch's holds live references to its buffers
        saf.state_dict(),  # a snapshot
    )
    train(m, opt, saf, range(2, 4))
    m2 = _mlp()
    m2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved[1])
    saf2 = bt.SAF(N, C, dtype=torch.float64, **hp)
    saf2.load_state_dict(saved[2])
    train(m2, opt2, saf2, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert torch.equal(saf.bank, saf2.bank)
    with pytest.raises(ValueError, match="bank of shape"):
        bt.SAF(N, C + 1).load_state_dict(saved[2])


# ------------------------------------------------------------------ MESA


def test_mesa_matches_the_authors_loss_and_ema() -> None:
    """A BatchNorm MLP over 6 epochs: loss, gradients, weights and the EMA (weights and BN
    statistics) equal the transcription's (timm's ModelEmaV2 + MESA_train.py's KL)."""
    ours, ref = _mlp(bn=True), _mlp(bn=True)
    mesa = bt.MESA(ours, lam=0.8, tau=3.0, decay=0.9, start_epoch=1, end_epoch=5)
    ema = ModelEmaV2Paper(ref, decay=0.9)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(6):
        for x, y, _ in _loader(seed=epoch):
            out = ours(x)
            pen = mesa.penalty(out, x, epoch)
            loss_a = F.cross_entropy(out, y) + pen
            with torch.no_grad():
                ema_out = ema.module(x)
            loss_b = mesa_paper_loss(ref(x), y, ema_out, epoch, 0.8, 3.0, 1, 5)
            torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-14)
            assert (float(pen.detach()) > 1e-8) == (1 < epoch < 5)
            opt_a.zero_grad()
            opt_b.zero_grad()
            loss_a.backward()
            loss_b.backward()
            _close(_grads(ours), _grads(ref))
            opt_a.step()
            opt_b.step()
            mesa.update(ours)
            ema.update(ref)
    _close(list(ours.parameters()), list(ref.parameters()))
    mine, theirs = mesa.ema.state_dict(), ema.module.state_dict()
    floats = [k for k, v in theirs.items() if v.dtype.is_floating_point]
    assert any("running_mean" in k for k in floats)
    _close([mine[k] for k in floats], [theirs[k] for k in floats])
    # integer buffers: copied here; timm's float update truncates them back (a documented
    # difference)
    assert int(mine["1.num_batches_tracked"]) == 6 * (N // BS)


def test_mesa_ema_update_by_hand() -> None:
    m = _mlp(bn=True)
    mesa = bt.MESA(m, decay=0.75)
    before = {k: v.clone() for k, v in mesa.ema.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
        m[1].running_var.mul_(3.0)
    mesa.update(m)
    for k, v in mesa.ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * m.state_dict()[k])
    assert not mesa.ema.training and not any(p.requires_grad for p in mesa.ema.parameters())
    assert m.training  # the trained model is left as it was


def test_mesa_state_dict_round_trip_and_per_token_logits() -> None:
    m = _mlp()
    mesa = bt.MESA(m, decay=0.5, start_epoch=-1)
    with torch.no_grad():
        m[0].weight.add_(1.0)
    mesa.update(m)
    other = bt.MESA(_mlp(), decay=0.5, start_epoch=-1)
    other.load_state_dict(mesa.state_dict())
    x = torch.randn(3, 7, D, dtype=torch.float64)  # per-token logits [3, 7, C]
    out = m(x)
    a, b = mesa.penalty(out, x, 0), other.penalty(out, x, 0)
    assert torch.equal(a, b) and float(a.detach()) > 0
    want = (
        0.8
        * 25
        * F.kl_div(F.log_softmax(out / 5, -1), F.softmax(mesa.ema(x) / 5, -1), reduction="none")
        .sum(-1)
        .mean()
    )
    torch.testing.assert_close(a, want)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"tau": 0.0}, "tau"),
        ({"tau": float("inf")}, "tau"),
        ({"memory": 0}, "memory"),
        ({"memory": 1.5}, "memory"),
        ({"start_epoch": -2}, "start_epoch"),
        ({"start_epoch": 3, "end_epoch": 3}, "end_epoch"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_saf_bad_hyperparameters_raise(kw, name) -> None:
    with pytest.raises(ValueError, match=name):
        bt.SAF(N, C, **kw)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"lam": -1.0}, "lam"),
        ({"tau": -1.0}, "tau"),
        ({"decay": 1.0}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"start_epoch": "5"}, "start_epoch"),
        ({"end_epoch": 2.5}, "end_epoch"),
    ],
)
def test_mesa_bad_hyperparameters_raise(kw, name) -> None:
    with pytest.raises(ValueError, match=name):
        bt.MESA(_mlp(), **kw)


def test_saf_bad_inputs_raise() -> None:
    saf = bt.SAF(10, 3)
    with pytest.raises(ValueError, match="n_samples"):
        bt.SAF(0, 3)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        saf.penalty(torch.zeros(2, 3), torch.tensor([3, 10]), 0)
    with pytest.raises(ValueError, match="logits"):
        saf.penalty(torch.zeros(2, 4), torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match="indices"):
        saf.penalty(torch.zeros(2, 3), torch.tensor([0]), 0)


# ------------------------------------------------------------------ harness


def test_create_builds_the_base_optimizer_and_points_method_hparams_to_the_method() -> None:
    m = _mlp()
    for name in ("saf", "mesa"):
        opt = bo.create(name, m.parameters(), lr=0.1, momentum=0.9)
        assert type(opt) is torch.optim.SGD
        with pytest.raises(ValueError, match="training method"):
            bo.create(name, m.parameters(), lr=0.1, lam=0.3)
    assert bo.info("saf").method_defaults["lam"] == 0.3


def test_harness_with_lam_zero_is_sgd_and_the_term_changes_the_run() -> None:
    """Through `run`: lam=0 is bit-identical to torch SGD momentum 0.9 (the hook adds nothing
    else), and the default lam trains differently once the term is active (mnist1d_mlp at
    batch 512: 7 steps an epoch; saf from epoch 2 = step 15, mesa from epoch 1 = step 8)."""
    kw = dict(steps=24, eval_every=24, batch_size=512, log_every=1)
    sgd = run(make_config("mnist1d_mlp", "torch:sgd", **kw))
    for name in ("saf", "mesa"):
        zero = run(make_config("mnist1d_mlp", name, {"lam": 0.0}, **kw))
        assert zero.series["train"]["loss"] == sgd.series["train"]["loss"], name
        on = run(make_config("mnist1d_mlp", name, **kw))
        assert on.status == "ok"
        first = {"saf": 15, "mesa": 8}[name]  # the first step with the term
        same = on.series["train"]["loss"][: first - 1]
        assert same == sgd.series["train"]["loss"][: first - 1], name
        # the loss recorded at a step is before its update: the first changed one is next
        assert on.series["train"]["loss"][first] != sgd.series["train"]["loss"][first], name
        assert on.state_bytes > sgd.state_bytes  # the bank / the EMA copy
    assert on.config["hparams"]["decay"] == 0.99


@pytest.mark.parametrize(
    "name,workload,why",
    [
        ("saf", "charlm", "per-sample class logits"),
        ("saf", "quadratic_deep", "per-sample class logits"),
        ("mesa", "rosenbrock", "class logits"),
    ],
)
def test_make_config_refuses_workloads_without_what_the_method_needs(name, workload, why):
    with pytest.raises(ValueError, match=why):
        make_config(workload, name, steps=2)


def test_bad_method_hyperparameters_fail_at_make_config() -> None:
    with pytest.raises(ValueError, match=r"saf: lam must be"):
        make_config("mnist1d_mlp", "saf", {"lam": -1.0}, steps=2)
    with pytest.raises(ValueError, match="memory"):
        make_config("mnist1d_mlp", "saf", {"memory": 0}, steps=2)
    with pytest.raises(ValueError, match="decay"):
        make_config("mnist1d_mlp", "mesa", {"decay": 2.0}, steps=2)


def test_saf_runs_on_your_loaders_over_an_indexed_dataset() -> None:
    ds = _data()
    ds = TensorDataset(ds.tensors[0].float(), ds.tensors[1])
    w = Workload.from_loaders(
        "saf_loader_test",
        lambda: nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)),
        train=DataLoader(bt.IndexedDataset(ds), batch_size=BS, shuffle=True),
        eval=DataLoader(ds, batch_size=BS),
        steps=30,
        lr={"sgd": 0.05},
    )
    r = run(make_config(w, "saf", {"start_epoch": 0, "memory": 1}, steps=30))
    assert r.status == "ok" and r.final["metric"] is not None
    plain = Workload.from_loaders(
        "saf_loader_plain",
        lambda: nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)),
        train=DataLoader(ds, batch_size=BS, shuffle=True),
        eval=DataLoader(ds, batch_size=BS),
        steps=30,
    )
    with pytest.raises(ValueError, match="IndexedDataset"):
        make_config(plain, "saf", steps=2)
    assert make_config(plain, "mesa", steps=2).optimizer == "mesa"
