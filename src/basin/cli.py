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
        msg = exc.args[0] if exc.args else f"unknown workload {name!r}"
        raise UserError(f"{msg}; built in: demo-mlp") from None
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

    # option mistakes before the workload is built and the first products are spent
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    if trace_hvp < 3:
        raise UserError(f"--trace-hvp must be >= 3 (Hutch++), got {trace_hvp}")
    if probes < 0 or surface_steps < 0 or surface_steps == 1:
        raise UserError("--probes must be >= 0 and --surface-steps 0 or >= 2")
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


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _parse_value(text: str) -> object:
    import json

    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() == "none":
        return None
    try:
        v = json.loads(t)
        return tuple(v) if isinstance(v, list) else v
    except ValueError:
        pass
    if "," in t:  # betas=0.9,0.999
        return tuple(_parse_value(x) for x in t.split(","))
    return t


def _schedule(name: str, **options: object) -> dict[str, object]:
    """The schedule dict of the ``--schedule`` option and the options the user gave."""
    return {"name": name, **{k: v for k, v in options.items() if v is not None}}


def parse_hparams(items: list[str] | None, optimizers: list[str]) -> dict[str, dict[str, object]]:
    """``["lr=1e-3", "torch:sgd.momentum=0.8"]`` -> per-optimizer overrides. A bare name
    applies to every optimizer; ``OPT.name=value`` to that one."""
    out: dict[str, dict[str, object]] = {o: {} for o in optimizers}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--hp {item!r}: expected NAME=VALUE or OPTIMIZER.NAME=VALUE")
        name, value = item.split("=", 1)
        val = _parse_value(value)
        if "." in name:
            opt, hp = name.rsplit(".", 1)
            if opt not in out:
                raise UserError(f"--hp {item!r}: optimizer {opt!r} is not in --optimizers")
            out[opt][hp.strip()] = val
        else:
            for o in optimizers:
                out[o][name.strip()] = val
    return {o: hp for o, hp in out.items() if hp}


def _progress_display():
    """The rich progress display (on stderr) of ``bench`` and ``tune``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def _progress(quiet: bool):
    """A rich progress display (or a no-op context) and a sweep progress callback."""
    import contextlib

    if quiet:
        return contextlib.nullcontext(), None
    prog = _progress_display()
    tasks: dict[str, int] = {}

    def cb(done: int, total: int, desc: str, step: int, steps: int | None) -> None:
        if "all" not in tasks:
            tasks["all"] = prog.add_task("runs", total=total)
            tasks["run"] = prog.add_task("", total=steps or 1)
        prog.update(tasks["all"], completed=done, total=total)
        if desc == "done":
            prog.update(tasks["run"], visible=False)
            return
        prog.update(tasks["run"], description=f"  {desc}", completed=step, total=steps or step or 1)

    return prog, cb


@app.command()
def bench(
    workload: list[str] = typer.Option(  # noqa: B008
        ["mnist1d_mlp"], "--workload", "-w", help="Workload name(s), comma-separated or repeated."
    ),
    optimizers: str = typer.Option(
        "",
        "--optimizers",
        "-o",
        help="Comma-separated optimizer names (any registry name, torch:*, pytorch_optimizer:*). "
        "Default: torch:adamw, torch:sgd, adabelief, diffgrad, sgdsai.",
    ),
    seeds: int = typer.Option(3, "--seeds", "-s", help="Seeds 0..N-1 per optimizer."),
    steps: int | None = typer.Option(None, help="Step budget (default: the workload's)."),
    time_budget: float | None = typer.Option(
        None, "--time-budget", help="Training seconds per run (evaluation excluded)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Default: the workload's."),
    scale_lr: bool = typer.Option(
        False,
        "--scale-lr",
        help="Rescale each default lr to --batch-size (linear rule for SGD, square root for "
        "adaptive methods).",
    ),
    hp: list[str] = typer.Option(  # noqa: B008
        [], "--hp", help="Hyperparameter override NAME=VALUE (all) or OPT.NAME=VALUE; repeatable."
    ),
    schedule: str = typer.Option("constant", help="constant | cosine | warmup | wsd | wsd-s"),
    warmup: float | None = typer.Option(None, help="Warmup fraction of the budget."),
    decay: float | None = typer.Option(None, help="WSD decay fraction."),
    decay_shape: str | None = typer.Option(None, "--decay-shape", help="linear | cosine | 1-sqrt"),
    cycles: int | None = typer.Option(None, help="WSD-S cycles."),
    eval_every: int | None = typer.Option(None, "--eval-every"),
    sharpness_every: int = typer.Option(
        0, "--sharpness-every", help="Top Hessian eigenvalue every N steps (needs basin.landscape)."
    ),
    threads: int = typer.Option(1, help="torch CPU threads (small workloads run fastest on one)."),
    storage: str = typer.Option("sqlite:///results/basin.db", help="Where runs are stored."),
    report: str | None = typer.Option(
        None, help="Report directory (default: next to the storage file)."
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write a report."),
    list_workloads: bool = typer.Option(False, "--list", help="List workloads and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
) -> None:
    """Run every optimizer x seed on the workload(s); skip runs already stored; write a report."""
    from pathlib import Path

    import torch

    from basin.bench import workloads as wl
    from basin.bench.runner import DEFAULT_OPTIMIZERS, configs_for, sweep
    from basin.bench.schedules import scale_lr as _scale
    from basin.bench.schedules import scaling_rule
    from basin.bench.store import Store, sqlite_path

    console = Console(width=160)
    if list_workloads:
        table = Table(title="basin workloads")
        for col in ("name", "metric", "target", "batch", "steps", "description"):
            table.add_column(col)
        for w in wl.workloads():
            table.add_row(
                w.name,
                f"{w.metric} ({w.metric_mode})",
                f"{w.target:g}",
                str(w.batch_size),
                str(w.steps),
                w.description,
            )
        console.print(table)
        return
    names = _split(workload)
    opts = _split([optimizers]) or list(DEFAULT_OPTIMIZERS)
    if len(set(opts)) != len(opts):
        raise UserError("--optimizers lists a name twice")
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    sched = _schedule(schedule, warmup=warmup, decay=decay, decay_shape=decay_shape, cycles=cycles)
    overrides = parse_hparams(hp, opts)
    configs = []
    for name in names:
        w = wl.get(name)
        per = {o: dict(overrides.get(o, {})) for o in opts}
        if scale_lr and batch_size is not None:
            for o in opts:
                if "lr" not in per[o]:
                    base = wl.default_hparams(w, o).get("lr")
                    if base is not None:
                        per[o]["lr"] = _scale(base, w.batch_size, batch_size, scaling_rule(o))
        configs += configs_for(
            [w.name],
            opts,
            range(seeds),
            {o: h for o, h in per.items() if h},
            steps=steps,
            time_budget=time_budget,
            batch_size=batch_size,
            schedule=sched,
            eval_every=eval_every,
            sharpness_every=sharpness_every,
        )
    torch.set_num_threads(threads)
    store = Store(storage)
    display, cb = _progress(quiet)
    with store:
        with display:
            done = sweep(configs, store, progress=cb)
        skipped = len(configs) - len(done)
        if not quiet:
            _summary_table(console, store, names, opts)
        out = None
        if not no_report:
            from basin.bench.report import write_report

            path = sqlite_path(storage)
            out = (
                Path(report) if report else (Path(path).parent if path != ":memory:" else Path("."))
            )
            paths = write_report(store, out)
            out = paths["html"]
    diverged = sum(r.status == "diverged" for r in done)
    failed = sum(r.status == "failed" for r in done)
    msg = f"{len(done)} run(s) done, {skipped} already stored"
    msg += f", {diverged} diverged" if diverged else ""
    msg += f", {failed} failed" if failed else ""
    msg += f"; runs in {storage}"
    if out is not None:
        msg += f"; report: {out}"
    print(msg, file=sys.stderr)


def _summary_table(console: Console, store, names: list[str], opts: list[str]) -> None:
    from basin.bench import workloads as wl
    from basin.bench.report import summarize

    rows = [
        r
        for r in summarize(store.runs())
        if r["workload"] in {wl.get(n).name for n in names}
        and r["optimizer"].split(" (")[0] in opts
    ]
    table = Table(title="final metrics (mean ± std over seeds)")
    for col in (
        "workload",
        "optimizer",
        "ok/div/fail",
        "metric",
        "time-to-target (steps)",
        "step ms",
    ):
        table.add_column(col)
    for r in rows:
        m = "-" if r["metric_mean"] is None else f"{r['metric_mean']:.4g} ± {r['metric_std']:.2g}"
        ttt = "not reached" if r["ttt_steps"] == float("inf") else f"{r['ttt_steps']:g}"
        st = "-" if r["step_time_ms"] is None else f"{r['step_time_ms']:.3g}"
        table.add_row(
            r["workload"],
            r["optimizer"],
            f"{r['ok']}/{r['diverged']}/{r['failed']}",
            f"{r['metric_name']} {m}",
            ttt,
            st,
        )
    console.print(table)


@app.command()
def report(
    results: str = typer.Argument(..., help="Storage URL (sqlite:///path.db) or .db file path."),
    out: str | None = typer.Option(
        None, "--out", help="Output directory (default: next to the database)."
    ),
    measure: str = typer.Option(
        "seconds", help="Time-to-target measure for performance profiles: seconds | steps."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write report.html (self-contained), results.json, runs.csv and summary.csv."""
    from pathlib import Path

    from basin.bench.report import write_report
    from basin.bench.store import sqlite_path

    path = sqlite_path(results)
    target = Path(out) if out else Path(path).parent
    paths = write_report(results, target, profile_measure=measure)
    if not quiet:
        for p in paths.values():
            print(p)


@app.command()
def tune(
    workload: str = typer.Option("mnist1d_mlp", "--workload", "-w", help="Workload name."),
    optimizer: str = typer.Option("adabelief", "--optimizer", "-o", help="Optimizer name."),
    trials: int = typer.Option(20, "--trials", "-n", help="Finished trials the study should hold."),
    sampler: str = typer.Option("tpe", help="tpe (seeded) | random | qmc (scrambled Halton)."),
    pruner: str = typer.Option("median", help="median | none."),
    objective: str = typer.Option("metric", help="metric (the workload's) | eval_loss."),
    search_space: str | None = typer.Option(
        None, "--search-space", help="JSON/TOML/YAML file replacing the default search space."
    ),
    show_space: bool = typer.Option(
        False, "--show-space", help="Print the search space as JSON and exit."
    ),
    storage: str = typer.Option(
        "sqlite:///results/basin.db",
        help="SQLAlchemy URL of the study (sqlite:///file.db, postgresql://... for several workers).",
    ),
    study_name: str | None = typer.Option(
        None, "--study-name", help="Default: WORKLOAD-OPTIMIZER. Rerunning resumes it."
    ),
    seed: int = typer.Option(0, help="Training seed of every trial and sampler seed."),
    steps: int | None = typer.Option(None, help="Step budget per trial (default: the workload's)."),
    time_budget: float | None = typer.Option(
        None, "--time-budget", help="Training seconds per trial (evaluation excluded)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Default: the workload's."),
    schedule: str = typer.Option("constant", help="constant | cosine | warmup | wsd | wsd-s"),
    warmup: float | None = typer.Option(None, help="Warmup fraction of the budget."),
    decay: float | None = typer.Option(None, help="WSD decay fraction."),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help="Evaluate (and report to the pruner) every N steps."
    ),
    threads: int = typer.Option(1, help="torch CPU threads."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Optuna search over an optimizer's hyperparameters on one workload; resumable."""
    import json

    import torch

    from basin.bench.space import space_to_dict
    from basin.bench.tune import prepare
    from basin.bench.tune import tune as run_tune

    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    sched = _schedule(schedule, warmup=warmup, decay=decay)
    spec = prepare(
        workload,
        optimizer,
        trials,
        sampler=sampler,
        pruner=pruner,
        search_space=search_space,
        storage=storage,
        study_name=study_name,
        seed=seed,
        objective=objective,
        steps=steps,
        time_budget=time_budget,
        batch_size=batch_size,
        schedule=sched,
        eval_every=eval_every,
    )
    if show_space:
        print(json.dumps(space_to_dict(spec.space), indent=2))
        return
    torch.set_num_threads(threads)
    on_trial = progress = on_start = prog = None
    if not quiet:
        prog = _progress_display()
        on_start = prog.start  # only once the storage is open: errors stay one line
        all_t = prog.add_task(spec.study_name, total=trials)
        run_t = prog.add_task("  trial", total=spec.run_kwargs.get("steps") or 1)
        best: dict[str, float] = {}

        def on_trial(t, done, total):  # noqa: ANN001
            if t.value is not None and t.state.name == "COMPLETE":
                v = best.get("v")
                better = v is None or (t.value > v if spec.direction == "maximize" else t.value < v)
                if better:
                    best["v"] = t.value
            desc = spec.study_name + (f" (best {best['v']:.4g})" if "v" in best else "")
            prog.update(all_t, completed=min(done, total), description=desc)

        def progress(step, total):  # noqa: ANN001
            prog.update(run_t, completed=step, total=total or step or 1)

    try:
        res = run_tune(spec, on_trial=on_trial, progress=progress, on_start=on_start)
    finally:
        if prog is not None and prog.live.is_started:  # stop() of an unstarted one prints
            prog.stop()
    msg = (
        f"study {res.study_name!r}: {res.n_complete} complete, {res.n_pruned} pruned, "
        f"{res.n_failed} failed ({res.n_new} new); "
    )
    if res.best_value is None:
        msg += "no complete trial"
    else:
        msg += f"best {spec.objective} {res.best_value:.6g} with {json.dumps(res.best_hparams, sort_keys=True)}"
    msg += f"; stored in {res.storage}"
    print(msg, file=sys.stderr)


@app.command()
def pbt(
    workload: str = typer.Option("mnist1d_mlp", "--workload", "-w", help="Workload name."),
    optimizer: str = typer.Option("adabelief", "--optimizer", "-o", help="Optimizer name."),
    population: int = typer.Option(4, "--population", "-p", help="Members of the population."),
    steps: int | None = typer.Option(
        None, help="Training steps per member (default: the workload's)."
    ),
    interval: int | None = typer.Option(
        None, help="Steps between evaluations, checkpoints and perturbations (default: eval_every)."
    ),
    search_space: str | None = typer.Option(
        None, "--search-space", help="JSON/TOML/YAML file replacing the default search space."
    ),
    seed: int = typer.Option(0, help="Training seed and seed of the initial population."),
    out: str = typer.Option("results/pbt", help="Directory for checkpoints and Ray's logs."),
    num_cpus: int | None = typer.Option(
        None, "--num-cpus", help="Logical CPUs for a local Ray (default: the population size)."
    ),
    synch: bool = typer.Option(False, help="Synchronous PBT (wait for every member)."),
) -> None:
    """Population Based Training with Ray Tune (pip install 'basin-optim[ray]')."""
    import json

    from basin.bench.pbt import pbt as run_pbt

    res = run_pbt(
        workload,
        optimizer,
        population=population,
        steps=steps,
        interval=interval,
        search_space=search_space,
        seed=seed,
        out_dir=out,
        num_cpus=num_cpus,
        synch=synch,
    )
    best = "-" if res.best_metric is None else f"{res.best_metric:.6g}"
    print(
        f"PBT {res.workload} {res.optimizer}: {len(res.trials)} members, {res.n_exploits} "
        f"exploit(s); best metric {best} with {json.dumps(res.best_hparams, sort_keys=True)}; "
        f"results in {res.path}",
        file=sys.stderr,
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
