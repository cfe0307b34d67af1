"""AdamP and SGDP: Adam and SGD that stop growing the norm of scale-invariant weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_betas,
    check_bool,
    check_lr,
    check_nonnegative,
    check_range,
    get_value,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._kernels import scale_invariant_projection
from .param_groups import decay_groups
from .registry import ADAM_SPACE, ELEMENTWISE_CAPS, SGD_SPACE, OptimInfo, Paper, register

__all__ = ["SGDP", "AdamP", "adamp", "sgdp"]

_REFERENCES = """
    References:
        Byeongho Heo, Sanghyuk Chun, Seong Joon Oh, Dongyoon Han, Sangdoo Yun, Gyuwan Kim,
        Youngjung Uh, Jung-Woo Ha. "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
        Scale-invariant Weights." ICLR 2021, arXiv:2006.08217. Reference code: adamp 0.3.0
        (clovaai/AdamP).
"""

_PROJECTION = """
    Projection (only for ``p.ndim > 1``): if the weight looks scale-invariant, first per output
    channel (rows of ``p.reshape(out, -1)``), else for the whole tensor, i.e. if
    ``max_rows |cos(g_row, p_row)| < delta / sqrt(row length)`` with the raw gradient ``g``,
    then per row ``u <- u - p_hat <p_hat, u>`` with ``p_hat = p_row / (||p_row|| + eps)`` and the
    weight decay is scaled by ``wd_ratio``. See :func:`basin.optim._kernels.scale_invariant_projection`.
"""


def _check_projection_args(group: dict[str, Any]) -> None:
    check_nonnegative("delta", group["delta"])
    check_range("wd_ratio", group["wd_ratio"], 0.0, 1.0)
    check_bool("nesterov", group["nesterov"])


class AdamP(BasinOptimizer):
    __doc__ = (
        r"""AdamP (Heo et al., 2021): Adam whose update loses its radial component on
    scale-invariant weights (weights followed by a normalisation layer), so that momentum does
    not inflate their norm and shrink the effective step size.

    Update, with :math:`bc_1 = 1-\beta_1^t`, :math:`bc_2 = 1-\beta_2^t`::

        m = b1 m + (1-b1) g;   v = b2 v + (1-b2) g^2
        u = m / (sqrt(v)/sqrt(bc2) + eps)          (nesterov: (b1 m + (1-b1) g) / (...))
        u, r = projection(p, g, u)                  (r = wd_ratio if projected, else 1)
        p <- p (1 - lr wd r) - lr/bc1 u
"""
        + _PROJECTION
        + """
    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the moment averages (default (0.9, 0.999)).
        eps: denominator term and norm floor of the projection (default 1e-8).
        weight_decay: decoupled weight decay (default 0).
        delta: cosine threshold of the scale-invariance test (default 0.1).
        wd_ratio: weight-decay multiplier on projected weights, in [0, 1] (default 0.1).
        nesterov: Nesterov-style first moment (default False).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).
"""
        + _REFERENCES
        + """
    Differences from the reference code:
        * The scale-invariance test reuses the per-row norms and dot products for the layer view
          (``||p||^2 = sum ||p_row||^2``) instead of recomputing them; only rounding differs.
        * bfloat16/float16 parameters are updated in their own dtype (state in that dtype too).
    """
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        _check_projection_args(group)

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, steps, (exp_avgs, exp_avg_sqs) = self._gather(
            group, ("exp_avg", "exp_avg_sq")
        )
        if params:
            adamp(params, grads, exp_avgs, exp_avg_sqs, steps, **self._hyperparameters(group))


def adamp(
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
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional AdamP; see :class:`AdamP`."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_adamp if use_foreach(foreach, params) else _single_tensor_adamp
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        wd_ratio=wd_ratio,
        nesterov=nesterov,
        maximize=maximize,
    )


def _single_tensor_adamp(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    delta, wd_ratio, nesterov, maximize,
):  # fmt: skip
    torch._foreach_add_(state_steps, 1)  # one dispatch instead of one per parameter
    corrections: dict[Any, tuple] = {}  # (bc1, sqrt(bc2)) per distinct step (usually just one)
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, v = exp_avgs[i], exp_avg_sqs[i]
        step = get_value(state_steps[i])
        if step not in corrections:
            corrections[step] = (1 - beta1**step, (1 - beta2**step) ** 0.5)
        bc1, sqrt_bc2 = corrections[step]

        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.sqrt().div_(sqrt_bc2).add_(eps)

        if p.ndim <= 1 and not nesterov:  # never projected: fuse the division into the step
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            p.addcdiv_(m, denom, value=-lr / bc1)
            continue

        if nesterov:
            u = m.mul(beta1).add_(g, alpha=1 - beta1).div_(denom)
        else:
            u = denom.reciprocal_().mul_(m)
        wd_factor = 1.0
        if p.ndim > 1:
            u, wd_factor = scale_invariant_projection(
                p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps
            )
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay * wd_factor)
        p.add_(u, alpha=-lr / bc1) if not isinstance(bc1, Tensor) else p.sub_(u * (lr / bc1))


def _multi_tensor_adamp(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    delta, wd_ratio, nesterov, maximize,
):  # fmt: skip
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for ps, gs, ms, vs, steps in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1)
        step_values = [get_value(t) for t in steps]

        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in step_values])
        torch._foreach_add_(denom, eps)
        if nesterov:
            us = list(torch._foreach_mul(ms, beta1))
            torch._foreach_add_(us, gs, alpha=1 - beta1)
            torch._foreach_div_(us, denom)
        else:
            us = list(torch._foreach_div(ms, denom))

        wd_factors: list[Any] = [1.0] * len(ps)
        for j, p in enumerate(ps):
            if p.ndim > 1:
                us[j], wd_factors[j] = scale_invariant_projection(
                    p, gs[j], us[j], delta=delta, wd_ratio=wd_ratio, eps=eps
                )
        if weight_decay != 0:
            torch._foreach_mul_(ps, [1 - lr * weight_decay * w for w in wd_factors])
        torch._foreach_mul_(us, [-lr / (1 - beta1**t) for t in step_values])
        torch._foreach_add_(ps, us)


class SGDP(BasinOptimizer):
    __doc__ = (
        r"""SGDP (Heo et al., 2021): SGD with momentum whose update loses its radial component on
    scale-invariant weights (see :class:`AdamP`).

    Update::

        buf = momentum buf + (1 - dampening) g       (buf starts at 0; none when momentum = 0)
        u = g + momentum buf  if nesterov  else buf
        u, r = projection(p, g, u)                     (r = wd_ratio if projected, else 1)
        p <- p (1 - lr wd r / (1 - momentum)) - lr u
"""
        + _PROJECTION
        + """
    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (required, as in the reference).
        momentum: momentum factor in [0, 1) (default 0).
        dampening: dampening of the gradient in the buffer, in [0, 1] (default 0).
        weight_decay: decoupled weight decay, scaled by ``1/(1 - momentum)`` (default 0).
        nesterov: Nesterov momentum (default False).
        eps: norm floor of the projection (default 1e-8).
        delta: cosine threshold of the scale-invariance test (default 0.1).
        wd_ratio: weight-decay multiplier on projected weights, in [0, 1] (default 0.1).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).
"""
        + _REFERENCES
        + """
    Differences from the reference code:
        * The reference projects its momentum buffer in place when ``nesterov=False`` (the update
          ``d_p`` *is* the buffer), so the radial component is also removed from all later
          momentum. The paper's Algorithm 1 (SGDP) projects only the update ``q_t``, leaving
          ``v_t`` intact, and so does basin (tested against a transcription, and that the
          reference differs, in tests/optim/test_adamp.py).
        * With ``momentum=0`` no buffer is stored (the reference keeps a zero-momentum buffer).
        * bfloat16/float16 parameters are updated in their own dtype (state in that dtype too).
    """
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_range("dampening", group["dampening"], 0.0, 1.0)
        check_nonnegative("weight_decay", group["weight_decay"])
        check_nonnegative("eps", group["eps"])
        _check_projection_args(group)

    def _step_group(self, group: dict[str, Any]) -> None:
        buf = "momentum_buffer" if group["momentum"] != 0 else None
        params, grads, _, (bufs,) = self._gather(group, (buf,), step=False)
        if params:
            sgdp(params, grads, bufs, **self._hyperparameters(group))


def sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional SGDP; see :class:`SGDP`."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_sgdp if use_foreach(foreach, params) else _single_tensor_sgdp
    fn(
        params,
        grads,
        momentum_buffers,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        eps=eps,
        delta=delta,
        wd_ratio=wd_ratio,
        maximize=maximize,
    )


def _single_tensor_sgdp(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, eps,
    delta, wd_ratio, maximize,
):  # fmt: skip
    decay_scale = lr * weight_decay / (1 - momentum)
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        if momentum != 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
            u = g.add(buf, alpha=momentum) if nesterov else buf
        else:
            u = g.mul(1 - dampening) if dampening != 0 else g
        wd_factor = 1.0
        if p.ndim > 1:  # out of place: the buffer and p.grad are never projected
            u, wd_factor = scale_invariant_projection(
                p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps
            )
        if weight_decay != 0:
            p.mul_(1 - decay_scale * wd_factor)
        p.add_(u, alpha=-lr) if not isinstance(lr, Tensor) else p.sub_(u * lr)


def _multi_tensor_sgdp(
    params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov, eps,
    delta, wd_ratio, maximize,
):  # fmt: skip
    decay_scale = lr * weight_decay / (1 - momentum)
    lists = [params, grads, momentum_buffers]
    for ps, gs, bufs in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        if momentum != 0:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, gs, alpha=1 - dampening)
            us = list(torch._foreach_add(gs, bufs, alpha=momentum) if nesterov else bufs)
        else:
            us = list(torch._foreach_mul(gs, 1 - dampening) if dampening != 0 else gs)
        wd_factors: list[Any] = [1.0] * len(ps)
        for j, p in enumerate(ps):
            if p.ndim > 1:
                us[j], wd_factors[j] = scale_invariant_projection(
                    p, gs[j], us[j], delta=delta, wd_ratio=wd_ratio, eps=eps
                )
        if weight_decay != 0:
            torch._foreach_mul_(ps, [1 - decay_scale * w for w in wd_factors])
        torch._foreach_add_(ps, us, alpha=-lr)


_PAPER = Paper(
    "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
    "Heo et al.",
    "2006.08217",
    2021,
)
register(
    OptimInfo(
        name="adamp",
        cls=AdamP,
        paper=_PAPER,
        state_memory=2.0,
        capabilities=ELEMENTWISE_CAPS | {"nesterov", "projection"},
        search_space=ADAM_SPACE,
        param_groups=decay_groups,
    )
)
register(
    OptimInfo(
        name="sgdp",
        cls=SGDP,
        paper=_PAPER,
        state_memory=1.0,
        capabilities=ELEMENTWISE_CAPS | {"nesterov", "projection"},
        state_note="with momentum > 0 (the harness default, 0.9); 0 with momentum = 0",
        family="sgd",
        lr_scaling="linear",
        lr_from={"lr": ("sgd",)},
        defaults={"momentum": 0.9},
        search_space=SGD_SPACE,
        param_groups=decay_groups,
    )
)
