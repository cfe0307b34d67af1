"""GGPO beyond the generic table: the perturbed protocols against the float64 transcription with
the same draws, closed forms (no perturbation = AdamW bit for bit, per-row std, exact restore),
opt-out groups, nonfinite handling mid-step, state-dict round trip, on a LoRA model."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from references.ggpo_paper import GGPOPaper
from torch import nn

import basin.optim as bo
from basin.optim.ggpo import GGPOAdamW
from basin.train import add_lora, lora_parameters


def lora_model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    m = add_lora(m.double(), r=3, alpha=6)
    with torch.no_grad():  # B away from zero, so that both factors get gradients at once
        for p in lora_parameters(m)[1::2]:
            p.normal_(0, 0.1)
    return m


def data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(32, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (32,), generator=gen),
        )
        for _ in range(n)
    ]


def loss_of(m, batch):
    x, y = batch
    return nn.functional.cross_entropy(m(x), y)


def max_rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    "hp",
    [
        {},
        {"variant": "port"},
        {"sigma": 0.2, "beta": 2.0, "lr": 3e-3, "weight_decay": 0.1, "seed": 4},
        {"variant": "port", "sigma": 0.1, "beta": 1.0, "betas": (0.8, 0.99)},
    ],
)
@pytest.mark.parametrize("protocol", ["closure", "perturb"])
def test_matches_the_paper_transcription_over_120_steps(hp, protocol):
    """float64, 120 steps on a LoRA MLP: parameters, AdamW moments and the per-row scales of
    the last perturbation equal the transcription driven by the same draws."""
    model = lora_model()
    ref_model = copy.deepcopy(model)
    params, ref_params = lora_parameters(model), lora_parameters(ref_model)
    opt = GGPOAdamW(params, **hp)
    ref = GGPOPaper(ref_params, **hp)
    for batch in data(120):
        for m, o in ((model, opt), (ref_model, ref)):
            if protocol == "closure":

                def closure(m=m, o=o, batch=batch):
                    o.zero_grad()
                    loss = loss_of(m, batch)
                    loss.backward()
                    return loss

                o.step(closure)
            else:
                o.perturb()
                o.zero_grad()
                loss_of(m, batch).backward()
                o.step()
    for p, r in zip(params, ref_params):
        assert max_rel(p, r) < 1e-12
        assert max_rel(opt.state[p]["exp_avg"], ref.state[r]["m"]) < 1e-12
        assert max_rel(opt.state[p]["exp_avg_sq"], ref.state[r]["v"]) < 1e-12
        assert max_rel(opt.row_scale(p), _ref_next_scale(ref, r, hp)) < 1e-12
    assert not torch.equal(params[1], lora_parameters(lora_model())[1])


def _ref_next_scale(ref, r, hp):
    """The transcription's per-row scale for its next perturbation (as its perturb computes)."""
    W = r.reshape(r.shape[0], -1)
    G = ref.gsq[r].reshape(r.shape[0], -1)
    n = W.shape[1]
    sigma, beta = hp.get("sigma", 0.03), hp.get("beta", 0.01)
    out = []
    for i in range(W.shape[0]):
        w2, g2 = float((W[i] ** 2).sum()), float((G[i] ** 2).sum())
        if hp.get("variant", "paper") == "paper":
            out.append(math.sqrt(sigma**2 / n * w2 + beta * g2))
        else:
            out.append(sigma * math.sqrt(w2) + beta * g2)
    return torch.tensor(out, dtype=torch.float64)


def test_sigma_beta_zero_is_adamw_bit_for_bit():
    model = lora_model()
    ref_model = copy.deepcopy(model)
    opt = GGPOAdamW(lora_parameters(model), lr=1e-2, sigma=0.0, beta=0.0)
    ref = torch.optim.AdamW(lora_parameters(ref_model), lr=1e-2)
    for batch in data(30):

        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
        ref.zero_grad()
        loss_of(ref_model, batch).backward()
        ref.step()
    for p, r in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, r)


@pytest.mark.parametrize("variant", ["paper", "port"])
def test_per_row_std_equals_the_formula(variant):
    """One 400 x 300 matrix with set row norms and a set previous gradient: the perturbation's
    per-row standard deviation equals the formula (300 draws per row: 4 standard errors)."""
    torch.manual_seed(0)
    rows, n = 400, 300
    w = nn.Parameter(
        torch.randn(rows, n, dtype=torch.float64) * torch.linspace(0.1, 3, rows)[:, None]
    )
    sigma, beta = 0.05, 0.3
    opt = bo.GGPO([w], torch.optim.SGD, sigma=sigma, beta=beta, variant=variant, lr=0.0)
    g = torch.randn(rows, n, dtype=torch.float64) * 0.02
    w.grad = g.clone()
    opt.step()  # lr 0: w unchanged, the gradient norms recorded
    w2, g2 = w.detach().square().sum(1), g.square().sum(1)
    if variant == "paper":
        expected = (sigma**2 / n * w2 + beta * g2).sqrt()
    else:
        expected = sigma * w2.sqrt() + beta * g2
    torch.testing.assert_close(opt.row_scale(w), expected, rtol=1e-12, atol=0)
    clean = w.detach().clone()
    opt.perturb()
    eps = w.detach() - clean
    std = eps.std(1)
    rel = (std / expected - 1).abs()
    assert float(rel.max()) < 4 / math.sqrt(2 * n) * 1.5, float(rel.max())
    assert float(eps.mean(1).abs().div(expected).max()) < 5 / math.sqrt(n)
    opt.restore()
    assert torch.equal(w.detach(), clean)


def test_weights_restored_exactly_and_clean_between_steps():
    """After every step the weights are exactly AdamW's iterate (an unperturbed copy of the
    trajectory with the same gradients would be bit-identical): the restore copies, so
    w + e - e rounding never enters; unperturbed() gives the clean weights mid-step."""
    model = lora_model()
    params = lora_parameters(model)
    opt = GGPOAdamW(params, lr=1e-2, sigma=0.5, beta=1.0)
    for batch in data(5):
        opt.perturb()
        perturbed = [p.detach().clone() for p in params]
        with opt.unperturbed():
            clean = [p.detach().clone() for p in params]
        assert all(torch.equal(p, q) for p, q in zip(params, perturbed))
        assert any(not torch.equal(p, q) for p, q in zip(perturbed, clean))
        opt.zero_grad()
        loss_of(model, batch).backward()
        grads = [p.grad.clone() for p in params]
        state_before = copy.deepcopy(opt.base_optimizer.state_dict())
        opt.step()
        # the same AdamW step from the clean weights, with the gradients taken at w + e
        twin = [nn.Parameter(c.clone()) for c in clean]
        ref = torch.optim.AdamW(twin, lr=1e-2)
        ref.load_state_dict(state_before)
        for t, g in zip(twin, grads):
            t.grad = g
        ref.step()
        assert all(torch.equal(p, t) for p, t in zip(params, twin))
        assert not opt.perturbed


def test_groups_may_opt_out_and_vectors_are_not_perturbed():
    model = lora_model()
    a_params, b_params = lora_parameters(model)[0::2], lora_parameters(model)[1::2]
    vec = nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = GGPOAdamW([{"params": a_params + [vec]}, {"params": b_params, "perturb": False}])
    before = [p.detach().clone() for p in a_params + b_params + [vec]]
    opt.perturb()
    after = a_params + b_params + [vec]
    n_a = len(a_params)
    assert all(not torch.equal(p, q) for p, q in zip(after[:n_a], before[:n_a]))
    assert all(torch.equal(p, q) for p, q in zip(after[n_a:], before[n_a:]))
    opt.restore()


def test_plain_loop_without_perturb_warns_once_and_is_the_base_step():
    model = lora_model()
    opt = GGPOAdamW(lora_parameters(model))
    with pytest.warns(UserWarning, match="perturb"):
        for batch in data(2):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        loss_of(model, data(1)[0]).backward()
        opt.step()


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nonfinite_gradient_mid_step_restores_and_changes_nothing_else(nonfinite):
    model = lora_model()
    params = lora_parameters(model)
    opt = GGPOAdamW(params, lr=1e-2, nonfinite=nonfinite)
    for batch in data(2):
        opt.perturb()
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    clean = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    opt.perturb()
    opt.zero_grad()
    loss_of(model, data(1, seed=9)[0]).backward()
    params[0].grad.view(-1)[0] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="not finite"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(p, c) for p, c in zip(params, clean)) and not opt.perturbed
    now = opt.state_dict()
    for i, st in now["state"].items():
        for k, v in st.items():
            assert torch.equal(v, state["state"][i][k]), (i, k)
    for i, v in now["ggpo"]["grad_sq"].items():
        assert torch.equal(v, state["ggpo"]["grad_sq"][i])


def test_state_dict_round_trip_mid_step_continues_identically():
    """Saved while perturbed (between perturb() and step()): the continuation, draws included,
    is bit-identical."""
    batches = data(10)
    model = lora_model()
    opt = GGPOAdamW(lora_parameters(model), lr=1e-2, sigma=0.3, beta=1.0, seed=3)

    def run(m, o, bs, first_perturbed=False):
        for j, batch in enumerate(bs):
            if not (first_perturbed and j == 0):
                o.perturb()
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()

    run(model, opt, batches[:5])
    opt.perturb()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, batches[5:], first_perturbed=True)

    model2 = lora_model(seed=11)
    model2.load_state_dict(saved_model)
    opt2 = GGPOAdamW(lora_parameters(model2), lr=1e-2, sigma=0.3, beta=1.0, seed=3)
    opt2.load_state_dict(saved_opt)
    assert opt2.perturbed
    run(model2, opt2, batches[5:], first_perturbed=True)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_wrapper_arguments():
    p = [nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="base_optimizer"):
        bo.GGPO(p, "no_such_optimizer")
    with pytest.raises(ValueError, match="GGPO itself"):
        bo.GGPO(p, GGPOAdamW)
    opt = bo.GGPO(p, "adabelief", lr=1e-3)  # a registry name as base
    assert type(opt.base_optimizer).__name__ == "AdaBelief"
    with pytest.raises(ValueError, match="sigma"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "sigma": -1.0})


def test_registry_builds_it_over_a_lora_model():
    """create("ggpo", model): only the trainable (LoRA) parameters, weight decay groups; the
    closure path trains."""
    model = lora_model()
    opt = bo.create("ggpo", model, lr=1e-2)
    built = {id(p) for g in opt.param_groups for p in g["params"]}
    assert built == {id(p) for p in lora_parameters(model)}
    x, y = (torch.cat(t) for t in zip(*data(4)))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(100):
        opt.step(closure)
    assert nn.functional.cross_entropy(model(x), y).item() < 0.8 * first
