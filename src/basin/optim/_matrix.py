"""Shared machinery of the matrix-aware optimizers (Muon, SWAN, COSMOS, FRUGAL): per-parameter
routing between the optimizer's matrix rule and one built-in AdamW fallback for embeddings,
output heads, biases, gains and anything else the matrix rule does not take.

Every parameter group carries ``matrix_rule``:

* ``True``: every parameter gets the matrix rule (``ndim > 2`` viewed as ``(size(0), -1)``); a
  parameter with ``ndim < 2`` raises ``ValueError`` naming it and saying how to route it.
* ``False``: every parameter gets AdamW with the group's ``lr``, ``betas``, ``eps`` and
  ``weight_decay`` (missing ones are filled from the optimizer's fallback defaults).
* ``None`` (automatic): the optimizer's ``_uses_matrix_rule(p, group)`` decides per parameter
  (Muon and SWAN: ``ndim >= 2``; COSMOS: 2-D with at most ``max_rows`` rows; FRUGAL: 2-D).
  Optimizers whose own hyperparameters are AdamW's (COSMOS, FRUGAL:
  ``_separate_fallback_group = False``) keep the other parameters in the group; the others
  (Muon, SWAN) move them to a companion ``matrix_rule=False`` group right after it, which takes
  the fallback defaults (group 0 stays the matrix group).

Orientation: the matrix rules are defined on a weight as ``(out, in)`` (``nn.Linear``'s
layout): Muon's scale ``sqrt(max(1, out/in))``, SWAN's row standardisation and whitening side,
COSMOS's subspace of the input side, FRUGAL's projected side. A group with ``transposed=True``
holds weights stored ``(in, out, ...)`` (HF's GPT-2 ``Conv1D``, ``nn.ConvTranspose*d``): the
rules then act on the weight with dims 0 and 1 swapped (:func:`as_matrix`), so such a layer gets
exactly the update of the same layer stored as ``nn.Linear``, transposed. Elementwise state
(momentum) stays in the parameter's layout; shape-dependent state (COSMOS's subspace, FRUGAL's
projector and moments) is in the ``(out, in)`` orientation.

:func:`basin.optim.matrix_param_groups` builds ``True`` groups (one with ``transposed=True`` for
weights stored ``(in, out)``) and a ``False`` group from a model; passing the model itself as
``params`` (``Muon(model)``) does the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._base import (
    BasinOptimizer,
    check_adam_hparams,
    check_grad,
    get_value,
    grad_of,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._fused import fused_step, use_fused
from .param_groups import matrix_param_groups

__all__ = ["MatrixOptimizer", "adamw_fallback", "as_matrix", "from_matrix", "matrix_shape"]

FALLBACK_KEYS = ("lr", "betas", "eps", "weight_decay")


class MatrixOptimizer(BasinOptimizer):
    """Base class. Subclasses set ``_algo`` (name for messages), ``_fallback_kw`` (the
    constructor flag that makes ``matrix_rule=None`` the default, or None where it already is)
    and ``_separate_fallback_group`` (see the module docstring), implement
    ``_check_hparams(group)`` (the matrix rule's hyperparameters: run on the defaults and on
    every group) and ``_matrix_step(group, params)``, and may override ``_uses_matrix_rule``
    (the automatic rule) and ``_check_params(group, gi)`` (per-parameter checks of the matrix
    rule).

    ``fallback``: ``lr``, ``betas``, ``eps``, ``weight_decay`` defaults of ``matrix_rule=False``
    groups, validated under the constructor names ``fallback_prefix + key``; None where the
    optimizer's own hyperparameters of those names are AdamW's."""

    _algo = "MatrixOptimizer"
    _fallback_kw: str | None = None
    _separate_fallback_group = True

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        matrix_rule: bool | None,
        fallback: dict[str, Any] | None = None,
        fallback_prefix: str = "",
    ) -> None:
        if isinstance(params, nn.Module):  # Muon(model): routed (and oriented) from its modules
            params = matrix_param_groups(params)
        if fallback is None:
            fallback = {k: defaults[k] for k in FALLBACK_KEYS}
        else:
            check_adam_hparams(fallback, fallback_prefix)
        self._fallback_defaults = {**fallback, "betas": tuple(fallback["betas"])}
        super().__init__(params, {**defaults, "matrix_rule": matrix_rule, "transposed": False})

    # ------------------------------------------------------------ routing

    def _uses_matrix_rule(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Automatic rule (``matrix_rule=None``): does the matrix rule update ``p``?"""
        return p.ndim >= 2

    def _split(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters as (matrix rule, AdamW fallback)."""
        rule = group["matrix_rule"]
        if rule is None:
            matrix: list[Tensor] = []
            fallback: list[Tensor] = []
            for p in group["params"]:
                (matrix if self._uses_matrix_rule(p, group) else fallback).append(p)
            return matrix, fallback
        return (list(group["params"]), []) if rule else ([], list(group["params"]))

    # ------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        rule = group.setdefault("matrix_rule", self.defaults["matrix_rule"])
        if rule is not None and not isinstance(rule, bool):
            raise ValueError(f"matrix_rule must be None, True or False, got {rule!r}")
        transposed = group.get("transposed", False)
        if not isinstance(transposed, bool):
            raise ValueError(
                f"transposed must be True (weights stored (in, out)) or False, got {transposed!r}"
            )
        if rule is None and self._separate_fallback_group:
            merged = {**self.defaults, **group}
            matrix: list[Any] = []
            other: list[Any] = []
            for item in group["params"]:
                p = item[1] if isinstance(item, tuple) else item
                (matrix if self._uses_matrix_rule(p, merged) else other).append(item)
            self._warn_ndim_routing(matrix, other)
            if matrix or not other:
                self.add_param_group({**group, "params": matrix, "matrix_rule": True})
            if other:
                keep = ("maximize", "foreach", "differentiable", "nonfinite")
                companion = {k: v for k, v in group.items() if k in keep}
                self.add_param_group({**companion, "params": other, "matrix_rule": False})
            return
        if rule is False:
            for key in FALLBACK_KEYS:
                group.setdefault(key, self._fallback_defaults[key])
        super().add_param_group(group)  # validates it (BasinOptimizer.add_param_group)

    def _warn_ndim_routing(self, matrix: list[Any], other: list[Any]) -> None:
        """A parameter list routed by ``ndim`` (``adamw_fallback=True`` on a framework's list):
        the vectors go to AdamW, but embeddings and the head, being 2-D, get the matrix rule.
        Say so once per optimizer, with the fix (the list cannot tell them apart)."""
        if not (matrix and other) or self._fallback_kw is None or self.__dict__.get("_warned"):
            return
        self._warned = True
        name = self._algo.lower()
        warnings.warn(
            f"{self._algo}: {self._fallback_kw}=True routes a parameter list by ndim alone, so "
            f"token/position embeddings and the output head (2-D) get the matrix rule, which the "
            f"papers advise against, and (in, out)-stored weights (HF Conv1D) the transposed "
            f"update. Build the optimizer from the model instead: "
            f"basin.optim.create({name!r}, model, ...) and hand it to the framework "
            f"(docs/frameworks.md).",
            UserWarning,
            stacklevel=4,
        )

    def _validate(self, group: dict[str, Any], gi: int) -> None:
        """The one validation path of every group: matrix-only groups hold only matrices, the
        fallback's hyperparameters are valid where it is used, then the subclass's checks."""
        if group["matrix_rule"] is True:
            names = group.get("param_names")
            bad = [i for i, p in enumerate(group["params"]) if p.ndim < 2]
            if bad:
                i, p = bad[0], group["params"][bad[0]]
                what = repr(names[i]) if names else f"#{i}"
                if self._fallback_kw:
                    auto = f"pass {self._fallback_kw}=True (or set matrix_rule=None on the group)"
                else:
                    auto = "leave matrix_rule=None (the default)"
                name = self._algo.lower()
                raise ValueError(
                    f"{self._algo} updates only matrices (ndim >= 2) with its matrix rule, but "
                    f"parameter {what} of param group {gi} (matrix_rule=True) has shape "
                    f"{tuple(p.shape)} ({len(bad)} such parameter(s)). Put embeddings, the "
                    f"output head, biases and gains in a group with matrix_rule=False: build the "
                    f"optimizer from the model, which does that and knows each layer's (out, in) "
                    f"orientation: basin.optim.create({name!r}, model, ...) or "
                    f"{self._algo}(model, ...) (basin.optim.matrix_param_groups(model) builds "
                    f"these groups). In a framework that passes parameter lists, hand it that "
                    f"optimizer instead: HF Trainer(..., optimizers=(basin.optim.create({name!r}, "
                    f"model), None)), Lightning's configure_optimizers returning it, "
                    f"accelerator.prepare(model, optimizer) (docs/frameworks.md). Or {auto} to "
                    f"route every parameter the matrix rule cannot take to the built-in AdamW (by "
                    f"ndim alone: embeddings and the head then get the matrix rule)."
                )
        try:
            self._check_common(group)
            self._check_hparams(group)
            if self._split(group)[1]:
                check_adam_hparams(group)
        except ValueError as err:
            raise ValueError(f"param group {gi}: {err}") from None
        self._check_params(group, gi)

    def _check_params(self, group: dict[str, Any], gi: int) -> None:
        """Per-parameter checks of the matrix rule (none by default)."""

    # ------------------------------------------------------------ step

    def _step_group(self, group: dict[str, Any]) -> None:
        matrix, fallback = self._split(group)
        if fallback:
            self._fallback_step(group, fallback)
        if matrix:
            self._matrix_step(group, matrix)

    def _matrix_step(self, group: dict[str, Any], params: list[Tensor]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _with_grad(self, params: list[Tensor]) -> list[Tensor]:
        """The parameters that have a gradient (checked: dense, real)."""
        out = [p for p in params if p.grad is not None]
        for p in out:
            check_grad(p, self._algo)
        return out

    def _fallback_step(self, group: dict[str, Any], group_params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        hyperparameters = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"], maximize=group["maximize"])  # fmt: skip
        if use_fused(group.get("fused"), group_params):
            hyperparameters["lr"] = scalar_lr(group["lr"])
            fused_step(self, group, ("exp_avg", "exp_avg_sq"), _flat_adamw, _flat_coefficients,
                       params=group_params, hyperparameters=hyperparameters)  # fmt: skip
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in self._with_grad(group_params):
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad_of(p))
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            adamw_fallback(params, grads, exp_avgs, exp_avg_sqs, steps, **hyperparameters,
                           foreach=group["foreach"])  # fmt: skip


def matrix_shape(p: Tensor, transposed: bool = False) -> tuple[int, int]:
    """``(rows, cols)`` of the ``(out, in)`` matrix the matrix rules see for ``p``."""
    if transposed:
        return p.size(1), p.numel() // p.size(1)
    return p.size(0), p.numel() // p.size(0)


def as_matrix(t: Tensor, transposed: bool = False) -> Tensor:
    """``t`` (a weight, its gradient or a state buffer in the weight's layout) as the
    ``(out, in)`` matrix of the matrix rules: ``t`` itself if 2-D, else ``(size(0), -1)``; for a
    weight stored ``(in, out, ...)`` (``transposed``) dims 0 and 1 are swapped first, into a
    contiguous copy, so that the rule runs on exactly the tensor an ``nn.Linear`` would give it."""
    if transposed:
        t = t.transpose(0, 1).contiguous()
    return t if t.ndim == 2 else t.reshape(t.size(0), -1)


def from_matrix(u: Tensor, shape: torch.Size | tuple[int, ...], transposed: bool = False) -> Tensor:
    """The ``(out, in)`` update ``u`` back in the parameter's ``shape`` (inverse of
    :func:`as_matrix`). Transposed, the result mirrors ``u``'s memory layout relative to the
    parameter (contiguous for a contiguous ``u``; transposed for a transposed view, as a tall
    matrix's Newton-Schulz result is), so that the parameter's elementwise update runs the same
    kernel, with the same rounding, as an ``nn.Linear``'s."""
    if not transposed:
        return u.reshape(shape)
    stored = (shape[1], shape[0], *shape[2:])
    if u.is_contiguous():
        return u.reshape(stored).transpose(0, 1).contiguous()
    return u.contiguous().reshape(stored).transpose(0, 1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16/float16 parameters (torch.linalg needs it), else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def adamw_fallback(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) with decoupled decay ``p *= 1 - lr*wd``,
    the fallback of every matrix optimizer. Arithmetic order of the Muon reference code's
    auxiliary Adam (moments by ``lerp``, bias-corrected moments, then
    ``m_hat / (sqrt(v_hat) + eps)``), so that Muon's fallback is bit-identical to it."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_adamw if use_foreach(foreach, params) else _single_tensor_adamw
    fn(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, maximize=maximize,
    )  # fmt: skip


def _flat_coefficients(
    step: float, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    maximize: bool,
) -> Tensor:  # fmt: skip
    """The step's scalars for :func:`_flat_adamw`: (grad sign, 1-beta1, 1-beta2, bc1, bc2, eps,
    decay factor, -lr), one float64 tensor."""
    values = [-1.0 if maximize else 1.0, 1 - beta1, 1 - beta2, 1 - beta1**step, 1 - beta2**step,
              eps, 1 - lr * weight_decay, -lr]  # fmt: skip
    return torch.tensor(values, dtype=torch.float64)


def _flat_adamw(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """One step of the AdamW fallback over flat tensors (the fused path's kernel, ``fused=True``):
    updates ``m`` and ``v`` in place and returns the new parameters; ``c`` from
    :func:`_flat_coefficients`. Same operations, in the same order, as the single-tensor path."""
    g = g * c[0]
    m.lerp_(g, c[1].to(m.dtype))
    v.lerp_(g * g, c[2].to(v.dtype))
    update = (m / c[3]) / ((v / c[4]).sqrt() + c[5])
    return p * c[6] + c[7] * update


def _single_tensor_adamw(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    maximize,
):  # fmt: skip
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, v = exp_avgs[i], exp_avg_sqs[i]
        state_steps[i] += 1
        step = get_value(state_steps[i])
        m.lerp_(g, 1 - beta1)
        v.lerp_(g.square(), 1 - beta2)
        update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
        _decay_and_add(p, update, lr, weight_decay)


def _multi_tensor_adamw(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    maximize,
):  # fmt: skip
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for ps, gs, ms, vs, steps in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1.0)
        step_values = [get_value(t) for t in steps]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1 - beta2)
        m_hat = torch._foreach_div(ms, [1 - beta1**t for t in step_values])
        denom = torch._foreach_div(vs, [1 - beta2**t for t in step_values])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(m_hat, denom)
        _foreach_decay_and_add(ps, m_hat, lr, weight_decay)


def _decay_and_add(p: Tensor, update: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """``p <- p (1 - lr wd) - lr update`` (``alpha=`` needs a Python number; a tensor lr
    multiplies first): the last lines of every single-tensor step of the matrix optimizers."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    if isinstance(lr, Tensor):
        p.sub_(update * lr)
    else:
        p.add_(update, alpha=-lr)


def _foreach_decay_and_add(
    params: list[Tensor], updates: list[Tensor], lr: float | Tensor, weight_decay: float
) -> None:
    """:func:`_decay_and_add` for lists (multi-tensor steps)."""
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    if isinstance(lr, Tensor):
        torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(params, updates, alpha=-lr)
