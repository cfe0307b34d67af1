from __future__ import annotations

import subprocess
import sys

from basin.cli import main


def test_optimizers_table_lists_every_registered_optimizer(capsys) -> None:
    import basin.optim as bo

    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    for info in bo.infos():
        assert info.name in out and info.paper.arxiv in out


def test_unknown_command_exits_2_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "basin", "nosuchcommand"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
