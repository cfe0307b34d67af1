"""EXAdam: Adam with cross-moment bias corrections, a gradient term and a growing step size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_adam_hparams,
    check_bool,
    get_value,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._fused import fused_step, use_fused
from .param_groups import decay_groups
from .registry import ADAM_SPACE, ELEMENTWISE_CAPS, OptimInfo, Paper, register

__all__ = ["EXAdam", "exadam"]


class EXAdam(BasinOptimizer):
    r"""EXAdam (Adly, 2024): Adam whose bias corrections are modulated by the *other* moment,
    plus a bias-corrected gradient term in the numerator and a logarithmically growing step.

    Update, with :math:`bc_1 = 1-\beta_1^t`, :math:`bc_2 = 1-\beta_2^t`::

        p  <- p * (1 - lr*wd)                               (decoupled, before everything else)
        m_t = b1 m_{t-1} + (1-b1) g_t
        v_t = b2 v_{t-1} + (1-b2) g_t^2
        d1  = 1 + b2^t * v_t / (v_t + eps)                  (from v; corrects m and g)
        d2  = 1 + b1^t * m_t^2 / (m_t^2 + eps)              (from m; corrects v)
        m~  = m_t d1 / bc1,   g~ = g_t d1 / bc1,   v~ = v_t d2 / bc2
        a_t = lr * ln(sqrt(2) * sqrt(t + 1))                (lr if not dynamic_step_size)
        p  <- p - a_t (m~ + g~) / (sqrt(v~) + eps)

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the first and second moments (default (0.9, 0.999)).
        eps: added to the denominator and inside d1, d2 (default 1e-8).
        weight_decay: decoupled weight decay ``p *= 1 - lr*wd`` (default 0).
        dynamic_step_size: scale the step by ``ln(sqrt(2(t+1)))`` as in the paper
            (default True); False uses ``lr`` as the authors' later code does.
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        fused: True runs one compiled kernel per step over flat state buffers
            (:mod:`basin.optim._fused`; the first step compiles it); None (default) and False
            use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).

    References:
        Ahmed M. Adly. "EXAdam: The Power of Adaptive Cross-Moments." arXiv:2412.20302, 2024.
        Reference code: AhmedMostafa16/EXAdam ``exadam.py``.

    Differences from the paper / reference code:
        * The dynamic step size of the paper (and of the authors' first commit) is the default;
          the authors' later code and pytorch-optimizer 4.1.0's ``EXAdam`` dropped it
          (``dynamic_step_size=False`` matches them).
        * Weight decay is scaled by ``lr``, not by the dynamic ``a_t``, as in the authors' code.
        * The eager loop evaluates ``(m+g) d1`` and ``v d2`` in an algebraically equal folded
          form (fewer passes); it matches the float64 transcription to 1e-10 over 100 steps.
        * bfloat16/float16 parameters are updated in their own dtype (state in that dtype too).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dynamic_step_size: bool = True,
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
            dynamic_step_size=dynamic_step_size,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_adam_hparams(group)
        check_bool("dynamic_step_size", group["dynamic_step_size"])

    def _step_group(self, group: dict[str, Any]) -> None:
        if use_fused(group.get("fused"), group["params"]):
            keys = ("exp_avg", "exp_avg_sq")
            fused_step(self, group, keys, _flat_exadam, _flat_coefficients)
            return
        params, grads, steps, (exp_avgs, exp_avg_sqs) = self._gather(
            group, ("exp_avg", "exp_avg_sq")
        )
        if params:
            exadam(params, grads, exp_avgs, exp_avg_sqs, steps, **self._hyperparameters(group))


def exadam(
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
    dynamic_step_size: bool,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional EXAdam; see :class:`EXAdam`."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_exadam if use_foreach(foreach, params) else _single_tensor_exadam
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
        dynamic_step_size=dynamic_step_size,
        maximize=maximize,
    )


def _coefficients(step: Any, lr: Any, beta1: float, beta2: float, eps: float, dynamic: bool):
    """Per-step scalars ``(b1^t, b2^t, step_scale, denom_eps)`` for a Python step (eager) or a
    tensor step (compiled), with the bias corrections folded in:
    ``a_t (m~ + g~)/(sqrt(v~) + eps) = step_scale * (m+g) d1 / (sqrt(v d2) + denom_eps)``
    where ``step_scale = a_t sqrt(bc2)/bc1`` and ``denom_eps = eps sqrt(bc2)``."""
    b1t, b2t = beta1**step, beta2**step
    sqrt_bc2 = (1 - b2t) ** 0.5
    alpha = lr
    if dynamic:  # ln(sqrt(2) sqrt(t+1)) = ln(2 (t+1)) / 2
        log = torch.log if isinstance(step, Tensor) else math.log
        alpha = lr * (0.5 * log(2 * (step + 1)))
    return b1t, b2t, alpha * sqrt_bc2 / (1 - b1t), eps * sqrt_bc2


def _flat_coefficients(
    step: float, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    dynamic_step_size: bool, maximize: bool, **_: Any,
) -> torch.Tensor:  # fmt: skip
    """The step's scalars for :func:`_flat_exadam`, folded as on the eager single-tensor path:
    (grad sign, decay factor, 1-beta1, beta2, 1-beta2, eps, the two fraction coefficients, the
    denominator eps, the step coefficient), one float64 tensor."""
    b1t, b2t, step_scale, denom_eps = _coefficients(step, lr, beta1, beta2, eps, dynamic_step_size)
    root = (1 + b1t) ** 0.5
    values = [-1.0 if maximize else 1.0, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps]
    values += [-b2t * eps / (1 + b2t), -b1t * eps / (1 + b1t), denom_eps / root]
    return torch.tensor(values + [-step_scale * (1 + b2t) / root], dtype=torch.float64)


def _flat_exadam(p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor) -> Tensor:
    """One EXAdam step over flat tensors (the fused path's kernel): updates ``m`` and ``v`` in
    place and returns the new parameters; the eager single-tensor path's operations."""
    g = g * c[0]
    p = p * c[1]
    m.lerp_(g, c[2].to(m.dtype))
    v.copy_(v * c[3] + c[4] * g * g)
    num = m + g
    num = num + c[6] * num / (v + c[5])  # (m+g) d1 / (1+b2^t)
    vd = v + c[7] * v / (m * m + c[5])  # v d2 / (1+b1^t)
    return p + c[9] * num / (torch.sqrt(vd) + c[8])


def _single_tensor_exadam(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    dynamic_step_size, maximize,
):  # fmt: skip
    torch._foreach_add_(state_steps, 1.0)  # one dispatch instead of one per parameter
    coefs: dict[Any, tuple] = {}  # per distinct step (usually just one)
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, v = exp_avgs[i], exp_avg_sqs[i]
        step = get_value(state_steps[i])
        c = coefs.get(step)
        if c is None:
            c = coefs[step] = _coefficients(step, lr, beta1, beta2, eps, dynamic_step_size)
        b1t, b2t, step_scale, denom_eps = c

        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)

        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)

        if isinstance(step, Tensor):  # compiled: tensor coefficients, Inductor fuses all of it
            d1 = 1 + b2t * v / (v + eps)
            m2 = m * m
            d2 = 1 + b1t * m2 / (m2 + eps)
            p.sub_(step_scale * (m + g) * d1 / ((v * d2).sqrt() + denom_eps))
            continue

        # eager: 9 passes and two temporaries for the update, using
        #   (m+g) d1 = (1+b2^t) (m+g) (1 - c2/(v+eps)),     c2 = b2^t eps/(1+b2^t)
        #   v d2     = (1+b1^t) (v - c1 v/(m^2+eps)),       c1 = b1^t eps/(1+b1^t)
        # (the subtracted fractions are <= 1/2: no cancellation), constants folded in the step
        r = v.add(eps)
        num = m.add(g)
        num.addcdiv_(num, r, value=-b2t * eps / (1 + b2t))  # (m+g) d1 / (1+b2^t)
        torch.mul(m, m, out=r).add_(eps)
        torch.addcdiv(v, v, r, value=-b1t * eps / (1 + b1t), out=r)  # v d2 / (1+b1^t)
        root = (1 + b1t) ** 0.5
        r.sqrt_().add_(denom_eps / root)
        p.addcdiv_(num, r, value=-step_scale * (1 + b2t) / root)


def _multi_tensor_exadam(
    params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay,
    dynamic_step_size, maximize,
):  # fmt: skip
    lr = get_value(lr)  # a tensor lr as a number: the foreach scalar lists need floats
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    for ps, gs, ms, vs, steps in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1.0)
        coefs = [
            _coefficients(get_value(t), lr, beta1, beta2, eps, dynamic_step_size) for t in steps
        ]
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)

        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)

        # the folded form of the single-tensor eager branch (see there)
        b1ts, b2ts = [c[0] for c in coefs], [c[1] for c in coefs]
        roots = [(1 + b1t) ** 0.5 for b1t in b1ts]
        r = torch._foreach_add(vs, eps)
        num = torch._foreach_add(ms, gs)
        torch._foreach_addcdiv_(num, num, r, [-b2t * eps / (1 + b2t) for b2t in b2ts])
        r = torch._foreach_mul(ms, ms)
        torch._foreach_add_(r, eps)
        den = torch._foreach_addcdiv(vs, vs, r, [-b1t * eps / (1 + b1t) for b1t in b1ts])
        torch._foreach_sqrt_(den)
        torch._foreach_add_(den, [c[3] / root for c, root in zip(coefs, roots)])
        sizes = [-c[2] * (1 + c[1]) / root for c, root in zip(coefs, roots)]
        torch._foreach_addcdiv_(ps, num, den, sizes)


register(
    OptimInfo(
        name="exadam",
        cls=EXAdam,
        paper=Paper("EXAdam: The Power of Adaptive Cross-Moments", "Adly", "2412.20302", 2024),
        state_memory=2.0,
        capabilities=ELEMENTWISE_CAPS | {"fused"},
        search_space=ADAM_SPACE,
        param_groups=decay_groups,
    )
)
