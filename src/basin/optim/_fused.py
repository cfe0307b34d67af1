"""The fused path shared by the elementwise optimizers: state in flat buffers, one compiled
kernel per step whatever the number of tensors.

Per param group and (device, dtype), the state tensors of the parameters are views into one
flat buffer per state key (``state[p]["exp_avg"]`` keeps its shape and key, so ``state_dict``
and per-parameter state look exactly as on the other paths). A step then costs: one
``torch.cat`` of the gradients, one of the parameters, one compiled elementwise kernel over
the flat tensors (hyperparameters and step-dependent coefficients passed as one float64
tensor, so a scheduler changing ``lr`` or the step count never recompiles; sizes are dynamic,
so adding parameters does not either) and one ``torch._foreach_copy_`` back into the
parameters.

The layout is rebuilt (state values copied into fresh flat buffers) whenever it no longer
matches: another set of parameters with gradients, a ``load_state_dict`` (which replaces the
state tensors), or state written by another path. Parameters whose step counters differ (one
that missed steps for lack of a gradient) go to separate flat runs, each with its own counter
value, so the bias corrections stay per parameter as on the reference path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import get_value, is_compiling

__all__ = [
    "FlatRun",
    "check_fusable",
    "compiled_kernel",
    "flat_runs",
    "fused_step",
    "group_runs",
    "scatter",
    "use_fused",
]

# one torch.compile wrapper per kernel function, shared by every optimizer instance; Dynamo
# specializes it per (dtype, device, static flags) and keeps sizes dynamic
_KERNELS: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled_kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=True, fullgraph=True)``, cached at module level."""
    kernel = _KERNELS.get(fn)
    if kernel is None:
        kernel = _KERNELS[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return kernel


def use_fused(fused: bool | None, params: Sequence[Tensor]) -> bool:
    """Resolve ``fused=None``: off on every device for now. On CPU the first step compiles the
    kernel (seconds to tens of seconds) and the eager loop is within a small factor on the
    sizes measured in docs/benchmarks.md; on CUDA the kernel has not been measured here. Under
    ``torch.compile`` of the whole step the single-tensor path is traced instead (Inductor
    fuses it itself)."""
    if is_compiling() or not params:
        return False
    return bool(fused)


class FlatRun:
    """Parameters of one group, device and dtype with equal step counters, and their state as
    views into flat buffers (one per state key)."""

    def __init__(self, params: list[Tensor], steps: list[Tensor], flats: dict[str, Tensor],
                 views: dict[str, list[Tensor]]) -> None:  # fmt: skip
        self.params = params
        self.steps = steps
        self.flats = flats
        self.views = views
        self.numels = [p.numel() for p in params]

    def step_value(self) -> float:
        return float(get_value(self.steps[0]))

    def advance(self) -> None:
        torch._foreach_add_(self.steps, 1)

    def gather_params(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def gather_grads(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]


def scatter(flat: Tensor, run: FlatRun) -> None:
    """Write the flat result back into the parameters: one ``torch._foreach_copy_``."""
    chunks = flat.split(run.numels)
    torch._foreach_copy_(run.params, [c.view(p.shape) for c, p in zip(chunks, run.params)])


def _matches(runs: list[FlatRun], params: list[Tensor], state: Any, keys: Sequence[str]) -> bool:
    i = 0
    for run in runs:
        for j, p in enumerate(run.params):
            if i >= len(params) or params[i] is not p:
                return False
            st = state[p]
            if st.get("step") is not run.steps[j]:
                return False
            for key in keys:
                if st.get(key) is not run.views[key][j]:
                    return False
            i += 1
    return i == len(params)


def flat_runs(
    cache: dict[Any, list[FlatRun]],
    cache_key: Any,
    params: list[Tensor],
    state: Any,
    keys: Sequence[str],
    new_step: Callable[[], Tensor],
) -> list[FlatRun]:
    """The flat runs of ``params`` (one group, one device and dtype, all with gradients), from
    ``cache`` if the layout still matches the optimizer's ``state``, else rebuilt: each state
    key becomes a flat buffer holding the current values (zeros for new state) and
    ``state[p][key]`` a view of it."""
    runs = cache.get(cache_key)
    if runs is not None and _matches(runs, params, state, keys):
        return runs
    by_step: dict[float, list[Tensor]] = {}
    for p in params:
        st = state[p]
        if "step" not in st:
            st["step"] = new_step()
        by_step.setdefault(float(st["step"]), []).append(p)
    runs = []
    for ps in by_step.values():
        total = sum(p.numel() for p in ps)
        flats: dict[str, Tensor] = {}
        views: dict[str, list[Tensor]] = {}
        for key in keys:
            flat = torch.zeros(total, dtype=ps[0].dtype, device=ps[0].device)
            vs = [c.view(p.shape) for c, p in zip(flat.split([p.numel() for p in ps]), ps)]
            for p, v in zip(ps, vs):
                old = state[p].get(key)
                if old is not None:
                    v.copy_(old)
                state[p][key] = v
            flats[key], views[key] = flat, vs
        runs.append(FlatRun(ps, [state[p]["step"] for p in ps], flats, views))
    cache[cache_key] = runs
    return runs


def check_fusable(params: Sequence[Tensor], optimizer: str) -> None:
    """The fused kernel needs dense floating-point gradients of the parameters' dtype."""
    for p in params:
        g = p.grad
        assert g is not None
        if not p.is_floating_point() or not g.is_floating_point():
            raise ValueError(
                f"{optimizer}(fused=True) needs floating-point parameters and gradients, got "
                f"{p.dtype} / {g.dtype}"
            )
        if g.is_sparse:
            raise RuntimeError(f"{optimizer} does not support sparse gradients")
        if g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"{optimizer}(fused=True) needs gradients of the parameter's dtype and device, "
                f"got {g.dtype} on {g.device} for a {p.dtype} parameter on {p.device}"
            )


def fused_step(
    optimizer: Any,
    group: dict[str, Any],
    keys: Sequence[str | None],
    kernel: Callable[..., Tensor],
    coefficients: Callable[..., Tensor],
    *static: Any,
) -> None:
    """One fused step of ``group``: per flat run, advance the step counters, compute the
    step's scalars ``coefficients(step, **hyperparameters)`` (a float64 tensor) on the host and
    call the compiled ``kernel(params, grads, *state, coefficients, *static)``, which updates
    the flat state in place and returns the new flat parameters. A ``None`` key is an optional
    buffer this group does not use (passed as ``None``); ``static`` are Python flags the
    kernel branches on (one compiled graph per combination)."""
    hp = optimizer._hyperparameters(group)
    compiled = compiled_kernel(kernel)
    for run in group_runs(optimizer, group, [k for k in keys if k is not None]):
        run.advance()
        coefs = coefficients(run.step_value(), **hp)
        state = [None if k is None else run.flats[k] for k in keys]
        scatter(compiled(run.gather_params(), run.gather_grads(), *state, coefs, *static), run)


def group_runs(optimizer: Any, group: dict[str, Any], keys: Sequence[str]) -> list[FlatRun]:
    """The flat runs of ``group``'s parameters that have gradients (checked fusable), split by
    device and dtype; the layout is cached on the optimizer (not in its state dict)."""
    name = type(optimizer).__name__
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in group["params"]:
        if p.grad is not None:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
    cache = optimizer.__dict__.setdefault("_flat_runs", {})
    runs: list[FlatRun] = []
    for (device, dtype), params in by_kind.items():
        check_fusable(params, name)
        runs += flat_runs(
            cache, (id(group), device, dtype), params, optimizer.state, keys, optimizer._new_step
        )
    return runs
