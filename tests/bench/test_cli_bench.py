"""`basin bench` and `basin report`: runs, resume, report files, and bad input -> exit 2."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from basin.cli import main, parse_hparams


def _count(db: Path) -> int:
    return sqlite3.connect(db).execute("select count(*) from basin_runs").fetchone()[0]


def test_bench_runs_resumes_and_reports(tmp_path, capsys) -> None:
    db = tmp_path / "b.db"
    args = ["bench", "-w", "f1,f3", "-o", "torch:sgd,adabelief", "--seeds", "2", "--steps", "50",
            "--storage", f"sqlite:///{db}", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert _count(db) == 8
    err = capsys.readouterr().err
    assert "8 run(s) done, 0 already stored" in err
    rep = tmp_path / "b-report"  # <db stem>-report/ next to the database
    assert (rep / "report.html").exists() and (rep / "runs.csv").exists()
    # a rerun skips everything; one more seed runs only the new ones
    assert main(args + ["--no-report"]) == 0
    assert "0 run(s) done, 8 already stored" in capsys.readouterr().err
    assert main([*args[:6], "3", *args[7:], "--no-report"]) == 0
    assert "4 run(s) done, 8 already stored" in capsys.readouterr().err
    assert _count(db) == 12
    out = tmp_path / "rep"
    assert main(["report", f"sqlite:///{db}", "--out", str(out), "--measure", "steps"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "report.html", "results.json", "runs.csv", "summary.csv"
    }  # fmt: skip


def test_bench_hp_and_schedule_options(tmp_path) -> None:
    from basin.bench import Store

    db = tmp_path / "h.db"
    assert main(["bench", "-w", "f2", "-o", "torch:sgd,adabelief", "--seeds", "1", "--steps", "20",
                 "--hp", "lr=0.02", "--hp", "torch:sgd.momentum=0.5", "--schedule", "wsd",
                 "--warmup", "0.1", "--decay", "0.3", "--decay-shape", "1-sqrt",
                 "--storage", str(db), "--quiet", "--no-report"]) == 0  # fmt: skip
    runs = {r["config"]["optimizer"]: r["config"] for r in Store(str(db)).runs()}
    assert runs["torch:sgd"]["hparams"] == {"lr": 0.02, "momentum": 0.5}
    assert runs["adabelief"]["hparams"]["lr"] == 0.02
    assert runs["adabelief"]["schedule"] == {
        "name": "wsd", "warmup": 0.1, "decay": 0.3, "decay_shape": "1-sqrt", "final": 0.0
    }  # fmt: skip


def test_scale_lr_follows_the_rules(tmp_path) -> None:
    from basin.bench import Store

    db = tmp_path / "s.db"
    assert main(["bench", "-w", "mnist1d_mlp", "-o", "torch:sgd,torch:adamw", "--seeds", "1",
                 "--steps", "2", "--batch-size", "512", "--scale-lr", "--storage", str(db),
                 "--quiet", "--no-report"]) == 0  # fmt: skip
    hp = {r["config"]["optimizer"]: r["config"]["hparams"]["lr"] for r in Store(str(db)).runs()}
    assert hp["torch:sgd"] == pytest.approx(0.05 * 4) and hp["torch:adamw"] == pytest.approx(
        3e-3 * 2
    )


def test_parse_hparams() -> None:
    assert parse_hparams(["lr=1e-3", "a.betas=0.9,0.99", "a.amsgrad=true"], ["a", "b"]) == {
        "a": {"lr": 1e-3, "betas": (0.9, 0.99), "amsgrad": True},
        "b": {"lr": 1e-3},
    }


@pytest.mark.parametrize(
    "extra, match",
    [
        (["-w", "mnist1d_mpl"], "unknown workload 'mnist1d_mpl'; did you mean mnist1d_mlp"),
        (["-o", "adabelif"], "unknown optimizer 'adabelif'; did you mean adabelief"),
        (["-o", "torch:adamw,diffgradd"], "unknown optimizer 'diffgradd'"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--time-budget", "-3"], "time_budget must be a positive"),
        (["--hp", "lr=-1"], "torch:sgd: Invalid learning rate: -1"),
        # a third-party optimizer raising its own exception type (not ValueError)
        (
            ["-o", "pytorch_optimizer:lion", "--hp", "lr=-1"],
            "pytorch_optimizer:lion: learning rate",
        ),
        (["--hp", "lr"], "expected NAME=VALUE"),
        (["--hp", "nosuch.lr=1"], "not in --optimizers"),
        (["--schedule", "wsd", "--decay", "2"], "decay must be a fraction"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--storage", "postgresql://h/db"], "only SQLite"),
        (["--sharpness-every", "-1"], "sharpness_every"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_stored(tmp_path, capsys, extra, match) -> None:
    db = tmp_path / "x.db"
    args = ["bench", "-w", "f1", "-o", "torch:sgd", "--seeds", "1", "--steps", "5",
            "--storage", f"sqlite:///{db}", "--quiet", "--no-report"]  # fmt: skip
    # later options win in click, so the bad value is appended
    assert main([*args, *extra]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("basin: error: "), cap.err
    assert match in lines[0]
    assert cap.out == ""
    assert not db.exists() or _count(db) == 0


def test_bad_input_from_the_console_script_has_no_traceback(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "basin", "bench", "-w", "mnist1d_mpl", "--storage",
         str(tmp_path / "x.db")], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "basin: error: unknown workload 'mnist1d_mpl'; did you mean mnist1d_mlp, mnist1d_cnn, "
        "mnist1d_bnn? (known: beale, charlm, digits_cnn, f1, f2, f3, mnist1d_bnn, mnist1d_cnn, "
        "mnist1d_mlp, "
        "quadratic_deep, rastrigin, rosenbrock; or path/to/file.py:NAME, package.module:NAME)"
    )
    assert not (tmp_path / "x.db").exists()


def test_report_bad_storage(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    for url in (str(bad), f"sqlite:///{tmp_path}/missing.db", "mysql://x"):
        assert main(["report", url]) == 2
        err = capsys.readouterr().err
        assert err.startswith("basin: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "missing.db").exists()


def test_report_unwritable_target_is_one_line(tmp_path, capsys) -> None:
    db = tmp_path / "r.db"
    assert main(["bench", "-w", "f1", "-o", "torch:sgd", "--seeds", "1", "--steps", "5",
                 "--storage", str(db), "--quiet", "--no-report"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "rep"
    (out / "results.json").mkdir(parents=True)  # the file cannot be replaced
    assert main(["report", str(db), "--out", str(out)]) == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == (
        f"basin: error: cannot write report file {str(out / 'results.json')!r}: Is a directory"
    )
    # nothing was renamed into place and no temporary file is left behind
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
