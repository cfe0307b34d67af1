"""Hutch++/Hutchinson trace and SLQ density against dense spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from landscape_helpers import Quadratic, quad_loss

from basin.landscape import hessian_density, hessian_trace
from basin.landscape.density import slq_nodes
from basin.landscape.trace import hutchinson, hutchpp


def test_trace_within_reported_standard_error(mlp_setup):
    model, loss_fn, data, h, _, _ = mlp_setup
    true = float(h.trace())
    for method in ("hutch++", "hutchinson"):
        for seed in range(3):
            res = hessian_trace(model, loss_fn, data, n_hvp=60, method=method, seed=seed)
            assert res.n_hvp == 60
            assert abs(res.trace - true) <= 3 * res.stderr, (
                method,
                seed,
                res.trace,
                true,
                res.stderr,
            )
            assert res.stderr < 0.2 * abs(true)


def test_standard_error_is_calibrated():
    """Over 400 independent runs on a fixed matrix, the error is within 1 SE about 68% of the
    time and within 2 SE about 95% (normal approximation of a mean of 20 probes)."""
    g = torch.Generator().manual_seed(0)
    n = 120
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * torch.linspace(-1, 3, n, dtype=torch.float64)) @ q.T
    true = float(a.trace())
    for fn, m in ((hutchinson, 20), (hutchpp, 60)):
        z = []
        for seed in range(400):
            gen = torch.Generator().manual_seed(seed)
            est, se, samples = fn(lambda v: a @ v, n, m, torch.float64, "cpu", gen)
            z.append((est - true) / se)
        z = np.abs(np.asarray(z))
        assert 0.58 <= (z <= 1).mean() <= 0.80, (fn.__name__, (z <= 1).mean())
        assert (z <= 2).mean() >= 0.90, (fn.__name__, (z <= 2).mean())


def test_hutchpp_decaying_spectrum_one_percent_with_99_products():
    n = 1000
    eigs = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2
    model = Quadratic(eigs, seed=1)
    x = torch.zeros(1, 1, dtype=torch.float64)
    true = float(eigs.sum())
    for seed in range(3):
        pp = hessian_trace(model, quad_loss, (x, x), n_hvp=99, seed=seed)
        assert pp.n_hvp == 99
        assert abs(pp.trace - true) / true <= 0.01, pp.trace
        assert abs(pp.trace - true) <= 3 * pp.stderr
    # Hutchinson with the same budget is much worse on this spectrum
    hu = [
        hessian_trace(model, quad_loss, (x, x), n_hvp=99, method="hutchinson", seed=s)
        for s in range(3)
    ]
    assert max(abs(r.trace - true) for r in hu) > 3 * max(abs(pp.trace - true), 1e-4)


def test_slq_quadrature_reproduces_moments_exactly(mlp_setup):
    """Gauss quadrature from m Lanczos steps integrates polynomials of degree < 2m exactly:
    sum_j tau_j theta_j^p = v^T H^p v / v^T v."""
    _, _, _, h, evals, _ = mlp_setup
    g = torch.Generator().manual_seed(0)
    probes = torch.randn(2, h.shape[0], generator=g, dtype=torch.float64)
    m = 12
    nodes, weights, _ = slq_nodes(lambda v: h @ v, probes, m)
    scale = float(evals.abs().max())
    hs = h / scale
    for v, th, w in zip(probes, nodes, weights):
        u = v / v.norm()
        hp = u.clone()
        for p in range(2 * m):
            moment = float(u @ hp)
            quad = float(np.sum(w * (th / scale) ** p))
            assert abs(quad - moment) <= 1e-9 * max(1.0, abs(moment)), (p, quad, moment)
            hp = hs @ hp


def test_density_matches_smoothed_exact_spectrum(mlp_setup):
    model, loss_fn, data, _, evals, _ = mlp_setup
    res = hessian_density(model, loss_fn, data, n_probes=8, n_iter=60, seed=0)
    assert res.n_hvp == 8 * 60
    dx = np.diff(res.grid)
    integral = float(np.sum(0.5 * (res.density[1:] + res.density[:-1]) * dx))
    assert abs(integral - 1) < 1e-12
    ev = evals.numpy()
    exact = np.exp(-0.5 * ((res.grid[:, None] - ev[None, :]) / res.sigma) ** 2).sum(1)
    exact /= len(ev) * res.sigma * np.sqrt(2 * np.pi)
    l1 = float(np.sum(np.abs(res.density - exact)[:-1] * dx))
    assert l1 < 0.1, l1
    # a discriminating check: the density of a spectrum shifted by 3 sigma is far away
    shifted = np.exp(
        -0.5 * ((res.grid[:, None] - ev[None, :] - 3 * res.sigma) / res.sigma) ** 2
    ).sum(1)
    shifted /= len(ev) * res.sigma * np.sqrt(2 * np.pi)
    assert float(np.sum(np.abs(res.density - shifted)[:-1] * dx)) > 3 * l1

    # Kolmogorov distance between the cumulative masses of the two smoothed spectra
    def cdf(d):
        return np.concatenate([[0], np.cumsum(0.5 * (d[1:] + d[:-1]) * dx)])

    ks = float(np.max(np.abs(cdf(res.density) - cdf(exact))))
    assert ks < 0.05, ks
    # converged Ritz values are true eigenvalues within their bounds, and the top one is found
    assert len(res.converged) >= 1
    assert abs(res.converged[0] - ev[-1]) <= max(res.converged_bounds[0], 1e-12)
    for t, b in zip(res.converged, res.converged_bounds):
        assert np.min(np.abs(ev - t)) <= max(b, 1e-12)
    # this untrained network's spectrum is continuous at both ends (top gaps 0.01 against a
    # width of 1.2): nothing stands out of the bulk
    assert len(res.outliers) == 0 and res.outlier_bounds.shape == (0,)


def _spectra():
    g = torch.Generator().manual_seed(0)
    n = 400
    bulk = torch.rand(n - 10, generator=g, dtype=torch.float64)
    wig = torch.randn(n, n, generator=g, dtype=torch.float64)
    semicircle = torch.linalg.eigvalsh((wig + wig.T) / (2 * (2 * n) ** 0.5))  # edges at +-1
    return {
        # DeepOBS quadratic_deep: 10 outliers U(30, 60) over a U(0, 1) bulk
        "deepobs": (
            torch.cat([bulk, 30 + 30 * torch.rand(10, generator=g, dtype=torch.float64)]),
            10,
        ),
        "uniform": (torch.linspace(0, 1, n, dtype=torch.float64), 0),
        "semicircle": (semicircle, 0),
        "both ends": (
            torch.cat([bulk - 0.5, torch.tensor([5.0, 6.0, -4.0], dtype=torch.float64)]),
            3,
        ),
    }


def test_density_outliers_by_the_gap_rule_with_and_without_outliers():
    x = torch.zeros(1, 1, dtype=torch.float64)
    for name, (eigs, n_out) in _spectra().items():
        res = hessian_density(Quadratic(eigs), quad_loss, (x, x), n_probes=3, n_iter=80, seed=0)
        ev = torch.sort(eigs).values.numpy()
        assert len(res.outliers) == n_out, (name, res.outliers)
        assert len(res.converged) > n_out, name  # edge values converge in every case
        want = np.concatenate(
            [
                ev[::-1][: min(n_out, 2 if name == "both ends" else n_out)],
                ev[:1] if name == "both ends" else ev[:0],
            ]
        )
        np.testing.assert_allclose(res.outliers, want, rtol=0, atol=1e-8)
        assert np.all(np.diff(res.outliers) < 0)
        # the rule, checked on the reported numbers: each outlier group's gap to the bulk
        # exceeds outlier_gap (0.25) times the bulk's width, and the bulk holds the rest
        lo, hi = res.bulk_edges
        above, below = res.outliers[res.outliers > hi], res.outliers[res.outliers < lo]
        if len(above):
            assert above.min() - hi > 0.25 * (hi - lo)
        if len(below):
            assert lo - below.max() > 0.25 * (hi - lo)
        # ... and the true spectrum has that gap too: the other eigenvalues stay inside it
        rest = (
            ev[np.min(np.abs(ev[:, None] - res.outliers[None, :]), axis=1) > 1e-8] if n_out else ev
        )
        assert len(rest) == len(ev) - n_out, name
        if len(above):
            assert above.min() - rest.max() > 0.25 * (hi - lo)
        if len(below):
            assert rest.min() - below.max() > 0.25 * (hi - lo)
    # a stricter gap turns the DeepOBS outliers (gap 29x the bulk width) into bulk at 40x
    eigs, _ = _spectra()["deepobs"]
    res = hessian_density(Quadratic(eigs), quad_loss, (x, x), n_probes=3, n_iter=80, outlier_gap=40)
    assert len(res.outliers) == 0
    with pytest.raises(ValueError, match="outlier_gap"):
        hessian_density(Quadratic(eigs), quad_loss, (x, x), outlier_gap=0)
