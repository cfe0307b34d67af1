"""diffGrad: Adam whose step is damped where the gradient barely changes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_adam_hparams,
    get_value,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._fused import fused_step, use_fused
from .param_groups import decay_groups
from .registry import ADAM_SPACE, ELEMENTWISE_CAPS, OptimInfo, Paper, register

__all__ = ["DiffGrad", "diffgrad"]


class DiffGrad(BasinOptimizer):
    r"""diffGrad (Dubey et al., 2019): Adam with a per-coordinate *friction*
    :math:`\xi_t = \mathrm{sigmoid}(|g_{t-1} - g_t|) \in [0.5, 1)` on the first moment, so that
    coordinates whose gradient hardly changes (near an optimum) take smaller steps.

    Update, with :math:`bc_1 = 1-\beta_1^t`, :math:`bc_2 = 1-\beta_2^t` and :math:`g_0 = 0`::

        g_t <- g_t + wd * p                                  (L2, if weight_decay)
        m_t = b1 m_{t-1} + (1-b1) g_t
        v_t = b2 v_{t-1} + (1-b2) g_t^2
        xi  = sigmoid(|g_{t-1} - g_t|)
        p  <- p - lr * sqrt(bc2)/bc1 * xi * m_t / (sqrt(v_t) + eps)
        g_{t-1} <- copy of g_t                              (state "previous_grad")

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the first and second moments (default (0.9, 0.999)).
        eps: added to ``sqrt(v)`` in the denominator (default 1e-8).
        weight_decay: L2 penalty added to the gradient (default 0); the stored previous
            gradient includes it, as in the authors' code.
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        fused: True runs one compiled kernel per step over flat state buffers
            (:mod:`basin.optim._fused`; the first step compiles it); None (default) and False
            use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).

    References:
        Shiv Ram Dubey, Soumendu Chakraborty, Swalpa Kumar Roy, Snehasis Mukherjee, Satish Kumar
        Singh, Bidyut Baran Chaudhuri. "diffGrad: An Optimization Method for Convolutional Neural
        Networks." IEEE TNNLS 2020, arXiv:1909.11015 (2019). Reference code:
        shivram1987/diffGrad ``diffGrad_v2.py``; torch-optimizer 0.3.0 ``DiffGrad``.

    Differences from the paper / reference code:
        * eps is added to ``sqrt(v_t)`` with the bias corrections folded into the step size
          (Kingma & Ba's "efficient" form, as in the authors' code and torch-optimizer), i.e. the
          paper's ``m^/(sqrt(v^) + eps)`` with ``eps`` scaled by ``sqrt(bc2)``.
        * The previous gradient is a copy (the authors' first ``diffGrad.py`` kept a reference to
          ``p.grad``, so zeroing gradients in place made ``xi`` a constant 0.5).
        * L2 decay does not modify ``p.grad`` in place (the authors' code and torch-optimizer do).
        * pytorch-optimizer 4.1.0's ``DiffGrad`` (a second opinion) defaults to decoupled decay
          and divides by ``sqrt(v + 1e-15) + eps``; with ``weight_decouple=False`` and that
          1e-15 removed it agrees with basin (tested).
        * bfloat16/float16 parameters are updated in their own dtype (state in that dtype too).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_adam_hparams(group)

    def _step_group(self, group: dict[str, Any]) -> None:
        if use_fused(group.get("fused"), group["params"]):
            keys = ("exp_avg", "exp_avg_sq", "previous_grad")
            fused_step(self, group, keys, _flat_diffgrad, _flat_coefficients)
            return
        params, grads, steps, (exp_avgs, exp_avg_sqs, prev_grads) = self._gather(
            group, ("exp_avg", "exp_avg_sq", "previous_grad")
        )
        if params:
            hyperparameters = self._hyperparameters(group)
            diffgrad(params, grads, exp_avgs, exp_avg_sqs, prev_grads, steps, **hyperparameters)


def diffgrad(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    previous_grads: list[Tensor],
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
    """Functional diffGrad; see :class:`DiffGrad`."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_diffgrad if use_foreach(foreach, params) else _single_tensor_diffgrad
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        previous_grads,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _flat_coefficients(
    step: float, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    maximize: bool, **_: Any,
) -> Tensor:  # fmt: skip
    """The step's scalars for :func:`_flat_diffgrad` (grad sign, L2 coefficient, 1-beta1,
    beta2, 1-beta2, eps, -step size), one float64 tensor."""
    values = [-1.0 if maximize else 1.0, weight_decay, 1 - beta1, beta2, 1 - beta2, eps]
    return torch.tensor(values + [-_step_size(step, lr, beta1, beta2)], dtype=torch.float64)


def _flat_diffgrad(p: Tensor, g: Tensor, m: Tensor, v: Tensor, prev: Tensor, c: Tensor) -> Tensor:
    """One diffGrad step over flat tensors (the fused path's kernel): updates ``m``, ``v`` and
    ``prev`` in place and returns the new parameters. Same operations as the single-tensor
    path."""
    g = g * c[0]
    g = g + c[1] * p
    m.lerp_(g, c[2].to(m.dtype))
    v.copy_(v * c[3] + c[4] * g * g)
    denom = torch.sqrt(v) + c[5]
    xi_m = torch.sigmoid(torch.abs(prev - g)) * m
    prev.copy_(g)
    return p + c[6] * xi_m / denom


def _step_size(step: Any, lr: Any, beta1: float, beta2: float) -> Any:
    """``lr * sqrt(bc2) / bc1`` for a Python step (eager) or a tensor step (compiled)."""
    return lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)


def _single_tensor_diffgrad(
    params, grads, exp_avgs, exp_avg_sqs, previous_grads, state_steps, *, lr, beta1, beta2, eps,
    weight_decay, maximize,
):  # fmt: skip
    torch._foreach_add_(state_steps, 1.0)  # one dispatch instead of one per parameter
    sizes: dict[Any, Any] = {}  # the step size per distinct step (usually just one)
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, v, prev = exp_avgs[i], exp_avg_sqs[i], previous_grads[i]
        step = get_value(state_steps[i])
        step_size = sizes.get(step)
        if step_size is None:
            step_size = sizes[step] = _step_size(step, lr, beta1, beta2)

        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)

        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().add_(eps)
        # prev becomes the numerator xi * m, then the copy of g for the next step
        prev.sub_(g).abs_().sigmoid_().mul_(m)
        if isinstance(step_size, Tensor):  # compiled: a tensor coefficient
            p.sub_(prev.div_(denom).mul_(step_size))
        else:
            p.addcdiv_(prev, denom, value=-step_size)
        prev.copy_(g)


def _multi_tensor_diffgrad(
    params, grads, exp_avgs, exp_avg_sqs, previous_grads, state_steps, *, lr, beta1, beta2, eps,
    weight_decay, maximize,
):  # fmt: skip
    lr = get_value(lr)  # a tensor lr as a number: the foreach scalar lists need floats
    lists = [params, grads, exp_avgs, exp_avg_sqs, previous_grads, state_steps]
    for ps, gs, ms, vs, prevs, steps in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1.0)
        if weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=weight_decay)

        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        torch._foreach_sub_(prevs, gs)
        torch._foreach_abs_(prevs)
        torch._foreach_sigmoid_(prevs)
        torch._foreach_mul_(prevs, ms)
        sizes = [-_step_size(get_value(t), lr, beta1, beta2) for t in steps]
        torch._foreach_addcdiv_(ps, prevs, denom, sizes)
        torch._foreach_copy_(prevs, gs)


register(
    OptimInfo(
        name="diffgrad",
        cls=DiffGrad,
        paper=Paper(
            "diffGrad: An Optimization Method for Convolutional Neural Networks",
            "Dubey et al.",
            "1909.11015",
            2019,
        ),
        state_memory=3.0,
        capabilities=ELEMENTWISE_CAPS | {"fused"},
        search_space=ADAM_SPACE,
        param_groups=decay_groups,
    )
)
