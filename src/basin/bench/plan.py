"""The runs of a plain (untuned) ``basin bench`` sweep: every workload x optimizer x seed, with
the learning rates the chosen rule gives (``scale_lr``: the batch-size rule of each optimizer's
family; ``lr_rule="steplaw"``: Step Law's fitted learning rate) and AdAdaGrad's adaptive batch.
``--hp`` overrides always win. The CLI only parses options and prints :func:`plan_runs`'s notes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import workloads as wl
from .runner import RunConfig, configs_for
from .schedules import scale_lr as _scale
from .schedules import scaling_rule

LR_RULES = ("default", "steplaw")


def plan_runs(
    workloads: Iterable[wl.Workload],
    optimizers: list[str],
    seeds: int,
    overrides: dict[str, dict[str, Any]],
    *,
    scale_lr: bool = False,
    lr_rule: str = "default",
    adaptive_batch: str | None = None,
    max_batch_size: int | None = None,
    **config: Any,
) -> tuple[list[RunConfig], list[str]]:
    """``(configs, notes)``: the validated run configs (``config``: budget and the other
    :func:`~basin.bench.runner.make_config` arguments, ``batch_size`` among them) and one note per workload whose
    learning rates a rule set (what Step Law computed). ``ValueError`` on a bad combination."""
    if lr_rule not in LR_RULES:
        raise ValueError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    if lr_rule == "steplaw" and scale_lr:
        raise ValueError("--lr-rule steplaw sets the learning rates: not with --scale-lr")
    batch_size = config.get("batch_size")
    configs: list[RunConfig] = []
    notes: list[str] = []
    for w in workloads:
        per = {o: dict(overrides.get(o, {})) for o in optimizers}
        if scale_lr and batch_size is not None:
            for o in optimizers:
                base = wl.default_hparams(w, o).get("lr")
                if "lr" not in per[o] and base is not None:
                    per[o]["lr"] = _scale(base, w.batch_size, batch_size, scaling_rule(o))
        if lr_rule == "steplaw":
            notes.append(_steplaw_lrs(w, optimizers, per, config.get("steps"), batch_size))
        ab = None
        if adaptive_batch is not None:
            first = batch_size or w.batch_size
            ab = {"test": adaptive_batch, "max_batch_size": max_batch_size or 8 * first}
        configs += configs_for(
            [w], optimizers, range(seeds), {o: h for o, h in per.items() if h},
            adaptive_batch=ab, **config,
        )  # fmt: skip
    return configs, notes


def _steplaw_lrs(
    w: wl.Workload, optimizers: list[str], per: dict[str, dict[str, Any]], steps: int | None,
    batch_size: int | None,
) -> str:  # fmt: skip
    """Step Law's learning rate into ``per`` (``--hp`` wins); the note saying what it used."""
    from . import steplaw as sl

    try:
        d = sl.steplaw_tokens(w, steps, batch_size)
        n = sl.non_embedding_params(w.build(0, 1).model)
        for o in optimizers:
            for k, v in sl.steplaw_hparams(w, o, steps, batch_size, n_params=n).items():
                per[o].setdefault(k, v)
    except ValueError as e:
        raise ValueError(f"--lr-rule steplaw: {e}") from None
    tokens = sl.steplaw_batch_size(d)
    return (
        f"steplaw on {w.name}: N={n} non-embedding parameters, D={d} tokens, "
        f"lr={sl.steplaw_lr(n, d):.4g} (Step Law's batch: {tokens:.0f} tokens = "
        f"{tokens / (w.tokens_per_sample or 1):.0f} samples)"
    )
