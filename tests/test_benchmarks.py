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


def _optim_step_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "optim_step", ROOT / "benchmarks" / "optim_step.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["optim_step"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_matrix_only_state_bytes() -> None:
    """The benchmark's matrix-only state column on a small transformer (d = 32, one layer:
    hidden matrices 96x32, 32x32, 128x32, 32x128; embedding, head, biases, norms on AdamW),
    one step each, against closed forms: SWAN 0 bytes, Muon 1, COSMOS (rank r)
    sum(mn + r(m + n) + r^2) / sum(mn), FRUGAL (svd, density 1/4, r = 8 of the smaller side
    32) moments 2 * density exactly plus the r x 32 projector per matrix."""
    import torch

    import basin.optim as bo

    ob = _optim_step_module()

    def build(name: str, **hp):
        torch.manual_seed(0)
        model = ob.TinyTransformer(vocab=50, d=32, layers=1, heads=2)
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        matrices, rest = ob.matrix_split(model)
        groups = [{"params": matrices, "matrix_rule": True}, {"params": rest, "matrix_rule": False}]
        opt = bo.create(name, groups, **hp)
        opt.step()
        opt.rest_numel = sum(p.numel() for p in rest)
        return opt, matrices, frozenset(id(p) for p in matrices)

    opt, mats, ids = build("swan")
    shapes = sorted(tuple(p.shape) for p in mats)
    assert shapes == [(32, 32), (32, 128), (96, 32), (128, 32)]
    assert sum(len(opt.state[p]) for p in mats) == 0
    assert ob.state_bytes_ratio(opt, ids) == 0.0
    # over all parameters only the AdamW fallback (embedding, head, biases, norms) has state
    total = opt.rest_numel + sum(p.numel() for p in mats)
    assert abs(ob.state_bytes_ratio(opt) - 2 * opt.rest_numel / total) < 1e-12

    opt, mats, ids = build("muon")
    assert ob.state_bytes_ratio(opt, ids) == 1.0
    assert ob.state_bytes_ratio(opt) > 1.0

    mn = sum(m * n for m, n in shapes)
    r = 8
    opt, mats, ids = build("cosmos", rank=r)
    expected = sum(m * n + r * (m + n) + r * r for m, n in shapes) / mn
    assert abs(ob.state_bytes_ratio(opt, ids) - expected) < 1e-12

    opt, mats, ids = build("frugal", density=0.25)
    moments = sum(opt.state[p][k].numel() for p in mats for k in ("exp_avg", "exp_avg_sq"))
    assert moments / mn == 2 * 0.25
    projector = sum(r * 32 for _ in shapes)  # svd: an r-column basis of the 32-wide side
    assert abs(ob.state_bytes_ratio(opt, ids) - (2 * 0.25 + projector / mn)) < 1e-12


def test_sharpness_aware_benchmark_quick() -> None:
    """benchmarks/sam_step.py --quick: every method's step time against its base, and the
    sharpness rows of every method run through the harness by name."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sam_step.py"), "--quick"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for kind in ("sam", "asam", "saf", "mesa", "ggpo"):
        assert f"mlp            399370 {kind:<6}" in proc.stdout, kind
    for opt in ("torch:sgd", "sam", "asam", "saf", "mesa"):
        assert f"mean {opt:<10} top eigenvalue" in proc.stdout, opt
