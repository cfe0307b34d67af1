"""Shared optimizer machinery: hyperparameter validation, the choice between the single-tensor
and multi-tensor paths, grouping tensors by device and dtype, step-counter and learning-rate
handling that works both eagerly and under ``torch.compile``, the gradient check that makes a
step all-or-nothing, and state dicts that name the optimizer that wrote them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "BasinOptimizer",
    "NonFiniteGradientError",
    "check_betas",
    "check_int",
    "check_lr",
    "check_nonnegative",
    "check_positive",
    "check_range",
    "get_value",
    "scalar_lr",
    "group_by_device_and_dtype",
    "is_compiling",
    "use_foreach",
]


# ---------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, (int, float))


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the range."""
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    rng = f"{lo}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}{hi}"
    if not _is_number(value):
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
    v = float(value)
    ok = (
        not math.isnan(v)
        and (v >= low if low_inclusive else v > low)
        and (v <= high if high_inclusive else v < high)
    )
    if not ok or (math.isinf(v) and not math.isinf(high)):
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_lr(lr: Any) -> None:
    """Learning rate: a float >= 0, or a 0-d tensor (as torch.optim allows)."""
    check_range("lr", lr, 0.0, math.inf, high_inclusive=False)


def check_nonnegative(name: str, value: Any) -> None:
    check_range(name, value, 0.0, math.inf, high_inclusive=False)


def check_positive(name: str, value: Any) -> None:
    check_range(name, value, 0.0, math.inf, low_inclusive=False, high_inclusive=False)


def check_betas(betas: Any, name: str = "betas") -> None:
    """Two coefficients, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2) with each in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        check_range(f"{name}[{i}]", b, 0.0, 1.0, high_inclusive=False)


def check_adam_hparams(group: dict[str, Any], prefix: str = "") -> None:
    """The hyperparameters every Adam-like rule has (``lr``, ``betas``, ``eps``,
    ``weight_decay``), named ``prefix + key`` in messages (``adamw_`` for the matrix
    optimizers' AdamW fallback)."""
    check_range(f"{prefix}lr", group["lr"], 0.0, math.inf, high_inclusive=False)
    check_betas(group["betas"], f"{prefix}betas")
    check_nonnegative(f"{prefix}eps", group["eps"])
    check_nonnegative(f"{prefix}weight_decay", group["weight_decay"])


def check_int(name: str, value: Any, low: int) -> int:
    """An integer (not a bool) >= ``low``, else ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_foreach(foreach: Any) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"foreach must be None, True or False, got {foreach!r}")


NONFINITE = ("raise", "skip")


class NonFiniteGradientError(ValueError):
    """A gradient with NaN/inf entries reached ``step()`` (nothing was changed)."""


def check_nonfinite(value: Any) -> None:
    if not isinstance(value, str) or value not in NONFINITE:
        raise ValueError(f"nonfinite must be one of 'raise', 'skip', got {value!r}")


# ---------------------------------------------------------------- paths


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def get_value(x: Tensor | float) -> Tensor | float:
    """A step counter as a Python number in eager mode (cheap scalar math), or the tensor itself
    under ``torch.compile`` (so the graph neither breaks on ``.item()`` nor recompiles per step)."""
    if isinstance(x, Tensor) and not is_compiling():
        return x.item()
    return x


def scalar_lr(lr: Tensor | float) -> Tensor | float:
    """A learning rate as the step functions use it: a tensor ``lr`` with one element (0-d,
    shape ``[1]``, ``[1, 1]``, ...: what torch.optim accepts) becomes a Python number eagerly,
    so that every path (``alpha=``, foreach scalar lists) takes it, and a 0-d tensor under
    ``torch.compile`` (no ``.item()``, no recompile when a scheduler changes it in place)."""
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            lr = lr.reshape(())
        return get_value(lr)
    return lr


def use_foreach(foreach: bool | None, params: Sequence[Tensor]) -> bool:
    """Resolve ``foreach=None``: the multi-tensor path on accelerators, where it saves kernel
    launches; the single-tensor loop on CPU, where ``torch._foreach_*`` is measurably slower
    than a plain loop (see benchmarks/optim_step.py) and under ``torch.compile``, where
    Inductor fuses the loop itself."""
    if foreach is not None:
        return foreach
    if is_compiling() or not params:
        return False
    return all(p.device.type not in ("cpu", "meta") for p in params)


def group_by_device_and_dtype(
    tensorlists: Sequence[Sequence[Tensor | None]],
) -> dict[tuple[torch.device, torch.dtype], list[list[Tensor]]]:
    """Split parallel lists of tensors into groups sharing the first list's device and dtype
    (``torch._foreach_*`` needs one device and dtype per call). A list of ``None`` (an unused
    optional buffer) stays a list of ``None``."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensorlists)  # type: ignore[arg-type]
    return {key: lists for key, (lists, _) in grouped.items()}  # type: ignore[misc]


def grad_of(p: Tensor) -> Tensor:
    """``p.grad`` of a parameter already known to have one (typed as a tensor)."""
    return cast(Tensor, p.grad)


def check_grad(p: Tensor, optimizer: str) -> None:
    g = p.grad
    assert g is not None
    if g.is_sparse:
        raise RuntimeError(f"{optimizer} does not support sparse gradients")
    if torch.is_complex(p):
        raise RuntimeError(f"{optimizer} does not support complex parameters")


def check_fusable(p: Tensor, optimizer: str) -> None:
    """The fused path (``fused=True``, :mod:`basin.optim._fused`) needs dense floating-point
    gradients of the parameter's dtype and device; checked for every group with ``fused=True``
    before a step changes anything."""
    g = p.grad
    assert g is not None
    if not p.is_floating_point() or not g.is_floating_point():
        raise ValueError(
            f"{optimizer}(fused=True) needs floating-point parameters and gradients, got "
            f"{p.dtype} / {g.dtype}"
        )
    if g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"{optimizer}(fused=True) needs gradients of the parameter's dtype and device, "
            f"got {g.dtype} on {g.device} for a {p.dtype} parameter on {p.device}"
        )


# ---------------------------------------------------------------- base class

# keys of ``defaults`` that are not a functional's keyword: ``betas`` (passed as beta1, beta2),
# ``differentiable``, which torch's Optimizer.__setstate__ (load_state_dict) adds, ``fused``
# (the path, not the math), ``matrix_rule`` (the routing of the matrix optimizers) and
# ``nonfinite``, which the step's gradient check reads
_NOT_KEYWORDS = frozenset({"betas", "differentiable", "fused", "matrix_rule", "nonfinite"})

# the key of state_dict() that names the optimizer class that wrote it
STATE_DICT_TAG = "basin_optimizer"


def _maybe_all_finite(grads: list[Tensor]) -> bool:
    """A fast test that every entry of every gradient is finite: the 2-norm per tensor (one
    fused kernel on accelerators, one vectorized pass on CPU; NaN and inf propagate), one host
    sync per device. False may also mean that a finite sum of squares overflowed: the caller
    then checks exactly."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        if g.numel():
            by_device.setdefault(g.device, []).append(g)
    return all(
        bool(torch.stack(torch._foreach_norm(gs)).isfinite().all()) for gs in by_device.values()
    )


class BasinOptimizer(Optimizer):
    """Base class: closure handling, the all-or-nothing gradient check and state-dict
    compatibility; subclasses implement ``_step_group(group)``, which gathers tensors
    (:meth:`_gather`) and calls the module-level functional with the group's hyperparameters
    (:meth:`_hyperparameters`).

    Guarantees shared by every basin optimizer:

    * A step completes or changes nothing: before any parameter or state is modified, every
      gradient is checked (dense, real and, eagerly, finite). A NaN/inf gradient raises
      ``ValueError`` naming the parameter (``nonfinite="raise"``, the default), or the whole
      step is skipped and counted in ``skipped_steps`` (``nonfinite="skip"``; where groups
      disagree, "raise" wins). The check costs one norm of the gradients and one host sync;
      under ``torch.compile`` it is not traced (it would break the graph), so compiled steps are
      unchecked. Optimizers whose step runs a factorization that can fail (QR, SVD, eigh:
      COSMOS, SOAP, FRUGAL's projector rebuilds) snapshot the parameters and state they are
      about to change (:meth:`_needs_snapshot`) and, if the step raises, put them back before
      the error propagates (eager steps).
    * ``lr`` may be a float or a one-element tensor (0-d, ``[1]``, ``[1, 1]``) on every path.
    * ``state_dict()`` records the writing class under ``"basin_optimizer"``; loading a state
      dict written by another basin optimizer raises ``ValueError`` (one without the tag, e.g.
      from an older basin, still loads). State dicts whose ``step`` is a plain number (torch
      < 1.12) load too.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._check_common(defaults)
        self._check_hparams(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _check_common(group: dict[str, Any]) -> None:
        check_foreach(group.get("foreach"))
        fused = group.get("fused")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        if fused and group.get("foreach"):
            raise ValueError("fused=True and foreach=True are exclusive: pick one path")
        check_bool("maximize", group.get("maximize", False))
        check_nonfinite(group.get("nonfinite", "raise"))

    def _check_hparams(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the hyperparameter of ``group`` (the defaults, or a
        param group with the defaults filled in) that is out of range; run on both."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, then :meth:`_validate` on the new group (which is
        removed again if it is invalid, so a caught error leaves the optimizer as it was)."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        try:
            self._validate(self.param_groups[gi], gi)
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate(self, group: dict[str, Any], gi: int) -> None:
        """Every group's hyperparameters, errors prefixed with the group's index."""
        try:
            self._check_common(group)
            self._check_hparams(group)
        except ValueError as err:
            raise ValueError(f"param group {gi}: {err}") from None

    def _step_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.
        All or nothing: see the class docstring (gradient check, ``nonfinite``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._check_grads():
            self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
            return loss
        if not is_compiling():  # the fused path's layouts are kept from one step call to the next
            self.__dict__["_step_calls"] = self.__dict__.get("_step_calls", 0) + 1
        snapshot = None if is_compiling() or not self._needs_snapshot() else self._snapshot()
        try:
            for group in self.param_groups:
                self._step_group(group)
        except Exception:
            if snapshot is not None:
                self._restore(snapshot)
            raise
        return loss

    def _needs_snapshot(self) -> bool:
        """Whether this step may fail part-way (a factorization), so that :meth:`step` keeps a
        copy to restore; False by default (the elementwise steps cannot fail once the
        gradients are checked)."""
        return False

    def _snapshot(self) -> list[tuple[Tensor, Tensor, dict[str, Any] | None]]:
        """Copies of every parameter with a gradient and of its state (None: no state yet)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                saved = None if not st else {
                    k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()
                }  # fmt: skip
                out.append((p, p.detach().clone(), saved))
        return out

    def _restore(self, snapshot: list[tuple[Tensor, Tensor, dict[str, Any] | None]]) -> None:
        """Put back what :meth:`_snapshot` saved: values are copied into the live tensors, so
        views and pools that share storage with them stay shared. The fused path's cached
        layouts are dropped (state may have been removed)."""
        self.__dict__.pop("_flat_runs", None)
        for p, value, saved in snapshot:
            p.detach().copy_(value)
            if saved is None:
                self.state.pop(p, None)
                continue
            st = self.state[p]
            for k in list(st):
                if k not in saved:
                    del st[k]
            for k, v in saved.items():
                cur = st.get(k)
                if isinstance(v, Tensor) and isinstance(cur, Tensor) and cur.shape == v.shape:
                    cur.copy_(v)
                else:
                    st[k] = v

    def _check_grads(self) -> bool:
        """Before anything is modified: every gradient dense and real (``RuntimeError``
        otherwise) and, eagerly, finite. A non-finite gradient raises ``ValueError`` naming its
        parameter if its group says ``nonfinite="raise"``; otherwise the step is to be skipped
        (returns False)."""
        name = getattr(self, "_algo", type(self).__name__)
        grads = []
        for group in self.param_groups:
            fused = bool(group.get("fused")) and not is_compiling()
            for p in group["params"]:
                if p.grad is not None:
                    check_grad(p, name)
                    if fused:
                        check_fusable(p, name)
                    grads.append(p.grad)
        if not grads or is_compiling() or _maybe_all_finite(grads):
            return True
        bad = [
            (gi, pi, p, group)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None and not bool(p.grad.isfinite().all())
        ]
        if not bad:  # the norm of large finite gradients overflowed
            return True
        raising = [b for b in bad if b[3].get("nonfinite", "raise") == "raise"]
        if not raising:
            return False
        gi, pi, p, group = raising[0]
        names = group.get("param_names")
        where = f"#{pi} of param group {gi}, shape {tuple(p.shape)}"
        what = f"{names[pi]!r} ({where})" if names else where
        g = p.grad
        n_nan, n_inf = int(g.isnan().sum()), int(g.isinf().sum())
        more = f"; {len(bad) - 1} more parameter(s) too" if len(bad) > 1 else ""
        raise NonFiniteGradientError(
            f"{name}: the gradient of parameter {what} is not finite ({n_nan} NaN, {n_inf} inf "
            f"of {g.numel()} entries{more}); nothing was changed (no parameter, no state). "
            f"Pass nonfinite='skip' to skip such steps instead."
        )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"basin_optimizer"``: the name of the class that wrote it."""
        out = super().state_dict()
        out[STATE_DICT_TAG] = type(self).__name__
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, refusing a state dict that another basin optimizer wrote
        (its hyperparameters and state would fail at ``step()`` or silently replace this
        optimizer's); a state dict without the tag (older basin, torch) loads as before."""
        writer = state_dict.get(STATE_DICT_TAG)
        mine = type(self).__name__
        if writer is not None and writer != mine:
            raise ValueError(
                f"this state dict was written by basin.optim.{writer}, not by {mine}: its "
                f"hyperparameters and state belong to {writer}, so {mine} cannot continue "
                f"from it. Load it into basin.optim.{writer}."
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != STATE_DICT_TAG})

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``__setstate__`` (also run by ``load_state_dict``), then: hyperparameters
        added since an older state dict was written take their defaults, and a plain-number
        ``step`` (torch < 1.12) becomes the tensor counter the steps expect."""
        super().__setstate__(state)
        self.__dict__.pop("_flat_runs", None)  # the fused path's layouts: state was replaced
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "differentiable":  # torch's own, added to defaults by its __setstate__
                    group.setdefault(key, value)
        for st in self.state.values():
            step = st.get("step")
            if step is not None and not isinstance(step, Tensor):
                st["step"] = torch.tensor(float(step), dtype=torch.float64)

    def _hyperparameters(
        self, group: dict[str, Any], exclude: Collection[str] = ()
    ) -> dict[str, Any]:
        """The group's hyperparameters as the functional's keyword arguments (the one way the
        optimizers hand a group to their functional): the value of every key the subclass put in
        ``defaults`` but ``exclude`` (keys that only the class reads, such as the routing of a
        matrix optimizer), with ``betas`` passed as ``beta1`` and ``beta2``."""
        kwargs = {
            key: group[key]
            for key in self.defaults
            if key not in _NOT_KEYWORDS and key not in exclude
        }
        if "lr" in kwargs:
            kwargs["lr"] = scalar_lr(kwargs["lr"])
        if "betas" in self.defaults:
            kwargs["beta1"], kwargs["beta2"] = group["betas"]
        return kwargs

    def _gather(
        self, group: dict[str, Any], zeros: Sequence[str | None] = (), *, step: bool = True
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[list[Tensor]]]:
        """The parameters of ``group`` that have a gradient, their gradients, their step
        counters (if ``step``) and, for each name in ``zeros``, that state buffer, created as
        zeros on first use (lazy state, as in torch.optim); a ``None`` name (an optional
        buffer that this group does not use) gives a list of ``None``."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        steps: list[Tensor] = []
        buffers: list[list[Tensor]] = [[] for _ in zeros]
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(p, type(self).__name__)
            state = self.state[p]
            if step and "step" not in state:
                state["step"] = self._new_step()
            for key, found in zip(zeros, buffers):
                if key is None:  # the kernel takes this optional buffer as a list of None
                    found.append(None)  # type: ignore[arg-type]
                    continue
                if key not in state:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                found.append(state[key])
            params.append(p)
            grads.append(p.grad)  # not None: checked above
            if step:
                steps.append(state["step"])
        return params, grads, steps, buffers

    @staticmethod
    def _new_step() -> Tensor:
        # A CPU scalar as in torch.optim (non-capturable): eager reads it with .item(); float64
        # so that bias corrections computed from it under torch.compile keep full precision.
        return torch.tensor(0.0, dtype=torch.float64)
