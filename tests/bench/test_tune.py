"""basin tune: search spaces, Optuna studies, resume after SIGKILL, report hook, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from basin.bench import space as sp
from basin.bench.tune import prepare, study_summaries, tune
from basin.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")
FAST = {"steps": 40, "eval_every": 10}


def _url(tmp_path: Path, name: str = "t.db") -> str:
    return f"sqlite:///{tmp_path / name}"


# ------------------------------------------------------------------ search spaces


def test_default_spaces_are_valid_for_every_registered_optimizer() -> None:
    from basin.optim import info, infos

    names = [i.name for i in infos()] + ["torch:adamw", "torch:sgd", "pytorch_optimizer:lion"]
    for name in names:
        # training methods need class logits (SAF, MESA), a first layer (TrAct) or binarizable
        # layers (ReSTE, BiPer): a classification workload, the binary one for those two
        w = "f1" if not info(name).method else "mnist1d_bnn" if name in ("reste", "biper") else "mnist1d_mlp"
        spec = prepare(w, name, 1, storage="sqlite:///unused.db", **FAST)
        assert set(spec.space) == set(info(name).search_space)
        assert set(sp.default_space(name)) == set(info(name).search_space)
    # an optimizer without a default space gets the learning rate only
    assert set(sp.default_space("torch:rmsprop")) == {"lr"}


def test_one_minus_and_tuple_elements_reach_the_optimizer() -> None:
    spec = prepare("f1", "adabelief", 1, storage="sqlite:///unused.db", **FAST)
    hp = spec.hparams({"lr": 0.01, "betas[0]": 0.9, "betas[1]": 0.999})
    assert hp["lr"] == 0.01 and hp["betas"] == (0.9, 0.999)
    p = spec.space["betas[1]"]
    assert p.spec["one_minus"] and p.value_of(1e-3) == pytest.approx(0.999)
    # extremes of beta2 in the default space: 1 - 1e-4 and 1 - 1e-1
    assert sorted(p.extremes()) == pytest.approx([0.9, 0.9999])


def test_storage_none_validates_only() -> None:
    """``storage=None`` (what PBT uses): the job is checked, no URL is needed, tune refuses it;
    merging the space values leaves the base hyperparameters unchanged."""
    spec = prepare("f1", "adabelief", 1, storage=None, **FAST)
    assert spec.storage is None
    base = dict(spec.base_hparams)
    assert spec.hparams({"betas[1]": 0.99})["betas"][1] == 0.99
    assert spec.base_hparams == base
    with pytest.raises(ValueError, match="storage=None"):
        tune(spec)
    with pytest.raises(ValueError, match="search space"):
        prepare("f1", "adabelief", 1, search_space={"nope": {"type": "fixed", "value": 1}},
                storage=None, **FAST)  # fmt: skip


def test_space_file_formats(tmp_path: Path) -> None:
    body = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}
    (tmp_path / "s.json").write_text(json.dumps(body))
    (tmp_path / "s.toml").write_text('[lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-1\nlog = true\n')
    (tmp_path / "s.yaml").write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n")
    for f in ("s.json", "s.toml", "s.yaml"):
        s = sp.load_space(tmp_path / f, "adabelief")
        assert sp.space_to_dict(s) == {"lr": {**body["lr"]}}, f


@pytest.mark.parametrize(
    ("text", "suffix", "expect"),
    [
        ('{"lrr": {"type": "float", "low": 0.1, "high": 1}}', "json", "unknown parameter 'lrr'"),
        ('{"lr": {"type": "normal", "low": 0.1, "high": 1}}', "json", "unknown distribution"),
        ('{"lr": {"type": "float", "low": 1, "high": 0.1}}', "json", "must be < high"),
        ('{"lr": {"type": "float", "low": 0, "high": 1, "log": true}}', "json", "low > 0"),
        ('{"lr": {"type": "float", "low": 0.1}}', "json", "missing 'high'"),
        ('{"lr": {"type": "float", "low": "a", "high": 1}}', "json", "finite number"),
        ('{"lr": {"type": "float", "low": 0.1, "high": 1, "mu": 2}}', "json", "unknown key"),
        ('{"lr": {"type": "categorical", "choices": []}}', "json", "non-empty list"),
        ('{"betas[5]": {"type": "fixed", "value": 0.9}}', "json", "has 2 element"),
        ('{"lr": {"type": "float", "low": -1, "high": 1}}', "json", "lr"),  # optimizer rejects
        ('{"lr": {"type": "float", "low": 0.1, "high": 1}', "json", "invalid JSON at line 1"),
        ("[lr\ntype = 1", "toml", "invalid TOML"),
        ("lr: [1, 2\n", "yaml", "invalid YAML"),
        ("{}", "json", "is empty"),
        ("[1, 2]", "json", "expected a table"),
        ("lr = 1", "ini", "unknown file type"),
    ],
)
def test_bad_space_files_one_clear_line(tmp_path: Path, text: str, suffix: str, expect: str):
    f = tmp_path / f"space.{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError) as ei:
        prepare("f1", "adabelief", 2, search_space=f, storage=_url(tmp_path), **FAST)
    msg = str(ei.value)
    assert expect in msg and "\n" not in msg
    assert not (tmp_path / "t.db").exists()


# ------------------------------------------------------------------ studies


def test_tpe_study_is_deterministic_and_reaches_n_trials(tmp_path: Path) -> None:
    results = []
    for name in ("a.db", "b.db"):
        spec = prepare("f1", "adabelief", 6, storage=_url(tmp_path, name), seed=1, **FAST)
        r = tune(spec)
        assert r.n_complete + r.n_pruned == 6 and r.n_failed == 0
        st = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
        results.append([(t.params, t.value, t.state) for t in st.trials])
    assert results[0] == results[1]
    # rerunning the finished command adds nothing; asking for more adds the difference
    spec = prepare("f1", "adabelief", 6, storage=_url(tmp_path, "a.db"), seed=1, **FAST)
    assert tune(spec).n_new == 0
    spec = prepare("f1", "adabelief", 8, storage=_url(tmp_path, "a.db"), seed=1, **FAST)
    r = tune(spec)
    assert r.n_new == 2 and r.n_complete + r.n_pruned == 8


def test_objective_is_final_metric_and_divergence_is_pruned(tmp_path: Path) -> None:
    from basin.bench import make_config, run

    space = {"lr": {"type": "categorical", "choices": [0.05, 1e30]}}
    spec = prepare(
        "f1", "torch:sgd", 4, search_space=space, storage=_url(tmp_path), pruner="none", **FAST
    )
    tune(spec)
    st = optuna.load_study(study_name=spec.study_name, storage=spec.storage)
    seen = set()
    for t in st.trials:
        seen.add(t.params["lr"])
        if t.params["lr"] == 0.05:
            assert t.state == optuna.trial.TrialState.COMPLETE
            want = run(make_config("f1", "torch:sgd", {"lr": 0.05}, **FAST)).final["metric"]
            assert t.value == pytest.approx(want, rel=1e-12)
            assert t.intermediate_values and max(t.intermediate_values) == FAST["steps"]
        else:
            assert t.state == optuna.trial.TrialState.PRUNED
            assert t.user_attrs["status"] == "diverged"
    assert seen == {0.05, 1e30}


def test_median_pruner_prunes_bad_trials(tmp_path: Path) -> None:
    space = {"lr": {"type": "float", "low": 1e-6, "high": 1e-1, "log": True}}
    spec = prepare(
        "f1",
        "adabelief",
        12,
        search_space=space,
        storage=_url(tmp_path),
        sampler="random",
        **FAST,
    )
    r = tune(spec)
    assert r.n_pruned >= 1 and r.n_complete >= 3


def test_changed_configuration_is_refused(tmp_path: Path) -> None:
    tune(prepare("f1", "adabelief", 1, storage=_url(tmp_path), **FAST))
    with pytest.raises(ValueError, match="different"):
        tune(prepare("f1", "adabelief", 1, storage=_url(tmp_path), steps=30, eval_every=10))


@pytest.mark.parametrize("attrs", [{}, {"basin_host": "here"}])
def test_a_trial_whose_worker_died_right_after_asking_it_is_run_again(
    tmp_path: Path, attrs: dict
) -> None:
    """A worker killed between asking a trial and recording its host and pid leaves a RUNNING
    trial with no owner and no heartbeat: the next worker fails and queues it again instead of
    waiting for it forever (a subprocess, so that a wait ends the test as a failure)."""
    url = _url(tmp_path)
    tune(prepare("f1", "adabelief", 1, storage=url, pruner="none", **FAST))
    study = optuna.load_study(study_name="f1-adabelief", storage=url)
    orphan = study.ask()  # what the killed worker left
    for k, v in attrs.items():
        orphan.set_user_attr(k, v)
    code = (
        "from basin.bench.tune import prepare, tune\n"
        f"r = tune(prepare('f1', 'adabelief', 2, storage={url!r}, pruner='none', steps=40, "
        "eval_every=10))\n"
        "print(r.n_complete, r.n_failed)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC}, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "1"]
    trials = optuna.load_study(study_name="f1-adabelief", storage=url).trials
    assert trials[orphan.number].state.name == "FAIL"
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert retry.state.name == "COMPLETE"  # parameters drawn afresh: the orphan had none


@pytest.mark.parametrize("host", ["same", "other"])
def test_resume_after_sigkill(tmp_path: Path, host: str) -> None:
    """A study killed mid-trial keeps its finished trials; the interrupted trial is marked
    failed, retried with the same parameters, and the rerun reaches N finished trials.
    ``same``: the rerun sees the killed process is gone; ``other``: the killed worker seems to
    run on another machine, so only its stale heartbeat (1 s interval, 2 s grace) tells."""
    db = tmp_path / "kill.db"
    url = f"sqlite:///{db}"
    kw = {"steps": 200, "eval_every": 10}
    fake = "import socket; socket.gethostname = lambda: 'elsewhere'\n" if host == "other" else ""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        + fake
        + "from basin.bench.tune import prepare, tune\n"
        f"tune(prepare('f1', 'adabelief', 4, storage={url!r}, pruner='none', "
        f"steps={kw['steps']}, eval_every={kw['eval_every']}), heartbeat_interval=1)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    states: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)
            assert proc.poll() is None, "tuning finished before it could be killed"
            try:
                con = sqlite3.connect(db, timeout=5)
                rows = con.execute(
                    "SELECT t.state, count(v.trial_intermediate_value_id) FROM trials t "
                    "LEFT JOIN trial_intermediate_values v USING (trial_id) "
                    "GROUP BY t.trial_id ORDER BY t.number"
                ).fetchall()
                con.close()
            except sqlite3.Error:
                continue
            states = [s for s, _ in rows]
            if "COMPLETE" in states and any(s == "RUNNING" and n > 0 for s, n in rows):
                break
        else:
            pytest.fail(f"never saw a complete and a running trial: {states}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = optuna.load_study(study_name="f1-adabelief", storage=url).trials
    kept = {t.number: (t.params, t.value) for t in before if t.state.name == "COMPLETE"}
    running = [t for t in before if t.state.name == "RUNNING"]
    assert kept and len(running) == 1

    if host == "other":
        time.sleep(2.5)  # let the heartbeat go stale
    r = tune(
        prepare("f1", "adabelief", 4, storage=url, pruner="none", **kw),
        heartbeat_interval=1,
        grace_period=2,
    )
    after = optuna.load_study(study_name="f1-adabelief", storage=url).trials
    by_n = {t.number: t for t in after}
    for n, (params, value) in kept.items():  # nothing finished was lost
        assert by_n[n].state.name == "COMPLETE" and (by_n[n].params, by_n[n].value) == (
            params,
            value,
        )
    killed = by_n[running[0].number]
    assert killed.state.name == "FAIL"
    retries = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == killed.params
    assert r.n_complete == 4 and r.n_failed == 1


def test_a_worker_whose_trial_was_failed_as_stale_goes_on(tmp_path: Path) -> None:
    """A worker that stalled past the grace period finds its trial failed and queued again
    by another worker (done here from inside its own training): it drops that run without
    raising, runs the retry and the study still ends with exactly N finished trials."""
    url = _url(tmp_path)
    spec = prepare("f1", "adabelief", 2, storage=url, pruner="none", **FAST)
    taken: list[int] = []

    def progress(step: int, steps: int | None) -> None:
        if taken or step < 15:
            return
        from basin.bench.tune import _fail_and_requeue, _open_storage

        st = optuna.load_study(study_name=spec.study_name, storage=_open_storage(spec, 10, 30))
        (t,) = st.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        assert _fail_and_requeue(st, t._trial_id)  # what a worker on another host does
        taken.append(t.number)

    r = tune(spec, progress=progress)
    trials = optuna.load_study(study_name=spec.study_name, storage=url).trials
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert failed.number == taken[0] and "hparams" in failed.user_attrs
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state.name == "COMPLETE" and retry.params == failed.params
    assert r.n_complete == 2 and r.n_failed == 1 and r.n_new == 2 and len(trials) == 3


# ------------------------------------------------------------------ report hook and CLI


def test_study_summaries_and_report(tmp_path: Path) -> None:
    url = _url(tmp_path)
    tune(prepare("f1", "adabelief", 5, storage=url, pruner="none", **FAST))
    (s,) = study_summaries(url)
    assert s["name"] == "f1-adabelief" and s["n_trials"] == 5 and s["states"] == {"complete": 5}
    vals = [v for _, v in s["history"]]
    assert s["best_value"] == min(vals) and s["direction"] == "minimize"
    assert set(s["importance"]) == {"lr", "betas[0]", "betas[1]", "weight_decay"}
    assert sum(s["importance"].values()) == pytest.approx(1.0)
    assert study_summaries(_url(tmp_path, "none.db")) == []
    assert not (tmp_path / "none.db").exists()

    from basin.bench.report import write_report

    paths = write_report(url, tmp_path / "rep")
    html = paths["html"].read_text()
    assert "f1-adabelief" in html and "data:image/png;base64" in html


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


def test_cli_tune_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _url(tmp_path)
    base = ["tune", "-w", "f1", "-o", "adabelief", "--storage", url, "--steps", "40"]
    rc, err = _cli([*base, "--trials", "3", "--eval-every", "10", "-q"], capsys)
    assert rc == 0, err
    assert "best" in err
    bad_space = tmp_path / "s.json"
    bad_space.write_text('{"lr": {"type": "float", "low": 1, "high": 0.5}}')
    for args, expect in [
        (["tune", "-w", "nope", "-o", "adabelief", "--storage", url], "unknown workload"),
        (["tune", "-w", "f1", "-o", "nope", "--storage", url], "unknown optimizer"),
        ([*base, "--search-space", str(bad_space)], "must be < high"),
        ([*base, "--sampler", "cmaes"], "unknown sampler"),
        ([*base, "--trials", "0"], "trials"),
        (["tune", "-w", "f1", "-o", "adabelief", "--storage", "nosuch://x"], "storage"),
        (
            ["tune", "-w", "f1", "-o", "adabelief", "--storage", "sqlite:///" + str(tmp_path)],
            "directory",
        ),
    ]:
        rc, err = _cli(args, capsys)
        assert rc == 2 and expect in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    # an error once the study is open (here: a changed budget), with progress bars on,
    # is still one line and nothing else (no stray line from the unstarted display)
    rc, err = _cli([*base, "--trials", "3", "--steps", "50"], capsys)
    assert rc == 2 and err.startswith("basin: error: study ") and err.count("\n") == 1, err
    # a file that is not a database is refused and left untouched
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    rc, err = _cli(
        ["tune", "-w", "f1", "-o", "adabelief", "--storage", f"sqlite:///{junk}"], capsys
    )
    assert rc == 2 and "cannot open storage" in err
    assert junk.read_bytes() == b"not a database" * 100
