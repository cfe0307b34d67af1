"""Workloads: offline, deterministic, the declared functions and data."""

from __future__ import annotations

import math

import pytest
import torch

from basin.bench import workloads as wl
from basin.bench.workloads import synthetic


def test_registry_and_close_names() -> None:
    assert {"rosenbrock", "beale", "rastrigin", "f1", "f2", "f3", "quadratic_deep",
            "mnist1d_mlp", "mnist1d_cnn", "digits_cnn", "charlm"} <= set(wl.names())  # fmt: skip
    with pytest.raises(ValueError, match="did you mean rosenbrock"):
        wl.get("rosenbrok")
    for w in wl.workloads():
        assert w.metric_mode in ("min", "max") and w.steps > 0 and w.batch_size > 0
        if w.family != "own":  # user workloads loaded by other tests in this process may lack one
            assert w.reached(w.target)


@pytest.mark.parametrize(
    "name, point, value",
    [
        ("rosenbrock", (1.0, 1.0), 0.0),
        ("rosenbrock", (-2.0, 2.0), 9 + 100 * 4),
        ("beale", (3.0, 0.5), 0.0),
        ("beale", (0.0, 0.0), 1.5**2 + 2.25**2 + 2.625**2),
        ("rastrigin", (0.0, 0.0), 0.0),
        ("rastrigin", (0.5, 0.5), 20 + 2 * (0.25 + 10)),
        ("f1", (-0.3,), 0.0),
        ("f1", (0.2,), 0.05),
        ("f1", (-1.0,), 0.49),
        ("f2", (-1.0,), 4.85),
        ("f2", (0.5,), 0.125 + 0.5 * math.sin(4.0) + 0.85),
        ("f3", (-1.0,), 1.0),
        ("f3", (-0.45,), 0.3),
        ("f3", (-0.2,), 0.175),
        ("f3", (0.3,), 0.2625),
        ("f3", (0.45,), 0.3),
        ("f3", (0.7,), 0.49),
    ],
)
def test_synthetic_function_values(name, point, value) -> None:
    fn = synthetic.FUNCTIONS[name][0]
    assert float(fn(torch.tensor(point, dtype=torch.float64))) == pytest.approx(value, abs=1e-12)


def test_diffgrad_f_minima() -> None:
    # F1 global min 0 at -0.3; F3's is 0 at x=0; F2 by a grid (the x^3 branch dips below 0)
    assert synthetic._grid_min("f1") == pytest.approx(0.0, abs=1e-10)
    assert synthetic._grid_min("f3") == pytest.approx(0.0, abs=1e-10)
    xs = torch.linspace(-0.9, 3, 100001, dtype=torch.float64)
    assert synthetic._grid_min("f2") == pytest.approx(
        float((xs**3 + xs * torch.sin(8 * xs) + 0.85).min()), abs=1e-6
    )


def test_quadratic_spectrum_and_hessian() -> None:
    from basin.bench.workloads import quadratic

    q = quadratic.hessian()
    ev = torch.linalg.eigvalsh(q)
    assert ((ev[:90] > 0) & (ev[:90] < 1)).all() and ((ev[90:] > 30) & (ev[90:] < 60)).all()
    task = wl.get("quadratic_deep").build(0, 16)
    x, y = next(task.batches)
    h = torch.autograd.functional.hessian(
        lambda w: task.loss_fn(torch.func.functional_call(task.model, {"w": w}, (x,)), y),
        task.model.w.detach(),
    )
    assert torch.allclose(h, task.model.q, atol=1e-5)
    ev0 = task.evaluate(task.model)["metric"]
    assert ev0 == pytest.approx(
        float(
            0.5 * torch.ones(100, dtype=torch.float64) @ q @ torch.ones(100, dtype=torch.float64)
        ),
        rel=1e-5,
    )


@pytest.mark.parametrize(
    "name, n_train, x_shape",
    [("mnist1d_mlp", 4000, (40,)), ("digits_cnn", 1437, (1, 8, 8)), ("charlm", None, (64,))],
)
def test_data_shapes_and_determinism(name, n_train, x_shape) -> None:
    w = wl.get(name)
    a, b = w.build(5, 8), w.build(5, 8)
    xa, ya = next(a.batches)
    xb, yb = next(b.batches)
    assert tuple(xa.shape[1:]) == x_shape and len(xa) == 8
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    c = w.build(6, 8)
    assert not torch.equal(next(c.batches)[0], xa)
    if n_train is not None:
        assert len(a.batches.x) == n_train
    ev = a.evaluate(a.model)
    assert set(ev) == {"eval_loss", "metric"} and math.isfinite(ev["eval_loss"])


def test_charlm_corpus_split() -> None:
    from basin.bench.workloads import charlm

    train, val = charlm.corpus()
    assert len(train) + len(val) <= charlm.CORPUS_CHARS
    assert len(val) == pytest.approx(0.1 * (len(train) + len(val)), abs=2)
    assert int(train.max()) < charlm.VOCAB and int(train.min()) >= 0
    x, y = next(wl.get("charlm").build(0, 4).batches)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    # an untrained model predicts ~uniformly: about log2(128) = 7 bits per character
    task = wl.get("charlm").build(0, 4)
    assert task.evaluate(task.model)["metric"] == pytest.approx(7.0, abs=0.5)


def test_default_hparams_table() -> None:
    assert wl.default_hparams("mnist1d_mlp", "torch:sgd") == {"lr": 0.05, "momentum": 0.9}
    assert wl.default_hparams("mnist1d_mlp", "adabelief") == {"lr": 3e-3}
    assert wl.default_hparams("f1", "adabelief") == {"lr": 0.1, "betas": (0.95, 0.999)}
    assert wl.default_hparams("mnist1d_mlp", "sgdsai") == {"lr": 1e-2}


def test_mnist1d_disk_cache_equals_fresh_generation(tmp_path, monkeypatch) -> None:
    from basin.bench.workloads import mnist1d

    cached = mnist1d.data()
    monkeypatch.setenv("BASIN_CACHE", str(tmp_path))
    mnist1d.data.cache_clear()
    try:
        fresh = mnist1d.data()  # generated, then written to tmp_path
        assert len(list(tmp_path.glob("mnist1d-*.pt"))) == 1
        mnist1d.data.cache_clear()
        again = mnist1d.data()  # read back from tmp_path
    finally:
        mnist1d.data.cache_clear()
    for a, b, c in zip(cached, fresh, again):
        assert torch.equal(a, b) and torch.equal(b, c)
