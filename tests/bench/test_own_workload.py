"""Your own model and data: Workload.from_tensors / from_loaders, -w file.py:NAME, the workload
fingerprint in the resume key, and the CLI's honesty (Ctrl-C, failed runs, report paths)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from basin.bench import Store, Workload, make_config, run
from basin.bench import workloads as wl
from basin.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 2))


def test_from_tensors_trains_and_fingerprints_model_and_data() -> None:
    w = Workload.from_tensors("own_t", _mlp, train=_data(), eval=_data(seed=1), steps=150,
                              batch_size=32, target=0.8)  # fmt: skip
    r = run(make_config(w, "adamw", seed=0))
    assert r.status == "ok" and r.final["metric"] > 0.8 and r.time_to_target is not None
    assert r.workload_meta["metric"] == "accuracy" and r.workload_meta["metric_mode"] == "max"
    key = make_config(w, "adamw").key()
    same = Workload.from_tensors("own_t", _mlp, train=_data(), eval=_data(seed=1), steps=150,
                                 batch_size=32, target=0.8)  # fmt: skip
    assert make_config(same, "adamw").key() == key  # equal workload, equal key
    wider = Workload.from_tensors("own_t", lambda: _mlp(17), train=_data(), eval=_data(seed=1),
                                  steps=150, batch_size=32, target=0.8)  # fmt: skip
    assert make_config(wider, "adamw").key() != key
    x, y = _data()
    y2 = y.clone()
    y2[-1] = 1 - y2[-1]  # one label of the last example changed
    relabelled = Workload.from_tensors("own_t", _mlp, train=(x, y2), eval=_data(seed=1),
                                       steps=150, batch_size=32, target=0.8)  # fmt: skip
    assert make_config(relabelled, "adamw").key() != key


def test_from_tensors_regression_with_own_metric() -> None:
    x = torch.randn(128, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def mae(out: torch.Tensor, t: torch.Tensor) -> float:
        return float((out - t).abs().mean())

    w = Workload.from_tensors("own_reg", lambda: nn.Linear(3, 1), train=(x, y), eval=(x, y),
                              loss="mse", metric=mae, metric_mode="min", steps=200,
                              batch_size=32, lr={"adaptive": 0.05})  # fmt: skip
    r = run(make_config(w, "adabelief"))
    assert r.status == "ok" and r.final["metric"] < 0.05 and r.final["best_metric"] < 0.05
    assert r.config["hparams"]["lr"] == 0.05


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(train=(torch.zeros(3, 2),), eval=_data()), "train must be a pair"),
        (dict(train=(torch.zeros(3, 2), torch.zeros(4)), eval=_data()), "same, non-zero length"),
        (dict(train=_data(), eval=_data(), loss="hinge"), "loss must be one of"),
        (dict(train=_data(), eval=_data(), metric="f1"), "metric must be one of"),
        (dict(train=_data(), eval=_data(), metric=lambda o, t: 0.0), "metric_mode"),
        (dict(train=_data(), eval=_data(), steps=0), "steps must be an integer >= 1"),
        (dict(train=_data(), eval=_data(), batch_size=-1), "batch_size"),
        (dict(train=_data(), eval=_data(), lr={"adaptive": -1}), "lr\\['adaptive'\\]"),
    ],
)
def test_from_tensors_bad_input(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        Workload.from_tensors("own_bad", _mlp, **kw)


def test_builtin_names_cannot_be_taken_over() -> None:
    w = Workload.from_tensors("mnist1d_mlp", _mlp, train=_data(), eval=_data(), steps=5)
    with pytest.raises(ValueError, match="taken by a built-in"):
        make_config(w, "adamw")


def test_from_loaders() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    tr = DataLoader(TensorDataset(*_data()), batch_size=32, shuffle=True)
    ev = DataLoader(TensorDataset(*_data(seed=1)), batch_size=100)
    w = Workload.from_loaders("own_dl", _mlp, train=tr, eval=ev, steps=50)
    a = run(make_config(w, "adamw", seed=3))
    b = run(make_config(w, "adamw", seed=3))
    assert a.status == "ok" and a.final == b.final  # a seed fixes the shuffling
    assert make_config(w, "adamw").batch_size == 32
    with pytest.raises(ValueError, match="takes its batch size from its DataLoader"):
        run(make_config(w, "adamw", batch_size=8))


WORKLOAD_FILE = """
import os
import torch
from torch import nn
from basin.bench import Workload

WIDTH = {width}

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    return x, (x[:, 0] > 0).long()

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, WIDTH)
        self.b = nn.Linear(WIDTH, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("BASIN_TEST_BOOM") and self.training and self.calls > 3:
            raise RuntimeError("boom at forward 4")
        if os.environ.get("BASIN_TEST_SLOW"):
            import time
            time.sleep(0.05)
        return self.b(torch.relu(self.a(x)))

def make():
    return Workload.from_tensors("filewl", Net, train=_data(0), eval=_data(1), steps=20,
                                 batch_size=32, eval_every=10)

workload = make()
"""


def _write(path: Path, width: int) -> None:
    path.write_text(textwrap.dedent(WORKLOAD_FILE.format(width=width)))


def _basin(*args: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "basin", *args], capture_output=True, text=True,
                          timeout=600, env=env or ENV, cwd=cwd)  # fmt: skip


def test_file_workload_through_bench_tune_and_landscape(tmp_path) -> None:
    f = tmp_path / "mywl.py"
    _write(f, 8)
    db = f"sqlite:///{tmp_path}/own.db"
    bench = ["bench", "-w", f"{f}:workload", "-o", "adamw,muon", "--seeds", "1", "--storage", db,
             "--quiet", "--no-report"]  # fmt: skip
    p = _basin(*bench)
    assert p.returncode == 0, p.stderr
    assert "2 run(s) done, 0 already stored" in p.stderr
    p = _basin(*bench)
    assert "0 run(s) done, 2 already stored" in p.stderr, p.stderr
    p = _basin(*bench[:2], f"{f}:make", *bench[3:])  # a callable returning the workload
    assert "0 run(s) done, 2 already stored" in p.stderr, p.stderr
    _write(f, 9)  # a wider model: no stale results
    p = _basin(*bench)
    assert "2 run(s) done, 0 already stored" in p.stderr, p.stderr
    tune = ["tune", "-w", f"{f}:workload", "-o", "adamw", "--trials", "2", "--steps", "10",
            "--storage", db, "--quiet"]  # fmt: skip
    p = _basin(*tune)
    assert p.returncode == 0 and "2 complete" in p.stderr and "(2 new)" in p.stderr, p.stderr
    p = _basin(*tune)
    assert "(0 new)" in p.stderr, p.stderr
    _write(f, 10)  # a changed model starts a new study instead of resuming the old one
    p = _basin(*tune)
    assert p.returncode == 0 and "(2 new)" in p.stderr, p.stderr
    p = _basin("landscape", "-w", f"{f}:workload", "--out", str(tmp_path / "land"), "--k", "1",
               "--trace-hvp", "6", "--probes", "0", "--surface-steps", "0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    # a stored run: retrained from its config and diagnosed, unless the file changed since
    _write(f, 9)
    fp = wl.get(f"{f}:workload").fingerprint()
    (rec,) = [r for r in Store(db).runs(optimizer="torch:adamw")
              if r["config"]["workload_fingerprint"] == fp]  # fmt: skip
    land = ["--storage", db, "--out", str(tmp_path / "l2"), "--k", "1", "--trace-hvp", "6",
            "--probes", "0", "--surface-steps", "0"]  # fmt: skip
    p = _basin("landscape", "--run", rec["key"][:10], *land)
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stderr
    _write(f, 10)
    p = _basin("landscape", "--run", rec["key"][:10], *land)
    assert p.returncode == 2 and "another version of workload 'filewl'" in p.stderr
    # the report reads the workload's metric from the records, without the file
    p = _basin("report", db, "--out", str(tmp_path / "rep"), cwd="/")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize(
    "spec,match",
    [
        ("{d}/nofile.py:workload", "no such file"),
        ("{d}/mywl.py:nothing", "has no attribute 'nothing'"),
        ("{d}/mywl.py:WIDTH", "is a int, not a basin.bench.Workload"),
        ("{d}/broken.py:workload", "failed to load: SyntaxError"),
        ("no_such_module_xyz:workload", "cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_workload_specs_are_one_line(tmp_path, capsys, spec, match) -> None:
    _write(tmp_path / "mywl.py", 4)
    (tmp_path / "broken.py").write_text("def f(:\n")
    code = main(["bench", "-w", spec.format(d=tmp_path), "-o", "adamw", "--storage",
                 str(tmp_path / "x.db"), "--quiet", "--no-report"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("basin: error: ") and len(err.strip().splitlines()) == 1
    assert match in err, err


def test_failed_run_reason_is_printed(tmp_path) -> None:
    f = tmp_path / "mywl.py"
    _write(f, 4)
    p = _basin("bench", "-w", f"{f}:workload", "-o", "adamw", "--seeds", "1", "--storage",
               str(tmp_path / "f.db"), "--quiet", "--no-report",
               env={**ENV, "BASIN_TEST_BOOM": "1"})  # fmt: skip
    assert p.returncode == 0
    assert "basin: run failed: filewl torch:adamw seed=0: RuntimeError: boom at forward 4" in p.stderr
    assert "1 failed" in p.stderr


def test_ctrl_c_exits_130_and_says_what_is_stored(tmp_path) -> None:
    f = tmp_path / "mywl.py"
    _write(f, 4)
    db = tmp_path / "c.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "basin", "bench", "-w", f"{f}:workload", "-o", "adamw,sgd,muon",
         "--seeds", "4", "--storage", str(db), "--quiet", "--no-report"],
        stderr=subprocess.PIPE, text=True, env={**ENV, "BASIN_TEST_SLOW": "1"},
        # as from a terminal (pytest-xdist workers start their children with SIGINT ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for the first stored run
        if db.exists():
            try:
                if len(Store(str(db), create=False)) >= 1:
                    break
            except ValueError:
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    n = len(Store(str(db)))
    assert err.strip().splitlines()[-1] == (
        f"basin: interrupted: {n} run(s) stored in {db}; rerun to resume"
    ), err
    assert "Traceback" not in err


def test_report_path_is_checked_before_training(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    db = tmp_path / "r.db"
    code = main(["bench", "-w", "f1", "-o", "sgd", "--seeds", "1", "--steps", "5", "--storage",
                 str(db), "--quiet", "--report", str(tmp_path / "afile")])  # fmt: skip
    assert code == 2
    assert "is a file" in capsys.readouterr().err
    assert not db.exists() or len(Store(str(db))) == 0  # nothing trained


def test_two_databases_in_one_folder_keep_their_reports(tmp_path) -> None:
    for name, opt in (("a", "sgd"), ("b", "adamw")):
        assert main(["bench", "-w", "f1", "-o", opt, "--seeds", "1", "--steps", "5",
                     "--storage", str(tmp_path / f"{name}.db"), "--quiet"]) == 0  # fmt: skip
    a = (tmp_path / "a-report" / "report.html").read_text()
    b = (tmp_path / "b-report" / "report.html").read_text()
    assert "torch:sgd" in a and "torch:adamw" not in a
    assert "torch:adamw" in b and "torch:sgd" not in b


def test_hp_text_for_a_number_is_one_clear_line(tmp_path, capsys) -> None:
    for opt in ("adamw", "adabelief", "pytorch_optimizer:lion"):
        code = main(["bench", "-w", "f1", "-o", opt, "--hp", "lr=abc", "--storage",
                     str(tmp_path / "h.db"), "--quiet", "--no-report"])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "lr must be a number" in err and "'abc'" in err, err
    with pytest.raises(ValueError, match="lr must be a number"):
        make_config("f1", "torch:adamw", {"lr": "abc"})


def test_option_names_agree_between_bench_tune_and_pbt() -> None:
    import typer

    from basin.cli import app

    cmd = typer.main.get_command(app)
    opts = {}
    for name in ("bench", "tune", "pbt"):
        sub = cmd.commands[name]
        options = [p for p in sub.params if getattr(p, "param_type_name", "") == "option"]
        opts[name] = {o for p in options for o in p.opts}
        for p in options:  # every option has help text
            assert p.help, (name, p.opts)
    shared = {"--workload", "-w", "--optimizers", "-o", "--steps"}
    assert all(shared <= o for o in opts.values())
    schedule = {"--schedule", "--warmup", "--decay", "--decay-shape", "--cycles", "--hp"} - {"--hp"}
    assert schedule <= opts["bench"] and schedule <= opts["tune"]
    assert {"--batch-size", "--time-budget", "--eval-every", "--threads", "--storage"} <= (
        opts["bench"] & opts["tune"]
    )
    assert wl.get("f1")  # the registry of workloads is intact after the CLI import


def test_examples_own_model_runs_end_to_end(tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    example = root / "examples" / "own_model.py"
    env = {**ENV, "BASIN_EXAMPLE_STEPS": "40"}
    p = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "adabelief: ok" in p.stdout and (tmp_path / "results/own-report/report.html").exists()
    p = _basin("bench", "-w", f"{example}:workload", "-o", "sgd", "--seeds", "1", "--quiet",
               "--storage", str(tmp_path / "e.db"), "--no-report", env=env)  # fmt: skip
    assert p.returncode == 0 and "1 run(s) done" in p.stderr, p.stderr


class _NaNGrad(nn.Module):
    """A finite loss whose gradient is NaN (d sqrt(z)/dz at z = 0, times 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 2)
        self.z = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + 0.0 * self.z.sqrt()


def test_a_nan_gradient_is_a_diverged_run_not_a_failed_one() -> None:
    w = Workload.from_tensors("own_nan", _NaNGrad, train=_data(), eval=_data(), steps=5)
    r = run(make_config(w, "adabelief"))  # refuses the step: diverged at step 1
    assert r.status == "diverged" and r.diverged_step == 1 and r.error is None
    r = run(make_config(w, "adamw"))  # torch steps into NaN weights: the loss says so next
    assert r.status == "diverged" and r.error is None


def test_an_optimizer_without_a_default_lr_needs_one(tmp_path, capsys) -> None:
    w = Workload.from_tensors("own_nolr", _mlp, train=_data(), eval=_data(), steps=5)
    with pytest.raises(ValueError, match="sgdp has no default learning rate"):
        make_config(w, "sgdp")
    assert run(make_config(w, "sgdp", {"lr": 0.01})).status == "ok"
