"""Worker processes that really start together (within milliseconds): each imports everything
first, runs an optional setup snippet (a fake host name, slow steps), says it is ready, then
waits for a go file before it runs ``basin.cli.main`` on its arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import basin

SRC = str(Path(basin.__file__).resolve().parents[1])  # the basin under test, in subprocesses
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

_WORKER = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
import optuna, sqlalchemy
import basin.bench.report, basin.bench.runner, basin.bench.tune
go, ready, setup = sys.argv[1:4]
exec(setup)
from basin.cli import main
open(ready, "w").close()
deadline = time.monotonic() + 300
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit(99)
    time.sleep(0.002)
sys.exit(main(sys.argv[4:]))
"""


def start(
    where: Path, argvs: list[list[str]], env: dict[str, str] | None = None, setup: str = ""
) -> list[subprocess.Popen]:
    """Start one worker per argument list in the new folder ``where``, wait until all are
    ready, then let them go together."""
    where.mkdir()
    go = where / "go"
    procs = []
    for i, argv in enumerate(argvs):
        ready = where / f"ready{i}"
        cmd = [sys.executable, "-c", _WORKER, str(go), str(ready), setup, *argv]
        p = subprocess.Popen(cmd, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        procs.append((ready, p))
    try:
        deadline = time.monotonic() + 300
        while not all(r.exists() for r, _ in procs):
            if any(p.poll() is not None for _, p in procs):  # one died getting ready: say why
                kill([p for _, p in procs])  # (the others would wait for the go file)
                raise AssertionError([p.communicate(timeout=60) for _, p in procs])
            assert time.monotonic() < deadline, "workers never got ready"
            time.sleep(0.05)
    except BaseException:
        kill([p for _, p in procs])
        raise
    go.touch()
    return [p for _, p in procs]


def finish(procs: list[subprocess.Popen], timeout: float = 500) -> list[tuple[int, str, str]]:
    """``(returncode, stdout, stderr)`` of each worker; any still running after ``timeout``
    seconds in all is killed (and the test fails on the timeout)."""
    end = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, end - time.monotonic()))
            out.append((p.returncode, o, e))
    finally:
        kill(procs)
    return out


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
