"""`basin tune` workers sharing one study on a real PostgreSQL server (tests/postgres.py: the
server of BASIN_TEST_POSTGRES_URL, which .ci/run starts, or a throwaway one): three concurrent
worker processes, a worker SIGKILLed mid-trial on "another machine", and the one-line errors
for an unreachable server or a missing driver."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import optuna
import postgres
import pytest
import together

from basin.cli import main

# a worker's setup: an optional fake host name (a worker on another machine) and slow steps,
# a short heartbeat (1 s, stale after 20 s: a loaded machine can stall a live worker for seconds)
# so that a dead worker's trial is noticed within the test
_SETUP = r"""
import functools, socket
import psycopg
if os.environ.get("FAKE_HOST"):
    socket.gethostname = lambda: os.environ["FAKE_HOST"]
import basin.bench.runner as br
import basin.bench.tune as bt
if os.environ.get("SLOW_STEP"):  # after its first 10 steps, a worker that outlasts the test
    _step, _calls = br.train_step, [0]
    def _slow(*a, **k):
        _calls[0] += 1
        time.sleep(0.05 if _calls[0] <= 10 else float(os.environ["SLOW_STEP"]))
        return _step(*a, **k)
    br.train_step = _slow
bt.tune = functools.partial(bt.tune, heartbeat_interval=1, grace_period=20)
"""

TUNE = ["tune", "-w", "f1", "-o", "adabelief", "--eval-every", "10", "--pruner", "none", "-q"]


@pytest.fixture(scope="module")
def pg_server():
    yield from postgres.server()


@pytest.fixture
def pg_url(pg_server):
    with postgres.fresh_database(pg_server) as url:
        yield url


def _start(where: Path, argvs: list[list[str]], env: dict[str, str] | None = None) -> list:
    return together.start(where, argvs, env, _SETUP)


def _finish(procs: list, timeout: float = 400) -> list[tuple[int, str]]:
    return [(rc, err) for rc, _, err in together.finish(procs, timeout)]


def _sql(url: str, query: str) -> list[tuple]:
    from sqlalchemy.engine import make_url

    with postgres._connect(url, make_url(url).database) as con:
        return con.execute(query).fetchall()


def _new(err: str) -> int:
    return int(re.search(r"\((\d+) new\)", err).group(1))


@pytest.mark.slow
def test_three_workers_share_one_study(pg_url: str, tmp_path: Path) -> None:
    """Three `basin tune` processes started together on an empty database: no schema-creation
    race, exactly --trials trials (all complete, distinct parameters), each trained by one
    worker (which one depends on who opened the study first), and every worker reports the
    study's best."""
    args = [*TUNE, "--steps", "20", "--trials", "5", "--storage", pg_url]
    res = _finish(_start(tmp_path / "w", [args] * 3))
    for rc, err in res:
        assert rc == 0, err
    st = optuna.load_study(study_name="f1-adabelief", storage=pg_url)
    assert [t.state.name for t in st.trials] == ["COMPLETE"] * 5
    assert len({json.dumps(t.params, sort_keys=True) for t in st.trials}) == 5
    assert sum(_new(e) for _, e in res) == 5
    best = min(t.value for t in st.trials)
    assert st.best_value == best
    for _, err in res:
        assert f"best metric {best:.6g} with" in err, err
    assert _sql(pg_url, "SELECT count(*) FROM basin_tune_locks") == [(0,)]
    assert _sql(pg_url, "SELECT sessions FROM basin_tune_studies") == [(3,)]


@pytest.mark.slow
def test_sigkilled_worker_on_another_machine(pg_url: str, tmp_path: Path) -> None:
    """A worker that seems to run on another machine is SIGKILLed mid-trial once two more
    workers have joined the study. They cannot see its process: once its heartbeat is stale
    they mark its trial failed and queue it again with the same parameters, and the study
    ends with exactly --trials complete trials; a rerun adds nothing."""
    n = 3
    args = [*TUNE, "--steps", "50", "--trials", str(n), "--storage", pg_url]
    victim = _start(tmp_path / "v", [args], {"FAKE_HOST": "elsewhere", "SLOW_STEP": "3"})[0]
    running = (
        "SELECT t.number FROM trials t JOIN trial_user_attributes a USING (trial_id) "
        "WHERE t.state = 'RUNNING' AND a.key = 'basin_host' AND a.value_json = '\"elsewhere\"' "
    )
    reported = (
        " AND EXISTS (SELECT 1 FROM trial_intermediate_values v WHERE v.trial_id = t.trial_id)"
    )
    procs = [victim]
    try:
        _wait(lambda: _has_trials(pg_url) and _sql(pg_url, running + reported), victim)
        procs += _start(tmp_path / "s", [args] * 2)
        _wait(lambda: _sql(pg_url, "SELECT sessions FROM basin_tune_studies") == [(3,)], victim)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        (killed,) = [r[0] for r in _sql(pg_url, running + reported)]
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    res = _finish(procs[1:])
    for rc, err in res:
        assert rc == 0, err

    trials = optuna.load_study(study_name="f1-adabelief", storage=pg_url).trials
    by_n = {t.number: t for t in trials}
    assert by_n[killed].state.name == "FAIL"
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state.name == "COMPLETE" and retry.params == by_n[killed].params
    assert retry.user_attrs["basin_host"] != "elsewhere"
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n and len(trials) == n + 1  # nothing RUNNING or WAITING left
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == n
    assert sum(_new(e) for _, e in res) == n  # the victim finished none
    best = min(t.value for t in complete)

    assert main(args) == 0
    st = optuna.load_study(study_name="f1-adabelief", storage=pg_url)
    assert len(st.trials) == n + 1 and st.best_value == best


def _wait(cond, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _has_trials(url: str) -> bool:
    return bool(_sql(url, "SELECT 1 FROM pg_tables WHERE tablename = 'trial_intermediate_values'"))


def test_unreachable_server_and_missing_driver(capsys: pytest.CaptureFixture[str]) -> None:
    """No server needed: one line, exit 2, at once."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [
        (f"postgresql+psycopg://basin@127.0.0.1:{port}/basin", "cannot open storage"),
        ("postgresql+nosuchdriver://basin@127.0.0.1/basin", "nosuchdriver"),
    ]
    try:
        import psycopg2  # noqa: F401
    except ImportError:  # the driver of SQLAlchemy < 2.1's postgresql://; basin uses psycopg
        cases.append(("postgresql+psycopg2://basin@127.0.0.1/basin", "postgresql+psycopg://"))
    for url, expect in cases:
        t0 = time.monotonic()
        rc = main([*TUNE, "--steps", "20", "--trials", "1", "--storage", url])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("basin: error: "), err
        assert expect in lines[0] and url in lines[0], err
        assert time.monotonic() - t0 < 60
