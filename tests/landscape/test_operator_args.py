"""A CurvatureOperator passed to the estimators: its kind and selection are its own (asking
for others raises instead of being ignored), and gn-split builds on its public interface."""

from __future__ import annotations

import inspect

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
from basin.landscape import trace as trace_module

CE = nn.functional.cross_entropy


def _setup():
    torch.manual_seed(0)
    x = torch.randn(48, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (48,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, (x, y)


def test_operator_with_other_kind_or_params_raises():
    model, (x, y) = _setup()
    op = CurvatureOperator(model, CE, (x, y))
    h = dense_hessian(model, CE, x, y)
    g = explicit_ggn(model, CE, x, y)
    top_h, top_g = float(torch.linalg.eigvalsh(h)[-1]), float(torch.linalg.eigvalsh(g)[-1])
    assert abs(top_h - top_g) > 1e-3  # the two answers differ: silently ignoring is visible
    for call in (
        lambda: hessian_eigenvalues(op, kind="ggn"),
        lambda: hessian_trace(op, kind="ggn", n_hvp=6),
        lambda: hessian_trace(op, kind="ggn", method="gn-split"),
        lambda: hessian_density(op, kind="ggn", n_probes=1, n_iter=4),
    ):
        with pytest.raises(ValueError, match="kind='ggn' does not match"):
            call()
    for call in (
        lambda: hessian_eigenvalues(op, params="2"),
        lambda: hessian_trace(op, params=["0.weight"], n_hvp=6),
        lambda: hessian_density(op, params="0", n_probes=1, n_iter=4),
    ):
        with pytest.raises(ValueError, match="selects other parameters"):
            call()
    with pytest.raises(ValueError, match="already holds its loss_fn and data"):
        hessian_eigenvalues(op, CE, (x, y))
    # repeating the operator's own kind and selection is fine
    same = hessian_eigenvalues(op, kind="hessian", params=["0", "2"], tol=1e-10)
    assert float(same.eigenvalues[0]) == pytest.approx(top_h, rel=1e-8)
    # an operator of kind "ggn" is the GGN, everywhere
    gop = CurvatureOperator(model, CE, (x, y), kind="ggn")
    assert float(hessian_eigenvalues(gop, tol=1e-10).eigenvalues[0]) == pytest.approx(
        top_g, rel=1e-8
    )
    exact = hessian_trace(gop, method="gn-split")
    assert exact.trace == pytest.approx(float(g.trace()), rel=1e-10) and exact.stderr == 0.0
    with pytest.raises(ValueError, match="gn-split"):
        hessian_trace(op.with_kind("residual"), method="gn-split")


def test_public_pieces_of_the_operator():
    model, (x, y) = _setup()
    op = CurvatureOperator(model, CE, [(x[:20], y[:20]), (x[20:], y[20:])], params="2")
    assert list(op.leaves) == op.names == ["2.weight", "2.bias"]
    assert all(t.requires_grad for t in op.leaves.values())
    out = op.output(1)
    torch.testing.assert_close(out, model(x[20:]))
    want = CE(model(x[20:]), y[20:]).detach()
    assert float(op.loss(out, y[20:]).detach()) == pytest.approx(float(want))
    with pytest.raises(ValueError, match="scalar"):
        CurvatureOperator(model, nn.CrossEntropyLoss(reduction="none"), (x, y)).loss(out, y[20:])
    zero = {n: torch.zeros_like(t) for n, t in op.leaves.items()}
    torch.testing.assert_close(op.call(zero, x[:3]), torch.zeros(3, 3, dtype=torch.float64))
    # with_kind keeps model, data and selection: residual = hessian - ggn on the same block
    res, ggn = op.with_kind("residual"), op.with_kind("ggn")
    assert res.names == op.names and res.total == op.total == 48
    v = torch.randn(op.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.matvec(v), op.matvec(v) - ggn.matvec(v))
    # gn-split uses only that public interface, no private fields of the operator
    src = inspect.getsource(trace_module)
    assert "op._" not in src and "._leaves" not in src and "._forward" not in src
