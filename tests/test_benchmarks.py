"""Smoke test: benchmarks/optim_step.py still runs (a few steps, no compile), so it can't rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "optim_step.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_optim_step_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = _run("--quick", "--only", "adabelief", "--no-compile", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "torch AdamW fused" in proc.stdout and "adabelief" in proc.stdout
    result = json.loads(out.read_text())
    rows = {(r["model"], r["impl"]): r for r in result["rows"]}
    for model in ("4m", "mlp"):
        basin = rows[(model, "basin")]
        assert basin["median_ms"] > 0 and basin["vs_fastest_peer"] > 0
        assert abs(basin["state_bytes_per_param"] - 2.0) < 1e-9  # exp_avg + exp_avg_var
        assert rows[(model, "adabelief_pytorch")]["median_ms"] > 0
        assert abs(rows[(model, "torch AdamW fused")]["vs_fused_adamw"] - 1.0) < 1e-12


def test_optim_step_benchmark_rejects_unknown_name() -> None:
    proc = _run("--quick", "--only", "nosuchoptimizer", "--no-compile")
    assert proc.returncode == 2
    assert "nosuchoptimizer" in proc.stderr and "Traceback" not in proc.stderr
