"""MoNNA against byzfl 0.0.11's ``MoNNA`` (imported without its torchvision dependency) and in a
simulated federation with Byzantine clients."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from basin.distributed import monna


@functools.cache
def _byzfl_monna():
    """byzfl's package ``__init__`` imports torchvision (not installed here): load
    ``byzfl.aggregators`` under a stub parent package instead."""
    if "byzfl" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None:
            pytest.skip("byzfl is not installed")
        stub = types.ModuleType("byzfl")
        stub.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["byzfl"] = stub
    return importlib.import_module("byzfl.aggregators").MoNNA


def _inputs(seed, n, f, d=20):
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(n - f, d, generator=gen, dtype=torch.float64)
    byz = 8 + 3 * torch.randn(f, d, generator=gen, dtype=torch.float64)
    x = torch.cat([honest, byz])
    return x[torch.randperm(n, generator=gen)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n, f", [(5, 2), (9, 4), (10, 3), (7, 0)])
def test_matches_byzfl(seed, n, f):
    """byzfl casts torch input to float32; its numpy path stays in float64."""
    ref_cls = _byzfl_monna()
    x = _inputs(seed, n, f)
    for idx in range(n):
        ours = monna(x, f, idx)
        ref = torch.from_numpy(ref_cls(f=f, idx=idx)(x.numpy()))  # numpy keeps float64
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    # a list of tensors works the same way
    ref = torch.from_numpy(ref_cls(f=f, idx=1)(list(x.numpy())))
    torch.testing.assert_close(monna(list(x), f, 1), ref, rtol=0, atol=1e-12)


def test_matrix_vectors_and_trusted_vector_inside():
    x = _inputs(0, 7, 3).view(7, 4, 5)
    out = monna(x, 3, 2)
    assert out.shape == (4, 5)
    dist = (x.reshape(7, -1) - x[2].reshape(-1)).norm(dim=1)
    keep = dist.argsort()[:4]
    assert 2 in keep.tolist()
    torch.testing.assert_close(out, x[keep].mean(0), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 2, 0), r"2 f < n"),
        ((3, 2, 0), r"2 f < n"),
        ((5, -1, 0), "f must be an integer >= 0"),
        ((5, 1, 5), r"idx must be in \[0, 4\]"),
        ((5, 1, -1), "idx must be an integer >= 0"),
        ((5, 1.0, 0), "f must be an integer"),
    ],
)
def test_bad_arguments(args, match):
    n, f, idx = args
    with pytest.raises(ValueError, match=match):
        monna(torch.zeros(n, 3), f, idx)


def _federation(aggregate, steps=60, n=9, f=3, seed=0):
    """Least squares over n clients (client 0 trusted); f clients send garbage gradients."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(6, generator=gen, dtype=torch.float64)
    data = []
    for _ in range(n - f):
        x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
        data.append((x, x @ w_true + 0.01 * torch.randn(32, generator=gen, dtype=torch.float64)))
    w = torch.zeros(6, dtype=torch.float64)
    for _ in range(steps):
        honest = [2 * x.T @ (x @ w - y) / len(y) for x, y in data]
        garbage = [100 * torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(f)]
        w = w - 0.1 * aggregate(torch.stack(honest + garbage))
    return (w - w_true).norm().item()


def test_training_survives_byzantine_clients_where_the_mean_fails():
    assert _federation(lambda g: monna(g, 3, 0)) < 1e-2
    assert _federation(lambda g: g.mean(0)) > 1.0
