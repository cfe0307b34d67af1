"""Curvature-vector products against dense autograd Hessians and an explicit J^T H J."""

from __future__ import annotations

import pytest
import torch
from landscape_helpers import dense_hessian, explicit_ggn
from torch import nn

from basin.landscape import (
    CurvatureOperator,
    ggn_vector_product,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)


def _snapshot(model):
    return (
        model.training,
        [m.training for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model, snap):
    training, modes, state = snap
    assert model.training == training
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_hvp_equals_dense_hessian(mlp_setup):
    model, loss_fn, data, h, _, _ = mlp_setup
    g = torch.Generator().manual_seed(0)
    v = torch.randn(h.shape[0], generator=g, dtype=torch.float64)
    hv = hessian_vector_product(model, loss_fn, data, v)
    torch.testing.assert_close(hv, h @ v, rtol=1e-10, atol=1e-12)
    # list form in, list form out
    parts = list(v.split([p.numel() for p in model.parameters()]))
    parts = [t.view(p.shape) for t, p in zip(parts, model.parameters())]
    out = hessian_vector_product(model, loss_fn, data, parts)
    torch.testing.assert_close(
        torch.cat([o.reshape(-1) for o in out]), h @ v, rtol=1e-10, atol=1e-12
    )


def test_hvp_over_batches_is_size_weighted_average(mlp_setup):
    model, loss_fn, (x, y), h, _, _ = mlp_setup
    batches = [(x[:100], y[:100]), (x[100:130], y[100:130]), (x[130:], y[130:])]
    v = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for cache in (64, 0):  # cached graphs and rebuilt-per-product graphs
        op = CurvatureOperator(model, loss_fn, iter(batches), cache_batches=cache)
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matvec(2 * v), 2 * (h @ v), rtol=1e-10, atol=1e-12)
        assert op.n_products == 2


def test_hvp_batchnorm_train_and_eval_mode_and_model_untouched(bn_setup):
    model, loss_fn, (x, y), h, _, _ = bn_setup
    v = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    snap = _snapshot(model)
    torch.testing.assert_close(hessian_vector_product(model, loss_fn, (x, y), v), h @ v)
    _assert_unchanged(model, snap)
    model.eval()
    try:
        h_eval = dense_hessian(model, loss_fn, x, y)
        assert not torch.allclose(h_eval, h)  # the modes really differ
        snap = _snapshot(model)
        torch.testing.assert_close(hessian_vector_product(model, loss_fn, (x, y), v), h_eval @ v)
        hessian_eigenvalues(model, loss_fn, (x, y), k=2, which="both")
        hessian_trace(model, loss_fn, (x, y), n_hvp=9)
        hessian_density(model, loss_fn, (x, y), n_probes=1, n_iter=10)
        _assert_unchanged(model, snap)
    finally:
        model.train()


def test_parameter_subset_is_the_dense_block(mlp_setup):
    model, loss_fn, data, h, _, _ = mlp_setup
    names = ["2.weight", "2.bias"]
    start = 40 * 32 + 32
    block = h[start:, start:]
    v = torch.randn(block.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        hessian_vector_product(model, loss_fn, data, v, params="2"), block @ v
    )
    op = CurvatureOperator(model, loss_fn, data, params=names)
    assert op.names == names and op.n == 330
    res = hessian_eigenvalues(model, loss_fn, data, k=3, params="2", tol=1e-10)
    want = torch.linalg.eigvalsh(block)[-3:].flip(0)
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-8, atol=0)


def test_ggn_equals_explicit_jt_h_j():
    torch.manual_seed(4)
    x = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    loss_fn = nn.functional.cross_entropy
    ggn = explicit_ggn(model, loss_fn, x, y)
    h = dense_hessian(model, loss_fn, x, y)
    assert not torch.allclose(ggn, h, atol=1e-6)  # a network where GGN != Hessian
    v = torch.randn(ggn.shape[0], dtype=torch.float64)
    torch.testing.assert_close(ggn_vector_product(model, loss_fn, (x, y), v), ggn @ v)
    # over two batches: the size-weighted average of the per-batch GGNs
    g1, g2 = (
        explicit_ggn(model, loss_fn, x[:15], y[:15]),
        explicit_ggn(model, loss_fn, x[15:], y[15:]),
    )
    op = CurvatureOperator(model, loss_fn, [(x[:15], y[:15]), (x[15:], y[15:])], kind="ggn")
    torch.testing.assert_close(op.matvec(v), (15 * g1 + 5 * g2) @ v / 20)
    # the GGN is PSD for a convex loss: its bottom eigenvalue is >= 0 (to rounding)
    res = hessian_eigenvalues(model, loss_fn, (x, y), k=1, which="both", kind="ggn", tol=1e-10)
    ev = torch.linalg.eigvalsh(ggn)
    torch.testing.assert_close(res.eigenvalues, torch.stack([ev[-1], ev[0]]), rtol=1e-6, atol=1e-10)


def test_ggn_mse_output_hessian():
    # MSE: H_L = (2/(N*C)) I, so G = (2/(N*C)) J^T J
    torch.manual_seed(5)
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    ggn = explicit_ggn(model, nn.functional.mse_loss, x, y)
    v = torch.randn(ggn.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        ggn_vector_product(model, nn.functional.mse_loss, (x, y), v), ggn @ v
    )


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_value_errors(mlp_setup):
    model, loss_fn, (x, y), _, _, _ = mlp_setup
    n = sum(p.numel() for p in model.parameters())
    v = torch.zeros(n, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty"):
        hessian_vector_product(model, loss_fn, [], v)
    with pytest.raises(ValueError, match="targets"):
        hessian_vector_product(model, loss_fn, (x, y[:10]), v)
    with pytest.raises(ValueError, match="does not fit the model"):
        hessian_vector_product(model, loss_fn, (x[:, :30], y), v)
    with pytest.raises(ValueError, match="names no parameter"):
        hessian_vector_product(model, loss_fn, (x, y), v, params="nosuchlayer")
    with pytest.raises(ValueError, match="scalar"):
        hessian_vector_product(
            model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), (x, y), v
        )
    with pytest.raises(ValueError, match="entries"):
        hessian_vector_product(model, loss_fn, (x, y), v[:-1])
    with pytest.raises(ValueError, match="k=2000"):
        hessian_eigenvalues(model, loss_fn, (x, y), k=2000)
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(model, loss_fn, (x, y), k=0)
    with pytest.raises(ValueError, match="which"):
        hessian_eigenvalues(model, loss_fn, (x, y), which="largest")
    with pytest.raises(ValueError, match="n_hvp"):
        hessian_trace(model, loss_fn, (x, y), n_hvp=2)
    with pytest.raises(ValueError, match="scalar"):
        hessian_trace(model, lambda o, t: o.sum(1), (x, y), n_hvp=6)
