"""The ``basin`` command. Every command is a thin layer over a Python function.

User mistakes (unknown names, invalid values, unreadable files) print one line to stderr and
exit with status 2; no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

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
    cols = ("name", "class", "paper", "arXiv", "year", "family / lr rule", "state / param",
            "searched", "capabilities")  # fmt: skip
    for col in cols:
        table.add_column(col)
    for info in infos():
        mem = f"{info.state_memory:g}x" + (f" ({info.state_note})" if info.state_note else "")
        table.add_row(
            info.name,
            info.cls.__name__ + (f" + {info.method}" if info.method else ""),
            info.paper.title if info.paper else "-",
            info.paper.arxiv if info.paper else "-",
            str(info.paper.year) if info.paper else "-",
            f"{info.family} / {info.lr_scaling}",
            mem,
            ", ".join(info.search_space),
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
    """``(model, loss_fn, data)`` of a workload: the built-in ``demo-mlp``, else any bench
    workload (a name, ``file.py:NAME`` or ``module:NAME``): its model built from ``seed``, its
    loss and its probe batch of training data."""
    if name == "demo-mlp":
        from basin.landscape.report import demo_workload

        demo = demo_workload(name, seed=seed)
        return demo.model, demo.loss_fn, demo.data
    from basin.bench import workloads

    try:
        w = workloads.get(name)
    except ValueError as exc:
        raise UserError(f"{exc}; built in: demo-mlp") from None
    task = w.build(seed)
    return task.model, task.loss_fn, task.probe_batch


def _stored_run(storage: str, key: str):
    """The stored run whose key starts with ``key``: its model trained again from its config
    (runs are deterministic on CPU: the final metric is checked against the stored one), its
    loss and its probe batch."""
    import math

    from basin.bench import RunConfig, Store, run
    from basin.bench import workloads as wl

    with Store(storage, create=False) as st:
        hits = [r for r in st.runs() if r["key"].startswith(key)]
    if not hits:
        raise UserError(f"no run with key {key!r} in {storage}")
    if len({r["key"] for r in hits}) > 1:
        raise UserError(f"key {key!r} is ambiguous in {storage}: give more characters")
    rec = hits[0]
    if rec["status"] != "ok":
        raise UserError(f"run {key!r} ended {rec['status']}: there is no trained model to diagnose")
    cfg = RunConfig.from_dict(rec["config"])
    source = (rec.get("workload_meta") or {}).get("source")
    w = wl.get(source or cfg.workload)
    if w.fingerprint() != cfg.workload_fingerprint:
        raise UserError(
            f"run {key!r} was trained on another version of workload {cfg.workload!r} "
            "(its model or data changed since)"
        )
    res = run(cfg)
    want, got = rec["final"].get("metric"), res.final.get("metric")
    if want is not None and got is not None and not math.isclose(want, got, rel_tol=1e-6):
        print(
            f"basin: warning: retrained run {key!r} ends at metric {got:.6g}, stored {want:.6g} "
            "(another machine or torch version)",
            file=sys.stderr,
        )
    task = w.build(cfg.seed, cfg.batch_size)
    return res.model, task.loss_fn, task.probe_batch


@app.command()
def landscape(
    workload: str = typer.Option(
        "demo-mlp",
        "--workload",
        "-w",
        help="Workload: demo-mlp, any bench workload (basin bench --list), path/to/file.py:NAME "
        "or package.module:NAME.",
    ),
    checkpoint: str = typer.Option(
        None, "--checkpoint", help="A state_dict saved with torch.save, loaded into the model."
    ),
    run_key: str | None = typer.Option(
        None,
        "--run",
        help="Diagnose a stored bench run (its key, or a unique prefix; see runs.csv): its "
        "model is trained again from the stored config. Needs --storage.",
    ),
    storage: str = typer.Option(
        "sqlite:///results/basin.db", "--storage", help="Where --run looks the run up."
    ),
    out: str = typer.Option("landscape_out", "--out", help="Directory for the plots."),
    k: int = typer.Option(5, "--k", help="Eigenvalues per end of the spectrum."),
    trace_hvp: int = typer.Option(99, "--trace-hvp", help="Hessian-vector products for the trace."),
    probes: int = typer.Option(3, "--probes", help="SLQ probes for the density (0: skip)."),
    surface_steps: int = typer.Option(
        21, "--surface-steps", help="Points of the 1-D slice (0: skip)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the model and of the estimators."),
) -> None:
    """Hessian spectrum, trace, density and a loss-surface slice of a workload, a stored run or
    a checkpoint; writes plots."""
    import torch

    # option mistakes before the workload is built and the first products are spent
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")
    if trace_hvp < 3:
        raise UserError(f"--trace-hvp must be >= 3 (Hutch++), got {trace_hvp}")
    if probes < 0 or surface_steps < 0 or surface_steps == 1:
        raise UserError("--probes must be >= 0 and --surface-steps 0 or >= 2")
    if run_key is not None:
        if checkpoint is not None:
            raise UserError("give --run or --checkpoint, not both")
        model, loss_fn, data = _stored_run(storage, run_key)
    else:
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
    from basin.bench.runner import math_attention

    with math_attention():
        _landscape_report(model, loss_fn, data, out, k, trace_hvp, probes, surface_steps, seed)


def _landscape_report(model, loss_fn, data, out, k, trace_hvp, probes, surface_steps, seed):  # noqa: ANN001
    from basin.landscape.report import run_landscape

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


# ---------------------------------------------------------------- shared options
# bench, tune and pbt spell the same things the same way.


def _o_workloads(default: str):
    return typer.Option(
        [default],
        "--workload",
        "-w",
        help="Workload(s): a built-in name (basin bench --list), path/to/file.py:NAME or "
        "package.module:NAME (a Workload or a function returning one); comma-separated or "
        "repeated.",
    )


def _o_workload():
    return typer.Option(
        "mnist1d_mlp",
        "--workload",
        "-w",
        help="Workload: a built-in name, path/to/file.py:NAME or package.module:NAME.",
    )


def _o_optimizers(default: str, what: str):
    return typer.Option(
        default,
        "--optimizers",
        "--optimizer",
        "-o",
        help=f"Comma-separated optimizer names: basin's, torch:*, pytorch_optimizer:*, or bare "
        f"names (adamw -> torch:adamw). {what}",
    )


def _o_steps(what: str = "run"):
    return typer.Option(None, "--steps", help=f"Step budget per {what} (default: the workload's).")


def _o_time_budget(what: str = "run"):
    return typer.Option(
        None, "--time-budget", help=f"Training seconds per {what} (evaluation excluded)."
    )


def _o_batch_size():
    return typer.Option(None, "--batch-size", help="Batch size (default: the workload's).")


def _o_hp():
    return typer.Option(
        [],
        "--hp",
        help="Hyperparameter NAME=VALUE (every optimizer) or OPTIMIZER.NAME=VALUE; repeatable.",
    )


def _o_schedule():
    return typer.Option("constant", "--schedule", help="constant | cosine | warmup | wsd | wsd-s")


def _o_warmup():
    return typer.Option(None, "--warmup", help="Warmup fraction of the budget.")


def _o_decay():
    return typer.Option(None, "--decay", help="WSD / WSD-S decay fraction.")


def _o_decay_shape():
    return typer.Option(None, "--decay-shape", help="WSD decay shape: linear | cosine | 1-sqrt.")


def _o_cycles():
    return typer.Option(None, "--cycles", help="WSD-S cycles.")


def _o_eval_every():
    return typer.Option(
        None, "--eval-every", help="Evaluate (and report to a pruner) every N steps."
    )


def _o_threads():
    return typer.Option(1, "--threads", help="torch CPU threads (small workloads: 1 is fastest).")


def _o_storage(what: str):
    return typer.Option("sqlite:///results/basin.db", "--storage", help=what)


def _o_quiet():
    return typer.Option(False, "--quiet", "-q", help="No progress bars or tables.")


class Interrupted(Exception):
    """Ctrl-C: reported as one line, exit status 130."""


def _optimizer_list(text: str, default: list[str] | None = None) -> list[str]:
    from basin.optim import resolve

    names = _split([text]) or list(default or [])
    if not names:
        raise UserError("--optimizers: give at least one optimizer name")
    resolved = [resolve(n) for n in names]
    if len(set(resolved)) != len(resolved):
        raise UserError("--optimizers lists an optimizer twice")
    return resolved


def _overrides(hp: list[str], typed: str, resolved: list[str]) -> dict[str, dict[str, object]]:
    """``--hp`` per canonical optimizer name (``--hp adamw.lr=...`` for ``torch:adamw``)."""
    from basin.optim import resolve

    typed_names = _split([typed]) or resolved
    aliases = {t: r for t, r in zip(typed_names, resolved)} | {r: r for r in resolved}
    items = []
    for item in hp or []:
        name = item.split("=", 1)[0]
        if "." in name:
            opt, rest = name.rsplit(".", 1)
            if opt not in aliases:
                try:
                    canon = resolve(opt)
                except ValueError:
                    canon = None
                if canon not in resolved:
                    raise UserError(f"--hp {item!r}: optimizer {opt!r} is not in --optimizers")
                aliases[opt] = canon
            item = f"{aliases[opt]}.{rest}={item.split('=', 1)[1]}" if "=" in item else item
        items.append(item)
    return parse_hparams(items, resolved)


def _report_dir(storage: str, report: str | None) -> Path:
    """Where the report goes (``<db stem>-report/`` next to the database by default, so two
    databases in one folder keep their own reports), checked writable before any training."""
    import os

    from basin.bench.store import sqlite_path

    if report is not None:
        out = Path(report)
    else:
        path = sqlite_path(storage)
        if path == ":memory:":
            out = Path("basin-report")
        else:
            out = Path(path).parent / f"{Path(path).stem}-report"
    if out.exists() and not out.is_dir():
        raise UserError(f"report directory {str(out)!r} is a file")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"report directory {str(out)!r} is not writable")
    return out


@app.command()
def bench(
    workload: list[str] = _o_workloads("mnist1d_mlp"),  # noqa: B008
    optimizers: str = _o_optimizers(
        "", "Default: torch:adamw, torch:sgd, adabelief, diffgrad, sgdsai."
    ),
    seeds: int = typer.Option(3, "--seeds", "-s", help="Seeds 0..N-1 per optimizer."),
    tune_trials: int = typer.Option(
        0,
        "--tune",
        help="Tuned comparison (AlgoPerf external tuning): N quasi-random trials per optimizer "
        "from its search space under the same budget, then the best configuration over the "
        "seeds. 0: the optimizers' default hyperparameters.",
    ),
    steps: int | None = _o_steps(),
    time_budget: float | None = _o_time_budget(),
    batch_size: int | None = _o_batch_size(),
    scale_lr: bool = typer.Option(
        False,
        "--scale-lr",
        help="Rescale each default lr to --batch-size (each optimizer's registry rule: linear "
        "for SGD, square root for adaptive methods).",
    ),
    lr_rule: str = typer.Option(
        "default",
        "--lr-rule",
        help="default (the workload's learning rates) | steplaw: Step Law's AdamW learning "
        "rate 1.79 N^-0.713 D^0.307 (arXiv:2503.04715) from the model's non-embedding "
        "parameters N and D = steps x batch x tokens per sample (token workloads only).",
    ),
    adaptive_batch: str | None = typer.Option(
        None,
        "--adaptive-batch",
        help="AdAdaGrad (arXiv:2402.11215): grow the batch by the norm | inner_product | "
        "augmented test on per-sample gradients (constants 0.1), never shrinking, up to "
        "--max-batch-size; runs record the batch-size series.",
    ),
    max_batch_size: int | None = typer.Option(
        None, "--max-batch-size", help="Cap of --adaptive-batch (default: 8 x the first batch)."
    ),
    hp: list[str] = _o_hp(),  # noqa: B008
    schedule: str = _o_schedule(),
    warmup: float | None = _o_warmup(),
    decay: float | None = _o_decay(),
    decay_shape: str | None = _o_decay_shape(),
    cycles: int | None = _o_cycles(),
    eval_every: int | None = _o_eval_every(),
    sharpness_every: int = typer.Option(
        0, "--sharpness-every", help="Top Hessian eigenvalue every N steps during training."
    ),
    landscape_final: bool = typer.Option(
        False,
        "--landscape",
        help="Record the final top Hessian eigenvalue and Hessian trace of every run.",
    ),
    threads: int = _o_threads(),
    storage: str = _o_storage("Where runs (and tuning studies) are stored."),
    report: str | None = typer.Option(
        None, "--report", help="Report directory (default: <db name>-report/ next to the db)."
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write a report."),
    list_workloads: bool = typer.Option(False, "--list", help="List workloads and exit."),
    ray_address: str | None = typer.Option(
        None,
        "--ray",
        help="Train the runs as Ray tasks (pip install 'basin-optim[ray]'): local (a Ray on "
        "this machine), auto or HOST:PORT (a running cluster). Same store, same resume.",
    ),
    ray_cpus: int | None = typer.Option(None, "--ray-cpus", help="CPUs of a --ray local Ray."),
    quiet: bool = _o_quiet(),
    # differential privacy (DP-SGD through Opacus, basin.bench.private)
    dp_epsilon: float | None = typer.Option(
        None, "--dp-epsilon", help="DP-SGD to this epsilon over --steps (Opacus sets the noise)."
    ),
    dp_noise: float | None = typer.Option(
        None, "--dp-noise", help="DP-SGD with this noise multiplier (noise std / clipping norm)."
    ),
    dp_delta: float | None = typer.Option(None, "--dp-delta", help="DP delta (default 1e-5)."),
    dp_max_grad_norm: float | None = typer.Option(
        None, "--dp-max-grad-norm", help="DP per-sample clipping norm (default 1.0)."
    ),
) -> None:
    """Run every optimizer x seed on the workload(s); skip runs already stored; write a report."""
    import torch

    from basin.bench import workloads as wl
    from basin.bench.runner import DEFAULT_OPTIMIZERS, sweep
    from basin.bench.store import Store

    console = Console(width=160)
    if list_workloads:
        table = Table(title="basin workloads")
        for col in ("name", "metric", "target", "batch", "steps", "description"):
            table.add_column(col)
        for w in wl.workloads():
            table.add_row(
                w.name,
                f"{w.metric} ({w.metric_mode})",
                "-" if w.target is None else f"{w.target:g}",
                str(w.batch_size),
                str(w.steps),
                w.description,
            )
        console.print(table)
        return
    names = _split(workload)
    opts = _optimizer_list(optimizers, DEFAULT_OPTIMIZERS)
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if tune_trials < 0:
        raise UserError(f"--tune must be >= 0 trials, got {tune_trials}")
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if tune_trials and scale_lr:
        raise UserError("--scale-lr rescales default learning rates; --tune searches them")
    if lr_rule not in ("default", "steplaw"):
        raise UserError(f"--lr-rule must be default or steplaw, got {lr_rule!r}")
    if lr_rule == "steplaw" and (tune_trials or scale_lr):
        raise UserError("--lr-rule steplaw sets the learning rates: not with --tune or --scale-lr")
    if lr_rule == "steplaw" and steps is None and time_budget is not None:
        raise UserError("--lr-rule steplaw counts tokens from a step budget: give --steps")
    if adaptive_batch is None and max_batch_size is not None:
        raise UserError("--max-batch-size caps --adaptive-batch: give --adaptive-batch too")
    if adaptive_batch is not None and tune_trials:
        raise UserError("--adaptive-batch runs the optimizers' defaults: not with --tune")
    if ray_cpus is not None and ray_address != "local":
        raise UserError("--ray-cpus sizes a --ray local Ray")
    if ray_cpus is not None and ray_cpus < 1:
        raise UserError(f"--ray-cpus must be >= 1, got {ray_cpus}")
    if ray_address is not None:
        from basin.bench.ray_sweep import require_ray

        require_ray()
    sched = _schedule(schedule, warmup=warmup, decay=decay, decay_shape=decay_shape, cycles=cycles)
    overrides = _overrides(hp, optimizers, opts)
    ws = [wl.get(n) for n in names]
    out_dir = None if no_report else _report_dir(storage, report)
    budget = dict(
        steps=steps,
        time_budget=time_budget,
        batch_size=batch_size,
        schedule=sched,
        eval_every=eval_every,
    )
    extra = dict(sharpness_every=sharpness_every, landscape=landscape_final)
    dp = _dp_settings(dp_epsilon, dp_noise, dp_delta, dp_max_grad_norm, tune_trials)
    if dp is not None:
        extra["dp"] = dp
    configs: list = []
    if not tune_trials:
        from basin.bench.plan import plan_runs

        configs, notes = plan_runs(
            ws, opts, seeds, overrides, scale_lr=scale_lr, lr_rule=lr_rule,
            adaptive_batch=adaptive_batch, max_batch_size=max_batch_size, **budget, **extra,
        )  # fmt: skip
        for note in notes:
            print(f"basin: {note}", file=sys.stderr)
    torch.set_num_threads(threads)
    stored = {"n": 0}

    def on_result(res, cfg) -> None:  # noqa: ANN001
        stored["n"] += 1
        if res is not None and res.status == "failed":
            print(
                f"basin: run failed: {cfg.workload} {cfg.optimizer} seed={cfg.seed}: {res.error}",
                file=sys.stderr,
            )

    store = Store(storage)
    with store:
        try:
            if tune_trials:
                configs = _tuned_configs(ws, opts, tune_trials, seeds, storage, overrides, budget,
                                         extra, quiet)  # fmt: skip
            display, cb = _progress(quiet)
            with display:
                if ray_address is None:
                    done = sweep(configs, store, progress=cb, on_result=on_result)
                else:
                    from basin.bench.ray_sweep import sweep_ray

                    done = sweep_ray(configs, store, address=ray_address, num_cpus=ray_cpus,
                                     threads=threads, progress=cb, on_result=on_result)  # fmt: skip
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted: {stored['n']} run(s) stored in {storage}; rerun to resume"
            ) from None
        skipped = len(configs) - len(done)
        if not quiet:
            _summary_table(console, store, [w.name for w in ws], opts)
        out = None
        if out_dir is not None:
            from basin.bench.report import write_report

            paths = write_report(store, out_dir)
            out = paths["html"]
    if not quiet and out is not None:
        _print_verdicts(out)
    diverged = sum(r.status == "diverged" for r in done)
    failed = sum(r.status == "failed" for r in done)
    msg = f"{len(done)} run(s) done, {skipped} already stored"
    msg += f", {diverged} diverged" if diverged else ""
    msg += f", {failed} failed" if failed else ""
    msg += f"; runs in {storage}"
    if out is not None:
        msg += f"; report: {out}"
    print(msg, file=sys.stderr)


def _dp_settings(epsilon, noise, delta, max_grad_norm, tune_trials):  # noqa: ANN001
    """The runs' DP settings from the --dp-* options (None: not private)."""
    if epsilon is None and noise is None:
        if delta is not None or max_grad_norm is not None:
            raise UserError("--dp-delta / --dp-max-grad-norm need --dp-noise or --dp-epsilon")
        return None
    if tune_trials:
        raise UserError("--dp-* with --tune: tuning trials would spend unaccounted privacy")
    return {"noise_multiplier": noise, "target_epsilon": epsilon, "delta": delta,
            "max_grad_norm": max_grad_norm}  # fmt: skip


def _tuned_configs(ws, opts, n, seeds, storage, overrides, budget, extra, quiet):  # noqa: ANN001
    """The tuned comparison's tuning phase with a progress display; the seed runs' configs."""
    from basin.bench.compare import tuned_configs

    total = len(ws) * len(opts) * n
    prog = None if quiet else _progress_display()
    state = {"done": 0}
    if prog is not None:
        all_t = prog.add_task("tuning trials", total=total)
        run_t = prog.add_task("  trial", total=1)
        prog.start()

    def on_trial(opt, t, done, n_trials):  # noqa: ANN001
        state["done"] += 1
        if prog is not None:
            prog.update(all_t, completed=min(state["done"], total), description=f"tuning {opt}")

    def progress(step, total_steps):  # noqa: ANN001
        if prog is not None:
            prog.update(run_t, completed=step, total=total_steps or step or 1)

    try:
        configs, choices = tuned_configs(
            ws,
            opts,
            n,
            range(seeds),
            storage,
            overrides=overrides,
            on_trial=on_trial,
            progress=progress,
            final=extra,
            **{k: v for k, v in budget.items() if v is not None},
        )
    finally:
        if prog is not None and prog.live.is_started:
            prog.stop()
    if not quiet:
        for c in choices:
            best = "no trial finished" if c.best_value is None else f"best {c.best_value:.4g}"
            print(f"tuned {c.optimizer} on {c.workload}: {best} with {c.hparams}", file=sys.stderr)
    return configs


def _print_verdicts(html_path) -> None:  # noqa: ANN001
    import json

    try:
        payload = json.loads((html_path.parent / "results.json").read_text())
    except (OSError, ValueError):
        return
    for v in (payload.get("verdicts") or {}).values():
        print(f"verdict: {v['verdict']}", file=sys.stderr)


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
    private = any(r.get("dp_epsilon") is not None for r in rows)
    cols = ["workload", "optimizer", "ok/div/fail", "metric", "time-to-target (steps)", "step ms"]
    for col in cols + (["DP epsilon (delta)"] if private else []):
        table.add_column(col)
    for r in rows:
        eps = [] if not private else [
            "-" if r.get("dp_epsilon") is None else f"{r['dp_epsilon']:.4g} ({r['dp_delta']:g})"
        ]  # fmt: skip
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
            *eps,
        )
    console.print(table)


@app.command()
def report(
    results: str = typer.Argument(..., help="Storage URL (sqlite:///path.db) or .db file path."),
    out: str | None = typer.Option(
        None, "--out", help="Output directory (default: <db name>-report/ next to the database)."
    ),
    measure: str = typer.Option(
        "steps",
        "--measure",
        help="Time-to-target measure of the performance profiles: steps (machine-independent) "
        "| seconds.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the written paths."),
) -> None:
    """Write report.html (self-contained), results.json, runs.csv and summary.csv."""
    from basin.bench.report import write_report

    target = _report_dir(results, out)
    paths = write_report(results, target, profile_measure=measure)
    if not quiet:
        for p in paths.values():
            print(p)


@app.command()
def tune(
    workload: str = _o_workload(),
    optimizers: str = _o_optimizers("adabelief", "One study per optimizer."),
    trials: int = typer.Option(
        20, "--trials", "-n", help="Finished trials each study should hold."
    ),
    sampler: str = typer.Option("tpe", help="tpe (seeded) | random | qmc (scrambled Halton)."),
    pruner: str = typer.Option("median", help="median | none."),
    objective: str = typer.Option("metric", help="metric (the workload's) | eval_loss."),
    search_space: str | None = typer.Option(
        None, "--search-space", help="JSON/TOML/YAML file replacing the default search space."
    ),
    show_space: bool = typer.Option(
        False, "--show-space", help="Print the search space as JSON and exit."
    ),
    storage: str = _o_storage(
        "SQLAlchemy URL of the studies (sqlite:///file.db; postgresql+psycopg://user@host/db "
        "for workers on several machines)."
    ),
    study_name: str | None = typer.Option(
        None, "--study-name", help="Default: WORKLOAD-OPTIMIZER. Rerunning resumes it."
    ),
    seed: int = typer.Option(0, "--seed", help="Training seed of every trial and sampler seed."),
    steps: int | None = _o_steps("trial"),
    time_budget: float | None = _o_time_budget("trial"),
    batch_size: int | None = _o_batch_size(),
    schedule: str = _o_schedule(),
    warmup: float | None = _o_warmup(),
    decay: float | None = _o_decay(),
    decay_shape: str | None = _o_decay_shape(),
    cycles: int | None = _o_cycles(),
    eval_every: int | None = _o_eval_every(),
    threads: int = _o_threads(),
    quiet: bool = _o_quiet(),
) -> None:
    """Optuna search over each optimizer's hyperparameters on one workload; resumable."""
    import json

    import torch

    from basin.bench.space import space_to_dict
    from basin.bench.tune import prepare
    from basin.bench.tune import tune as run_tune

    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    opts = _optimizer_list(optimizers)
    if study_name is not None and len(opts) > 1:
        raise UserError("--study-name names one study: give one optimizer")
    sched = _schedule(schedule, warmup=warmup, decay=decay, decay_shape=decay_shape, cycles=cycles)
    specs = [
        prepare(
            workload,
            o,
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
        for o in opts
    ]
    if show_space:
        for spec in specs:
            print(json.dumps(space_to_dict(spec.space), indent=2))
        return
    torch.set_num_threads(threads)
    for spec in specs:
        _tune_one(spec, trials, quiet, run_tune)


def _tune_one(spec, trials, quiet, run_tune) -> None:  # noqa: ANN001
    import json

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
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: finished trials of study {spec.study_name!r} are stored in "
            f"{spec.storage}; rerun to resume"
        ) from None
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
    workload: str = _o_workload(),
    optimizers: str = _o_optimizers("adabelief", "One population per optimizer."),
    population: int = typer.Option(4, "--population", "-p", help="Members of the population."),
    steps: int | None = _o_steps("member"),
    interval: int | None = typer.Option(
        None, help="Steps between evaluations, checkpoints and perturbations (default: eval_every)."
    ),
    search_space: str | None = typer.Option(
        None, "--search-space", help="JSON/TOML/YAML file replacing the default search space."
    ),
    seed: int = typer.Option(0, "--seed", help="Training seed and seed of the initial population."),
    out: str = typer.Option("results/pbt", help="Directory for checkpoints and Ray's logs."),
    num_cpus: int | None = typer.Option(
        None, "--num-cpus", help="Logical CPUs for a local Ray (default: the population size)."
    ),
    synch: bool = typer.Option(False, help="Synchronous PBT (wait for every member)."),
) -> None:
    """Population Based Training with Ray Tune (pip install 'basin-optim[ray]')."""
    import json

    from basin.bench.pbt import pbt as run_pbt

    for o in _optimizer_list(optimizers):
        try:
            res = run_pbt(
                workload,
                o,
                population=population,
                steps=steps,
                interval=interval,
                search_space=search_space,
                seed=seed,
                out_dir=out,
                num_cpus=num_cpus,
                synch=synch,
            )
        except KeyboardInterrupt:
            raise Interrupted("interrupted: PBT stopped; its checkpoints stay in " + out) from None
        best = "-" if res.best_metric is None else f"{res.best_metric:.6g}"
        print(
            f"PBT {res.workload} {res.optimizer}: {len(res.trials)} members, {res.n_exploits} "
            f"exploit(s); best metric {best} with {json.dumps(res.best_hparams, sort_keys=True)}; "
            f"results in {res.path}",
            file=sys.stderr,
        )


def _raised_by_basin(exc: BaseException) -> bool:
    """Was ``exc`` raised by basin's own code (its input checks raise ``ValueError`` naming
    what is wrong)? A ``ValueError`` whose innermost frame is in another package is not a
    message meant for the user."""
    import os

    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    root = os.path.dirname(os.path.abspath(__file__))
    return last is not None and os.path.abspath(last).startswith(root + os.sep)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        app(args=argv, standalone_mode=False)
    except Interrupted as exc:
        print(f"basin: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("basin: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as exc:
        print(f"basin: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        if not _raised_by_basin(exc):
            raise  # from inside a library: a bug to see with its traceback, not a user error
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
