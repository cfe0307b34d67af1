"""`basin bench --ray`: the sweep's runs as tasks on a local Ray cluster (2 CPUs), on the same
store as the sequential sweep -- a real CLI driver SIGKILLed mid-sweep, its rerun resuming
where it stopped, and every record equal to the sequential sweep's. The workload is a user's
file (`-w file.py:NAME`), so it has to travel to the Ray workers as an object."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import basin
from basin.bench import Store, configs_for, sweep
from basin.cli import main

pytest.importorskip("ray")

SRC = str(Path(basin.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
OPTS, SEEDS, STEPS = ["torch:sgd", "adabelief"], 3, 400

WORKLOAD = """
import torch
from torch import nn
from basin.bench import Workload

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    return x, (x[:, :3].sum(1) > 0).long()

def _net():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

workload = Workload.from_tensors("raywl", _net, train=_data(0), eval=_data(1), steps=50,
                                 batch_size=32, eval_every=100)
"""


def _stored(db: Path) -> dict[str, tuple[str, str]]:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return {
                k: (c, r) for k, c, r in con.execute("SELECT key, created, result FROM basin_runs")
            }
        finally:
            con.close()
    except sqlite3.Error:
        return {}


def _claims(db: Path) -> list[tuple]:
    con = sqlite3.connect(db, timeout=5)
    try:
        return con.execute("SELECT key, pid FROM basin_claims").fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_ray_sweep_resumes_after_sigkill_and_equals_the_sequential_sweep(tmp_path: Path) -> None:
    db = tmp_path / "ray.db"
    wl = tmp_path / "raywl.py"
    wl.write_text(WORKLOAD)
    args = [sys.executable, "-m", "basin", "bench", "-w", f"{wl}:workload", "-o", ",".join(OPTS),
            "--seeds", str(SEEDS), "--steps", str(STEPS), "--storage", str(db), "--no-report",
            "-q", "--ray", "local", "--ray-cpus", "2"]  # fmt: skip
    n = len(OPTS) * SEEDS
    proc = subprocess.Popen(args, env=ENV, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not _stored(db):
            if proc.poll() is not None:  # its Ray's processes may still hold the pipe
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"the driver ended early: {proc.communicate(timeout=60)}")
            assert time.monotonic() < deadline, "no run was stored"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: Ray cleans up after it
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _stored(db)
    assert 1 <= len(before) < n, "the kill came too late to leave anything to resume"
    dead = {pid for _, pid in _claims(db)}
    assert dead <= {proc.pid}  # the claims of the runs its tasks were training

    rerun = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{n - len(before)} run(s) done, {len(before)} already stored" in rerun.stderr
    after = _stored(db)
    assert len(after) == n and _claims(db) == []
    for key, row in before.items():  # finished runs were not run again
        assert after[key] == row

    configs = configs_for([f"{wl}:workload"], OPTS, range(SEEDS), steps=STEPS)
    with Store(str(tmp_path / "seq.db")) as seq:
        results = {r.key: r for r in sweep(configs, seq)}
    assert set(results) == set(after)
    for key, (_, text) in after.items():
        rec, ref = json.loads(text), results[key]
        assert rec["status"] == ref.status == "ok"
        assert rec["final"] == ref.final
        for part, names in (
            ("train", ("step", "loss", "lr")),
            ("eval", ("step", "eval_loss", "metric")),
        ):
            for name in names:
                assert rec["series"][part][name] == ref.series[part][name], (key, part, name)

    # everything stored: nothing to train, so no Ray is started
    assert main(args[3:]) == 0


def test_ray_options_are_checked_before_training(tmp_path: Path, capsys) -> None:
    base = ["bench", "-w", "f1", "-o", "torch:sgd", "--seeds", "1", "--steps", "5",
            "--storage", str(tmp_path / "e.db"), "--no-report", "-q"]  # fmt: skip
    for extra, expect in [
        (["--ray-cpus", "2"], "--ray-cpus sizes a --ray local Ray"),
        (["--ray", "auto", "--ray-cpus", "2"], "--ray-cpus sizes a --ray local Ray"),
        (["--ray", "local", "--ray-cpus", "0"], "--ray-cpus must be >= 1"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"basin: error: {expect}" or expect in err, err
    assert not (tmp_path / "e.db").exists() or _stored(tmp_path / "e.db") == {}
    from basin.bench.ray_sweep import sweep_ray

    with Store(str(tmp_path / "e.db")) as st:
        with pytest.raises(ValueError, match="threads"):
            sweep_ray(configs_for(["f1"], ["torch:sgd"], [0], steps=5), st, threads=0)
        with pytest.raises(ValueError, match="num_cpus sizes a local Ray"):
            sweep_ray([], st, address="auto", num_cpus=2)
