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


def _python_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_own_model_example_runs() -> None:
    scope: dict = {}
    exec(_python_block("Workload.from_tensors"), scope)  # noqa: S102 -- the README's own code
    assert scope["r"].status == "ok" and scope["r"].model is not None


def test_readme_optim_example_runs() -> None:
    scope: dict = {}
    exec(_python_block('bo.create("muon", model'), scope)  # noqa: S102
    assert type(scope["opt"]).__name__ == "Muon"
    assert [g["matrix_rule"] for g in scope["opt"].param_groups] == [True, False]


def test_readme_private_training_example_runs() -> None:
    scope: dict = {}
    exec(_python_block("make_private(model"), scope)  # noqa: S102 -- the README's own code
    assert 0 < scope["dp"].epsilon() < float("inf")
    low, high = scope["post"].interval
    assert 0 <= low <= scope["post"].estimate <= high
