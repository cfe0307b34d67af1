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


def _resolve_workload(name: str, seed: int):
    """``(model, loss_fn, data)`` of a workload: the built-in ``demo-mlp``, else
    ``basin.bench.workloads.get(name)`` (an object with ``model``, ``loss_fn`` and ``train_data``
    or ``data`` attributes, or a ``build(seed=...)`` returning one)."""
    if name == "demo-mlp":
        from basin.landscape.report import demo_workload

        w = demo_workload(name, seed=seed)
        return w.model, w.loss_fn, w.data
    try:
        from basin.bench import workloads
    except ImportError:
        raise UserError(
            f"unknown workload {name!r}: basin.bench is not available (built in: demo-mlp)"
        ) from None
    try:
        w = workloads.get(name)
    except (KeyError, ValueError) as exc:
        raise UserError(f"unknown workload {name!r}: {exc}") from None
    if hasattr(w, "build") and not hasattr(w, "model"):
        w = w.build(seed=seed)
    loss_fn = getattr(w, "loss_fn", None) or getattr(w, "loss", None)
    data = getattr(w, "train_data", None) or getattr(w, "data", None)
    if getattr(w, "model", None) is None or loss_fn is None or data is None:
        raise UserError(f"workload {name!r} does not expose model, loss_fn and data")
    return w.model, loss_fn, data


@app.command()
def landscape(
    workload: str = typer.Option("demo-mlp", "--workload", "-w", help="Workload name."),
    checkpoint: str = typer.Option(
        None, "--checkpoint", help="A state_dict saved with torch.save."
    ),
    out: str = typer.Option("landscape_out", "--out", help="Directory for the plots."),
    k: int = typer.Option(5, "--k", help="Eigenvalues per end of the spectrum."),
    trace_hvp: int = typer.Option(99, "--trace-hvp", help="Hessian-vector products for the trace."),
    probes: int = typer.Option(3, "--probes", help="SLQ probes for the density (0: skip)."),
    surface_steps: int = typer.Option(
        21, "--surface-steps", help="Points of the 1-D slice (0: skip)."
    ),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Hessian spectrum, trace, density and a loss-surface slice of a workload; writes plots."""
    import torch

    from basin.landscape.report import run_landscape

    model, loss_fn, data = _resolve_workload(workload, seed)
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable, not a torch file, ...
            raise UserError(
                f"cannot read checkpoint {checkpoint!r}: {type(exc).__name__}"
            ) from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            model.load_state_dict(state)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"checkpoint {checkpoint!r} does not fit workload {workload!r}: {first}"
            ) from None
    if probes < 0 or surface_steps < 0 or surface_steps == 1:
        raise UserError("--probes must be >= 0 and --surface-steps 0 or >= 2")
    run_landscape(
        model,
        loss_fn,
        data,
        out,
        k=k,
        trace_hvp=trace_hvp,
        density_probes=probes,
        surface_steps=surface_steps,
        seed=seed,
        echo=typer.echo,
    )


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
