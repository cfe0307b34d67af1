"""AdaBelief: adapting step sizes by the belief in observed gradients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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

__all__ = ["AdaBelief", "adabelief"]


class AdaBelief(BasinOptimizer):
    r"""AdaBelief (Zhuang et al., 2020): Adam whose second moment tracks the *belief*
    :math:`(g_t - m_t)^2` instead of :math:`g_t^2`.

    Short runs look slow with the default ``rectify=True`` (the authors' default): the first 5
    steps are SGD-with-momentum steps and the rectified step is a fraction ``r`` of the
    unrectified one that grows with the step count, at ``betas[1]=0.999``: ``r`` = 0.05 at step
    10, 0.21 at 100, 0.65 at 1,000, 0.98 at 5,000 (RAdam's warmup). For runs of a few hundred
    steps, or to compare with Adam at the same ``lr``, pass ``rectify=False``.

    Update, with :math:`bc_1 = 1-\beta_1^t`, :math:`bc_2 = 1-\beta_2^t`::

        m_t = b1 m_{t-1} + (1-b1) g_t
        s_t = b2 s_{t-1} + (1-b2) (g_t - m_t)^2 + eps      (eps accumulates in s, as in the paper)
        s_t <- max(s_max, s_t)                              if amsgrad
        p  <- p - lr/bc1 * m_t / (sqrt(s_t)/sqrt(bc2) + eps)

    With ``rectify`` (RAdam's variance rectification): :math:`\rho_\infty = 2/(1-\beta_2) - 1`,
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / bc_2`; if :math:`\rho_t \ge 5` the step is
    ``lr * r_t * m_t / (sqrt(s_t) + eps)`` with
    :math:`r_t = \sqrt{bc_2 (\rho_t-4)(\rho_t-2)\rho_\infty / ((\rho_\infty-4)(\rho_\infty-2)\rho_t)} / bc_1`;
    otherwise ``lr * m_t / bc1`` (SGD with momentum) when ``degenerated_to_sgd``, else no step.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-3).
        betas: coefficients of the first moment and of the belief (default (0.9, 0.999)).
        eps: added to the belief at every step and to the denominator (default 1e-16).
        weight_decay: weight decay coefficient (default 0).
        amsgrad: use the running maximum of the belief (default False).
        weight_decouple: decoupled decay ``p *= 1 - lr*wd`` (default True); False adds ``wd*p``
            to the gradient (L2).
        fixed_decay: decoupled decay independent of lr, ``p *= 1 - wd`` (default False).
        rectify: RAdam-style rectification (default True).
        degenerated_to_sgd: take an SGD-with-momentum step while the rectification is
            undefined (default True).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        fused: True runs one compiled kernel per step over flat state buffers, whatever the
            number of tensors (:mod:`basin.optim._fused`; the first step compiles it); None
            (default) and False use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).

    References:
        Juntang Zhuang, Tommy Tang, Yifan Ding, Sekhar Tatikonda, Nicha Dvornek, Xenophon
        Papademetris, James S. Duncan. "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
        Observed Gradients." NeurIPS 2020, arXiv:2010.07468. Reference code: adabelief-pytorch 0.2.1.

    Differences from the reference code:
        * With ``amsgrad=True`` and ``rectify=True`` the reference computes the running maximum
          but then divides by the current belief, so amsgrad silently does nothing; basin divides
          by the maximum, as AMSGrad prescribes (tested against a transcription).
        * L2 decay (``weight_decouple=False``) does not modify ``p.grad`` in place.
        * bfloat16/float16 parameters are updated in their own dtype (state in that dtype too).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
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
            amsgrad=amsgrad,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_adam_hparams(group)
        for name in ("amsgrad", "weight_decouple", "fixed_decay", "rectify", "degenerated_to_sgd"):
            check_bool(name, group[name])

    def _step_group(self, group: dict[str, Any]) -> None:
        if use_fused(group.get("fused"), group["params"]):
            self._fused_step_group(group)
            return
        max_var = "max_exp_avg_var" if group["amsgrad"] else None
        params, grads, steps, (exp_avgs, exp_avg_vars, max_exp_avg_vars) = self._gather(
            group, ("exp_avg", "exp_avg_var", max_var)
        )
        if params:
            hyperparameters = self._hyperparameters(group)
            adabelief(
                params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, steps, **hyperparameters
            )

    def _fused_step_group(self, group: dict[str, Any]) -> None:
        amsgrad = group["amsgrad"]
        keys = ("exp_avg", "exp_avg_var", "max_exp_avg_var" if amsgrad else None)
        fused_step(self, group, keys, _flat_adabelief, _flat_coefficients, amsgrad)


def _flat_coefficients(
    step: float, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    weight_decouple: bool, fixed_decay: bool, rectify: bool, degenerated_to_sgd: bool,
    maximize: bool, **_: Any,
) -> Tensor:  # fmt: skip
    """The step's scalars for :func:`_flat_adabelief`, as the single-tensor path computes them:
    (grad sign, decoupled decay factor, L2 coefficient, 1-beta1, beta2, eps, 1-beta2,
    denominator eps, adaptive coefficient, SGD coefficient), one float64 tensor."""
    decay, l2 = 1.0, 0.0
    if weight_decay != 0:
        if weight_decouple:
            decay = 1 - (weight_decay if fixed_decay else lr * weight_decay)
        else:
            l2 = weight_decay
    if rectify:
        adaptive, sgd = _rectification(step, beta1, beta2, degenerated_to_sgd)
        denom_eps, ca, cs = eps, -lr * adaptive, -lr * sgd
    else:
        sqrt_bc2 = (1 - beta2**step) ** 0.5
        denom_eps, ca, cs = eps * sqrt_bc2, -lr * sqrt_bc2 / (1 - beta1**step), 0.0
    values = [-1.0 if maximize else 1.0, decay, l2, 1 - beta1, beta2, eps, 1 - beta2, denom_eps]
    return torch.tensor(values + [ca, cs], dtype=torch.float64)


def _flat_adabelief(
    p: Tensor, g: Tensor, m: Tensor, s: Tensor, s_max: Tensor | None, c: Tensor, amsgrad: bool
) -> Tensor:
    """One AdaBelief step over flat tensors (the fused path's kernel): updates ``m``, ``s``
    (and ``s_max``) in place and returns the new parameters; ``c`` from
    :func:`_flat_coefficients`. Same operations, in the same order, as the single-tensor path."""
    g = g * c[0]
    p = p * c[1]
    g = g + c[2] * p
    m.lerp_(g, c[3].to(m.dtype))
    buf = g - m
    s.copy_(c[5] + c[4] * s + c[6] * buf * buf)
    if amsgrad:
        assert s_max is not None
        s_max.copy_(torch.maximum(s_max, s))
        s = s_max
    denom = torch.sqrt(s) + c[7]
    return p + c[8] * m / denom + c[9] * m


def _rectification(step: Any, beta1: float, beta2: float, degenerated_to_sgd: bool) -> tuple:
    """Coefficients (adaptive, sgd): the step is ``lr*adaptive*m/(sqrt(s)+eps) + lr*sgd*m``.

    Works on a Python step (eager) and on a tensor step (under torch.compile, without
    branching on tensor values)."""
    bc1 = 1 - beta1**step
    beta2_t = beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2_t / (1 - beta2_t)
    ratio = (
        (1 - beta2_t)
        * (rho_t - 4)
        * (rho_t - 2)
        * rho_inf
        / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    )
    sgd_coef = 1 / bc1 if degenerated_to_sgd else 0.0
    if isinstance(step, Tensor):
        ok = rho_t >= 5
        adaptive = torch.where(ok, ratio.clamp_min(0) ** 0.5 / bc1, 0.0)
        return adaptive, torch.where(ok, 0.0, sgd_coef)
    if rho_t >= 5:
        return ratio**0.5 / bc1, 0.0
    return 0.0, sgd_coef


def adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: Sequence[Tensor | None],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional AdaBelief; see :class:`AdaBelief`."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_adabelief if use_foreach(foreach, params) else _single_tensor_adabelief
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_vars,
        max_exp_avg_vars,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        weight_decouple=weight_decouple,
        fixed_decay=fixed_decay,
        rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd,
        maximize=maximize,
    )


def _single_tensor_adabelief(
    params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, *, lr, beta1, beta2,
    eps, weight_decay, amsgrad, weight_decouple, fixed_decay, rectify, degenerated_to_sgd,
    maximize,
):  # fmt: skip
    # Eager speed (benchmarks/optim_step.py): nine passes over each tensor instead of eleven and
    # one temporary instead of two, the step counters advanced in one call, and the Python
    # scalar coefficients computed once per distinct step.
    torch._foreach_add_(state_steps, 1.0)
    eps_t = torch.tensor(eps, dtype=torch.float64)  # 0-d: broadcasts to any dtype and device
    coefs: dict[Any, tuple] = {}
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        m, s = exp_avgs[i], exp_avg_vars[i]
        step = get_value(state_steps[i])

        if weight_decay != 0:
            if weight_decouple:
                p.mul_(1 - (weight_decay if fixed_decay else lr * weight_decay))
            else:
                g = g.add(p, alpha=weight_decay)

        m.lerp_(g, 1 - beta1)  # m = b1 m + (1-b1) g
        buf = torch.sub(g, m)  # the residual g - m; reused below for the denominator
        torch.add(eps_t, s, alpha=beta2, out=s)  # s = b2 s + eps
        s.addcmul_(buf, buf, value=1 - beta2)  #   + (1-b2) (g-m)^2
        if amsgrad:
            torch.maximum(max_exp_avg_vars[i], s, out=max_exp_avg_vars[i])
            s = max_exp_avg_vars[i]

        if not rectify:
            # lr/bc1 * m / (sqrt(s)/sqrt(bc2) + eps) = lr*sqrt(bc2)/bc1 * m / (sqrt(s) + eps*sqrt(bc2))
            sqrt_bc2 = (1 - beta2**step) ** 0.5
            denom = torch.sqrt(s, out=buf).add_(eps * sqrt_bc2)
            p.addcdiv_(m, denom, value=-lr * sqrt_bc2 / (1 - beta1**step))
            continue

        if isinstance(step, Tensor):  # compiled: both terms, one of them zero
            adaptive, sgd = _rectification(step, beta1, beta2, degenerated_to_sgd)
            p.addcdiv_(m, torch.sqrt(s, out=buf).add_(eps), value=-lr * adaptive)
            p.add_(m * (-lr * sgd))
            continue
        if step not in coefs:
            coefs[step] = _rectification(step, beta1, beta2, degenerated_to_sgd)
        adaptive, sgd = coefs[step]
        if adaptive:
            p.addcdiv_(m, torch.sqrt(s, out=buf).add_(eps), value=-lr * adaptive)
        elif sgd:
            p.add_(m, alpha=-lr * sgd)


def _multi_tensor_adabelief(
    params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, *, lr, beta1, beta2,
    eps, weight_decay, amsgrad, weight_decouple, fixed_decay, rectify, degenerated_to_sgd,
    maximize,
):  # fmt: skip
    lists = [params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps]
    for ps, gs, ms, ss, maxs, steps in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1.0)
        if weight_decay != 0:
            if weight_decouple:
                torch._foreach_mul_(ps, 1 - (weight_decay if fixed_decay else lr * weight_decay))
            else:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)

        torch._foreach_lerp_(ms, gs, 1 - beta1)
        residuals = torch._foreach_sub(gs, ms)
        torch._foreach_mul_(ss, beta2)
        torch._foreach_addcmul_(ss, residuals, residuals, value=1 - beta2)
        torch._foreach_add_(ss, eps)
        if amsgrad:
            torch._foreach_maximum_(maxs, ss)
            ss = maxs
        denom = torch._foreach_sqrt(ss)
        step_values = [get_value(t) for t in steps]

        if not rectify:
            torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in step_values])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - beta1**t) for t in step_values])
            continue

        coefs = [_rectification(t, beta1, beta2, degenerated_to_sgd) for t in step_values]
        torch._foreach_add_(denom, eps)
        if any(a for a, _ in coefs):
            torch._foreach_addcdiv_(ps, ms, denom, [-lr * a for a, _ in coefs])
        if any(s for _, s in coefs):
            torch._foreach_add_(ps, torch._foreach_mul(ms, [-lr * s for _, s in coefs]))


register(
    OptimInfo(
        name="adabelief",
        cls=AdaBelief,
        paper=Paper(
            "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
            "Zhuang et al.",
            "2010.07468",
            2020,
        ),
        state_memory=2.0,
        capabilities=ELEMENTWISE_CAPS | {"amsgrad", "rectify", "fused"},
        state_note="+1 with amsgrad",
        search_space=ADAM_SPACE,
        param_groups=decay_groups,
    )
)
