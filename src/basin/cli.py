"""The ``basin`` command. Every command is a thin layer over a Python function.

User mistakes (unknown names, invalid values, unreadable files) print one line to stderr and
exit with status 2; no traceback."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="basin: verified optimizers, loss-landscape diagnostics and optimizer benchmarks.",
)


@app.callback()
def _root() -> None:
    """basin: verified optimizers, loss-landscape diagnostics and optimizer benchmarks."""


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


@app.command()
def optimizers(
    all_names: bool = typer.Option(
        False, "--all", help="Also list every torch:* and pytorch_optimizer:* name."
    ),
) -> None:
    """Table of basin's optimizers: paper, year, state memory per parameter, capabilities."""
    from basin.optim import available, infos

    table = Table(title="basin optimizers")
    for col in ("name", "class", "paper", "arXiv", "year", "state / param", "capabilities"):
        table.add_column(col)
    for info in infos():
        mem = f"{info.state_memory:g}x" + (f" ({info.state_note})" if info.state_note else "")
        table.add_row(
            info.name,
            info.cls.__name__,
            info.paper.title,
            info.paper.arxiv,
            str(info.paper.year),
            mem,
            ", ".join(sorted(info.capabilities)),
        )
    console = Console(width=200)
    console.print(table)
    if all_names:
        for name in available():
            console.print(name)
    else:
        n = len(available())
        console.print(f"{n} names in all (basin, torch:*, pytorch_optimizer:*); --all lists them.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        app(args=argv, standalone_mode=False)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"basin: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("basin: aborted", file=sys.stderr)
        return 130
    except Exception as exc:
        # usage errors of the command-line parser (typer/click): it prints its own message
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
