"""The README's two commands are what a new user and CI run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_readme_opens_with_main_job_and_test_command() -> None:
    main_job, tests = _bash_blocks()[:2]
    assert "pip install torch==2.13.0" in main_job and ".venv/bin/basin" in main_job
    assert "pytest" in tests and "ruff check" in tests


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _bash_blocks()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
