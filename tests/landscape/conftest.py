"""Fixtures for the landscape tests: small float64 networks and their dense Hessians (see
landscape_helpers.py)."""

from __future__ import annotations

import pytest
import torch
from landscape_helpers import dense_hessian, mnist1d_tensors
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # the test machine is small and shared: one intra-op thread is much faster than oversubscribed
    # OpenMP threads (measured 0.6 s vs 37 s for the BatchNorm dense Hessian under load)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def mlp_setup(_one_thread):
    """40-32-10 tanh MLP (1,642 parameters) on 256 MNIST-1D examples, float64, its dense
    Hessian and eigendecomposition."""
    torch.manual_seed(0)
    x, y = mnist1d_tensors(256)
    model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    loss_fn = nn.functional.cross_entropy
    h = dense_hessian(model, loss_fn, x, y)
    evals, evecs = torch.linalg.eigh(h)
    return model, loss_fn, (x, y), h, evals, evecs


@pytest.fixture(scope="session")
def bn_setup(_one_thread):
    """Linear-BatchNorm-Tanh-Linear network (325 parameters), train mode, float64, and its dense
    Hessian (batch statistics are part of the function in train mode)."""
    torch.manual_seed(1)
    x = torch.randn(64, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (64,))
    model = nn.Sequential(
        nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 5)
    ).double()
    model.train()
    loss_fn = nn.functional.cross_entropy
    h = dense_hessian(model, loss_fn, x, y)
    evals, evecs = torch.linalg.eigh(h)
    return model, loss_fn, (x, y), h, evals, evecs
