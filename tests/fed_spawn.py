"""One spawn of 4 gloo ranks for the decentralized / federated / gradient-coding tests
(starting Python processes is the slow part, so tests/distributed/test_gossip.py,
test_fedsvd.py and test_gradient_coding.py share it through the session fixture ``fed_ranks``
in tests/distributed/conftest.py). Each part's results come back per rank in one file."""

from __future__ import annotations

import functools

import torch
from gloo import init_gloo
from torch import nn

WORLD = 4

# ---- gossip -------------------------------------------------------------------------------
ROUNDS = 6
LOCAL = 2  # local optimizer steps between gossip steps

SCENARIOS = {  # name: (topology, optimizer class, optimizer kwargs)
    "ring": ("ring", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "torus": ("torus", torch.optim.Adam, {"lr": 0.01}),
    "exponential": ("exponential", torch.optim.SGD, {"lr": 0.1}),
    "custom": ("custom", torch.optim.AdamW, {"lr": 0.02}),
}


def custom_w() -> torch.Tensor:
    """A doubly stochastic, non-symmetric matrix: a convex combination of permutations."""
    eye = torch.eye(WORLD, dtype=torch.float64)
    p1, p2 = eye[[1, 2, 3, 0]], eye[[2, 0, 3, 1]]
    return 0.5 * eye + 0.3 * p1 + 0.2 * p2


def make_net(rank: int) -> nn.Module:
    torch.manual_seed(10 + rank)  # every node starts elsewhere: gossip has work to do
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def make_data(rank: int):
    gen = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(16, 5, generator=gen, dtype=torch.float64) + rank  # heterogeneous nodes
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    return x, y


def local_steps(net, opt, rank):
    x, y = make_data(rank)
    for _ in range(LOCAL):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def flat(net) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _gossip_part(rank: int, solo) -> dict:
    from basin.distributed import Gossip

    results: dict = {}
    for name, (topo, opt_cls, kw) in SCENARIOS.items():
        net = make_net(rank)
        opt = opt_cls(net.parameters(), **kw)
        g = Gossip(net, custom_w() if topo == "custom" else topo)
        traj = []
        for _ in range(ROUNDS):
            local_steps(net, opt, rank)
            g.step()
            traj.append(flat(net))
        results[name] = {"traj": traj, "pre_merge": flat(net), "bytes": g.bytes_sent}
        results[name]["out_neighbours"] = g.out_neighbours
        g.merge()
        results[name]["merged"] = flat(net)
    errors = {}
    if rank == 3:
        try:
            Gossip(nn.Linear(2, 2), "ring", process_group=solo)
        except ValueError as e:
            errors["world1"] = str(e)
    bad = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.6, 0.4]])
    try:
        Gossip(nn.Linear(2, 2), bad.T)  # rows sum to 1, columns do not
    except ValueError as e:
        errors["bad_w"] = str(e)
    results["errors"] = errors
    return results


# ---- FedSVD -------------------------------------------------------------------------------
FED_ROUNDS = 2
FED_LOCAL = 3


def make_lora_net(seed: int = 0) -> nn.Module:
    from basin.train import add_lora

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    return add_lora(net, r=2, alpha=4.0)


def teacher() -> nn.Module:
    """The target: the same frozen base and A, with some B; LoRA updates lie in the row space of
    A, which FedSVD's re-factorization keeps, so the clients can reach it."""
    from basin.train import LoRALinear

    net = make_lora_net()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(
                    0.5 * torch.randn(m.lora_B.shape, generator=gen, dtype=torch.float64)
                )
    return net


@functools.cache
def client_data(k: int, n: int = 24):
    gen = torch.Generator().manual_seed(300 + k)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64) + 0.3 * k  # heterogeneous clients
    with torch.no_grad():
        return x, teacher()(x)


def client_train(net, k: int, steps: int, lr: float = 0.05) -> None:
    from basin.distributed import fedsvd_freeze_a

    opt = torch.optim.SGD(fedsvd_freeze_a(net), lr=lr)
    x, y = client_data(k)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def _fedsvd_part(rank: int) -> dict:
    from basin.distributed import fedsvd_round
    from basin.train import LoRALinear

    net = make_lora_net()
    layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
    rounds = []
    for _ in range(FED_ROUNDS):
        client_train(net, rank, FED_LOCAL)
        before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers]
        fedsvd_round(net, weight=float(rank + 1))
        after = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in layers]
        rounds.append({"before": before, "after": after})
    return {"rounds": rounds}


# ---- gradient coding ----------------------------------------------------------------------
CODE_S = 1
CODE_STRAGGLERS = [2]
SGC = {"n": WORLD, "burst": 1, "window": 3, "lam": 2}  # s = ceil(1 * 2 / 3) = 1
SGC_JOBS = 3
# round 0: 2 > s stragglers (the master among them), so job 0 is re-attempted in round 1
SGC_PATTERN = [[0, 1], [], [], [0]]


def partial_gradient(job: int, part: int) -> torch.Tensor:
    """The gradient of a least-squares loss on data part ``part`` at job ``job``'s weights."""
    gen = torch.Generator().manual_seed(1000 + part)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)
    w = torch.linspace(-1, 1, 5, dtype=torch.float64) * (job + 1)
    return 2 * x.T @ (x @ w - y) / (8 * WORLD)


def _coding_part(rank: int) -> dict:
    from basin.distributed import (
        GradientCode,
        SelectiveReattemptSGC,
        coded_gradient,
        run_sequential_gradient_coding,
    )

    code = GradientCode(WORLD, CODE_S)
    one = coded_gradient(code, lambda j: partial_gradient(0, j), CODE_STRAGGLERS)
    sch = SelectiveReattemptSGC(**SGC)
    seq = run_sequential_gradient_coding(sch, partial_gradient, SGC_JOBS, SGC_PATTERN)
    return {"one": one, "seq": seq, "waits": sch.waits, "tasks": sch._tasks}


def worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(store, rank, WORLD)
    solo = dist.new_group([3])
    results = {
        "gossip": _gossip_part(rank, solo),
        "fedsvd": _fedsvd_part(rank),
        "coding": _coding_part(rank),
    }
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()
