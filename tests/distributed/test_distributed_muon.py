"""Distributed Muon (``Muon(..., distributed=True)``) on real gloo process groups (3 spawned
processes; the 2-rank cases on the subgroup {0, 1}, a 1-rank group on rank 2): every rank's
parameters and momentum equal, bit for bit, single-process Muon replaying the same (DDP-averaged)
gradients in the parent; each rank ran Newton-Schulz for its share of the matrices only."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from gloo import init_gloo
from torch import nn

import basin.optim.muon as muon_module
from basin.optim import Muon, info, matrix_param_groups
from basin.optim._distributed import assign

STEPS = 12
RESUME_AT = 5  # the "resume" scenario continues from a state dict loaded into a new optimizer


class Conv1D(nn.Module):
    """HF transformers' Conv1D: the weight stored (in, out)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def make_net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32),
        nn.Tanh(),
        Conv1D(32, 48),  # (in, out): the transposed matrix group
        nn.Tanh(),
        nn.Linear(48, 24),
        nn.Tanh(),
        nn.Linear(24, 24),
        nn.Tanh(),
        nn.Linear(24, 40),
        nn.Tanh(),
        nn.Linear(40, 5),  # the head: AdamW fallback
    )
    return net.to(dtype)


N_MATRICES = 5  # the hidden weights (the head and the biases go to the fallback)


def make_data(rank: int, step: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 8, generator=gen).to(dtype)
    y = torch.randint(0, 5, (16,), generator=gen)
    return x, y


def make_opt(net: nn.Module, hp: dict, **kw) -> Muon:
    groups = matrix_param_groups(net)
    assert [len(g["params"]) for g in groups] == [4, 1, 7]  # Linear, Conv1D (transposed), rest
    assert groups[1]["transposed"] is True
    return Muon(groups, **hp, **kw)


def _state(opt: Muon, net: nn.Module) -> dict:
    return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in net.named_parameters()}


def _worker(rank: int, world: int, store: str, out: str, scenarios: list) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    init_gloo(store, rank, world)
    groups = {2: dist.new_group([0, 1]), 3: None, 1: dist.new_group([2])}

    calls: list[tuple[int, ...]] = []
    ns = muon_module.newton_schulz5

    def counting(G, *args, **kw):
        if G.device.type != "meta":  # the layout probe runs it on meta: no arithmetic
            calls.append(tuple(G.shape))
        return ns(G, *args, **kw)

    muon_module.newton_schulz5 = counting
    results = {}
    if rank < 2:
        results["reference"] = _against_reference(rank, groups[2])
    for name, kw in scenarios:
        n, pg = kw["world"], groups[kw["world"]]
        if (rank != 2) if n == 1 else (rank >= n):  # the 1-rank group is rank 2's
            continue
        dtype = kw.get("dtype", torch.float32)
        net = make_net(dtype)
        ddp = DDP(net, process_group=pg)
        opt = make_opt(net, kw["hp"], distributed=True, process_group=pg)
        grads, counts, params_t = [], [], []
        for t in range(STEPS):
            if kw.get("resume") and t == RESUME_AT:
                sd = opt.state_dict()
                opt = make_opt(net, kw["hp"], distributed=True, process_group=pg)
                opt.load_state_dict(sd)
            opt.zero_grad()
            x, y = make_data(rank, t, dtype)
            nn.functional.cross_entropy(ddp(x).float(), y).backward()
            grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
            calls.clear()
            opt.step()
            counts.append(list(calls))
            params_t.append({k: p.detach().clone() for k, p in net.named_parameters()})
        names = {p: k for k, p in net.named_parameters()}
        results[name] = {
            "grads": grads,
            "params": params_t,
            "state": _state(opt, net),
            "state_dict": opt.state_dict(),
            "ns_calls": counts,
            "owner": {names[p]: r for p, r in opt.ns_owner.items()},
        }
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


REF_SHAPES = [(24, 24)] * 4 + [(16, 24)] * 2  # sorted by size, the chunks of 2 are uniform


def _against_reference(rank: int, pg) -> dict:
    """The authors' distributed ``muon.Muon`` (muon-optimizer; every rank the same gradients, as
    under DDP) and ``Muon(distributed=True)``, side by side, on the 2-rank subgroup (the
    reference's collectives use the default group: its module's ``dist`` is pointed at ``pg``)."""
    import torch.distributed as dist

    try:
        import muon as reference
    except ImportError:
        return {"skip": "muon-optimizer is not installed"}
    import types

    torch.manual_seed(3)
    init = [torch.randn(*s) * 0.2 for s in REF_SHAPES]
    ref_ps = [nn.Parameter(t.clone()) for t in init]
    ps = [nn.Parameter(t.clone()) for t in init]
    saved = reference.dist  # torch.distributed: point the reference's collectives at pg
    reference.dist = types.SimpleNamespace(
        all_gather=lambda out, t: dist.all_gather(out, t, group=pg),
        get_world_size=lambda: dist.get_world_size(pg),
        get_rank=lambda: dist.get_rank(pg),
    )
    try:
        ref = reference.Muon(ref_ps, lr=0.02, weight_decay=0.1, momentum=0.95)
        opt = Muon(ps, lr=0.02, weight_decay=0.1, momentum=0.95, distributed=True, process_group=pg)
        gen = torch.Generator().manual_seed(7)
        for _ in range(STEPS):
            for a, b in zip(ref_ps, ps):
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
            ref.step()
            opt.step()
    finally:
        reference.dist = saved
    return {
        "ref": [p.detach().clone() for p in ref_ps],
        "ours": [p.detach().clone() for p in ps],
        "init": init,
    }


HP_A = {"lr": 0.05, "weight_decay": 0.1, "adamw_lr": 1e-2, "adamw_weight_decay": 0.01}
HP_B = {"lr": 0.03, "nesterov": False, "ns_dtype": torch.float32, "foreach": True}
SCENARIOS = [
    ("a2", {"world": 2, "hp": HP_A}),
    ("b2", {"world": 2, "hp": HP_B}),
    ("resume2", {"world": 2, "hp": HP_A, "resume": True}),
    ("a3", {"world": 3, "hp": HP_A}),
    ("b3", {"world": 3, "hp": HP_B}),
    ("bf16_3", {"world": 3, "hp": {"lr": 0.05, "maximize": True}, "dtype": torch.bfloat16}),
    ("one", {"world": 1, "hp": HP_A}),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dmuon")
    out = str(tmp / "res")
    mp.spawn(_worker, args=(3, str(tmp / "store"), out, SCENARIOS), nprocs=3, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(3)]


def _replay(grads: list[dict], hp: dict, dtype) -> tuple[list[dict], dict, dict]:
    """Single-process Muon fed the recorded (averaged) gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = make_net(dtype)
        opt = make_opt(net, hp)
        params_t = []
        for g in grads:
            for k, p in net.named_parameters():
                p.grad = g[k].clone()
            opt.step()
            params_t.append({k: p.detach().clone() for k, p in net.named_parameters()})
        return params_t, _state(opt, net), opt.state_dict()
    finally:
        torch.set_num_threads(threads)


def _holders(ranks: list[dict], name: str) -> list[dict]:
    return [r[name] for r in ranks if name in r]


def _check_bit_identical(ranks: list[dict], name: str, world: int) -> None:
    results = _holders(ranks, name)
    assert len(results) == world
    kw = dict(SCENARIOS)[name]
    for res in results[1:]:  # DDP gave every rank the same averaged gradients
        for a, b in zip(res["grads"], results[0]["grads"]):
            assert all(torch.equal(a[k], b[k]) for k in a)
    params_t, state, sd = _replay(results[0]["grads"], kw["hp"], kw.get("dtype", torch.float32))
    assert not torch.equal(params_t[-1]["0.weight"], make_net(kw.get("dtype"))[0].weight)
    for res in results:
        for t in range(STEPS):
            for k, v in params_t[t].items():
                assert torch.equal(res["params"][t][k], v), (name, t, k)
        for k, s in state.items():
            assert s.keys() == res["state"][k].keys(), k
            for key, v in s.items():
                assert torch.equal(res["state"][k][key], v), (name, k, key)
        assert res["state_dict"]["basin_optimizer"] == sd["basin_optimizer"] == "Muon"
        for i, s in sd["state"].items():
            for key, v in s.items():
                assert torch.equal(res["state_dict"]["state"][i][key], v), (name, i, key)


@pytest.mark.parametrize("name", ["a2", "b2", "resume2"])
def test_bit_identical_to_single_process_muon_2_ranks(ranks, name):
    _check_bit_identical(ranks, name, 2)


@pytest.mark.parametrize("name", ["a3", "b3", "bf16_3"])
def test_bit_identical_to_single_process_muon_3_ranks(ranks, name):
    _check_bit_identical(ranks, name, 3)


def test_world_size_one_group_is_plain_muon(ranks):
    _check_bit_identical(ranks, "one", 1)
    res = ranks[2]["one"]
    assert res["owner"] == {}  # the local path: nothing shared
    assert all(len(c) == N_MATRICES for c in res["ns_calls"])


@pytest.mark.parametrize("name, world", [("a2", 2), ("b3", 3), ("bf16_3", 3)])
def test_each_rank_orthogonalizes_only_its_share(ranks, name, world):
    results = _holders(ranks, name)
    owner = results[0]["owner"]
    assert len(owner) == N_MATRICES and all(r["owner"] == owner for r in results)
    assert sorted(set(owner.values())) == list(range(world))  # every rank has work
    net = make_net()
    shape = {k: tuple(p.shape) for k, p in net.named_parameters()}
    for rank, res in enumerate(results):
        mine = [k for k, r in owner.items() if r == rank]
        for calls in res["ns_calls"]:
            assert len(calls) == len(mine)  # every step, only its own matrices
            # newton_schulz5 sees the (out, in) matrix; the Conv1D weight is stored (in, out)
            want = sorted(s[::-1] if k == "2.weight" else s for k, s in shape.items() if k in mine)
            assert sorted(calls) == want
    total = sum(len(r["ns_calls"][0]) for r in results)
    assert total == N_MATRICES


def test_equals_the_authors_distributed_muon_2_ranks(ranks):
    """muon-optimizer's distributed ``Muon`` (momentum on the owning rank, parameters
    all-gathered) and basin's (every momentum everywhere, updates all-gathered): the same
    parameters on both ranks, bit for bit, in bfloat16 Newton-Schulz."""
    for r in ranks[:2]:
        res = r["reference"]
        if "skip" in res:
            pytest.skip(res["skip"])
        for a, b, x0 in zip(res["ref"], res["ours"], res["init"]):
            assert not torch.equal(a, x0)
            assert torch.equal(a, b)


def test_assignment_balances_cost_deterministically():
    assert assign([1.0, 1.0, 1.0, 1.0], 2) == [0, 1, 0, 1]
    assert assign([10.0, 1.0, 1.0, 8.0], 2) == [0, 1, 1, 1]  # 10 | 8 + 1 + 1
    assert assign([5.0], 3) == [0]
    assert assign([], 2) == []


def test_without_a_process_group_distributed_is_plain_muon():
    import torch.distributed as dist

    assert not dist.is_initialized()
    runs = []
    for distributed in (False, True):
        net = make_net()
        opt = make_opt(net, HP_A, distributed=distributed)
        for t in range(4):
            opt.zero_grad()
            x, y = make_data(0, t, torch.float32)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        runs.append(net)
        assert opt.ns_owner == {}
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"distributed": "yes"}, "distributed"),
        ({"distributed": 1}, "distributed"),
        ({"process_group": object()}, "process_group is used only with distributed=True"),
        ({"distributed": True, "process_group": "world"}, "process_group must be a"),
    ],
)
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        make_opt(make_net(), {}, **kw)


def test_a_copy_stays_distributed_and_state_dicts_load_across_forms():
    import copy

    net = make_net()
    opt = make_opt(net, HP_A, distributed=True)
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert copy.deepcopy(opt).distributed is True
    plain = make_opt(net, HP_A)
    plain.load_state_dict(opt.state_dict())  # the same class: either form loads the other's
    assert plain.distributed is False


def test_registry_declares_distributed():
    assert "distributed" in info("muon").capabilities
