"""Crash consistency and several workers: real processes started together, real SIGKILL and
SIGINT (issue 10, items 1-5). Every test here failed on the code before the fix."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import together
from together import ENV

from basin.bench import Store, make_config, sweep
from basin.bench.tune import prepare, tune
from basin.cli import main


def _together(tmp_path: Path, argvs: list[list[str]], timeout: float = 500) -> list[tuple]:
    return together.finish(together.start(tmp_path / "w", argvs), timeout)


def _wait_for(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            assert proc.poll() is None, f"the process ended before {what}"
        try:
            v = cond()
        except sqlite3.Error:
            v = None
        if v:
            return v
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db, timeout=5)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _one_line_error(rc: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("basin: error: "), (rc, err)
    return lines[0]


TUNE = ["tune", "-w", "f1", "-o", "adabelief", "--steps", "20", "--eval-every", "10",
        "--pruner", "none", "-q"]  # fmt: skip


# ------------------------------------------------------------------ 1: study + fingerprint


def test_kill_between_study_creation_and_fingerprint_leaves_a_guarded_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL right after Optuna committed the new study (before, the fingerprint was
    written after it): a rerun with another budget or space is refused in one line and adds
    no trial; the same command resumes it."""
    db = tmp_path / "k.db"
    url = f"sqlite:///{db}"
    code = (
        "import os, signal, optuna\n"
        "real = optuna.storages.RDBStorage.create_new_study\n"
        "def create_then_die(self, *a, **k):\n"
        "    sid = real(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "optuna.storages.RDBStorage.create_new_study = create_then_die\n"
        "from basin.cli import main\n"
        f"main({[*TUNE, '--trials', '2', '--storage', url]!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert _rows(db, "SELECT study_name FROM studies") == [("f1-adabelief",)]

    space = tmp_path / "lr.json"
    space.write_text('{"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": true}}')
    for extra in (["--steps", "30"], ["--search-space", str(space)]):
        rc = main([*TUNE, "--trials", "2", "--storage", url, *extra])
        line = _one_line_error(rc, capsys.readouterr().err)
        assert "different workload, optimizer, objective, search space or budget" in line
        assert _rows(db, "SELECT count(*) FROM trials") == [(0,)]
    assert main([*TUNE, "--trials", "2", "--storage", url]) == 0
    capsys.readouterr()
    st = optuna.load_study(study_name="f1-adabelief", storage=url)
    assert [t.state.name for t in st.trials] == ["COMPLETE", "COMPLETE"]


def test_an_unguarded_study_with_trials_is_refused(tmp_path: Path) -> None:
    """A study that has trials but no fingerprint (made by plain Optuna, or by the old code
    killed at creation and then resumed) is refused: its budget is unknown."""
    url = f"sqlite:///{tmp_path / 'u.db'}"
    st = optuna.create_study(study_name="f1-adabelief", storage=url)
    st.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-1), n_trials=1)
    with pytest.raises(ValueError, match="has trials but no basin fingerprint"):
        tune(prepare("f1", "adabelief", 2, storage=url, steps=20, eval_every=10))
    assert len(optuna.load_study(study_name="f1-adabelief", storage=url).trials) == 1


# ------------------------------------------------------------------ 2, 3: several workers


def test_workers_started_together_on_a_new_file(tmp_path: Path) -> None:
    """Three `basin tune` and two `basin bench` processes start together on a file that does
    not exist yet: no table-creation race, the tune workers draw distinct parameters and
    stop at exactly --trials, and the bench workers share the sweep (each run trained
    once)."""
    db = tmp_path / "new.db"
    url = f"sqlite:///{db}"
    tune_args = [*TUNE, "--trials", "5", "--storage", url]
    bench_args = ["bench", "-w", "mnist1d_mlp", "-o", "torch:sgd,torch:adamw", "--seeds", "2",
                  "--steps", "20", "--storage", url, "--quiet", "--no-report"]  # fmt: skip
    res = _together(tmp_path, [tune_args] * 3 + [bench_args] * 2)
    for rc, _, err in res:
        assert rc == 0, err
    tune_err, bench_err = [e for _, _, e in res[:3]], [e for _, _, e in res[3:]]

    st = optuna.load_study(study_name="f1-adabelief", storage=url)
    states = [t.state.name for t in st.trials]
    assert states.count("COMPLETE") == 5 and len(states) == 5, states
    params = [json.dumps(t.params, sort_keys=True) for t in st.trials]
    assert len(set(params)) == 5, params
    new = [int(re.search(r"\((\d+) new\)", e).group(1)) for e in tune_err]
    assert sum(new) == 5, tune_err

    assert _rows(db, "SELECT count(*) FROM basin_runs") == [(4,)]
    done = [int(re.search(r"(\d+) run\(s\) done", e).group(1)) for e in bench_err]
    assert sum(done) == 4, bench_err
    assert _rows(db, "SELECT count(*) FROM basin_claims") == [(0,)]


@pytest.mark.parametrize("host", ["same", "other"])
def test_bench_takes_over_the_run_of_a_killed_worker(tmp_path: Path, host: str) -> None:
    """A worker SIGKILLed while training leaves its claim; another worker takes the run over
    -- at once when the dead worker ran on this host (its pid is gone), after the lease when
    it seems to run elsewhere -- and the run is stored once."""
    db = tmp_path / "c.db"
    lease = 4.0
    fake = "import socket; socket.gethostname = lambda: 'elsewhere'\n" if host == "other" else ""
    code = (
        fake + "from basin.bench import Store, make_config, sweep\n"
        "cfg = make_config('f1', 'torch:sgd', steps=20000, eval_every=1000)\n"
        f"sweep([cfg], Store({str(db)!r}), lease={lease})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    try:
        _wait_for(lambda: _rows(db, "SELECT pid FROM basin_claims"), "a claim", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    cfg = make_config("f1", "torch:sgd", steps=20000, eval_every=1000)
    with Store(str(db)) as st:
        (claim,) = st.claims()
        assert claim["pid"] == proc.pid
        t0 = time.time()
        (res,) = sweep([cfg], st, lease=lease, poll=0.1)
        waited = time.time() - t0
        assert res.status == "ok" and st.has(cfg.key()) and len(st) == 1
        assert st.claims() == []
    if host == "other":
        assert claim["expires"] - t0 <= waited  # it waited for the lease to run out


def test_a_finished_run_is_stored_exactly_once(tmp_path: Path) -> None:
    cfg = make_config("f1", "torch:sgd", steps=5)
    with Store(str(tmp_path / "o.db")) as st:
        (res,) = sweep([cfg], st)
        first = st.get(cfg.key())
        assert st.put(res) is False  # a second worker's copy (e.g. after a lease ran out)
        assert st.get(cfg.key()) == first and len(st) == 1
        assert st.claim(cfg.key()) is False  # nothing left to claim


# ------------------------------------------------------------------ 4: damaged storages


def test_damaged_database_page_is_one_line_and_untouched(tmp_path: Path, capsys) -> None:
    db = tmp_path / "d.db"
    with Store(str(db)) as st:
        sweep([make_config("f1", "torch:sgd", steps=5)], st)
    page = _rows(db, "PRAGMA page_size")[0][0]
    raw = bytearray(db.read_bytes())
    for off in range(page, len(raw)):  # every page but the first (header, schema)
        raw[off] = 0xA5
    db.write_bytes(bytes(raw))
    args = ["bench", "-w", "f1", "-o", "torch:sgd", "--seeds", "1", "--steps", "5",
            "--storage", str(db), "--quiet"]  # fmt: skip
    line = _one_line_error(main(args), capsys.readouterr().err)
    assert str(db) in line and "malformed" in line
    assert db.read_bytes() == bytes(raw)


def test_foreign_studies_table_is_refused_untouched(tmp_path: Path, capsys) -> None:
    db = tmp_path / "mine.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY, title TEXT)")
    con.execute("INSERT INTO studies VALUES (1, 'my thesis')")
    con.commit()
    con.close()
    before = db.read_bytes()
    line = _one_line_error(main([*TUNE, "--storage", f"sqlite:///{db}"]), capsys.readouterr().err)
    assert "not an Optuna database" in line
    assert db.read_bytes() == before


def test_bad_json_row_names_the_storage(tmp_path: Path, capsys) -> None:
    db = tmp_path / "j.db"
    cfg = make_config("f1", "torch:sgd", steps=5)
    with Store(str(db)) as st:
        sweep([cfg, make_config("f1", "torch:sgd", seed=1, steps=5)], st)
    con = sqlite3.connect(db)
    con.execute("UPDATE basin_runs SET result = '{\"key\": ' WHERE key = ?", (cfg.key(),))
    con.commit()
    con.close()
    before = db.read_bytes()
    line = _one_line_error(main(["report", str(db), "--out", str(tmp_path / "r")]),
                           capsys.readouterr().err)  # fmt: skip
    assert str(db) in line and cfg.key() in line and "not valid JSON" in line
    assert db.read_bytes() == before


# ------------------------------------------------------------------ 5: Ctrl-C, report files


def test_ctrl_c_in_tune_requeues_the_trial(tmp_path: Path) -> None:
    """SIGINT to `basin tune` mid-trial: the trial is marked failed and queued again with
    its parameters; the rerun runs exactly that retry and reaches --trials."""
    db = tmp_path / "i.db"
    url = f"sqlite:///{db}"
    kw = {"steps": 1000, "eval_every": 10}
    args = ["tune", "-w", "f1", "-o", "adabelief", "--steps", "1000", "--eval-every", "10",
            "--pruner", "none", "--trials", "2", "--storage", url, "-q"]  # fmt: skip
    # as from a terminal: a process started with SIGINT ignored (pytest-xdist workers, `cmd &`)
    # would ignore it too, so give it the default disposition
    proc = subprocess.Popen(
        [sys.executable, "-m", "basin", *args],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for(
            lambda: _rows(
                db,
                "SELECT t.trial_id FROM trials t JOIN trial_intermediate_values v "
                "USING (trial_id) WHERE t.state = 'RUNNING'",
            ),
            "a running trial that reported",
            proc,
        )
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "basin: interrupted: finished trials of study 'f1-adabelief' are stored in "
        f"{url}; rerun to resume"
    ], err
    trials = optuna.load_study(study_name="f1-adabelief", storage=url).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(failed) == 1 and len(waiting) == 1, [t.state for t in trials]
    assert waiting[0].params == failed[0].params
    assert waiting[0].system_attrs["failed_trial"] == failed[0].number
    r = tune(prepare("f1", "adabelief", 2, storage=url, pruner="none", **kw))
    after = {t.number: t for t in optuna.load_study(study_name="f1-adabelief", storage=url).trials}
    assert after[waiting[0].number].state.name == "COMPLETE"
    assert after[waiting[0].number].params == failed[0].params
    assert r.n_complete == 2 and r.n_failed == 1


def _report_set(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def two_reports(tmp_path: Path):
    """A storage with a report written, then one more run stored (the next report differs)."""
    db = tmp_path / "r.db"
    out = tmp_path / "rep"
    with Store(str(db)) as st:
        sweep([make_config("f1", "torch:sgd", steps=20, eval_every=10)], st)
    from basin.bench.report import write_report

    write_report(str(db), out)
    with Store(str(db)) as st:
        sweep([make_config("f1", "torch:sgd", seed=1, steps=20, eval_every=10)], st)
    return db, out, _report_set(out)


@pytest.mark.parametrize("where", ["render", "rename"])
def test_sigkill_while_writing_the_report_keeps_a_consistent_set(two_reports, where) -> None:
    """SIGKILL while the report is rendered (before: results.json was already replaced) or
    when the first file is renamed into place: the previous set is left as it was, and the
    next report removes the dead writer's temporary files."""
    db, out, old = two_reports
    hook = (
        "import basin.bench.report as r\n"
        "r._html = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        if where == "render"
        else "os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    code = (
        "import os, signal\n" + hook + "from basin.bench.report import write_report\n"
        f"write_report({str(db)!r}, {str(out)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    left = _report_set(out)
    assert {k: v for k, v in left.items() if not k.endswith(".tmp")} == old
    from basin.bench.report import write_report

    write_report(str(db), out)
    new = _report_set(out)
    assert set(new) == set(old) and new["results.json"] != old["results.json"]
    assert len(json.loads(new["results.json"])["runs"]) == 2


def test_full_disk_while_writing_the_report_leaves_no_temp_file(two_reports) -> None:
    """A write that hits the file-size limit (a real EFBIG from the kernel, as a full disk
    gives ENOSPC) fails in one line; the previous set is untouched, no temporary file left."""
    import resource

    db, out, old = two_reports
    limit = max(len(v) for v in old.values()) // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "basin", "report", str(db), "--out", str(out), "-q"],
        env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )  # fmt: skip
    line = _one_line_error(proc.returncode, proc.stderr)
    assert "cannot write report file" in line and "File too large" in line
    assert _report_set(out) == old


# ------------------------------------------------------------------ 5: search-space files


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    from basin.bench.space import load_space, space_to_dict

    f = tmp_path / "s.yaml"
    f.write_text("lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n")
    assert space_to_dict(load_space(f, "adabelief")) == {
        "lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}
    }


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        ("json", '{"lr": {"type": "float", "low": 0.1, "high": 1}, '
                 '"lr": {"type": "fixed", "value": 1}}'),
        ("json", '{"lr": {"type": "float", "low": 0.1, "low": 0.5, "high": 1}}'),
        ("yaml", "lr: {type: float, low: 0.1, high: 1}\nlr: {type: fixed, value: 1}\n"),
    ],
)  # fmt: skip
def test_duplicate_keys_are_refused(tmp_path: Path, suffix: str, text: str) -> None:
    from basin.bench.space import load_space

    f = tmp_path / f"s.{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError, match="given twice") as ei:
        load_space(f, "adabelief")
    assert "\n" not in str(ei.value)


# SIGINT sent from inside a storage call of `basin tune`, just before its commit: where a
# real Ctrl-C lands now and then (CI saw one: the re-queueing then waited on SQLite's lock
# held by the interrupted write and the process hung).
_CTRL_C_IN_STORAGE = r"""
import os, signal, sys, threading
import sqlalchemy.orm
from optuna.storages import RDBStorage
from basin.cli import main
method = sys.argv[1]
armed = {"on": False, "fired": False}
commit = sqlalchemy.orm.Session.commit
def commit_after_ctrl_c(self):
    if armed["on"] and not armed["fired"] and threading.current_thread() is threading.main_thread():
        armed["fired"] = True
        self.flush()  # the write is sent: this connection holds SQLite's write lock
        os.kill(os.getpid(), signal.SIGINT)
    return commit(self)
sqlalchemy.orm.Session.commit = commit_after_ctrl_c
call = getattr(RDBStorage, method)
def armed_call(self, *a, **k):
    armed["on"] = True
    try:
        return call(self, *a, **k)
    finally:
        armed["on"] = False
setattr(RDBStorage, method, armed_call)
signal.signal(signal.SIGINT, signal.default_int_handler)
code = main(sys.argv[2:])
print("fired" if armed["fired"] else "not fired")
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("method", "states"),
    [
        ("_create_new_trial", {"FAIL": 1, "WAITING": 1}),  # study.ask of the first trial
        ("set_trial_intermediate_value", {"FAIL": 1, "WAITING": 1}),  # a report mid-trial
        ("set_trial_state_values", {"COMPLETE": 1, "FAIL": 1, "WAITING": 1}),  # the first tell
    ],
)
def test_ctrl_c_inside_a_storage_write_completes_it_then_requeues(
    tmp_path: Path, method: str, states: dict[str, int]
) -> None:
    """The write finishes, the interrupt is raised where training goes on, the running trial
    is failed and queued again, and the process ends with 130 (not a hang on SQLite's lock)."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    args = ["tune", "-w", "f1", "-o", "adabelief", "--steps", "200", "--eval-every", "10",
            "--pruner", "none", "--trials", "2", "--storage", url, "-q"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_IN_STORAGE, method, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "fired", (proc.stdout, proc.stderr)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "basin: interrupted: finished trials of study 'f1-adabelief' are stored in "
        f"{url}; rerun to resume"
    ], proc.stderr
    trials = optuna.load_study(study_name="f1-adabelief", storage=url).trials
    got: dict[str, int] = {}
    for t in trials:
        got[t.state.name] = got.get(t.state.name, 0) + 1
    assert got == states
    r = tune(prepare("f1", "adabelief", 2, storage=url, pruner="none", steps=200, eval_every=10))
    assert r.n_complete == 2
