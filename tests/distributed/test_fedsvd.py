"""FedSVD's server step against a dense float64 numpy transcription of the paper's equations,
on tensors, on 4 real gloo ranks (tests/fed_spawn.py) and in an in-process federation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fed_spawn import FED_ROUNDS, WORLD, client_data, client_train, make_lora_net
from torch import nn

from basin.distributed import fedsvd_aggregate, fedsvd_round
from basin.train import LoRALinear


def reference(bs, a, weights):
    """B_bar = sum_k w_k B_k / sum_k w_k; B_bar A = U S V^T; A <- V_r^T, B <- U_r S_r."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    b_bar = sum(wk * np.asarray(b, dtype=np.float64) for wk, b in zip(w, bs))
    u, s, vt = np.linalg.svd(b_bar @ np.asarray(a, dtype=np.float64), full_matrices=False)
    r = a.shape[0]
    return vt[:r], u[:, :r] * s[:r], b_bar


def assert_matches_reference(a_new, b_new, bs, a, weights, tol=1e-10):
    a_ref, b_ref, b_bar = reference(bs, a, weights)
    a_new, b_new = a_new.numpy(), b_new.numpy()
    # singular vectors are defined up to sign: align each pair (A row k, B column k) once
    sign = np.sign(np.sum(a_new * a_ref, axis=1))
    np.testing.assert_allclose(a_new * sign[:, None], a_ref, rtol=0, atol=tol)
    np.testing.assert_allclose(b_new * sign[None, :], b_ref, rtol=0, atol=tol)
    # the product (the layer's update) is preserved and A has orthonormal rows
    np.testing.assert_allclose(b_new @ a_new, b_bar @ a.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(a_new @ a_new.T, np.eye(a_new.shape[0]), rtol=0, atol=1e-12)


def _random_layer(seed, clients=3, out=7, r=3, inp=9):
    gen = torch.Generator().manual_seed(seed)
    bs = [torch.randn(out, r, generator=gen, dtype=torch.float64) for _ in range(clients)]
    return bs, torch.randn(r, inp, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weights", [None, [1.0, 5.0, 2.0]])
def test_server_step_matches_dense_transcription(seed, weights):
    bs, a = _random_layer(seed)
    a_new, b_new = fedsvd_aggregate(bs, a, weights)
    assert_matches_reference(a_new, b_new, bs, a, weights or [1.0] * len(bs))
    # not vacuous: a plain average of B keeps A, which is not orthonormal
    assert (a @ a.T - torch.eye(3, dtype=torch.float64)).abs().max() > 0.1


def test_wide_rank_and_zero_b():
    bs, a = _random_layer(7, clients=2, out=4, r=4, inp=3)  # r > in: B A has rank <= 3
    a_new, b_new = fedsvd_aggregate(bs, a)
    torch.testing.assert_close(b_new @ a_new, (bs[0] + bs[1]) / 2 @ a, rtol=0, atol=1e-12)
    a_new, b_new = fedsvd_aggregate([torch.zeros(5, 2, dtype=torch.float64)], a[:2])
    assert torch.equal(b_new, torch.zeros_like(b_new))  # B A = 0 stays 0; A orthonormal anyway
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(2, dtype=torch.float64))


def test_distributed_round_matches_transcription(fed_ranks):
    res = [r["fedsvd"]["rounds"] for r in fed_ranks]
    for t in range(FED_ROUNDS):
        for layer in range(2):
            a = res[0][t]["before"][layer][0]
            assert all(torch.equal(r[t]["before"][layer][0], a) for r in res)  # A shared, frozen
            bs = [r[t]["before"][layer][1] for r in res]
            assert (bs[0] - bs[1]).abs().max() > 1e-6  # the clients did train different B
            a_new, b_new = res[0][t]["after"][layer]
            for r in res:  # every rank ends with the same factors
                assert torch.equal(r[t]["after"][layer][0], a_new)
                assert torch.equal(r[t]["after"][layer][1], b_new)
            assert_matches_reference(a_new, b_new, bs, a, [k + 1.0 for k in range(WORLD)])


def _loss(net, clients):
    xs, ys = zip(*(client_data(k) for k in range(clients)))
    with torch.no_grad():
        return nn.functional.mse_loss(net(torch.cat(xs)), torch.cat(ys)).item()


def test_simulated_federation_converges():
    clients = 5
    models = [make_lora_net() for _ in range(clients)]
    start = _loss(models[0], clients)
    for _ in range(25):
        for k, m in enumerate(models):
            client_train(m, k, steps=4)
        bs = [
            [m.lora_B.detach().clone() for m in c.modules() if isinstance(m, LoRALinear)]
            for c in models
        ]
        a0 = [m.lora_A.detach().clone() for m in models[0].modules() if isinstance(m, LoRALinear)]
        fedsvd_round(models)
        layers = [m for m in models[0].modules() if isinstance(m, LoRALinear)]
        for i, m in enumerate(layers):  # the in-process round is the server step
            a_new, b_new = fedsvd_aggregate([b[i] for b in bs], a0[i])
            assert torch.equal(m.lora_A, a_new) and torch.equal(m.lora_B, b_new)
    end = _loss(models[0], clients)
    assert end < 0.1 * start, (start, end)
    for c in models[1:]:
        for p, q in zip(c.parameters(), models[0].parameters()):
            assert torch.equal(p, q)


def test_bad_input():
    bs, a = _random_layer(0)
    with pytest.raises(ValueError, match="at least one client"):
        fedsvd_aggregate([], a)
    with pytest.raises(ValueError, match="each B must be"):
        fedsvd_aggregate([torch.zeros(7, 2, dtype=torch.float64)], a)
    with pytest.raises(ValueError, match="weights must be 3"):
        fedsvd_aggregate(bs, a, [1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be 3"):
        fedsvd_aggregate(bs, a, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="no basin.train.LoRALinear"):
        fedsvd_round([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="needs an initialised process group"):
        fedsvd_round(make_lora_net())
    m1, m2 = make_lora_net(0), make_lora_net(1)
    with pytest.raises(ValueError, match="share the same"):
        fedsvd_round([m1, m2])
    with pytest.raises(ValueError, match="weights must be 2"):
        fedsvd_round([m1, copy.deepcopy(m1)], weight=[1.0])
