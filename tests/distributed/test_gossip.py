"""Gossip SGD with a single global merge on 4 real gloo ranks (tests/fed_spawn.py), against a float64 single-process
simulation of ``x_i <- local steps; X <- W X`` with the same optimizers and data."""

from __future__ import annotations

import pytest
import torch
from fed_spawn import ROUNDS, SCENARIOS, WORLD, custom_w, flat, local_steps, make_net
from torch import nn

from basin.distributed import TOPOLOGIES, Gossip, check_mixing_matrix, mixing_matrix


@pytest.fixture(scope="module")
def ranks(fed_ranks) -> list[dict]:
    return [r["gossip"] for r in fed_ranks]


def simulate(topo: str, opt_cls, kw, w: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every node in one process: local steps, then X <- W X on the stacked flat parameters."""
    w = mixing_matrix(topo, WORLD) if w is None else w
    nets = [make_net(i) for i in range(WORLD)]
    opts = [opt_cls(n.parameters(), **kw) for n in nets]
    traj = []
    for _ in range(ROUNDS):
        for i in range(WORLD):
            local_steps(nets[i], opts[i], i)
        x = w @ torch.stack([flat(n) for n in nets])
        for n, xi in zip(nets, x):
            torch.nn.utils.vector_to_parameters(xi.clone(), n.parameters())
        traj.append(x)
    return traj


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gossip_matches_single_process_simulation(ranks, name):
    topo, opt_cls, kw = SCENARIOS[name]
    w = custom_w() if topo == "custom" else None
    sim = simulate(topo, opt_cls, kw, w)
    for t in range(ROUNDS):
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r][name]["traj"][t], sim[t][r], rtol=1e-12, atol=1e-13)
    # not vacuous: without mixing (W = I) the nodes take other paths
    alone = simulate(topo, opt_cls, kw, torch.eye(WORLD, dtype=torch.float64))
    assert (alone[-1] - sim[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_single_merge_is_the_exact_mean(ranks, name):
    mean = torch.stack([r[name]["pre_merge"] for r in ranks]).mean(0)
    for r in ranks:
        torch.testing.assert_close(r[name]["merged"], mean, rtol=1e-14, atol=1e-15)
        assert torch.equal(r[name]["merged"], ranks[0][name]["merged"])  # identical everywhere
    spread = max((r[name]["pre_merge"] - mean).abs().max().item() for r in ranks)
    assert spread > 1e-4, "the nodes had not reached consensus: the merge did something"


def test_point_to_point_traffic_follows_the_topology(ranks):
    numel = ranks[0]["ring"]["pre_merge"].numel()
    for r, res in enumerate(ranks):
        assert sorted(res["ring"]["out_neighbours"]) == sorted({(r - 1) % 4, (r + 1) % 4})
        assert res["ring"]["bytes"] == ROUNDS * 2 * numel * 8
        assert sorted(res["exponential"]["out_neighbours"]) == sorted({(r - 1) % 4, (r - 2) % 4})


def test_bad_configuration_is_refused(ranks):
    assert "needs a process group of >= 2 ranks" in ranks[3]["errors"]["world1"]
    for r in ranks:
        assert "doubly stochastic" in r["errors"]["bad_w"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 9])
def test_mixing_matrices_are_doubly_stochastic(topology, n):
    w = mixing_matrix(topology, n)
    check_mixing_matrix(w, n, tol=1e-14)
    assert (w > 0).any(1).all()
    ev = torch.linalg.eigvals(w).abs().sort(descending=True).values
    assert ev[0] == pytest.approx(1.0) and ev[1] < 1 - 1e-6  # connected: it mixes


def test_mixing_matrix_shapes():
    ring = mixing_matrix("ring", 6)
    assert torch.allclose(ring[0], torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.float64) / 3)
    torus = mixing_matrix("torus", 9)  # 3 x 3 with wrap-around: degree 4, weights 1/5
    assert ((torus > 0).sum(1) == 5).all() and torch.allclose(
        torus[torus > 0], torch.tensor(0.2, dtype=torch.float64)
    )
    expo = mixing_matrix("exponential", 8)  # offsets 0, 1, 2, 4
    assert (expo[0] > 0).nonzero().flatten().tolist() == [0, 1, 2, 4]
    assert torch.equal(mixing_matrix("complete", 4), torch.full((4, 4), 0.25, dtype=torch.float64))


@pytest.mark.parametrize(
    "w, match",
    [
        (torch.tensor([[0.5, 0.5], [0.5, 0.6]]), "doubly stochastic"),
        (torch.tensor([[1.5, -0.5], [-0.5, 1.5]]), "non-negative"),
        (torch.ones(2, 3) / 3, "square"),
        (torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), "finite"),
    ],
)
def test_bad_mixing_matrix(w, match):
    with pytest.raises(ValueError, match=match):
        check_mixing_matrix(w)


def test_bad_topology():
    with pytest.raises(ValueError, match="topology must be one of"):
        mixing_matrix("star", 4)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        mixing_matrix("ring", 0)
    with pytest.raises(ValueError, match="needs an initialised"):
        Gossip(nn.Linear(2, 2))
