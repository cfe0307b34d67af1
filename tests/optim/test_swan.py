"""SWAN beyond the generic table: the coupled Newton-Schulz whitening against an exact
eigendecomposition, the GradNorm invariances, statelessness, parameter groups and the
rank-deficient layers of the default test MLP."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from optim_db import mlp
from references.swan_paper import exact_whitening, grad_norm
from torch import nn

import basin.optim as bo
from basin.optim._kernels import whiten_newton_schulz
from basin.optim.swan import _swan_direction


def _conditioned(m: int, n: int, cond: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=torch.float64)
    return 3.0 * U @ torch.diag(s) @ V.T


@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (16, 16)], ids=str)
def test_whitening_converges_to_the_exact_inverse_square_root(shape) -> None:
    """Singular values spanning 1:100 (normalised Gram eigenvalues down to ~1e-5 of the
    largest): 25 coupled iterations reach float64 rounding (an eigenvalue l grows ~2.25x per
    step until ~1, then converges quadratically: ~14 + 5 steps here), so 1e-12 is tight; too
    few steps are visibly wrong."""
    G = _conditioned(*shape, cond=100.0, seed=sum(shape))
    exact = exact_whitening(G)
    torch.testing.assert_close(whiten_newton_schulz(G, 25), exact, rtol=0, atol=1e-12)
    assert (whiten_newton_schulz(G, 5) - exact).abs().max() > 1e-2
    # the whitened matrix is the polar factor: orthonormal rows (wide) or columns (tall)
    W = whiten_newton_schulz(G, 25)
    small = W @ W.T if shape[0] <= shape[1] else W.T @ W
    torch.testing.assert_close(
        small, torch.eye(min(shape), dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_whitening_is_scale_invariant_and_batched() -> None:
    G = torch.stack([_conditioned(6, 10, 10.0, s) for s in range(3)])
    W = whiten_newton_schulz(G, 20)
    for i in range(3):
        torch.testing.assert_close(W[i], exact_whitening(G[i]), rtol=0, atol=1e-12)
    torch.testing.assert_close(whiten_newton_schulz(1e-3 * G, 20), W, rtol=0, atol=1e-12)


def test_grad_norm_invariances() -> None:
    """Row standardisation removes per-row offsets and positive per-row scales, so the SWAN
    direction of ``D G + c 1^T`` equals that of ``G`` (D diagonal positive)."""
    G = _conditioned(5, 12, 10.0, 0)
    gen = torch.Generator().manual_seed(1)
    D = torch.rand(5, 1, dtype=torch.float64, generator=gen) + 0.5
    c = torch.randn(5, 1, dtype=torch.float64, generator=gen)
    a = _swan_direction(G, 30, 0.0, True)
    b = _swan_direction(D * G + c, 30, 0.0, True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # and it matches the transcription's GradNorm -> exact whitening -> rescaling
    gt = grad_norm(G, 0.0)
    w = exact_whitening(gt)
    torch.testing.assert_close(a, w * gt.norm() / w.norm(), rtol=0, atol=1e-11)


def test_stateless_for_matrices() -> None:
    model = mlp()
    opt = bo.SWAN(bo.matrix_param_groups(model, head=None))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p in model.parameters():
        if p.ndim >= 2:
            assert len(opt.state[p]) == 0
        else:
            assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert bo.info("swan").state_memory == 0.0


def test_trains_the_default_mlp_with_rank_deficient_layers() -> None:
    """8-16-16-4: row centering makes the square and tall gradients rank-deficient; with the
    default 10 iterations the run stays finite and learns (float32)."""
    torch.manual_seed(0)
    model = mlp()
    opt = bo.SWAN(model.parameters(), adamw_fallback=True, lr=0.01, adamw_lr=0.01)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=gen)
    y = (x @ torch.randn(8, 4, generator=gen)).argmax(1)
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * first


def test_non_matrix_parameter_without_fallback_raises() -> None:
    with pytest.raises(ValueError, match=r"'bias'.*matrix_rule=False.*matrix_param_groups"):
        bo.SWAN(nn.Linear(3, 3).named_parameters())
    groups = bo.matrix_param_groups(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    assert [g["matrix_rule"] for g in groups] == [True, False]
    opt = bo.SWAN(groups, adamw_lr=2e-3)
    assert opt.param_groups[1]["lr"] == 2e-3 and opt.param_groups[1]["betas"] == (0.9, 0.999)


def test_conv_kernels_are_flattened() -> None:
    w = nn.Parameter(torch.randn(4, 2, 3, 3, dtype=torch.float64))
    g = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    w0 = w.detach().clone()
    w.grad = g
    bo.SWAN([w], lr=0.1, ns_steps=30, eps=0.0).step()
    gt = grad_norm(g.reshape(4, 18), 0.0)
    white = exact_whitening(gt)
    expected = w0 - 0.1 * (white * gt.norm() / white.norm()).reshape(4, 2, 3, 3)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


def _b8_newton_schulz(G: torch.Tensor, steps: int, beta: float) -> torch.Tensor:
    """Gong, Scetbon, Ma & Meeds (arXiv:2502.07752) App. B.8, written out for a wide G:
    Y_0 = A / ||A||_F with A = G G^T, Z_0 = I, then the coupled updates with step ``beta``;
    Z -> (A / ||A||_F)^(-1/2), so the whitening is Z G / ||A||_F^(1/2)."""
    A = G @ G.T
    c = torch.linalg.matrix_norm(A)
    Y, Z = A / c, torch.eye(G.shape[0], dtype=G.dtype)
    for _ in range(steps):
        T = 3 * torch.eye(G.shape[0], dtype=G.dtype) - Z @ Y
        Y, Z = beta * Y @ T, beta * T @ Z
    return Z @ G / c.sqrt()


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_whitening_follows_the_authors_frobenius_normalised_iteration(steps) -> None:
    """Before convergence the iterate depends on how the Gram matrix is normalised; ours is the
    Frobenius normalisation of the SWAN authors' App. B.8 (a trace normalisation would differ
    here by far more than 1e-12)."""
    G = _conditioned(6, 15, 30.0, 3)
    for beta in (0.5, 0.6):
        torch.testing.assert_close(
            whiten_newton_schulz(G, steps, beta=beta),
            _b8_newton_schulz(G, steps, beta),
            rtol=0,
            atol=1e-12,
        )


def test_ns_beta_converges_to_a_multiple_of_the_whitening() -> None:
    """For 1/3 < beta < 2/3 the coupled iteration converges (linearly, rate |3 - 6 beta|) to
    sqrt(3 - 1/beta) times the whitening; the rescaling removes the factor, so SWAN's direction
    is the same as at beta = 1/2. beta = 0.8 (a value ports attribute to the paper) stays
    bounded but does not converge: an approximate whitening with unequal singular values."""
    G = _conditioned(8, 20, 10.0, 5)
    exact = exact_whitening(G)
    W = whiten_newton_schulz(G, 80, beta=0.6)
    torch.testing.assert_close(W, (3 - 1 / 0.6) ** 0.5 * exact, rtol=0, atol=1e-11)
    a = _swan_direction(G, 40, 0.0, True, 0.5)
    b = _swan_direction(G, 80, 0.0, True, 0.6)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    sv = torch.linalg.svdvals(whiten_newton_schulz(G, 10, beta=0.8))
    assert torch.isfinite(sv).all() and sv.max() < 3**0.5
    assert 1.05 < sv.max() / sv.min() < 2.0  # not a whitening, but a rough one
    with pytest.raises(ValueError, match="ns_beta"):
        bo.SWAN([nn.Parameter(torch.zeros(2, 2))], ns_beta=0.3)
    with pytest.raises(ValueError, match="ns_beta"):
        bo.SWAN([nn.Parameter(torch.zeros(2, 2))], ns_beta=0.9)


def test_rescale_equals_the_sqrt_mn_form() -> None:
    """Ports write the rescaling as ||G~||_F / ||W||_F or as sqrt(m n) / ||W||_F: the same map,
    since each standardised row has squared norm n. With eps > 0 a constant row standardises
    to 0 and the two part (we keep ||G~||_F; documented)."""
    G = _conditioned(7, 13, 10.0, 2) + 0.3
    gt = grad_norm(G, 0.0)
    torch.testing.assert_close(gt.norm() ** 2, torch.tensor(7.0 * 13, dtype=G.dtype))
    w = exact_whitening(gt)
    direction = _swan_direction(G, 40, 0.0, True)
    torch.testing.assert_close(direction, (7 * 13) ** 0.5 * w / w.norm(), rtol=0, atol=1e-11)
    G[2] = 1.5  # a constant row: GradNorm gives 0 there with eps > 0
    assert grad_norm(G, 1e-8).norm() ** 2 < 6.0 * 13 + 1e-6


def test_deprecated_adam_spellings_warn_and_mean_the_adamw_options() -> None:
    """``adam_*`` (before 0.2) still work, warn, and give the same optimizer as ``adamw_*``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    x = torch.randn(16, 6)
    new = dict(adamw_fallback=True, adamw_lr=3e-3, adamw_betas=(0.8, 0.99), adamw_eps=1e-6,
               adamw_weight_decay=0.05)  # fmt: skip
    old = {k.replace("adamw_", "adam_"): v for k, v in new.items()}
    results = []
    for hp in (new, old):
        model = copy.deepcopy(net)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = bo.SWAN(model.parameters(), lr=0.01, **hp)
        names = {str(w.message).split()[1] for w in caught if w.category is DeprecationWarning}
        assert names == ({k for k in old} if hp is old else set())
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not opt.param_groups[1]["matrix_rule"] and opt.param_groups[1]["lr"] == 3e-3
