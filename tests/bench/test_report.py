"""Report: aggregates, JSON/CSV, self-contained HTML, and that it renders in Chromium."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import statistics

import pytest
from chromium import CHROMIUM, image_sizes, render

from basin.bench import Store, configs_for, make_config, sweep
from basin.bench.report import summarize, tune_summaries, write_report


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rep") / "runs.db"
    cfgs = configs_for(["f1", "f2"], ["torch:sgd", "adabelief"], range(2), eval_every=20)
    cfgs.append(make_config("quadratic_deep", "torch:sgd", {"lr": 0.5, "momentum": 0.0}))
    cfgs.append(make_config("quadratic_deep", "adabelief", steps=40, sharpness_every=0))
    with Store(str(path)) as st:
        sweep(cfgs, st)
    return f"sqlite:///{path}"


def test_summary_matches_the_runs(storage) -> None:
    with Store(storage, create=False) as st:
        runs = st.runs()
    rows = {(r["workload"], r["optimizer"]): r for r in summarize(runs)}
    assert len(runs) == 10 and len(rows) == 6
    f1 = [
        r
        for r in runs
        if r["config"]["workload"] == "f2" and r["config"]["optimizer"] == "adabelief"
    ]
    row = rows[("f2", "adabelief")]
    assert row["metric_mean"] == pytest.approx(statistics.fmean(r["final"]["metric"] for r in f1))
    assert row["runs"] == 2 and row["ok"] == 2 and row["reached"] == 2
    div = rows[("quadratic_deep", "torch:sgd")]
    assert div["diverged"] == 1 and div["metric_mean"] is None and div["ttt_steps"] == float("inf")


def test_files_written(storage, tmp_path) -> None:
    paths = write_report(storage, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert len(data["runs"]) == 10 and len(data["summary"]) == 6
    assert set(data["profile_scores"]) == {"torch:sgd", "adabelief"}
    rows = list(csv.DictReader(paths["runs_csv"].open()))
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok", "diverged"}
    summary = list(csv.DictReader(paths["summary_csv"].open()))
    assert len(summary) == 6
    html = paths["html"].read_text()
    assert "diverged at step" in html and "Performance profiles" in html
    assert "generalization gap" in html and "final sharpness" in html
    # self-contained: no external resources, every image is an embedded PNG
    assert not re.search(r"(src|href)=['\"](?!data:)", html)
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(imgs) == 4  # three workloads' curves + the profiles
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"


def test_generalization_gap_and_sharpness_beside_accuracy(tmp_path) -> None:
    """Two seeds with --landscape: the row holds the mean gap and final top eigenvalue of the
    runs, and the HTML table prints them."""
    path = tmp_path / "g.db"
    cfgs = [
        make_config("mnist1d_mlp", "torch:sgd", seed=s, steps=30, eval_every=30, landscape=True)
        for s in (0, 1)
    ]
    with Store(str(path)) as st:
        sweep(cfgs, st)
        runs = st.runs()
    (row,) = summarize(runs)
    gaps = [r["final"]["generalization_gap"] for r in runs]
    eigs = [r["final"]["top_eigenvalue"] for r in runs]
    assert row["gap_mean"] == pytest.approx(statistics.fmean(gaps))
    assert row["sharpness_mean"] == pytest.approx(statistics.fmean(eigs))
    html = write_report(f"sqlite:///{path}", tmp_path / "out")["html"].read_text()
    assert f"{row['gap_mean']:.4g} &plusmn;" in html
    assert f"{row['sharpness_mean']:.4g} &plusmn;" in html


def test_empty_or_missing_storage(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        write_report(str(tmp_path / "nope.db"), tmp_path)
    Store(str(tmp_path / "empty.db")).close()
    with pytest.raises(ValueError, match="no runs"):
        write_report(str(tmp_path / "empty.db"), tmp_path)


def test_tuning_section_reads_optuna_studies(storage, tmp_path) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = tmp_path / "t.db"
    shutil.copy(storage.removeprefix("sqlite:///"), db)
    url = f"sqlite:///{db}"
    assert tune_summaries(url) == []
    study = optuna.create_study(
        study_name="demo",
        storage=url,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    study.optimize(
        lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2 + 0 * t.suggest_float("y", 0, 1),
        n_trials=12,
    )
    (s,) = tune_summaries(url)
    assert s["name"] == "demo" and s["n_trials"] == 12 and len(s["history"]) == 12
    assert s["best_value"] == pytest.approx(min(v for _, v in s["history"]))
    assert set(s["importance"]) == {"x", "y"} and s["importance"]["x"] > s["importance"]["y"]
    html = write_report(url, tmp_path / "o")["html"].read_text()
    assert "<h3>demo</h3>" in html and "alt='tuning demo'" in html




@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (CI installs it)")
def test_html_renders_in_headless_chromium_with_all_images(storage, tmp_path) -> None:
    html_path = write_report(storage, tmp_path / "r")["html"]
    n_imgs = html_path.read_text().count("<img ")
    sizes = image_sizes(render(html_path.read_text(), tmp_path))
    assert len(sizes) == n_imgs == 4
    assert all(w > 100 and h > 100 for w, h in sizes), sizes


def test_variants_are_labelled_and_tuner_groups_left_out(tmp_path) -> None:
    from basin.bench import run
    from basin.bench.report import labels

    st = Store(str(tmp_path / "v.db"))
    a = run(make_config("f1", "torch:sgd", {"lr": 0.01}, steps=20))
    b = run(make_config("f1", "torch:sgd", {"lr": 0.02}, steps=20))
    c = run(make_config("f1", "adabelief", steps=20))
    t = run(make_config("f1", "adabelief", {"lr": 0.5}, steps=20))
    for r in (a, b, c):
        st.put(r)
    st.put(t, group="tune:demo")
    lab = labels([x.to_dict() for x in (a, b, c)])
    assert lab[a.key] == "torch:sgd (lr=0.01)" and lab[b.key] == "torch:sgd (lr=0.02)"
    assert lab[c.key] == "adabelief"
    paths = write_report(st, tmp_path / "o")
    data = json.loads(paths["json"].read_text())
    assert {r["optimizer"] for r in data["summary"]} == set(lab.values())
    assert t.key not in {r["key"] for r in data["runs"]}
    assert len(write_report(st, tmp_path / "all", groups=None)["json"].read_text()) > 0
