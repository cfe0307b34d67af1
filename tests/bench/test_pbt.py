"""Population Based Training with Ray Tune on a small local population (optional extra)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.tune")

from basin.bench.pbt import pbt  # noqa: E402


def _flat(hp: dict) -> dict[str, float]:
    out = {}
    for k, v in hp.items():
        for i, x in enumerate(v) if isinstance(v, list) else [(None, v)]:
            out[k if i is None else f"{k}[{i}]"] = x
    return out


@pytest.mark.slow
def test_pbt_exploits_and_mutates(tmp_path: Path) -> None:
    steps, interval = 30, 10
    r = pbt(
        "f1",
        "adabelief",
        population=4,
        steps=steps,
        interval=interval,
        out_dir=tmp_path,
        seed=0,
        synch=True,  # all members reach each evaluation before the quantiles are taken
    )
    assert len(r.trials) == 4
    for t in r.trials:
        assert t["error"] is None
        # the optimizer runs with the member's current (possibly mutated) hyperparameters,
        # not the ones stored in the donor's optimizer state
        assert _flat(t["hparams"]) == pytest.approx(_flat(t["config_hparams"]), rel=1e-12)
        assert t["step"] == steps and math.isfinite(t["metric"])
        # the whole history is read back (Ray's result.json can lose rows at a restart)
        assert t["first_step"] == interval
    # at every evaluation the bottom quarter (1 of 4) takes over a top member's checkpoint
    assert r.n_exploits >= 1
    exploiters = [t for t in r.trials if t["exploits"]]
    ids = {t["trial_id"] for t in r.trials}
    for t in exploiters:
        assert t["lineage"] and set(t["lineage"]) <= ids
        # continuing with the donor's hyperparameters, perturbed (x0.8 / x1.2) or resampled
        assert t["hparams"] != t["first_hparams"]
    assert r.best_metric == min(t["metric"] for t in r.trials)
    saved = json.loads((Path(r.path) / "basin_pbt.json").read_text())
    assert saved["best_metric"] == r.best_metric
    # checkpoints were written for every member
    assert len(list(Path(r.path).glob("*/checkpoint_*/state.pt"))) >= 4


def test_pbt_bad_input() -> None:
    with pytest.raises(ValueError, match="population"):
        pbt("f1", "adabelief", population=1)
    with pytest.raises(ValueError, match="unknown workload"):
        pbt("nope", "adabelief")


@pytest.mark.slow
def test_pbt_diverging_members_report_the_worst_score(tmp_path: Path) -> None:
    """A member whose basin optimizer refuses a non-finite gradient is a diverged member, as in
    `basin bench`: it reports the worst score at that evaluation and ends (no Ray error), as
    a member whose loss goes non-finite does."""
    r = pbt(
        "f1", "adabelief", population=2, steps=20, interval=10, out_dir=tmp_path, seed=0,
        search_space={"lr": {"type": "float", "low": 1e29, "high": 1e30, "log": True}},
    )  # fmt: skip
    assert len(r.trials) == 2
    for t in r.trials:
        assert t["error"] is None
        assert t["metric"] == math.inf and t["step"] == 10  # diverged in the first interval


def test_pbt_and_ray_sweeps_start_their_own_ray_whatever_the_host_recorded(tmp_path: Path) -> None:
    """A dead cluster named by ``RAY_ADDRESS`` (as by an earlier ``ray start``, whose address
    file ``ray.init()`` also reads) is not joined: `basin pbt` and `basin bench --ray local`
    start a Ray of their own (real CLI processes)."""
    import os
    import subprocess
    import sys

    import basin

    src = str(Path(basin.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": "127.0.0.1:9", "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    for args in (
        ["pbt", "-w", "f1", "-o", "adabelief", "-p", "2", "--steps", "4", "--interval", "2",
         "--out", str(tmp_path / "pbt")],
        ["bench", "-w", "f1", "-o", "torch:sgd", "--seeds", "1", "--steps", "5", "--no-report",
         "--storage", str(tmp_path / "r.db"), "-q", "--ray", "local", "--ray-cpus", "1"],
    ):  # fmt: skip
        p = subprocess.run([sys.executable, "-m", "basin", *args], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert p.returncode == 0, (args[0], p.stderr[-3000:])
