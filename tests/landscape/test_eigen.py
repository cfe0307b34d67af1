"""Lanczos eigenpairs against dense eigendecompositions; the reported bounds must bound the
true errors."""

from __future__ import annotations

import numpy as np
import torch
from landscape_helpers import Quadratic, quad_loss

from basin.landscape import CurvatureOperator, hessian_eigenvalues


def _check_against_dense(res, h, evals, k):
    want = torch.cat([evals[-k:].flip(0), evals[:k].flip(0)])
    rel = (res.eigenvalues - want).abs() / want.abs()
    assert rel.max() <= 1e-6, rel
    # the reported error bounds bound the true error ...
    err = (res.eigenvalues - want).abs()
    assert torch.all(err <= res.error_bounds + 1e-15), (err, res.error_bounds)
    # ... and the residual norms are the true ||H y - lambda y|| (up to their rounding floor)
    for i in range(2 * k):
        y = res.eigenvectors[i]
        assert abs(float(y.norm()) - 1) < 1e-10
        true_r = float((h @ y - res.eigenvalues[i] * y).norm())
        assert true_r <= res.residuals[i] * (1 + 1e-6) + 1e-13
        assert res.residuals[i] <= max(2 * true_r, 1e-10)
    assert bool(res.converged.all())
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])  # descending


def test_mlp_top5_bottom5_match_dense(mlp_setup):
    model, loss_fn, data, h, evals, evecs = mlp_setup
    assert evals[0] < 0  # the MLP has negative curvature to find
    res = hessian_eigenvalues(model, loss_fn, data, k=5, which="both", tol=1e-10)
    _check_against_dense(res, h, evals, 5)
    # eigenvectors match (up to sign) where the eigenvalue is well separated
    top = evecs[:, -1]
    assert abs(float(res.eigenvectors[0] @ top)) > 1 - 1e-8
    assert res.n_hvp == res.n_iter < 400
    # top only: fewer products, same values
    top5 = hessian_eigenvalues(model, loss_fn, data, k=5, which="top", tol=1e-10)
    torch.testing.assert_close(top5.eigenvalues, evals[-5:].flip(0), rtol=1e-6, atol=0)
    bottom = hessian_eigenvalues(model, loss_fn, data, k=5, which="bottom", tol=1e-10)
    torch.testing.assert_close(bottom.eigenvalues, evals[:5].flip(0), rtol=1e-6, atol=0)


def test_batchnorm_network_top5_bottom5(bn_setup):
    model, loss_fn, data, h, evals, _ = bn_setup
    res = hessian_eigenvalues(model, loss_fn, data, k=5, which="both", tol=1e-10)
    _check_against_dense(res, h, evals, 5)


def test_quadratic_with_known_spectrum():
    eigs = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0, 7.0, 5.0]),
            torch.linspace(-0.5, 1.0, 195),
            torch.tensor([-3.0, -2.0]),
        ]
    ).double()
    model = Quadratic(eigs)
    x = torch.zeros(1, 1, dtype=torch.float64)
    res = hessian_eigenvalues(model, quad_loss, (x, x), k=5, which="both", tol=1e-12)
    s = eigs.sort(descending=True).values
    want = torch.cat([s[:5], s[-5:]])
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-9, atol=1e-12)
    # outliers separated from the bulk: Lanczos needs few products for the top five
    top = hessian_eigenvalues(model, quad_loss, (x, x), k=5, tol=1e-8)
    assert top.n_hvp <= 40
    torch.testing.assert_close(top.eigenvalues, s[:5], rtol=1e-7, atol=0)


def test_bounds_are_honest_before_convergence(mlp_setup):
    """With a step budget far too small, values are off, but each Ritz value still has a true
    eigenvalue within its residual bound, and the values are flagged unconverged."""
    model, loss_fn, data, h, evals, _ = mlp_setup
    res = hessian_eigenvalues(model, loss_fn, data, k=5, which="both", max_iter=12)
    assert res.n_hvp == 12
    assert not bool(res.converged.all())
    ev = evals.numpy()
    for lam, r in zip(res.eigenvalues.numpy(), res.residuals.numpy()):
        assert np.min(np.abs(ev - lam)) <= r
    # the top Ritz value never overshoots (interlacing) and its bound covers the gap to the top
    assert res.eigenvalues[0] <= evals[-1] + 1e-12


def test_low_rank_hessian_restarts_after_breakdown():
    """A rank-3 Hessian makes the Krylov space invariant after 4 steps; the restart must still
    deliver the repeated zero eigenvalue and the negative one."""
    eigs = torch.zeros(30, dtype=torch.float64)
    eigs[:3] = torch.tensor([4.0, 2.0, -1.0])
    model = Quadratic(eigs, seed=3)
    x = torch.zeros(1, 1, dtype=torch.float64)
    res = hessian_eigenvalues(model, quad_loss, (x, x), k=4, which="both", tol=1e-10)
    torch.testing.assert_close(
        res.eigenvalues,
        torch.tensor([4.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], dtype=torch.float64),
        atol=1e-10,
        rtol=0,
    )


def test_operator_reuse_and_warm_start(mlp_setup):
    model, loss_fn, data, _, evals, evecs = mlp_setup
    op = CurvatureOperator(model, loss_fn, data)
    cold = hessian_eigenvalues(op, k=1, tol=1e-8)
    warm = hessian_eigenvalues(
        op, k=1, tol=1e-8, init=evecs[:, -1] + 1e-3 * torch.randn(len(evals), dtype=torch.float64)
    )
    assert warm.n_hvp < cold.n_hvp
    torch.testing.assert_close(warm.eigenvalues[0], evals[-1], rtol=1e-7, atol=0)
    assert op.n_products == cold.n_hvp + warm.n_hvp
