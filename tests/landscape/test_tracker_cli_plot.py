"""Sharpness tracker, plots and the ``basin landscape`` command end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from basin.cli import main
from basin.landscape import (
    SharpnessTracker,
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    loss_surface,
)


def _setup():
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return model, nn.functional.cross_entropy, (x, y)


def test_tracker_records_sharpness_every_n_steps():
    model, loss_fn, data = _setup()
    tracker = SharpnessTracker(model, loss_fn, data, every=5, trace_hvp=30, tol=1e-8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(12):
        if (rec := tracker(step)) is not None:
            want = hessian_eigenvalues(model, loss_fn, data, k=1, tol=1e-10).eigenvalues[0]
            assert rec.sharpness == pytest.approx(float(want), rel=1e-6)
            assert rec.trace == rec.trace and rec.trace_stderr > 0
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        opt.step()
    assert tracker.steps == [0, 5, 10]
    assert len(tracker.sharpness) == 3 and len(tracker.as_dicts()) == 3
    with pytest.raises(ValueError, match="every"):
        SharpnessTracker(model, loss_fn, data, every=0)
    with pytest.raises(ValueError, match="trace_method"):
        SharpnessTracker(model, loss_fn, data, trace_hvp=4, trace_method="exact")
    with pytest.raises(ValueError, match=r"trace_hvp must be 0 or an integer >= 3 for hutch\+\+"):
        SharpnessTracker(model, loss_fn, data, trace_hvp=2)
    # Hutchinson and gn-split give a standard error from 2 products, as hessian_trace does
    rec = SharpnessTracker(model, loss_fn, data, trace_hvp=2, trace_method="hutchinson")(0)
    assert rec.trace_stderr > 0


def test_tracker_gn_split_trace_is_the_functions():
    model, loss_fn, data = _setup()
    tracker = SharpnessTracker(model, loss_fn, data, every=1, trace_hvp=4, trace_method="gn-split")
    rec = tracker(3)
    want = hessian_trace(model, loss_fn, data, n_hvp=4, method="gn-split", seed=3)
    assert rec.trace == want.trace and rec.trace_stderr == want.stderr


def test_plots_write_files(tmp_path):
    pytest.importorskip("matplotlib")
    from basin.landscape import plot

    model, loss_fn, data = _setup()
    d = hessian_density(model, loss_fn, data, n_probes=2, n_iter=20)
    s1 = loss_surface(model, loss_fn, data, steps=5)
    s2 = loss_surface(model, loss_fn, data, dim=2, steps=4)
    tracker = SharpnessTracker(model, loss_fn, data, every=1, trace_hvp=6)
    tracker(0)
    tracker(1)
    for name, fig in (
        ("d.png", plot.plot_density(d, tmp_path / "d.png")),
        ("s1.png", plot.plot_surface(s1, tmp_path / "s1.png")),
        ("s2.png", plot.plot_surface(s2, tmp_path / "s2.png", log=True)),
        ("t.png", plot.plot_sharpness(tracker, tmp_path / "t.png", lr=0.1)),
    ):
        assert (tmp_path / name).stat().st_size > 1000
        assert fig.axes


def test_cli_landscape_demo_end_to_end(tmp_path, capsys):
    from basin.landscape.report import demo_workload

    out = tmp_path / "out"
    assert (
        main(
            [
                "landscape",
                "--workload",
                "demo-mlp",
                "--out",
                str(out),
                "--k",
                "2",
                "--trace-hvp",
                "9",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Hessian eigenvalues" in text and "trace (Hutch++, 9 HVPs)" in text
    assert (out / "density.png").exists() and (out / "surface_1d.png").exists()
    # a checkpoint that fits is loaded: scaling the last layer changes the printed loss
    w = demo_workload()
    state = w.model.state_dict()
    state["2.weight"] = 0 * state["2.weight"]
    state["2.bias"] = 0 * state["2.bias"]
    torch.save(state, tmp_path / "ck.pt")
    assert (
        main(
            [
                "landscape",
                "--checkpoint",
                str(tmp_path / "ck.pt"),
                "--out",
                str(out),
                "--k",
                "1",
                "--trace-hvp",
                "3",
            ]
        )
        == 0
    )
    assert "loss: 2.30259" in capsys.readouterr().out  # zero logits: log(10)


def test_cli_landscape_user_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert main(["landscape", "--checkpoint", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read checkpoint" in err
    torch.save({"foo": torch.zeros(2)}, tmp_path / "wrong.pt")
    assert (
        main(["landscape", "--checkpoint", str(tmp_path / "wrong.pt"), "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit" in err
    assert main(["landscape", "--workload", "no-such-workload"]) == 2
    assert "unknown workload" in capsys.readouterr().err
    # option mistakes are caught before the workload is built or any product computed
    for args, msg in (
        (["--k", "0"], "--k must be >= 1"),
        (["--trace-hvp", "2"], "--trace-hvp must be >= 3"),
        (["--surface-steps", "1"], "--surface-steps 0 or >= 2"),
    ):
        assert main(["landscape", *args, "--out", str(tmp_path)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and msg in err


def test_tracker_checks_inputs_at_construction_and_tracks_ggn_sharpness():
    import copy

    from landscape_helpers import explicit_ggn

    model, loss_fn, data = _setup()
    with pytest.raises(ValueError, match="empty"):
        SharpnessTracker(model, loss_fn, [])
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        SharpnessTracker(frozen, loss_fn, data)
    with pytest.raises(ValueError, match="names no parameter"):
        SharpnessTracker(model, loss_fn, data, params="nope")
    with pytest.raises(ValueError, match="kind"):
        SharpnessTracker(model, loss_fn, data, kind="residual")
    # Gauss-Newton sharpness against the explicit J^T H_L J; its trace exact with gn-split
    g = explicit_ggn(model, loss_fn, *data)
    tracker = SharpnessTracker(
        model, loss_fn, data, kind="ggn", trace_hvp=2, trace_method="gn-split", tol=1e-10
    )
    rec = tracker(0)
    assert rec.sharpness == pytest.approx(float(torch.linalg.eigvalsh(g)[-1]), rel=1e-8)
    assert rec.trace == pytest.approx(float(g.trace()), rel=1e-10) and rec.trace_stderr == 0
    h_top = hessian_eigenvalues(model, loss_fn, data, tol=1e-10).eigenvalues[0]
    assert abs(rec.sharpness - float(h_top)) > 1e-3  # the GGN's, not the Hessian's
    # an iterator is read once and kept: every measurement sees the same data
    once = SharpnessTracker(model, loss_fn, iter([data]), every=1, tol=1e-10)
    assert once(0).sharpness == pytest.approx(once(1).sharpness, rel=1e-9)
