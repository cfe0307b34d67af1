"""DIFF2 (arXiv:2302.03884) against a float64 transcription of its update (per-sample
gradients by an autograd loop over flat vectors, the same seeded noise), and against the
closed form of gradient descent on least squares when noise and clipping are off (the
gradient-difference estimator then telescopes to the exact full gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from gloo import init_gloo
from torch import nn

from basin.distributed import DIFF2


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _loss(out, y):
    return nn.functional.cross_entropy(out, y)


def _reference(model, batches, *, lr, b, c1, c2, s1, s2, seed):
    """Algorithm 1 of DIFF2 with the GD subroutine, on flat float64 vectors. ``batches[t]``
    is one batch, or a list of the workers' batches (worker p's noise seeded ``seed + p``);
    the estimator moves by the mean of the workers' messages."""
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    x = torch.cat([p.detach().reshape(-1) for p in params]).clone()

    def per_sample(flat, xb, yb):
        out = []
        for i in range(len(xb)):
            ps, k = [], 0
            for s in shapes:
                n = math.prod(s)
                ps.append(flat[k : k + n].reshape(s).clone().requires_grad_(True))
                k += n
            h = torch.tanh(xb[i : i + 1] @ ps[0].T + ps[1])
            loss = _loss(h @ ps[2].T + ps[3], yb[i : i + 1])
            out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ps)]))
        return out

    def clip(u, c):
        return u * min(1.0, c / float(u.norm()))

    def noise(gen):  # the same draws as DIFF2: one normal tensor per parameter, in order
        return torch.cat([torch.randn(s, generator=gen, dtype=torch.float64).reshape(-1)
                          for s in shapes])  # fmt: skip

    if not isinstance(batches[0], list):
        batches = [[bt] for bt in batches]
    gens = [torch.Generator().manual_seed(seed + p) for p in range(len(batches[0]))]
    v, x_prev, xs = None, None, []
    for t, per_worker in enumerate(batches):
        msgs = []
        for (xb, yb), gen in zip(per_worker, gens):
            g = per_sample(x, xb, yb)
            if t % b == 0:
                msgs.append((sum(clip(gi, c1) for gi in g) + s1 * c1 * noise(gen)) / len(xb))
            else:
                gp = per_sample(x_prev, xb, yb)
                d = sum(clip(a - c, c2) for a, c in zip(g, gp))
                msgs.append((d + s2 * c2 * noise(gen)) / len(xb))
        m = sum(msgs) / len(msgs)
        v = m if t % b == 0 else v + m
        x_prev, x = x, x - lr * v
        xs.append(x.clone())
    return xs


def test_diff2_matches_the_transcription_of_its_update() -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.randn(40, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (40,), generator=g)
    batches = []
    for _ in range(9):
        idx = torch.randperm(40, generator=g)[:12]
        batches.append((data[idx], labels[idx]))
    hp = dict(lr=0.3, b=4, c1=0.8, c2=0.05, s1=0.9, s2=1.7, seed=7)
    ref = _reference(_mlp(), batches, **hp)
    model = _mlp()
    opt = DIFF2(model, _loss, lr=0.3, restart_period=4, max_grad_norm=0.8,
                diff_max_grad_norm=0.05, noise_multiplier=0.9, diff_noise_multiplier=1.7,
                generator=torch.Generator().manual_seed(7))  # fmt: skip
    for (xb, yb), want in zip(batches, ref):
        opt.step(xb, yb)
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (opt.n_full, opt.n_diff) == (3, 6)
    assert opt.history(0.3) == [(0.9, 0.3, 3), (1.7, 0.3, 6)]


def test_no_noise_no_clipping_is_gradient_descent_in_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 30, 4
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    w0 = model.weight.detach().reshape(-1).clone()

    def loss(out, t):
        return 0.5 * ((out.squeeze(-1) - t) ** 2).mean()

    lr, steps = 0.2, 25
    opt = DIFF2(model, loss, lr=lr, restart_period=10, max_grad_norm=1e12, noise_multiplier=0.0)
    for _ in range(steps):
        opt.step(a, y)
    h = a.T @ a / n
    w_star = torch.linalg.solve(h, a.T @ y / n)
    m = torch.eye(d, dtype=torch.float64) - lr * h
    want = w_star + torch.linalg.matrix_power(m, steps) @ (w0 - w_star)
    torch.testing.assert_close(model.weight.detach().reshape(-1), want, rtol=1e-11, atol=1e-12)
    assert opt.epsilon(1e-5) == math.inf


def test_epsilon_is_the_composition_of_both_kinds_of_step() -> None:
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    model = _mlp()
    opt = DIFF2(model, _loss, lr=0.1, restart_period=3, noise_multiplier=2.0,
                diff_noise_multiplier=4.0)  # fmt: skip
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    for _ in range(7):
        opt.step(x, y)
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=2.0, sample_rate=1.0)
    for _ in range(4):
        acc.step(noise_multiplier=4.0, sample_rate=1.0)
    assert opt.epsilon(1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": 0.0}, "lr must be a positive"),
        ({"restart_period": 0}, "restart_period must be an integer >= 1"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be a positive"),
        ({"diff_max_grad_norm": 0.0}, "diff_max_grad_norm must be a positive"),
        ({"noise_multiplier": -0.1}, "noise_multiplier must be a non-negative"),
        ({"diff_noise_multiplier": float("nan")}, "diff_noise_multiplier must be a non-negative"),
        ({"expected_batch_size": 0}, "expected_batch_size must be an integer >= 1"),
    ],
)
def test_invalid_hyperparameters_raise(kw, match) -> None:
    args = {"lr": 0.1, "restart_period": 2, **kw}
    with pytest.raises(ValueError, match=match):
        DIFF2(_mlp(), _loss, **args)


# ------------------------------------------------------------------ distributed (gloo)

HP = dict(lr=0.3, b=3, c1=0.8, c2=0.05, s1=0.9, s2=1.7, seed=11)
WORLD, STEPS = 2, 7


def _worker_batches(rank: int):
    g = torch.Generator().manual_seed(50 + rank)
    data = torch.randn(30, 3, generator=g, dtype=torch.float64) + 0.5 * rank
    labels = torch.randint(0, 2, (30,), generator=g)
    out = []
    for _ in range(STEPS):
        idx = torch.randperm(30, generator=g)[: 8 + 2 * rank]  # unequal batch sizes
        out.append((data[idx], labels[idx]))
    return out


def _diff2_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(store, rank, WORLD)
    model = _mlp()
    opt = DIFF2(model, _loss, lr=HP["lr"], restart_period=HP["b"], max_grad_norm=HP["c1"],
                diff_max_grad_norm=HP["c2"], noise_multiplier=HP["s1"],
                diff_noise_multiplier=HP["s2"], distributed=True,
                generator=torch.Generator().manual_seed(HP["seed"] + rank))  # fmt: skip
    traj = []
    for xb, yb in _worker_batches(rank):
        opt.step(xb, yb)
        traj.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.save(traj, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_diff2_matches_the_transcription_on_2_gloo_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "traj")
    mp.spawn(_diff2_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    per_rank = [_worker_batches(r) for r in range(WORLD)]
    ref = _reference(_mlp(), [[per_rank[r][t] for r in range(WORLD)] for t in range(STEPS)], **HP)
    for r in range(WORLD):
        got = torch.load(f"{out}.{r}", weights_only=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_distributed_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        DIFF2(_mlp(), _loss, lr=0.1, restart_period=2, distributed=True)
