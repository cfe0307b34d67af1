"""Curvature-vector products: Hessian (H v) and generalised Gauss-Newton (G v = J^T H_L J v).

Everything in :mod:`basin.landscape` goes through :class:`CurvatureOperator`, a linear operator on
the flattened vector of the selected parameters. ``data`` is one batch ``(inputs, targets)`` or an
iterable of batches; the loss is the batch-size-weighted average of ``loss_fn(model(x), y)`` over
the batches (so the products are exactly those of the loss on the concatenated data when
``loss_fn`` returns the batch mean).

How the products are computed, and why. The model is called through
``torch.func.functional_call`` on detached copies of its parameters and buffers, so the module's
parameters, buffers (BatchNorm running statistics) and train/eval mode are never changed: the mode
is the caller's choice. For each batch the gradient graph ``g(w) = dL/dw`` is built once
(``create_graph=True``) and kept; every Hessian-vector product is then one reverse pass through
that graph (``H v = d(g . v)/dw``, double backward). Forward-over-reverse
(``torch.func.jvp(grad(f))``) has to redo the forward and backward pass for every product, which
on CPU measured ~10x slower per product on the 1,642-parameter MLP of the tests (for the
many products that Lanczos and Hutch++ need on a fixed batch, caching the graph wins). When the
data has more batches than ``cache_batches``, graphs are rebuilt per product to bound memory.

Randomness and precision. A forward with random ops (Dropout in train mode) would draw new masks
at every product, so the operator would not even be a fixed matrix, and it would advance the
global RNG. Every forward of batch ``i`` therefore runs under a forked RNG (CPU and the
parameters' device) seeded from ``(seed, i)``: all products use the same masks, the same seed
gives the same operator, and the caller's RNG state is left as it was. The result is the
curvature of the loss with that one draw of the masks (``model.eval()`` gives the deterministic
network). Every op of the forward also runs with autocast switched off (a TorchFunctionMode),
even when the model's ``forward`` enters autocast itself (as a mixed-precision framework may leave
patched onto it): the products are computed in the parameters' own dtype.

Residual products (``kind="residual"``, ``H - G``) are Hessian products of ``sum(r * f(w))``
with ``r = dL/df`` computed once and frozen: ``H = J^T H_L J + sum_i r_i d2f_i/dw2``.

GGN products use the output ``z = f(w)``: ``J v`` by the double-vjp trick (a reverse pass through
``u -> J^T u``, which is linear in ``u``), ``H_L`` by double backward of the loss with respect to
``z``, and ``J^T`` by one more reverse pass.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

__all__ = [
    "CurvatureOperator",
    "autocast_off",
    "batch_seed",
    "full_precision",
    "seeded_rng",
    "functional_forward",
    "ggn_vector_product",
    "hessian_vector_product",
    "normalize_batches",
    "select_parameters",
]

Batch = tuple[Any, Any]
KINDS = ("hessian", "ggn", "residual")
NONFINITE = "the curvature product returned non-finite values (inf/nan loss?)"


class _NoAutocast(TorchFunctionMode):
    """Run every torch op with autocast off for ``device_type``, even inside a forward that
    enters autocast itself (a mode sees each op after the forward's own autocast context is
    set, so it can switch it off around the op)."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled(self.device_type):
            with torch.autocast(self.device_type, enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def autocast_off(device: torch.device | str) -> torch.autocast:
    """A context with autocast switched off for ``device``'s type (an autocast the caller
    entered would otherwise also lower the precision of the backward passes)."""
    return torch.autocast(torch.device(device).type, enabled=False)


_AUTOCAST_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


@contextlib.contextmanager
def _autocast_off_everywhere() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for dt in _AUTOCAST_TYPES:
            try:
                on = torch.is_autocast_enabled(dt)
            except (RuntimeError, ValueError):  # a device type this build does not know
                continue
            if on:
                stack.enter_context(torch.autocast(dt, enabled=False))
        yield


def full_precision(fn: Callable) -> Callable:
    """Decorator: run ``fn`` with every autocast the caller entered switched off, so the
    products and the small dense algebra around them (Lanczos, QR) run in the parameters'
    dtype."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _autocast_off_everywhere():
            return fn(*args, **kwargs)

    return wrapper


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def batch_seed(seed: int, index: int) -> int:
    """The RNG seed of batch ``index`` under ``seed`` (distinct batches get distinct masks)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Fork the CPU RNG and that of ``device``, seed both with ``seed``, restore them on exit:
    random ops inside (Dropout) are reproducible and the caller's RNG state is untouched."""
    device = torch.device(device)
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    mod = torch.get_device_module(device.type)
    index = device.index if device.index is not None else mod.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with mod.device(index):
            mod.manual_seed(seed)
        yield


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return seed


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.ndim > 0 else 1
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return _batch_size(x[0])
    if isinstance(x, Mapping) and x:
        return _batch_size(next(iter(x.values())))
    raise ValueError(f"cannot tell the batch size of inputs of type {type(x).__name__}")


def _is_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, Mapping))
        and isinstance(data[1], Tensor)
    )


def normalize_batches(data: Any) -> list[tuple[Any, Tensor, int]]:
    """``data`` (one batch or an iterable of batches) -> list of ``(inputs, targets, size)``.

    Raises ``ValueError`` for empty data or inputs and targets of different lengths."""
    if data is None:
        raise ValueError(
            "data must be a batch (inputs, targets) or an iterable of batches, got None"
        )
    if _is_batch(data):
        batches = [tuple(data)]
    else:
        try:
            batches = [tuple(b) for b in data]
        except TypeError as exc:
            raise ValueError(
                "data must be a batch (inputs, targets) or an iterable of batches, "
                f"got {type(data).__name__}"
            ) from exc
    if not batches:
        raise ValueError("data is empty: no batches")
    out = []
    for i, b in enumerate(batches):
        if len(b) != 2:
            raise ValueError(f"batch {i} must be a pair (inputs, targets), got {len(b)} items")
        x, y = b
        n = _batch_size(x)
        if n == 0:
            raise ValueError(f"batch {i} is empty")
        if isinstance(y, Tensor) and y.ndim > 0 and y.shape[0] != n:
            raise ValueError(f"batch {i}: inputs have {n} examples but targets have {y.shape[0]}")
        out.append((x, y, n))
    return out


def select_parameters(
    model: nn.Module, params: str | Sequence[str] | None = None
) -> list[tuple[str, Tensor]]:
    """The named parameters to differentiate: all that require grad (``params=None``), or those
    whose name equals, or starts with ``<entry>.``, one of the given names (e.g. ``"fc1"`` or
    ``"layers.0.weight"``). Raises ``ValueError`` if the selection is empty."""
    named: list[tuple[str, Tensor]] = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad
    ]
    if params is None:
        chosen = named
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        if not wanted:
            raise ValueError("params names no parameters: an empty list was given")
        chosen = [(n, p) for n, p in named if any(n == w or n.startswith(w + ".") for w in wanted)]
        if not chosen:
            names = ", ".join(n for n, _ in named[:12])
            raise ValueError(f"params={wanted!r} names no parameter of the model (it has: {names})")
    if not chosen:
        raise ValueError("the model has no parameters that require grad")
    return chosen


def functional_forward(model: nn.Module) -> Callable[[Mapping[str, Tensor], Any], Tensor]:
    """``f(params, x)``: ``model(x)`` through ``functional_call`` with the tensors of ``params``
    in place of the parameters they name, detached copies of the other parameters and fresh
    clones of the buffers at every call (running statistics are never updated), in the model's
    own train/eval mode, with autocast switched off for every op (also inside a forward that
    enters autocast itself), so it runs in the parameters' dtype. Works under ``torch.func``
    transforms. A shape mismatch between the data and the model raises ``ValueError``."""
    frozen = {n: p.detach() for n, p in model.named_parameters()}
    device_type = _device_of(model).type

    def forward(params: Mapping[str, Tensor], x: Any) -> Tensor:
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            with _NoAutocast(device_type):
                return functional_call(model, ({**frozen, **params}, buffers), (x,))
        except RuntimeError as exc:
            if "shape" in str(exc) or "size" in str(exc):
                raise ValueError(f"the data does not fit the model: {exc}") from exc
            raise

    return forward


class CurvatureOperator:
    """The Hessian or GGN of the data-averaged loss as a linear operator on a flat vector.

    Args:
        model: the network; its mode (train/eval) is used as is and never changed.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a batch mean).
        data: one batch ``(inputs, targets)`` or an iterable of batches.
        params: ``None`` (all trainable parameters) or names / name prefixes of a subset.
        kind: ``"hessian"``, ``"ggn"`` or ``"residual"`` (``H - G``: the Hessian of
            ``sum(r * f(w))`` with ``r = dL/df`` held fixed, the curvature of the network
            itself weighted by the loss gradient; one double-backward per product).
        cache_batches: keep the autograd graphs when there are at most this many batches
            (faster, more memory); otherwise rebuild them at each product.
        seed: seeds the random ops of the forward (Dropout in train mode): batch ``i`` always
            runs under a forked RNG seeded from ``(seed, i)``, so every product sees the same
            masks and the global RNG is not advanced.

    ``n_products`` counts the operator applications (one per vector, whatever the batch count).
    A product that is not finite (a NaN/inf loss or input) raises ``ValueError``.

    The pieces the estimators build on are public: ``batches`` (``(inputs, targets, size)``
    per batch), ``total`` (examples), ``names`` / ``shapes`` / ``numels`` (the selection),
    :attr:`leaves`, :meth:`output`, :meth:`loss`, :meth:`call` and :meth:`with_kind`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data: Any,
        params: str | Sequence[str] | None = None,
        kind: str = "hessian",
        cache_batches: int = 64,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {loss_fn!r}")
        self.seed = _check_seed(seed)
        self.model = model
        self.loss_fn = loss_fn
        self.kind = kind
        self.cache_batches = cache_batches
        self.batches = normalize_batches(data)
        self.total = sum(n for _, _, n in self.batches)
        chosen = select_parameters(model, params)
        self.names = [n for n, _ in chosen]
        self.shapes = [tuple(p.shape) for _, p in chosen]
        self.numels = [p.numel() for _, p in chosen]
        self.n = sum(self.numels)
        first = chosen[0][1]
        self.dtype = first.dtype
        self.device = first.device
        self._chosen = set(self.names)
        self.n_products = 0
        self._cache: list | None = [] if len(self.batches) <= cache_batches else None
        self._leaves = {n: p.detach().requires_grad_(True) for n, p in chosen}
        self._forward = functional_forward(model)

    def with_kind(self, kind: str) -> CurvatureOperator:
        """An operator of another ``kind`` on the same model, loss, data, selection and seed
        (so the same Dropout masks)."""
        return CurvatureOperator(
            self.model,
            self.loss_fn,
            [b[:2] for b in self.batches],
            params=self.names,
            kind=kind,
            cache_batches=self.cache_batches,
            seed=self.seed,
        )

    # ------------------------------------------------------------------ vectors
    def flatten(self, parts: Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
        if isinstance(parts, Mapping):
            parts = [parts[n] for n in self.names]
        return torch.cat([p.reshape(-1) for p in parts])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        if flat.numel() != self.n:
            raise ValueError(f"vector has {flat.numel()} entries, the parameters have {self.n}")
        return {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def parameter_vector(self) -> Tensor:
        return self.flatten([self._leaves[n].detach() for n in self.names])

    # ------------------------------------------------------------------ public pieces
    @property
    def leaves(self) -> dict[str, Tensor]:
        """The selected parameters as detached tensors that require grad (in ``names`` order):
        differentiate :meth:`output` with respect to these. A new dict each time."""
        return dict(self._leaves)

    def output(self, batch: int, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Model output on batch number ``batch`` at :attr:`leaves` (or at ``params``, a dict
        by name overriding some of them), with gradients enabled, under that batch's seeded RNG
        (the masks every product of this operator uses) and with autocast off."""
        x = self.batches[batch][0]
        p = self._leaves if params is None else {**self._leaves, **params}
        with torch.enable_grad(), seeded_rng(batch_seed(self.seed, batch), self.device):
            return self._forward(p, x)

    def call(self, params: Mapping[str, Tensor], x: Any) -> Tensor:
        """``model(x)`` with the tensors of ``params`` (by name) in place of those parameters,
        the other parameters and copies of the buffers fixed, autocast off, no RNG handling
        (the form ``torch.func`` transforms need, e.g. per-example ``vmap``)."""
        return self._forward(params, x)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """``loss_fn(out, y)`` as a 0-d tensor; ``ValueError`` if it is not a scalar."""
        loss = self.loss_fn(out, y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar, got {shape}")
        return loss.reshape(())

    # ------------------------------------------------------------------ graphs
    def _grad(self, outputs, inputs, grad_outputs=None, create_graph=False):
        if isinstance(outputs, (tuple, list)):
            # outputs that do not depend on the inputs (e.g. the constant gradient of a
            # parameter the loss is linear in) contribute nothing
            keep = [i for i, o in enumerate(outputs) if o.requires_grad]
            if not keep:
                ins = (inputs,) if isinstance(inputs, Tensor) else inputs
                return tuple(torch.zeros_like(t) for t in ins)
            outputs = [outputs[i] for i in keep]
            if grad_outputs is not None:
                grad_outputs = [grad_outputs[i] for i in keep]
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=grad_outputs,
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )

    def _build(self, i: int) -> tuple:
        leaves = [self._leaves[n] for n in self.names]
        y = self.batches[i][1]
        with torch.enable_grad(), autocast_off(self.device):
            out = self.output(i)
            if self.kind == "hessian":
                loss = self.loss(out, y)
                grads = self._grad(loss, leaves, create_graph=True)
                return (loss.detach(), grads)
            if self.kind == "residual":
                loss = self.loss(out, y)
                r = self._grad(loss, out)[0].detach()
                grads = self._grad((r * out).sum(), leaves, create_graph=True)
                return (loss.detach(), grads)
            z = out.detach().requires_grad_(True)
            loss = self.loss(z, y)
            gz = self._grad(loss, z, create_graph=True)[0]
            u = torch.zeros_like(out, requires_grad=True)
            jtu = self._grad(out, leaves, u, create_graph=True)
            return (loss.detach(), out, z, gz, u, jtu)

    def _graphs(self):
        if self._cache is not None and self._cache:
            yield from zip(self._cache, self.batches)
            return
        for i, b in enumerate(self.batches):
            g = self._build(i)
            if self._cache is not None:
                self._cache.append(g)
            yield g, b

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Data-averaged loss and its gradient (flat) at the current parameters."""
        total_loss = 0.0
        grad = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        leaves = [self._leaves[n] for n in self.names]
        with autocast_off(self.device):
            for g, (_, _, nb) in self._graphs():
                w = nb / self.total
                total_loss += w * float(g[0])
                if self.kind != "ggn":
                    gr = g[1]
                else:
                    _, out, z, gz, _, _ = g
                    gr = self._grad(out, leaves, gz.detach())
                grad += w * self.flatten([t.detach() for t in gr])
        return total_loss, grad

    # ------------------------------------------------------------------ products
    def matvec(self, v: Tensor) -> Tensor:
        """Apply the operator to a flat vector ``v`` (length ``n``); ``ValueError`` if the
        product is not finite."""
        if v.shape != (self.n,):
            raise ValueError(f"vector must have shape ({self.n},), got {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.device)
        parts = list(v.split(self.numels))
        parts = [p.view(s) for p, s in zip(parts, self.shapes)]
        leaves = [self._leaves[n] for n in self.names]
        result = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        with autocast_off(self.device):
            for g, (_, _, nb) in self._graphs():
                w = nb / self.total
                if self.kind != "ggn":
                    hv = self._grad(g[1], leaves, parts)
                else:
                    _, out, z, gz, u, jtu = g
                    jv = self._grad(jtu, u, parts)[0]
                    hjv = self._grad(gz, z, jv)[0]
                    hv = self._grad(out, leaves, hjv)
                result += w * self.flatten(hv)
        self.n_products += 1
        if not torch.isfinite(result).all():
            raise ValueError(NONFINITE)
        return result.detach()

    __matmul__ = matvec


def _as_flat(op: CurvatureOperator, vector: Any) -> tuple[Tensor, str]:
    if isinstance(vector, Tensor):
        if vector.numel() == op.n and (vector.ndim == 1 or len(op.names) > 1):
            return vector.reshape(-1), "flat"
        if len(op.names) == 1 and tuple(vector.shape) == op.shapes[0]:
            return vector.reshape(-1), "single"
        raise ValueError(f"vector has {vector.numel()} entries, the parameters have {op.n}")
    if isinstance(vector, Mapping):
        missing = [n for n in op.names if n not in vector]
        if missing:
            raise ValueError(f"vector is missing parameters {missing[:5]}")
        return op.flatten(vector), "dict"
    vector = list(vector)
    if len(vector) != len(op.names):
        raise ValueError(f"vector has {len(vector)} tensors, the selection has {len(op.names)}")
    return op.flatten(vector), "list"


def _product(model, loss_fn, data, vector, params, kind):
    op = CurvatureOperator(model, loss_fn, data, params=params, kind=kind, cache_batches=0)
    flat, form = _as_flat(op, vector)
    out = op.matvec(flat)
    if form == "flat":
        return out
    if form == "single":
        return out.view(op.shapes[0])
    parts = op.unflatten(out)
    return parts if form == "dict" else list(parts.values())


def hessian_vector_product(
    model: nn.Module,
    loss_fn,
    data: Any,
    vector: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    params: str | Sequence[str] | None = None,
):
    """Hessian of the (batch-size-weighted) data loss times ``vector``.

    ``vector`` is a flat tensor, a list of tensors shaped like the selected parameters, or a dict
    by parameter name; the result has the same form. For many products with the same data use
    :class:`CurvatureOperator`, which keeps the autograd graph between products."""
    return _product(model, loss_fn, data, vector, params, "hessian")


def ggn_vector_product(
    model: nn.Module,
    loss_fn,
    data: Any,
    vector: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    params: str | Sequence[str] | None = None,
):
    """Generalised Gauss-Newton ``J^T H_L J`` times ``vector`` (``J`` the Jacobian of the model
    outputs with respect to the parameters, ``H_L`` the Hessian of ``loss_fn`` with respect to the
    outputs), averaged over batches like :func:`hessian_vector_product`."""
    return _product(model, loss_fn, data, vector, params, "ggn")


def make_operator(
    model, loss_fn, data, params=None, kind=None, cache_batches=64, seed=0
) -> CurvatureOperator:
    """Internal: accept an existing operator or build one (``kind=None`` means "hessian").

    An operator already fixes its loss, data, selection and kind: passing ``loss_fn``/``data``,
    a ``params`` that selects other parameters, or another ``kind`` with it raises
    ``ValueError`` instead of being ignored."""
    if isinstance(model, CurvatureOperator):
        op = model
        if loss_fn is not None or data is not None:
            raise ValueError(
                "a CurvatureOperator already holds its loss_fn and data: pass either the "
                "operator alone or (model, loss_fn, data)"
            )
        if kind is not None and kind != op.kind:
            raise ValueError(
                f"kind={kind!r} does not match the operator's kind {op.kind!r}: build the "
                f"operator with kind={kind!r} (or use op.with_kind({kind!r}))"
            )
        if params is not None:
            names = [n for n, _ in select_parameters(op.model, params)]
            if names != op.names:
                raise ValueError(
                    f"params={params!r} selects other parameters than the operator's "
                    f"({len(op.names)} tensors: {', '.join(op.names[:6])}): build the operator "
                    "with that params="
                )
        return op
    return CurvatureOperator(
        model,
        loss_fn,
        data,
        params=params,
        kind="hessian" if kind is None else kind,
        cache_batches=cache_batches,
        seed=seed,
    )
