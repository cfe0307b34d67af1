"""Random forwards (Dropout in train mode), forwards under autocast, half-precision models and
non-finite inputs: every curvature function gives the same answer for the same seed, leaves
the global RNG alone, computes in the parameters' dtype, and raises on NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from landscape_helpers import dense_hessian, explicit_ggn
from torch import nn

from basin.landscape import (
    CurvatureOperator,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
)

CE = nn.functional.cross_entropy


def _data(dtype=torch.float64, n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _dropout_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
    return m.train()


def _masked_dense_hessian(model, x, y, seed):
    """Dense Hessian with the forward's masks drawn from ``seed`` (the operator's documented
    seeding of batch 0), independent of basin's product code."""

    def loss(out, t):
        return CE(out, t)

    class Seeded(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inp):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.inner(inp)

    return dense_hessian(Seeded(model), loss, x, y)


def test_dropout_same_seed_same_answer_bound_holds_rng_untouched():
    model = _dropout_mlp()
    x, y = _data()
    rng = torch.get_rng_state()
    a = hessian_eigenvalues(model, CE, (x, y), k=2, tol=1e-10, seed=0)
    b = hessian_eigenvalues(model, CE, (x, y), k=2, tol=1e-10, seed=0)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    t1 = hessian_trace(model, CE, (x, y), n_hvp=30, seed=4)
    t2 = hessian_trace(model, CE, (x, y), n_hvp=30, seed=4)
    assert t1.trace == t2.trace and t1.stderr == t2.stderr
    d1 = hessian_density(model, CE, (x, y), n_probes=2, n_iter=20, seed=1)
    d2 = hessian_density(model, CE, (x, y), n_probes=2, n_iter=20, seed=1)
    np.testing.assert_array_equal(d1.density, d2.density)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG did not advance
    assert model.training
    # the reported bounds hold for the operator with that draw of masks
    from basin.landscape._hvp import batch_seed

    h = _masked_dense_hessian(model, x, y, batch_seed(0, 0))
    true = torch.linalg.eigvalsh(h).flip(0)[:2]
    err = (a.eigenvalues - true).abs()
    assert bool((err <= a.error_bounds + 1e-12).all()), (a.eigenvalues, true, a.error_bounds)
    # other masks give another (honestly different) operator
    c = hessian_eigenvalues(model, CE, (x, y), k=1, tol=1e-10, seed=1)
    assert abs(float(c.eigenvalues[0] - a.eigenvalues[0])) > 1e-3


def test_dropout_operator_is_one_matrix_with_or_without_cached_graphs():
    # without the graph cache every product rebuilds the forward: the masks must not change
    model = _dropout_mlp()
    x, y = _data()
    cached = CurvatureOperator(model, CE, (x, y))
    rebuilt = CurvatureOperator(model, CE, (x, y), cache_batches=0)
    v = torch.randn(cached.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rebuilt.matvec(v), cached.matvec(v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rebuilt.matvec(v), rebuilt.matvec(v), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Dropout"):
        hessian_trace(model, CE, (x, y), method="gn-split")
    with pytest.raises(ValueError, match="seed"):
        CurvatureOperator(model, CE, (x, y), seed=0.5)


def test_forward_patched_with_autocast_runs_in_parameter_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = _data(torch.float32)
    want = hessian_eigenvalues(model, CE, (x, y), tol=1e-6)
    want_tr = hessian_trace(model, CE, (x, y), n_hvp=30, seed=0)
    # what a bf16 training framework may leave behind
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    assert model(x).dtype == torch.bfloat16
    got = hessian_eigenvalues(model, CE, (x, y), tol=1e-6)
    got_tr = hessian_trace(model, CE, (x, y), n_hvp=30, seed=0)
    rel = abs(float(got.eigenvalues[0] / want.eigenvalues[0]) - 1)
    assert rel <= 1e-6, rel  # bf16 products were 1e-3 off
    assert abs(float(got.eigenvalues[0] - want.eigenvalues[0])) <= float(
        got.error_bounds[0] + want.error_bounds[0]
    ) + 1e-6 * float(want.eigenvalues[0])
    assert got_tr.trace == pytest.approx(want_tr.trace, rel=1e-5)
    # autocast entered by the caller is switched off as well
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = hessian_eigenvalues(model, CE, (x, y), tol=1e-6)
    assert abs(float(inside.eigenvalues[0] / want.eigenvalues[0]) - 1) <= 1e-6
    assert model(x).dtype == torch.bfloat16  # the model's own forward is left as it was


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trace_against_dense_float64(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    x, y = _data(dtype)
    ref = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    true = float(dense_hessian(ref, CE, x.double(), y).trace())
    ggn = float(explicit_ggn(ref, CE, x.double(), y).trace())
    for method in ("hutch++", "hutchinson", "gn-split"):
        for seed in range(3):
            r = hessian_trace(model, CE, (x, y), n_hvp=60, method=method, seed=seed)
            assert abs(r.trace - true) <= 4 * r.stderr, (method, seed, r.trace, true, r.stderr)
            assert r.stderr < 0.25 * abs(true)
    # the exact Gauss-Newton trace: rounding of the half-precision forward only (measured
    # 6e-6 bf16, 3e-5 fp16; eps is 8e-3 and 1e-3)
    r = hessian_trace(model, CE, (x, y), method="gn-split", kind="ggn")
    assert r.trace == pytest.approx(ggn, rel=1e-3)


def test_nan_inputs_raise_in_every_curvature_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = _data()
    x[3, 2] = float("nan")
    calls = [
        lambda: hessian_eigenvalues(model, CE, (x, y)),
        lambda: hessian_density(model, CE, (x, y), n_probes=1, n_iter=5),
        lambda: hessian_trace(model, CE, (x, y), n_hvp=6),
        lambda: hessian_trace(model, CE, (x, y), n_hvp=6, method="hutchinson"),
        lambda: hessian_trace(model, CE, (x, y), n_hvp=6, method="gn-split"),
        lambda: hessian_trace(model, CE, (x, y), method="gn-split", kind="ggn"),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(ValueError, match="non-finite"):
            call()
            pytest.fail(f"call {i} returned")
