"""Reports from stored runs: JSON, CSV and one self-contained HTML file.

:func:`write_report` reads every run in a storage, aggregates over seeds per workload and
optimizer (final metrics mean +- std, time-to-target, step time, optimizer state memory),
draws the curves with matplotlib (mean +- std bands over seeds), performance profiles
(:mod:`basin.bench.profiles`), sharpness curves when recorded and, for tuning studies found in
the same storage, their history and parameter importance, and writes::

    report.html    self-contained (PNG images embedded as base64 data URIs)
    results.json   summary rows + every run record
    runs.csv       one row per run
    summary.csv    one row per (workload, optimizer)

Tuning sections come from :func:`tune_summaries`, which returns ``[]`` when the storage holds
no studies. Each summary is a dict with ``name``, ``n_trials``, ``direction``, ``best_value``,
``best_params``, ``history`` (list of ``[trial_number, value]``) and ``importance``
(``{param: importance}``, possibly empty); :mod:`basin.bench.tune` may provide its own
``study_summaries(storage_url)`` which is then used instead.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import workloads as _wl
from .profiles import performance_profiles, profile_scores, taus
from .store import Store, pid_alive

__all__ = ["load_runs", "summarize", "tune_summaries", "write_report"]


# ------------------------------------------------------------------ data


def load_runs(storage: str | Store, groups: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Stored runs of the given groups (all if None); ``ValueError`` if the storage cannot be
    read or does not exist."""
    if isinstance(storage, Store):
        return _load(storage, groups)
    with Store(storage, create=False) as st:
        return _load(st, groups)


def _load(st: Store, groups: Sequence[str] | None) -> list[dict[str, Any]]:
    if groups is None:
        return st.runs()
    return [r for g in groups for r in st.runs(group=g)]


def workload_meta(wname: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metric, mode, target and description of a workload: from its runs' records (a user's
    workload need not be loadable where the report is written), else the registry."""
    for r in runs:
        if r.get("workload_meta"):
            return dict(r["workload_meta"])
    try:
        return _wl.get(wname).meta()
    except ValueError:
        return {"metric": "metric", "metric_mode": "min", "target": None, "description": ""}


def _mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _median_inf(xs: Sequence[float]) -> float:
    """Median where unreached (inf) counts as the slowest."""
    if not xs:
        return math.inf
    s = sorted(xs)
    n = len(s)
    m = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return m


_VARIANT_FIELDS = (
    "hparams",
    "tuning",
    "steps",
    "time_budget",
    "batch_size",
    "schedule",
    "eval_every",
    "dp",
)


def dp_label(dp: dict[str, Any] | None) -> str:
    """How a run's DP settings read in a label: ``non-private``, ``DP noise=1 C=1``,
    ``DP eps<=3 C=1``."""
    if not dp:
        return "non-private"
    what = (
        f"noise={dp['noise_multiplier']:g}"
        if dp.get("noise_multiplier") is not None
        else f"eps<={dp['target_epsilon']:g}"
    )
    return f"DP {what} C={dp['max_grad_norm']:g}"


def _epsilon(rs: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Mean epsilon spent by a configuration's private runs (failed ones excluded) and
    their delta; ``(None, None)`` for non-private runs."""
    ps = [r["privacy"] for r in rs if r.get("privacy") and r["status"] != "failed"]
    if not ps:
        return None, None
    return statistics.fmean(p["epsilon"] for p in ps), ps[0]["delta"]


def labels(runs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Run key -> display label: the optimizer name, plus what differs when one workload has
    several configurations (hyperparameters, budget, ...) of the same optimizer."""
    variants: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        c = r["config"]
        v = {k: c.get(k) for k in _VARIANT_FIELDS}
        variants[(c["workload"], c["optimizer"])][json.dumps(v, sort_keys=True)] = v
    out = {}
    for r in runs:
        c = r["config"]
        vs = variants[(c["workload"], c["optimizer"])]
        label = c["optimizer"]
        if len(vs) > 1:
            mine = {k: c.get(k) for k in _VARIANT_FIELDS}
            diff = []
            per_tuning: dict[str, set[str]] = defaultdict(set)
            for v in vs.values():
                per_tuning[v.get("tuning") or ""].add(json.dumps(v["hparams"], sort_keys=True))
            # hyperparameters that differ only because of the tuning are said by its label
            tunings = per_tuning if all(len(h) == 1 for h in per_tuning.values()) else {}
            for k in _VARIANT_FIELDS:
                if len({json.dumps(v[k], sort_keys=True) for v in vs.values()}) > 1:
                    if k == "hparams" and len(tunings) > 1:
                        continue  # the tuning label says why they differ
                    if k == "tuning":
                        diff.append(f"tuned {mine[k]}" if mine[k] else "default hparams")
                    elif k == "hparams":
                        keys = {n for v in vs.values() for n in v["hparams"]}
                        diff += [
                            f"{n}={mine['hparams'].get(n)}"
                            for n in sorted(keys)
                            if len({json.dumps(v["hparams"].get(n)) for v in vs.values()}) > 1
                        ]
                    elif k == "schedule":
                        diff.append(f"schedule={mine[k]['name']}")
                    elif k == "dp":
                        diff.append(dp_label(mine[k]))
                    else:
                        diff.append(f"{k}={mine[k]}")
            label += " (" + ", ".join(diff) + ")"
        out[r["key"]] = label
    return out


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload and configuration (all but the seed): counts, final metrics
    mean/std over non-diverged seeds, time-to-target (median over all seeds, unreached or
    diverged = inf). ``optimizer`` is the display label from :func:`labels`."""
    lab = labels(runs)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["config"]["workload"], lab[r["key"]])].append(r)
    rows = []
    for (wname, opt), rs in sorted(groups.items()):
        ok = [r for r in rs if r["status"] == "ok"]

        def fin(k: str, ok: list[dict[str, Any]] = ok) -> list[float]:
            return [r["final"].get(k) for r in ok]

        m, s = _mean_std(fin("metric"))
        el, els = _mean_std(fin("eval_loss"))
        tl, tls = _mean_std(fin("train_loss"))
        gap, gaps = _mean_std([v for v in fin("generalization_gap") if v is not None])
        tm, tms = _mean_std([v for v in fin("train_metric") if v is not None])
        sharp_vals = [
            r["final"].get("top_eigenvalue", r["final"].get("sharpness"))
            for r in ok
            if r["final"].get("top_eigenvalue", r["final"].get("sharpness")) is not None
        ]
        sh, shs = _mean_std(sharp_vals)
        ttt_steps = [
            r["time_to_target"]["step"] if r.get("time_to_target") else math.inf
            for r in rs
            if r["status"] != "failed"
        ]
        ttt_secs = [
            r["time_to_target"]["seconds"] if r.get("time_to_target") else math.inf
            for r in rs
            if r["status"] != "failed"
        ]
        meta = workload_meta(wname, rs)
        metric_name, mode, target = meta["metric"], meta["metric_mode"], meta["target"]
        step_times = [r["step_time"] for r in ok if r.get("step_time")]
        eps, eps_delta = _epsilon(rs)
        rows.append(
            {
                "workload": wname,
                "optimizer": opt,
                "metric_name": metric_name,
                "metric_mode": mode,
                "target": target,
                "runs": len(rs),
                "ok": len(ok),
                "diverged": sum(r["status"] == "diverged" for r in rs),
                "failed": sum(r["status"] == "failed" for r in rs),
                "metric_mean": m,
                "metric_std": s,
                "eval_loss_mean": el,
                "eval_loss_std": els,
                "train_loss_mean": tl,
                "train_loss_std": tls,
                "train_metric_mean": tm,
                "train_metric_std": tms,
                "gap_mean": gap,
                "gap_std": gaps,
                "sharpness_mean": sh,
                "sharpness_std": shs,
                "reached": sum(math.isfinite(t) for t in ttt_steps),
                "ttt_steps": _median_inf(ttt_steps),
                "ttt_seconds": _median_inf(ttt_secs),
                "step_time_ms": 1e3 * statistics.median(step_times) if step_times else None,
                "state_bytes": max((r["state_bytes"] for r in ok), default=None),
                "hparams": rs[0]["config"]["hparams"],
                "dp_epsilon": eps,
                "dp_delta": eps_delta,
            }
        )
    return rows


# ------------------------------------------------------------------ tuning hook


def tune_summaries(storage: str) -> list[dict[str, Any]]:
    """Summaries of the tuning studies stored alongside the runs (``[]`` if there are none;
    the file is never modified): :func:`basin.bench.tune.study_summaries`."""
    from .tune import study_summaries

    return study_summaries(storage)


# ------------------------------------------------------------------ plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _band(ax: Any, series: list[tuple[list[float], list[float]]], label: str, color: Any) -> None:
    """Mean +- std over seeds on the steps all seeds share (truncated to the shortest)."""
    if not series:
        return
    n = min(len(x) for x, _ in series)
    if n == 0:
        return
    x = np.asarray(series[0][0][:n], dtype=float)
    ys = np.asarray([y[:n] for _, y in series], dtype=float)
    mean, std = ys.mean(0), ys.std(0)
    ax.plot(x, mean, label=f"{label} (n={len(series)})", color=color, lw=1.5)
    if len(series) > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def _curves(wname: str, runs: list[dict[str, Any]], sharp: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = workload_meta(wname, runs)
    mname, target = meta["metric"], meta["target"]
    by_opt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    lab = labels(runs)
    for r in runs:
        if r["status"] == "ok":
            by_opt[lab[r["key"]]].append(r)
    ncol = 3 if sharp else 2
    fig, axes = plt.subplots(1, ncol, figsize=(5.0 * ncol, 3.4))
    colors = plt.get_cmap("tab10")
    for i, (opt, rs) in enumerate(sorted(by_opt.items())):
        c = colors(i % 10)
        tr = [(r["series"]["train"]["step"], r["series"]["train"]["loss"]) for r in rs]
        ev = [(r["series"]["eval"]["step"], r["series"]["eval"]["metric"]) for r in rs]
        _band(axes[0], tr, opt, c)
        _band(axes[1], ev, opt, c)
        if sharp:
            sh = [
                (r["series"]["sharpness"]["step"], r["series"]["sharpness"]["value"])
                for r in rs
                if r["series"].get("sharpness", {}).get("step")
            ]
            _band(axes[2], sh, opt, c)
    axes[0].set(xlabel="step", ylabel="train loss", title=f"{wname}: train loss")
    axes[1].set(xlabel="step", ylabel=mname, title=f"{wname}: eval {mname}")
    if target is not None:
        axes[1].axhline(target, color="k", ls=":", lw=1, label="target")
    try:
        if all(v > 0 for line in axes[0].get_lines() for v in line.get_ydata()):
            axes[0].set_yscale("log")
    except (TypeError, ValueError):
        pass
    if sharp:
        axes[2].set(xlabel="step", ylabel="top Hessian eigenvalue", title=f"{wname}: sharpness")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _profile_plot(profiles: dict[str, np.ndarray], grid: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (opt, rho) in enumerate(sorted(profiles.items())):
        ax.step(grid, rho, where="post", label=opt, color=plt.get_cmap("tab10")(i % 10))
    ax.set(xlabel="tau (time / fastest time)", ylabel="fraction of workloads", ylim=(-0.02, 1.02))
    ax.set_title("Performance profiles (time-to-target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _tuning_plot(s: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imp = s.get("importance") or {}
    fig, axes = plt.subplots(1, 2 if imp else 1, figsize=(10 if imp else 5, 3.2))
    axes = np.atleast_1d(axes)
    hist = [(n, v) for n, v in s.get("history", []) if v is not None]
    if hist:
        xs, ys = zip(*hist)
        axes[0].plot(xs, ys, "o", ms=3, alpha=0.6, label="trial")
        best = (
            np.minimum.accumulate(ys)
            if s.get("direction") == "minimize"
            else np.maximum.accumulate(ys)
        )
        axes[0].plot(xs, best, "-", lw=1.5, label="best so far")
        axes[0].legend(fontsize=7)
    axes[0].set(xlabel="trial", ylabel="objective", title=f"{s['name']}: history")
    axes[0].grid(alpha=0.3)
    if imp:
        names = list(imp)[::-1]
        axes[1].barh(names, [imp[n] for n in names])
        axes[1].set(xlabel="importance", title="parameter importance")
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ writing


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "not reached"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _pm(m: float | None, s: float | None) -> str:
    return "-" if m is None else f"{m:.4g} &plusmn; {s:.2g}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
td:last-child{white-space:normal;font-size:11px;max-width:220px;text-align:left}
th{background:#f0f0f0;white-space:normal;font-size:12px} td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:8px 0}
.meta{color:#666;font-size:12px} h2{border-bottom:1px solid #ddd;padding-bottom:4px}
.best{font-weight:bold}
"""


def write_report(
    storage: str | Store,
    out_dir: str | Path,
    *,
    title: str = "basin benchmark report",
    profile_measure: str = "steps",
    groups: Sequence[str] | None = ("bench",),
) -> dict[str, Path]:
    """Write report.html, results.json, runs.csv and summary.csv under ``out_dir``.

    ``profile_measure`` is ``"steps"`` (machine-independent, the default) or ``"seconds"``
    (training time, AlgoPerf's choice on fixed hardware).
    ``groups``: which stored groups of runs to include (``None`` = all); runs a tuner stores
    under its own group (e.g. ``"tune:<study>"``) stay out of the comparison.
    Returns the written paths. ``ValueError`` if the storage cannot be read or has no runs."""
    if profile_measure not in ("seconds", "steps"):
        raise ValueError(f"profile_measure must be 'seconds' or 'steps', got {profile_measure!r}")
    url = storage.url if isinstance(storage, Store) else str(storage)
    runs = load_runs(storage, groups)
    tuning = (
        tune_summaries(url) if not isinstance(storage, Store) or storage.path != ":memory:" else []
    )
    if not runs and not tuning:
        raise ValueError(f"storage {url!r} holds no runs")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create report directory {str(out)!r}: {exc.strerror}") from None
    rows = summarize(runs)
    from .compare import sensitivity, verdicts

    verdict = verdicts(runs, labels(runs))
    sens = sensitivity(url) if tuning else []

    # performance profiles over workloads (need >= 1 workload; meaningful with several)
    col = "ttt_seconds" if profile_measure == "seconds" else "ttt_steps"
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        times[r["workload"]][r["optimizer"]] = r[col]
    grid = taus()
    profiles = performance_profiles(times, grid)
    scores = profile_scores(profiles, grid)

    paths = {
        "html": out / "report.html",
        "json": out / "results.json",
        "runs_csv": out / "runs.csv",
        "summary_csv": out / "summary.csv",
    }
    payload = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "storage": url,
        "summary": rows,
        "profile_measure": profile_measure,
        "profile_scores": scores,
        "tuning": tuning,
        "verdicts": verdict,
        "sensitivity": sens,
        "runs": runs,
    }
    # every file is rendered first, then written to a temporary name and renamed into
    # place, report.html last: a failure leaves the previous set as it was
    files = {
        paths["json"]: json.dumps(_json_safe(payload), indent=1, sort_keys=True),
        paths["summary_csv"]: _csv_text(
            [
                {k: v for k, v in r.items() if k != "hparams"}
                | {"hparams": json.dumps(r["hparams"], sort_keys=True)}
                for r in rows
            ]
        ),
        paths["runs_csv"]: _csv_text([_run_row(r) for r in runs]),
        paths["html"]: _html(
            title, url, runs, rows, profiles, scores, grid, tuning, profile_measure, verdict, sens
        ),
    }
    _write_set(files)
    return paths


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _run_row(r: dict[str, Any]) -> dict[str, Any]:
    c = r["config"]
    ttt = r.get("time_to_target") or {}
    f = r.get("final") or {}
    return {
        "key": r["key"],
        "workload": c["workload"],
        "optimizer": c["optimizer"],
        "seed": c["seed"],
        "status": r["status"],
        "diverged_step": r.get("diverged_step"),
        "steps_done": r.get("steps_done"),
        "train_seconds": r.get("train_seconds"),
        "final_train_loss": f.get("train_loss"),
        "final_eval_loss": f.get("eval_loss"),
        "final_metric": f.get("metric"),
        "final_train_metric": f.get("train_metric"),
        "generalization_gap": f.get("generalization_gap"),
        "top_eigenvalue": f.get("top_eigenvalue"),
        "hessian_trace": f.get("hessian_trace"),
        "best_metric": f.get("best_metric"),
        "ttt_step": ttt.get("step"),
        "ttt_seconds": ttt.get("seconds"),
        "step_time": r.get("step_time"),
        "state_bytes": r.get("state_bytes"),
        "dp_epsilon": (r.get("privacy") or {}).get("epsilon"),
        "dp_delta": (r.get("privacy") or {}).get("delta"),
        "dp_noise_multiplier": (r.get("privacy") or {}).get("noise_multiplier"),
        "hparams": json.dumps(c["hparams"], sort_keys=True),
        "schedule": json.dumps(c["schedule"], sort_keys=True),
        "batch_size": c.get("batch_size"),
        "version": r.get("version"),
        "git_rev": r.get("git_rev"),
        "created": r.get("created"),
        "error": r.get("error"),
    }


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove_stale_tmp(out: Path, names: Sequence[str]) -> None:
    """Remove temporary report files left by a process that was killed (SIGKILL cannot
    clean up); those of a live writer stay."""
    try:
        entries = list(out.iterdir())
    except OSError:
        return
    for p in entries:
        m = _TMP.match(p.name)
        if m and m["name"] in names and not pid_alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                p.unlink()


def _write_set(files: dict[Path, str]) -> None:
    """Write a set of files so that an error or a kill leaves the previous set: each goes to
    a temporary name beside it (flushed to disk), then all are renamed into place in order
    (report.html is last, so it is never newer than the data it shows). Temporary files
    are removed on any error, and a killed writer's are removed by the next one."""
    paths = list(files)
    if paths:
        _remove_stale_tmp(paths[0].parent, [p.name for p in paths])
    tmps: list[tuple[Path, Path]] = []
    current = paths[0] if paths else Path()
    try:
        for path, text in files.items():
            current = path
            tmp = _tmp_name(path)
            tmps.append((tmp, path))
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in tmps:
            current = path
            os.replace(tmp, path)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ValueError(f"cannot write report file {str(current)!r}: {why}") from None
    finally:
        for tmp, _ in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _html(
    title: str,
    url: str,
    runs: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    profiles: dict[str, np.ndarray],
    scores: dict[str, float],
    grid: np.ndarray,
    tuning: list[dict[str, Any]],
    measure: str,
    verdict: dict[str, dict[str, Any]] | None = None,
    sens: list[dict[str, Any]] | None = None,
) -> str:
    e = html.escape
    revs = sorted({r.get("git_rev") or "-" for r in runs})
    versions = sorted({r.get("version") or "-" for r in runs})
    env = runs[-1].get("env", {}) if runs else {}
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='meta'>{len(runs)} runs from {e(url)}; generated "
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; basin "
        f"{e(', '.join(versions))}; git {e(', '.join(r[:10] for r in revs))}; python "
        f"{e(str(env.get('python')))}, torch {e(str(env.get('torch')))}, "
        f"{e(str(env.get('platform')))}, {e(str(env.get('threads')))} thread(s)</p>",
    ]
    by_w: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_w[r["config"]["workload"]].append(r)
    for wname in sorted(by_w):
        wr = [r for r in rows if r["workload"] == wname]
        desc = workload_meta(wname, by_w[wname]).get("description") or ""
        mname, mode, target = wr[0]["metric_name"], wr[0]["metric_mode"], wr[0]["target"]
        cfg0 = by_w[wname][0]["config"]
        budget = f"{cfg0['steps']} steps" if cfg0.get("steps") else f"{cfg0.get('time_budget')} s"
        parts.append(
            f"<h2>{e(wname)}</h2><p>{e(desc)}. Budget {e(budget)}, batch "
            f"{cfg0['batch_size']}, schedule {e(cfg0['schedule']['name'])}; target "
            f"{e(mname)} {'&le;' if mode == 'min' else '&ge;'} {_fmt(target)}.</p>"
        )
        vals = [r["metric_mean"] for r in wr if r["metric_mean"] is not None]
        best = (min(vals) if mode == "min" else max(vals)) if vals else None
        private = any(r.get("dp_epsilon") is not None for r in wr)
        dp_th = (
            "<th title='epsilon spent (Opacus accountant) at the run&apos;s delta, mean over "
            "seeds; - : not private'>privacy &epsilon; (&delta;)</th>"
            if private
            else ""
        )
        parts.append(
            f"<table><tr><th>optimizer</th>{dp_th}<th>runs (ok/div./failed)</th>"
            f"<th>final {e(mname)} (mean &plusmn; std)</th><th>{e(mname)} on train data</th>"
            "<th>final eval loss</th><th>final train loss</th>"
            "<th title='eval loss minus the loss on a fixed sample of the training data'>"
            "generalization gap (eval &minus; train loss)</th>"
            "<th title='top Hessian eigenvalue of the final model (--landscape or "
            "--sharpness-every)'>final sharpness</th>"
            "<th>time-to-target (steps)</th><th>(seconds)</th>"
            "<th>reached</th><th>step time (ms)</th><th>optimizer state</th>"
            "<th>hyperparameters</th></tr>"
        )
        for r in wr:
            cls = " class='best'" if best is not None and r["metric_mean"] == best else ""
            sb = r["state_bytes"]
            dp_td = ""
            if private:
                dp_td = (
                    "<td>-</td>"
                    if r.get("dp_epsilon") is None
                    else f"<td>{r['dp_epsilon']:.4g} ({r['dp_delta']:g})</td>"
                )
            parts.append(
                f"<tr><td>{e(r['optimizer'])}</td>{dp_td}<td>{r['runs']} ({r['ok']}/{r['diverged']}/"
                f"{r['failed']})</td><td{cls}>{_pm(r['metric_mean'], r['metric_std'])}</td>"
                f"<td>{_pm(r['train_metric_mean'], r['train_metric_std'])}</td>"
                f"<td>{_pm(r['eval_loss_mean'], r['eval_loss_std'])}</td>"
                f"<td>{_pm(r['train_loss_mean'], r['train_loss_std'])}</td>"
                f"<td>{_pm(r['gap_mean'], r['gap_std'])}</td>"
                f"<td>{_pm(r['sharpness_mean'], r['sharpness_std'])}</td>"
                f"<td>{_fmt(r['ttt_steps'], 'g')}</td><td>{_fmt(r['ttt_seconds'], '.3g')}</td>"
                f"<td>{r['reached']}/{r['runs'] - r['failed']}</td>"
                f"<td>{_fmt(r['step_time_ms'], '.3g')}</td>"
                f"<td>{_bytes(sb)}</td>"
                f"<td>{e(json.dumps(r['hparams'], sort_keys=True))}</td></tr>"
            )
        parts.append("</table>")
        if verdict and wname in verdict:
            parts.append(_verdict_html(verdict[wname]))
        sharp = any(
            r["series"].get("sharpness", {}).get("step") for r in by_w[wname] if r["status"] == "ok"
        )
        if any(r["status"] == "ok" for r in by_w[wname]):
            parts.append(
                f"<img alt='curves {e(wname)}' src='{_curves(wname, by_w[wname], sharp)}'>"
            )
        bad = [r for r in by_w[wname] if r["status"] != "ok"]
        if bad:
            parts.append("<p>Runs that did not finish normally:</p><ul>")
            for r in bad:
                why = (
                    f"diverged at step {r['diverged_step']}"
                    if r["status"] == "diverged"
                    else f"failed: {r.get('error')}"
                )
                parts.append(
                    f"<li>{e(r['config']['optimizer'])} seed {r['config']['seed']}: {e(why)}</li>"
                )
            parts.append("</ul>")
    if not runs:  # the storage holds tuning studies only
        parts.append("<p>No benchmark runs in this storage.</p>")
    else:
        parts.append("<h2>Performance profiles</h2>")
        parts.append(
            f"<p>Per workload, time-to-target ({e(measure)}, median over seeds) relative to the "
            f"fastest optimizer; rho(tau) = fraction of the {len(by_w)} workload(s) an optimizer "
            "reaches within tau times the fastest. Score = normalised area under rho for tau in "
            "[1, 4] (AlgoPerf).</p>"
        )
        parts.append(f"<img alt='performance profiles' src='{_profile_plot(profiles, grid)}'>")
        parts.append("<table><tr><th>optimizer</th><th>profile score</th></tr>")
        for o, s in sorted(scores.items(), key=lambda kv: -kv[1]):
            parts.append(f"<tr><td>{e(o)}</td><td>{s:.3f}</td></tr>")
        parts.append("</table>")
    if sens:
        parts.append(_sensitivity_html(sens))
    parts.append("<h2>Tuning</h2>")
    if not tuning:
        parts.append("<p>No tuning studies in this storage.</p>")
    for study in tuning:
        best_params = e(json.dumps(study.get("best_params", {}), sort_keys=True))
        parts.append(
            f"<h3>{e(str(study['name']))}</h3><p>{study['n_trials']} trials, best "
            f"{_fmt(study.get('best_value'))} with {best_params}</p>"
        )
        parts.append(f"<img alt='tuning {e(str(study['name']))}' src='{_tuning_plot(study)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _ci(ci: Any, scale: float = 1.0) -> str:
    return "-" if not ci else f"[{ci[0] * scale:.4g}, {ci[1] * scale:.4g}]"


def _verdict_html(v: dict[str, Any]) -> str:
    """The verdict line, the ranking with confidence intervals and the paired tests."""
    e = html.escape
    pts = v["metric"] == "accuracy"
    unit = " (points)" if pts else ""
    k = 100.0 if pts else 1.0
    parts = [
        f"<p class='verdict'><b>Verdict:</b> {e(v['verdict'])}</p>",
        f"<p>Protocol: {e(v['protocol'])}. Intervals: 95% percentile bootstrap over seeds; "
        "differences paired by seed (same initialisation and data order), two-sided paired "
        "t-test.</p>",
        f"<table class='ranking'><tr><th>rank</th><th>configuration</th><th>mean final "
        f"{e(v['metric'])}</th><th>95% CI</th><th>seeds</th><th>diverged</th></tr>",
    ]
    for i, r in enumerate(v["ranking"], 1):
        parts.append(
            f"<tr><td>{i}</td><td>{e(r['label'])}</td><td>{_fmt(r['mean'])}</td>"
            f"<td>{_ci(r['ci'])}</td><td>{r['n']}</td><td>{r['diverged']}</td></tr>"
        )
    parts.append("</table>")
    if v["pairs"]:
        best = v["ranking"][0]["label"]
        parts.append(
            f"<table class='pairs'><tr><th>{e(best)} minus</th><th>mean difference{unit}</th>"
            "<th>95% CI</th><th>paired seeds</th><th>p-value</th></tr>"
        )
        for p in v["pairs"]:
            mean = _fmt(p["mean"] * k) if p.get("mean") is not None else "-"
            pv = _fmt(p.get("p_value"), ".2g")
            parts.append(
                f"<tr><td>{e(p['label'])}</td><td>{mean}</td><td>{_ci(p.get('ci'), k)}</td>"
                f"<td>{p.get('n', 0)}</td><td>{pv}</td></tr>"
            )
        parts.append("</table>")
    return "\n".join(parts)


def _sensitivity_html(sens: list[dict[str, Any]]) -> str:
    """Learning-rate sensitivity curves of the tuned comparison and its tuning cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = html.escape
    parts = [
        "<h2>Learning-rate sensitivity and tuning cost</h2>",
        "<p>Final objective of every tuning trial against its learning rate (the other "
        "hyperparameters vary too, so the curve is the envelope a user meets); crosses: "
        "diverged trials.</p>",
    ]
    by_w: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for st in sens:
        by_w[str(st["workload"])].append(st)
    for wname, studies in sorted(by_w.items()):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for i, st in enumerate(studies):
            color = f"C{i % 10}"
            if st["points"]:
                x, y = zip(*st["points"])
                ax.plot(x, y, "o-", ms=4, lw=1, color=color, label=str(st["optimizer"]))
            for lr in st["diverged"]:
                ax.axvline(lr, color=color, ls=":", lw=0.8)
                ax.plot([lr], [ax.get_ylim()[0]], "x", color=color)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final objective")
        ax.set_title(wname)
        ax.legend(fontsize=7)
        parts.append(f"<img alt='sensitivity {e(wname)}' src='{_png(fig)}'>")
    parts.append(
        "<table><tr><th>workload</th><th>optimizer</th><th>trials</th><th>tuning steps</th>"
        "<th>tuning seconds</th></tr>"
    )
    for st in sens:
        parts.append(
            f"<tr><td>{e(str(st['workload']))}</td><td>{e(str(st['optimizer']))}</td>"
            f"<td>{st['n_trials']}</td><td>{st['steps']}</td>"
            f"<td>{st['train_seconds']:.3g}</td></tr>"
        )
    total_s = sum(st["train_seconds"] for st in sens)
    total_steps = sum(st["steps"] for st in sens)
    parts.append(
        f"</table><p>Total tuning cost: {total_steps} steps, {total_s:.3g} s of training.</p>"
    )
    return "\n".join(parts)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"
