"""Periodic sharpness: the runner asks basin.landscape for the top Hessian eigenvalue.

On the noisy quadratic the Hessian of every mini-batch loss is exactly Q, so the recorded
sharpness must equal Q's largest eigenvalue (dense float64 ``eigvalsh``) at every step."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from basin.bench import make_config, run
from basin.bench.workloads import quadratic


def _top_eig_q() -> float:
    q = quadratic.hessian().float().double()
    return float(torch.linalg.eigvalsh(q)[-1])


@dataclass
class _Eig:
    eigenvalues: list[float]


def _power_iteration(model, loss_fn, data, k=1, iters=400):
    """Independent stand-in: power iteration on autograd Hessian-vector products."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p, generator=torch.Generator().manual_seed(0)) for p in params]
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((u * u).sum() for u in v))
        v = [u / norm for u in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        lam = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = [h.detach() for h in hv]
    return _Eig([lam])


def test_sharpness_with_a_power_iteration_stand_in(monkeypatch) -> None:
    fake = types.ModuleType("basin.landscape")
    fake.hessian_eigenvalues = _power_iteration
    monkeypatch.setitem(sys.modules, "basin.landscape", fake)
    r = run(make_config("quadratic_deep", "adabelief", steps=20, sharpness_every=10))
    sh = r.series["sharpness"]
    assert sh["step"] == [10, 20]
    for v in sh["value"]:
        assert v == pytest.approx(_top_eig_q(), rel=1e-4)
    assert r.final["sharpness"] == sh["value"][-1]


def test_report_draws_sharpness_curves(monkeypatch, tmp_path) -> None:
    from basin.bench import Store
    from basin.bench.report import write_report

    fake = types.ModuleType("basin.landscape")
    fake.hessian_eigenvalues = lambda *a, **k: _power_iteration(*a, **k, iters=50)
    monkeypatch.setitem(sys.modules, "basin.landscape", fake)
    with Store(str(tmp_path / "s.db")) as st:
        st.put(run(make_config("quadratic_deep", "torch:sgd", steps=10, sharpness_every=5)))
        html = write_report(st, tmp_path)["html"].read_text()
    assert html.count("<img ") == 2  # curves (with a sharpness panel) + profiles
    import base64
    import io

    from PIL import Image

    src = html.split("alt='curves quadratic_deep' src='data:image/png;base64,")[1].split("'")[0]
    width, height = Image.open(io.BytesIO(base64.b64decode(src))).size
    assert width > 3.6 * height  # three panels, 15 x 3.4 in (two panels: 10 x 3.4)


@pytest.mark.skipif(
    importlib.util.find_spec("basin.landscape") is None, reason="basin.landscape not present"
)
def test_sharpness_with_basin_landscape() -> None:
    r = run(make_config("quadratic_deep", "torch:sgd", steps=10, sharpness_every=5))
    assert r.series["sharpness"]["step"] == [5, 10]
    for v in r.series["sharpness"]["value"]:
        assert v == pytest.approx(_top_eig_q(), rel=1e-3)


def test_sharpness_without_landscape_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "basin.landscape", None)  # import raises ImportError
    with pytest.raises(ValueError, match="sharpness_every needs basin.landscape"):
        make_config("quadratic_deep", "torch:sgd", steps=10, sharpness_every=5)
