"""The fused path shared by the elementwise optimizers: state in flat buffers, one compiled
kernel per step whatever the number of tensors.

Per param group and (device, dtype), the state tensors of the parameters are views into one
flat buffer per state key (``state[p]["exp_avg"]`` keeps its shape and key, so ``state_dict``
and per-parameter state look exactly as on the other paths). A step then costs: one
``torch.cat`` of the gradients, one of the parameters, one compiled elementwise kernel over
the flat tensors (hyperparameters and step-dependent coefficients passed as one float64
tensor, so a scheduler changing ``lr`` or the step count never recompiles; sizes are dynamic,
so adding parameters does not either) and one ``torch._foreach_copy_`` back into the
parameters. Per-tensor quantities stay vectorized: SGD-SaI's g-SNR scales are expanded once
per layout into a per-element buffer; AdamP/SGDP's projection statistics are segment sums over
the flat products, and its coefficients are gathered back by a per-element row index.

The layout is rebuilt (state values copied into fresh flat buffers) whenever it may no longer
match, which is checked in O(parameters) identity comparisons and no state lookups:

* another set of parameters with gradients (the tuple of their ids differs);
* another set of state keys (e.g. ``amsgrad`` switched on);
* a ``load_state_dict`` (or any ``__setstate__``, which replaces ``optimizer.state``), or a
  step restored after a failure (:meth:`~basin.optim._base.BasinOptimizer._restore`), both of
  which drop the cached layouts;
* state written by another path: the layout is kept only from one ``step()`` to the next in
  which this path ran, so a step of the group on the single-tensor or multi-tensor path in
  between (``fused`` switched off for a while) rebuilds it from the state those steps left.

A state tensor *replaced by hand* between steps (``opt.state[p]["exp_avg"] = t``; writing in
place is fine) is not detected; call :func:`invalidate` after doing so. Parameters whose step
counters differ (one that missed steps for lack of a gradient) go to separate flat runs, each
with its own counter value, so the bias corrections stay per parameter as on the reference
path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from ._base import get_value, is_compiling

__all__ = [
    "FlatRun",
    "compiled_kernel",
    "flat_runs",
    "fused_step",
    "group_runs",
    "in_place",
    "invalidate",
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


_IN_PLACE: dict[Callable[..., Any], Callable[..., None]] = {}


def in_place(fn: Callable[..., Tensor]) -> Callable[..., None]:
    """``fn(p, *args)`` (which returns the new flat parameters) writing its result into ``p``:
    compiled, the copy is fused into the kernel, which then stores each element once."""
    wrapped = _IN_PLACE.get(fn)
    if wrapped is None:

        def wrapped(p: Tensor, *args: Any) -> None:
            p.copy_(fn(p, *args))

        name = f"{fn.__name__}_in_place"
        # a code object of its own: Dynamo keeps its compiled graphs (and its recompile limit)
        # per code object, and every wrapper would otherwise share this one
        wrapped.__code__ = wrapped.__code__.replace(co_name=name, co_qualname=name)
        wrapped.__name__ = wrapped.__qualname__ = name
        _IN_PLACE[fn] = wrapped
    return wrapped


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
    views into flat buffers (one per state key). ``steps`` is empty for an optimizer that
    keeps no counter (SGD-SaI, SGDP); ``extras`` caches tensors derived from the layout."""

    def __init__(self, params: list[Tensor], steps: list[Tensor], flats: dict[str, Tensor],
                 views: dict[str, list[Tensor]]) -> None:  # fmt: skip
        self.params = params
        self.steps = steps
        self.flats = flats
        self.views = views
        self.numels = [p.numel() for p in params]
        self.extras: dict[Any, Any] = {}
        # the parameters' own flat buffer when they are views of it (see _back_params)
        self.flat_params: Tensor | None = None

    def step_value(self) -> float:
        return float(get_value(self.steps[0])) if self.steps else 0.0

    def advance(self) -> None:
        if self.steps:
            torch._foreach_add_(self.steps, 1.0)

    def gather_params(self) -> Tensor:
        """The parameters as one flat tensor: their own buffer when they live in one (no
        copy), else a ``torch.cat``."""
        if self.flat_params is not None:
            return self.flat_params
        return torch.cat([p.reshape(-1) for p in self.params])

    def gather_grads(self) -> Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.params])  # type: ignore[union-attr]

    def chunks(self, flat: Tensor) -> list[Tensor]:
        """``flat`` split per parameter, each chunk viewed in its parameter's shape."""
        return [c.view(p.shape) for c, p in zip(flat.split(self.numels), self.params)]

    def extra(self, build: Callable[[FlatRun], Any]) -> Any:
        """``build(self)``, computed once per layout (rebuilt layouts build it again)."""
        if build not in self.extras:
            self.extras[build] = build(self)
        return self.extras[build]


def scatter(flat: Tensor, run: FlatRun) -> None:
    """Write the flat result back into the parameters: one copy into their flat buffer, or one
    ``torch._foreach_copy_`` when they do not live in one."""
    if run.flat_params is None:
        torch._foreach_copy_(run.params, run.chunks(flat))
        return
    if flat is not run.flat_params:
        run.flat_params.copy_(flat)
    _written(run)


def _written(run: FlatRun) -> None:
    """The parameters were written through their flat buffer: bump their version counters
    (as an in-place update of each would), so that autograd still refuses a graph that saved
    their old values."""
    increment_version(run.params)


def _owns_storage(p: Tensor) -> bool:
    """``p`` is the whole of its storage (not a view into a larger tensor the user may hold)."""
    nbytes = p.numel() * p.element_size()
    return p.storage_offset() == 0 and p.untyped_storage().nbytes() == nbytes


def _movable(ps: Sequence[Tensor], backing: dict[int, int]) -> list[bool]:
    """Which of ``ps`` may move into a flat buffer of the optimizer's own (``p.data`` becomes a
    view of it): plain contiguous tensors that own their whole storage, alone (or that already
    live in a buffer of this optimizer: ``backing``, parameter id to buffer address), so that
    no aliasing the user set up between tensors is broken."""
    seen: dict[int, int] = {}
    for p in ps:
        address = p.untyped_storage().data_ptr()
        seen[address] = seen.get(address, 0) + 1
    out = []
    for p in ps:
        address = p.untyped_storage().data_ptr()
        out.append(
            type(p.data) is Tensor
            and not p.is_sparse
            and p.is_contiguous()
            and (_owns_storage(p) and seen[address] == 1 or backing.get(id(p)) == address)
        )
    return out


def _back_params(run: FlatRun, backing: dict[int, int]) -> None:
    """Move the run's parameters (all :func:`_movable`) into one flat buffer, values
    unchanged, so that a step reads and writes them in place instead of gathering and
    scattering them (two passes over the parameters fewer)."""
    flat = torch.empty(sum(run.numels), dtype=run.params[0].dtype, device=run.params[0].device)
    views = run.chunks(flat)
    torch._foreach_copy_(views, [p.detach() for p in run.params])
    address = flat.untyped_storage().data_ptr()
    for p, view in zip(run.params, views):
        p.data = view
        backing[id(p)] = address
    run.flat_params = flat


def _addresses(params: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(p.data_ptr() for p in params)


class _Layout:
    """A cached layout and what it was built for: the parameters (by id), the optimizer's
    state object and the ``step()`` call that last used it."""

    __slots__ = ("addresses", "ids", "runs", "state", "tick")

    def __init__(self, runs: list[FlatRun], ids: tuple[int, ...], state: Any, tick: int,
                 addresses: tuple[int, ...]) -> None:  # fmt: skip
        self.runs, self.ids, self.state, self.tick = runs, ids, state, tick
        self.addresses = addresses


def invalidate(optimizer: Any) -> None:
    """Drop ``optimizer``'s cached flat layouts: the next fused step rebuilds them from its
    state (the state tensors keep their values)."""
    optimizer.__dict__.pop("_flat_runs", None)


def flat_runs(
    cache: dict[Any, _Layout],
    cache_key: Any,
    params: list[Tensor],
    state: Any,
    keys: Sequence[str],
    new_step: Callable[[], Tensor] | None,
    tick: int = 0,
    init: Callable[[list[Tensor]], None] | None = None,
    backing: dict[int, int] | None = None,
) -> list[FlatRun]:
    """The flat runs of ``params`` (one group, one device and dtype, all with gradients), from
    ``cache`` if the layout still matches (same parameters, same ``state`` object, used at the
    previous ``tick``; see the module docstring), else rebuilt: each state key becomes a flat
    buffer holding the current values (zeros for new state) and ``state[p][key]`` a view of
    it. ``init(params)``, run before a rebuild, creates state that does not start at zero;
    ``new_step=None``: the optimizer keeps no step counter (one run, no ``"step"`` state);
    ``backing``: move the parameters into flat buffers of their own where they allow it
    (:func:`_back_params`; the dict remembers which buffers are this optimizer's)."""
    ids = tuple(map(id, params))
    layout = cache.get(cache_key)
    if (
        layout is not None
        and layout.ids == ids
        and layout.state is state
        and layout.tick in (tick, tick - 1)
        and layout.addresses == _addresses(params)  # no parameter moved (p.data = ..., .to())
    ):
        layout.tick = tick
        return layout.runs
    if init is not None:
        init(params)
    by_step: dict[float, list[Tensor]] = {}
    for p in params:
        st = state[p]
        if new_step is None:
            by_step.setdefault(0.0, []).append(p)
            continue
        if "step" not in st:
            st["step"] = new_step()
        by_step.setdefault(float(st["step"]), []).append(p)
    parts: list[tuple[list[Tensor], bool]] = []
    for ps in by_step.values():
        if backing is None:
            parts.append((ps, False))
            continue
        movable = _movable(ps, backing)
        for flag in (True, False):
            part = [p for p, m in zip(ps, movable) if m is flag]
            if part:
                parts.append((part, flag))
    runs = []
    for ps, move in parts:
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
        steps = [] if new_step is None else [state[p]["step"] for p in ps]
        runs.append(FlatRun(ps, steps, flats, views))
        if move:
            _back_params(runs[-1], backing)  # type: ignore[arg-type]  # move needs backing
    cache[cache_key] = _Layout(runs, ids, state, tick, _addresses(params))
    return runs


def fused_step(
    optimizer: Any,
    group: dict[str, Any],
    keys: Sequence[str | None],
    kernel: Callable[..., Tensor],
    coefficients: Callable[..., Tensor],
    *static: Any,
    params: Sequence[Tensor] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    inputs: Callable[[FlatRun], tuple[Tensor, ...]] | None = None,
    counted: bool = True,
    init: Callable[[list[Tensor]], None] | None = None,
) -> None:
    """One fused step of ``group``: per flat run, advance the step counters, compute the
    step's scalars ``coefficients(step, **hyperparameters)`` (a float64 tensor) on the host and
    call the compiled ``kernel(params, grads, *state, *inputs(run), coefficients, *static)``,
    which updates the flat state in place and returns the new flat parameters. A ``None`` key
    is an optional buffer this group does not use (passed as ``None``); ``static`` are Python
    flags the kernel branches on (one compiled graph per combination); ``inputs`` builds
    per-layout tensors (cached with the layout); ``params`` (default: the group's) and
    ``hyperparameters`` (default: ``optimizer._hyperparameters(group)``) serve a part of a
    group (the AdamW fallback of the matrix optimizers); ``counted=False``: no step counter."""
    hp = optimizer._hyperparameters(group) if hyperparameters is None else hyperparameters
    compiled = compiled_kernel(kernel)
    inplace = compiled_kernel(in_place(kernel))
    state_keys = [k for k in keys if k is not None]
    for run in group_runs(optimizer, group, state_keys, params, counted=counted, init=init):
        run.advance()
        coefs = coefficients(run.step_value(), **hp)
        state = [None if k is None else run.flats[k] for k in keys]
        extra = () if inputs is None else run.extra(inputs)
        if run.flat_params is not None:  # the kernel writes the parameters' own buffer
            inplace(run.flat_params, run.gather_grads(), *state, *extra, coefs, *static)
            _written(run)
            continue
        new = compiled(run.gather_params(), run.gather_grads(), *state, *extra, coefs, *static)
        scatter(new, run)


def group_runs(
    optimizer: Any,
    group: dict[str, Any],
    keys: Sequence[str],
    params: Sequence[Tensor] | None = None,
    *,
    counted: bool = True,
    init: Callable[[list[Tensor]], None] | None = None,
) -> list[FlatRun]:
    """The flat runs of ``params``' (default: the group's) parameters that have gradients
    (checked fusable by the step: :func:`basin.optim._base.check_fusable`), split by device and
    dtype; the layout is cached on the optimizer (not in its state dict), keyed by group, device, dtype and state keys."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in group["params"] if params is None else params:
        if p.grad is not None:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
    cache = optimizer.__dict__.setdefault("_flat_runs", {})
    # which parameters this optimizer moved into flat buffers, and where (kept across layouts)
    backing = optimizer.__dict__.setdefault("_flat_backing", {})
    tick = optimizer.__dict__.get("_step_calls", 0)
    new_step = optimizer._new_step if counted else None
    runs: list[FlatRun] = []
    for (device, dtype), ps in by_kind.items():
        key = (id(group), device, dtype, tuple(keys))
        runs += flat_runs(cache, key, ps, optimizer.state, keys, new_step, tick, init, backing)
    return runs
