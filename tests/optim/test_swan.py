"""SWAN beyond the generic table: the coupled Newton-Schulz whitening against an exact
eigendecomposition, the GradNorm invariances, statelessness, parameter groups and the
rank-deficient layers of the default test MLP."""

from __future__ import annotations

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
    opt = bo.SWAN(model.parameters(), adam_fallback=True, lr=0.01, adam_lr=0.01)
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
    opt = bo.SWAN(groups, adam_lr=2e-3)
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
