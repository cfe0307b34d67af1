"""The tuned comparison (bench --tune N): protocol, statistics, verdict and its report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from chromium import CHROMIUM, IMAGE_PROBE, image_sizes, render
from scipy import stats

from basin.bench import Store
from basin.bench.compare import TUNING_SEED, bootstrap_ci, paired_comparison, verdicts
from basin.bench.report import labels
from basin.cli import main


def test_bootstrap_ci_covers_the_mean_at_its_nominal_rate() -> None:
    """Normal samples of size 20: the 95% percentile interval covers the true mean in about
    95% of 400 repetitions (percentile bootstrap undercovers slightly at small n)."""
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(400):
        x = rng.normal(1.0, 2.0, size=20)
        lo, hi = bootstrap_ci(x, seed=i)
        hits += lo <= 1.0 <= hi
        assert lo < x.mean() < hi
    assert 0.90 <= hits / 400 <= 0.98
    assert bootstrap_ci([1.0]) is None


def test_paired_comparison_is_the_paired_t_test() -> None:
    a = {0: 0.91, 1: 0.88, 2: 0.93, 3: 0.90}
    b = {0: 0.89, 1: 0.87, 2: 0.90, 3: 0.90, 4: 0.5}  # seed 4 is not paired
    pc = paired_comparison(a, b)
    seeds = [0, 1, 2, 3]
    ref = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    assert pc["n"] == 4 and pc["mean"] == pytest.approx(np.mean([a[s] - b[s] for s in seeds]))
    assert pc["p_value"] == pytest.approx(ref.pvalue)
    assert pc["ci"][0] <= pc["mean"] <= pc["ci"][1]


def _rec(key, opt, seed, metric, status="ok", tuning="qmc:4", mode="max"):
    return {
        "key": key,
        "status": status,
        "config": {"workload": "w", "optimizer": opt, "seed": seed, "hparams": {}, "tuning": tuning},
        "final": {"metric": metric},
        "workload_meta": {"metric": "accuracy", "metric_mode": mode, "target": None},
    }


def test_verdict_names_a_clear_winner_and_refuses_a_noisy_one() -> None:
    clear = [_rec(f"a{s}", "adabelief", s, 0.90 + 0.001 * s) for s in range(5)]
    clear += [_rec(f"b{s}", "torch:adamw", s, 0.88 + 0.001 * s + 0.0005 * (s % 2)) for s in range(5)]
    v = verdicts(clear, labels(clear))["w"]
    assert [r["label"] for r in v["ranking"]] == ["adabelief", "torch:adamw"]
    assert v["verdict"].startswith("adabelief beats torch:adamw on w: +1.9")
    assert "points accuracy, 95% CI [" in v["verdict"] and "paired over 5 seeds" in v["verdict"]
    assert "tuned: best of 4 quasi-random" in v["protocol"]
    noisy = [_rec(f"a{s}", "adabelief", s, 0.90 + (0.05 if s % 2 else -0.05)) for s in range(4)]
    noisy += [_rec(f"b{s}", "torch:adamw", s, 0.895 + (-0.05 if s % 2 else 0.05)) for s in range(4)]
    v = verdicts(noisy, labels(noisy))["w"]
    assert v["verdict"].startswith("no clear winner on w") and "includes 0" in v["verdict"]
    # an interval off 0 from 3 seeds whose paired test is not significant is no win either
    few = [_rec(f"a{s}", "adabelief", s, m) for s, m in enumerate([0.62, 0.64, 0.66])]
    few += [_rec(f"b{s}", "torch:adamw", s, m) for s, m in enumerate([0.615, 0.60, 0.64])]
    v = verdicts(few, labels(few))["w"]
    assert v["pairs"][0]["ci"][0] > 0 and v["pairs"][0]["p_value"] > 0.05
    assert "the paired test is not significant" in v["verdict"]
    # minimised metrics rank the other way; untuned comparisons say so
    low = [_rec(f"a{s}", "x", s, 1.0 + s * 0.01, tuning="", mode="min") for s in range(3)]
    low += [_rec(f"b{s}", "y", s, 2.0 + s * 0.01, tuning="", mode="min") for s in range(3)]
    v = verdicts(low, labels(low))["w"]
    assert v["ranking"][0]["label"] == "x" and "untuned" in v["protocol"]


def test_tuned_comparison_end_to_end(tmp_path, capsys) -> None:
    db = tmp_path / "c.db"
    args = ["bench", "-w", "mnist1d_mlp", "-o", "adabelief,adamw", "--tune", "3", "--seeds", "2",
            "--steps", "60", "--storage", str(db), "--quiet"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "4 run(s) done" in err
    import optuna

    url = f"sqlite:///{db}"
    studies = optuna.get_all_study_summaries(url)
    assert len(studies) == 2
    hps = {}
    for s in studies:
        st = optuna.load_study(study_name=s.study_name, storage=url)
        assert len(st.trials) == 3 and all(t.state.name == "COMPLETE" for t in st.trials)
        assert st.user_attrs["optimizer"] in ("adabelief", "torch:adamw")
        best = st.best_trial.user_attrs["hparams"]
        hps[st.user_attrs["optimizer"]] = best
    runs = Store(str(db)).runs()
    assert len(runs) == 4 and {r["config"]["seed"] for r in runs} == {0, 1}
    assert TUNING_SEED not in {r["config"]["seed"] for r in runs}
    for r in runs:  # the seed runs use the best trial's hyperparameters, same budget
        assert r["config"]["tuning"] == "qmc:3" and r["config"]["steps"] == 60
        assert r["config"]["hparams"] == hps[r["config"]["optimizer"]]
    # rerunning resumes: no new trial, no new run
    assert main(args) == 0
    assert "0 run(s) done, 4 already stored" in capsys.readouterr().err
    payload = json.loads((tmp_path / "c-report" / "results.json").read_text())
    v = payload["verdicts"]["mnist1d_mlp"]
    assert len(v["ranking"]) == 2 and v["ranking"][0]["ci"] is not None
    assert {s["optimizer"] for s in payload["sensitivity"]} == {"adabelief", "torch:adamw"}
    assert all(len(s["points"]) == 3 and s["steps"] == 180 for s in payload["sensitivity"])
    html = (tmp_path / "c-report" / "report.html").read_text()
    assert "Verdict:" in html and "95% CI" in html and "Learning-rate sensitivity" in html
    assert "Total tuning cost: 360 steps" in html
    if CHROMIUM is None:
        pytest.skip("chromium not installed (CI installs it)")
    _check_in_chromium(tmp_path, html)


def _check_in_chromium(tmp_path, html: str) -> None:
    probe = IMAGE_PROBE + (
        "document.body.setAttribute('data-verdict',document.querySelector('p.verdict').innerText);"
    )
    dom = render(html, tmp_path, probe)
    sizes = image_sizes(dom)
    assert len(sizes) == html.count("<img ") and all(w > 100 and h > 100 for w, h in sizes)
    verdict = re.search(r'data-verdict="([^"]*)"', dom).group(1)
    assert "mnist1d_mlp" in verdict and "95% CI" in verdict
