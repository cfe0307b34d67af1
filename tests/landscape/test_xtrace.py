"""XTrace / XNysTrace (arXiv:2301.07825): the downdated estimates against a direct float64
transcription of the leave-one-out definitions (one QR / one Nystrom solve per left-out vector,
same test vectors), exactness on low-rank matrices, the calibration of the error estimate in a
simulation, and ``hessian_trace``'s ``"xtrace"``, ``"xnystrace"``, ``"gn-xtrace"`` and
``"auto"`` against the dense Hessian / Gauss-Newton matrix of a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from landscape_helpers import dense_hessian, explicit_ggn
from torch import nn

from basin.landscape import hessian_trace
from basin.landscape.xtrace import xnystrace, xnystrace_from, xtrace, xtrace_from

F64 = torch.float64


def ref_xtrace(A, Om):
    """Definition: t_i = tr(Q_i^T A Q_i) + (n - s + 1) u^T A u / |u|^2, Q_i = orth(A Om_{-i}),
    u = (I - Q_i Q_i^T) omega_i."""
    n, s = Om.shape
    out = []
    for i in range(s):
        keep = [j for j in range(s) if j != i]
        qi, _ = torch.linalg.qr(A @ Om[:, keep])
        u = Om[:, i] - qi @ (qi.T @ Om[:, i])
        out.append(torch.trace(qi.T @ A @ qi) + (n - s + 1) * (u @ A @ u) / (u @ u))
    return torch.stack(out)


def ref_xnystrace(A, Om):
    """Definition: t_i = tr(A<Om_{-i}>) + omega_i^T (A - A<Om_{-i}>) omega_i, with the Nystrom
    approximation A<X> = (A X) (X^T A X)^{-1} (A X)^T."""
    s = Om.shape[1]
    out = []
    for i in range(s):
        keep = [j for j in range(s) if j != i]
        y = A @ Om[:, keep]
        nys = y @ torch.linalg.solve(Om[:, keep].T @ y, y.T)
        w = Om[:, i]
        out.append(torch.trace(nys) + w @ (A - nys) @ w)
    return torch.stack(out)


def _sym(n, seed, psd=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n, generator=g, dtype=F64)
    return x @ x.T / n if psd else 0.5 * (x + x.T)


def _xtrace_parts(A, Om):
    y = A @ Om
    q, r = torch.linalg.qr(y)
    return Om, y, q, r, A @ q


@pytest.mark.parametrize("n,s", [(40, 2), (60, 7), (30, 12)])
def test_downdated_estimates_equal_the_definitions(n, s):
    om = torch.randn(n, s, generator=torch.Generator().manual_seed(s), dtype=F64)
    a = _sym(n, n)
    got, want = xtrace_from(*_xtrace_parts(a, om)), ref_xtrace(a, om)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(a.norm()))
    p = _sym(n, n + 1, psd=True)
    got, want = xnystrace_from(om, p @ om), ref_xnystrace(p, om)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(p.norm()))


def test_public_functions_draw_gaussian_test_vectors_from_the_generator():
    n, m = 50, 12
    a, p = _sym(n, 3), _sym(n, 4, psd=True)
    est, err, ests = xtrace(lambda v: a @ v, n, m, F64, "cpu", torch.Generator().manual_seed(5))
    om = torch.randn(n, m // 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    want = ref_xtrace(a, om)
    assert torch.allclose(torch.tensor(ests, dtype=F64), want, rtol=1e-10, atol=1e-10)
    assert est == pytest.approx(float(want.mean()), rel=1e-10)
    assert err == pytest.approx(float(want.std() / math.sqrt(m // 2)), rel=1e-8)
    est, err, ests = xnystrace(lambda v: p @ v, n, m, F64, "cpu", torch.Generator().manual_seed(6))
    om = torch.randn(n, m, generator=torch.Generator().manual_seed(6), dtype=F64)
    want = ref_xnystrace(p, om)
    assert est == pytest.approx(float(want.mean()), rel=1e-10)
    assert err == pytest.approx(float(want.std() / math.sqrt(m)), rel=1e-8)


@pytest.mark.parametrize("rank", [1, 4, 5])
def test_exact_for_rank_below_the_number_of_test_vectors(rank):
    # s = 6 test vectors: every leave-one-out basis of 5 vectors spans range(A)
    n, s = 80, 6
    g = torch.Generator().manual_seed(rank)
    u = torch.randn(n, rank, generator=g, dtype=F64)
    lam = torch.linspace(-3.0, 5.0, rank, dtype=F64) if rank > 1 else torch.ones(1, dtype=F64)
    a = u @ torch.diag(lam) @ u.T
    est, err, _ = xtrace(lambda v: a @ v, n, 2 * s, F64, "cpu", g)
    assert est == pytest.approx(float(torch.trace(a)), rel=1e-10, abs=1e-10)
    assert err < 1e-9 * float(a.norm())
    p = u @ u.T
    est, err, _ = xnystrace(lambda v: p @ v, n, s, F64, "cpu", g)
    assert est == pytest.approx(float(torch.trace(p)), rel=1e-9)
    assert err < 1e-8 * float(p.norm())


def test_not_exact_above_that_rank():
    n, s = 80, 6
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, s + 4, generator=g, dtype=F64)
    a = u @ u.T
    est, err, _ = xtrace(lambda v: a @ v, n, 2 * s, F64, "cpu", g)
    assert abs(est - float(torch.trace(a))) > 1e-6 and err > 1e-6


@pytest.mark.parametrize("which", ["xtrace", "xnystrace"])
def test_error_estimate_is_calibrated(which):
    """Over 400 draws, the error estimate's root-mean-square is within 30% of the actual
    root-mean-square error, and |error| < 1.96 x estimate holds for 80-97% of the draws (the
    estimate is from s = 8 leave-one-out values, so some under-coverage of 95% is expected).
    A wrong scale (e.g. without the 1/sqrt(s)) puts the ratio at 0.35 or 2.8."""
    torch.set_num_threads(1)
    n = 60
    g = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    lam = torch.arange(1, n + 1, dtype=F64) ** -0.5
    if which == "xtrace":
        lam = lam * torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0).to(F64)
    a = q @ torch.diag(lam) @ q.T
    true = float(lam.sum())
    fn, m = (xtrace, 16) if which == "xtrace" else (xnystrace, 8)
    err2, se2, covered = 0.0, 0.0, 0
    trials = 400
    for _ in range(trials):
        est, se, _ = fn(lambda v: a @ v, n, m, F64, "cpu", g)
        err2 += (est - true) ** 2
        se2 += se**2
        covered += abs(est - true) < 1.96 * se
    ratio = math.sqrt(se2 / err2)
    assert 0.7 < ratio < 1.3, ratio
    assert 0.80 <= covered / trials <= 0.97, covered / trials


def _tiny(bn=False):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    x, y = torch.randn(20, 5, generator=g, dtype=F64), torch.randint(0, 3, (20,), generator=g)
    layers = [nn.Linear(5, 6)] + ([nn.BatchNorm1d(6)] if bn else []) + [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double(), nn.functional.cross_entropy, x, y


def test_hessian_trace_xtrace_matches_the_dense_hessian():
    model, ce, x, y = _tiny()
    h = dense_hessian(model, ce, x, y)
    n, m, seed = h.shape[0], 10, 4
    om = torch.randn(n, m // 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    r = hessian_trace(model, ce, (x, y), n_hvp=m, method="xtrace", seed=seed)
    want = ref_xtrace(h, om)
    assert r.method == "xtrace" and r.n_hvp == m
    assert r.trace == pytest.approx(float(want.mean()), rel=1e-10)
    assert r.stderr == pytest.approx(float(want.std() / math.sqrt(m // 2)), rel=1e-8)


def test_gn_xtrace_is_exact_ggn_plus_xtrace_of_the_dense_residual():
    model, ce, x, y = _tiny()
    h, gg = dense_hessian(model, ce, x, y), explicit_ggn(model, ce, x, y)
    n, m, seed = h.shape[0], 8, 2
    om = torch.randn(n, m // 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    r = hessian_trace(model, ce, (x, y), n_hvp=m, method="gn-xtrace", seed=seed)
    assert r.ggn_trace == pytest.approx(float(gg.trace()), rel=1e-10)
    res = ref_xtrace(h - gg, om)
    assert r.trace == pytest.approx(float(gg.trace() + res.mean()), rel=1e-10)
    assert r.stderr == pytest.approx(float(res.std() / math.sqrt(m // 2)), rel=1e-8)
    auto = hessian_trace(model, ce, (x, y), n_hvp=m, method="auto", seed=seed)
    split = hessian_trace(model, ce, (x, y), n_hvp=m, method="gn-split", seed=seed)
    assert auto.method == "gn-split" and auto.trace == split.trace


def test_xnystrace_matches_the_dense_ggn_and_auto_falls_back():
    model, ce, x, y = _tiny(bn=True)  # train-mode BatchNorm: no Gauss-Newton split
    gg = explicit_ggn(model, ce, x, y)
    n, m, seed = gg.shape[0], 9, 1
    om = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=F64)
    r = hessian_trace(model, ce, (x, y), n_hvp=m, method="auto", kind="ggn", seed=seed)
    want = ref_xnystrace(gg, om)
    assert r.method == "xnystrace" and r.n_hvp == m
    assert r.trace == pytest.approx(float(want.mean()), rel=1e-9)
    assert hessian_trace(model, ce, (x, y), n_hvp=m, method="auto").method == "xtrace"
    model, ce, x, y = _tiny()
    exact = hessian_trace(model, ce, (x, y), n_hvp=m, method="auto", kind="ggn")
    assert exact.method == "gn-split" and exact.stderr == 0.0 and exact.n_hvp == 0


def test_invalid_arguments():
    model, ce, x, y = _tiny()
    with pytest.raises(ValueError, match="positive semidefinite"):
        hessian_trace(model, ce, (x, y), n_hvp=6, method="xnystrace")
    with pytest.raises(ValueError, match="n_hvp must be an integer >= 4"):
        hessian_trace(model, ce, (x, y), n_hvp=3, method="xtrace")
    with pytest.raises(ValueError, match="2x the parameter count"):
        hessian_trace(model, ce, (x, y), n_hvp=200, method="xtrace")
    with pytest.raises(ValueError, match="positive semidefinite"):  # an indefinite matrix
        a = _sym(30, 0)
        xnystrace(lambda v: a @ v, 30, 10, F64, "cpu", torch.Generator().manual_seed(0))
