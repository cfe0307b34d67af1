"""Shared machinery of matrix-only optimizers (Muon, SWAN): per-group routing between the matrix
rule and a built-in Adam(W) fallback for embeddings, output heads, biases and gains.

A parameter group carries a boolean flag (``use_muon``, ``use_swan``, ...): True groups get the
matrix rule, False groups the fallback, with that group's ``lr``, ``betas``, ``eps`` and
``weight_decay`` (missing ones are filled from the optimizer's fallback defaults, not from the
matrix rule's). A flagged group holding a parameter with ``ndim < 2`` raises ``ValueError``
naming it, unless the optimizer was built with ``auto_fallback``, in which case such parameters
are moved into a companion fallback group right after their group (so ``Muon(model.parameters(),
adamw_fallback=True)`` works on any model; group 0 stays the matrix group).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_betas,
    check_grad,
    check_lr,
    check_nonnegative,
    get_value,
    group_by_device_and_dtype,
    use_foreach,
)

__all__ = ["MatrixOptimizer", "adam_fallback"]

FALLBACK_KEYS = ("lr", "betas", "eps", "weight_decay")


class MatrixOptimizer(BasinOptimizer):
    """Base class: subclasses validate their constructor arguments (the fallback's included, under
    their own names), set ``_flag`` (the group key), ``_algo`` (name for messages),
    ``_helper`` (the param-group helper to point users to), ``_auto_kw`` (the constructor flag
    that enables automatic routing) and implement ``_matrix_step(group)``."""

    _flag = "use_matrix"
    _algo = "MatrixOptimizer"
    _helper = "matrix_param_groups"
    _auto_kw = "auto_fallback"
    _fallback_name = "Adam"

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        fallback_defaults: dict[str, Any],
        auto_fallback: bool,
    ) -> None:
        self._fallback_defaults = dict(fallback_defaults)
        self._auto_fallback = auto_fallback
        super().__init__(params, {**defaults, self._flag: True})

    # ------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        flag = group.get(self._flag, True)
        if not isinstance(flag, bool):
            raise ValueError(f"{self._flag} must be True or False, got {flag!r}")
        if not flag:
            self._add_fallback_group({**group, "params": params})
            return
        matrix, other = [], []
        for i, item in enumerate(params):
            p = item[1] if isinstance(item, tuple) else item
            if isinstance(p, Tensor) and p.ndim < 2:
                other.append((i, item))
            else:
                matrix.append(item)
        if other and not self._auto_fallback:
            i, item = other[0]
            what = repr(item[0]) if isinstance(item, tuple) else f"#{i}"
            p = item[1] if isinstance(item, tuple) else item
            raise ValueError(
                f"{self._algo} updates only matrices (ndim >= 2), but parameter {what} of a "
                f"{self._flag}=True group has shape {tuple(p.shape)} ({len(other)} such "
                f"parameter(s)). Put embeddings, the output head, biases and gains in a group "
                f"with {self._flag}=False (basin.optim.{self._helper}(model) builds these "
                f"groups), or pass {self._auto_kw}=True to route every ndim < 2 parameter to "
                f"the built-in {self._fallback_name}."
            )
        if matrix or not other:
            group["params"] = matrix
            group[self._flag] = True
            super().add_param_group(group)
            self._check_matrix_group(self.param_groups[-1])
        if other:
            companion = {
                k: v for k, v in group.items() if k in ("maximize", "foreach", "differentiable")
            }
            self._add_fallback_group({**companion, "params": [item for _, item in other]})

    def _add_fallback_group(self, group: dict[str, Any]) -> None:
        group[self._flag] = False
        for key in FALLBACK_KEYS:
            group.setdefault(key, self._fallback_defaults[key])
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        super().add_param_group(group)

    def _check_matrix_group(self, group: dict[str, Any]) -> None:  # pragma: no cover
        """Validate a matrix group's hyperparameters (overridden)."""

    # ------------------------------------------------------------ step

    def _step_group(self, group: dict[str, Any]) -> None:
        if group[self._flag]:
            self._matrix_step(group)
        else:
            self._fallback_step(group)

    def _matrix_step(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fallback_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(p, self._algo)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam_fallback(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            foreach=group["foreach"],
        )


def adam_fallback(
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
    """AdamW with decoupled decay ``p *= 1 - lr*wd``, in the arithmetic order of the Muon
    reference code's auxiliary Adam (moments by ``lerp``, bias-corrected moments, then
    ``m_hat / (sqrt(v_hat) + eps)``), so that Muon's fallback is bit-identical to it."""
    fn = _multi_tensor_adam if use_foreach(foreach, params) else _single_tensor_adam
    fn(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, maximize=maximize,
    )  # fmt: skip


def _single_tensor_adam(
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
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        _add_scaled(p, update, lr)


def _multi_tensor_adam(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    maximize,
):  # fmt: skip
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for ps, gs, ms, vs, steps in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1)
        step_values = [get_value(t) for t in steps]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_lerp_(vs, torch._foreach_mul(gs, gs), 1 - beta2)
        m_hat = torch._foreach_div(ms, [1 - beta1**t for t in step_values])
        denom = torch._foreach_div(vs, [1 - beta2**t for t in step_values])
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(m_hat, denom)
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        if isinstance(lr, Tensor):
            torch._foreach_add_(ps, torch._foreach_mul(m_hat, -lr))
        else:
            torch._foreach_add_(ps, m_hat, alpha=-lr)


def _add_scaled(p: Tensor, update: Tensor, lr: float | Tensor) -> None:
    """``p -= lr * update`` (``alpha=`` needs a Python number; a tensor lr multiplies first)."""
    if isinstance(lr, Tensor):
        p.sub_(update * lr)
    else:
        p.add_(update, alpha=-lr)
