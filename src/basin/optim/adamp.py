"""AdamP and SGDP: Adam and SGD that stop growing the norm of scale-invariant weights."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_adam_hparams,
    check_bool,
    check_lr,
    check_nonnegative,
    check_range,
    get_value,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._fused import FlatRun, compiled_kernel, group_runs, scatter, use_fused
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
        fused: True runs the step over flat state buffers whatever the number of tensors
            (:mod:`basin.optim._fused`): one compiled kernel for the moments and the update,
            the projection's per-row and per-tensor statistics as segment sums over the flat
            buffers, one compiled kernel for the parameters (the first step compiles both);
            None (default) and False use the paths above.
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
        fused: bool | None = None,
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
            fused=fused,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_adam_hparams(group)
        _check_projection_args(group)

    def _step_group(self, group: dict[str, Any]) -> None:
        if use_fused(group.get("fused"), group["params"]):
            hp = self._hyperparameters(group)
            nesterov, beta1 = hp["nesterov"], hp["beta1"]
            kernel = compiled_kernel(_flat_adamp_moments)
            for run in group_runs(self, group, ("exp_avg", "exp_avg_sq")):
                run.advance()
                step = run.step_value()
                bc1, sqrt_bc2 = 1 - beta1**step, (1 - hp["beta2"] ** step) ** 0.5
                c = torch.tensor(
                    [-1.0 if hp["maximize"] else 1.0, beta1, 1 - beta1, hp["beta2"],
                     1 - hp["beta2"], sqrt_bc2, hp["eps"], float(nesterov)], dtype=torch.float64,
                )  # fmt: skip
                m, v = run.flats["exp_avg"], run.flats["exp_avg_sq"]
                p = run.gather_params()
                u, prods = kernel(p, run.gather_grads(), m, v, c)
                decay_scale = hp["lr"] * hp["weight_decay"]
                _flat_project_and_update(run, p, u, prods, hp, -hp["lr"] / bc1, decay_scale)
            return
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
    torch._foreach_add_(state_steps, 1.0)  # one dispatch instead of one per parameter
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
        torch._foreach_add_(steps, 1.0)
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
        fused: True runs the step over flat state buffers whatever the number of tensors
            (:mod:`basin.optim._fused`): one compiled kernel for the moments and the update,
            the projection's per-row and per-tensor statistics as segment sums over the flat
            buffers, one compiled kernel for the parameters (the first step compiles both);
            None (default) and False use the paths above.
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
        fused: bool | None = None,
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
            fused=fused,
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
        if use_fused(group.get("fused"), group["params"]):
            hp = self._hyperparameters(group)
            kernel = compiled_kernel(_flat_sgdp_update)
            keys = [] if buf is None else [buf]
            c = torch.tensor(
                [
                    -1.0 if hp["maximize"] else 1.0,
                    hp["momentum"],
                    1 - hp["dampening"],
                    float(hp["nesterov"]),
                ],
                dtype=torch.float64,
            )
            for run in group_runs(self, group, keys, counted=False):
                p = run.gather_params()
                flat_buf = None if buf is None else run.flats[buf]
                u, prods = kernel(p, run.gather_grads(), flat_buf, c)
                decay_scale = hp["lr"] * hp["weight_decay"] / (1 - hp["momentum"])
                _flat_project_and_update(run, p, u, prods, hp, -hp["lr"], decay_scale)
            return
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


# ------------------------------------------------------------------ fused path (fused=True)


def _flat_adamp_moments(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    """AdamP's elementwise part over flat tensors (a compiled kernel): updates ``m``, ``v`` in
    place; returns the unprojected update ``u`` and the products ``(p*p, g*g, p*g, p*u)`` (as
    the rows of a ``(4, N)`` tensor) whose per-row sums are the projection's statistics. ``c``: (grad sign, beta1, 1-beta1, beta2,
    1-beta2, sqrt(bc2), eps, nesterov as 0/1: selected, not branched on, so that one graph
    serves both). Same operations, in the same order, as the single-tensor path."""
    g = g * c[0]
    m.copy_(m * c[1] + g * c[2])
    v.copy_(v * c[3] + c[4] * g * g)
    denom = torch.sqrt(v) / c[5] + c[6]
    u = torch.where(c[7] > 0, m * c[1] + g * c[2], m) / denom  # c[7]: nesterov
    return u, _products(p, g, u)


def _flat_sgdp_update(p: Tensor, g: Tensor, buf: Tensor | None, c: Tensor) -> tuple[Tensor, Tensor]:
    """SGDP's elementwise part over flat tensors (a compiled kernel): updates ``buf`` in place;
    returns the unprojected update and the products as :func:`_flat_adamp_moments` does.
    ``c``: (grad sign, momentum, 1-dampening, nesterov as 0/1)."""
    g = g * c[0]
    if buf is not None:
        buf.copy_(buf * c[1] + g * c[2])
        u = torch.where(c[3] > 0, g + c[1] * buf, buf)  # c[3]: nesterov
    else:
        u = g * c[2]
    return u, _products(p, g, u)


def _products(p: Tensor, g: Tensor, u: Tensor) -> Tensor:
    """``(p*p, g*g, p*g, p*u)`` as the rows of a ``(4, N)`` tensor (each product contiguous,
    so that its per-row sums are contiguous reductions), in float32 for bfloat16/float16
    parameters (whose sums of squares ``vector_norm`` accumulates in float32 on the
    single-tensor path)."""
    if p.dtype in (torch.bfloat16, torch.float16):
        p, g, u = p.float(), g.float(), u.float()
    return torch.stack([p * p, g * g, p * g, p * u])


def _flat_apply(p: Tensor, u: Tensor, row: Tensor, per_row: Tensor, c: Tensor) -> Tensor:
    """The parameters after the projected step (a compiled kernel):
    ``p * decay[row] + c * (u - p * coef[row])`` with the per-row projection coefficient and
    decay factor (``per_row = (coef, decay)``, padded by one column so that a one-row layout
    does not specialize the compiled graph) gathered by the per-element row index."""
    return p * per_row[1][row] + c * (u - p * per_row[0][row])


def _flat_rows(run: FlatRun) -> tuple[Any, ...]:
    """Per layout: the row index of every element (rows of ``p.reshape(size(0), -1)``; a
    vector is one row), the spans of equal row length ``(first element, rows, row length)``
    and the tensor of every row, the rows, row length
    and size of every tensor, and which tensors are projected at all (``ndim > 1``)."""
    rows = [p.shape[0] if p.ndim > 1 else 1 for p in run.params]
    cols = [n // r if r else 0 for n, r in zip(run.numels, rows)]
    device = run.params[0].device
    row_len = torch.tensor([n for n, r in zip(cols, rows) for _ in range(r)], device=device)
    n_rows = len(row_len)
    index = torch.int32 if n_rows < 2**31 else torch.int64  # half the bytes read per element
    row = torch.repeat_interleave(torch.arange(n_rows, device=device, dtype=index), row_len)
    rows_t = torch.tensor(rows, device=device)
    tensor_of_row = torch.repeat_interleave(torch.arange(len(rows), device=device), rows_t)
    cols_t = torch.tensor(cols, dtype=torch.float64, device=device)
    numel = torch.tensor(run.numels, dtype=torch.float64, device=device)
    matrix = torch.tensor([p.ndim > 1 for p in run.params], device=device)
    # maximal spans of consecutive tensors with equal row length: (first element, rows, length)
    spans: list[tuple[int, int, int]] = []
    start = 0
    for r, n in zip(rows, cols):
        if spans and spans[-1][2] == n:
            o, rr, _ = spans[-1]
            spans[-1] = (o, rr + r, n)
        else:
            spans.append((start, r, n))
        start += r * n
    return row, spans, tensor_of_row, rows_t, cols_t, numel, matrix


def _flat_project_and_update(
    run: FlatRun, p: Tensor, u: Tensor, prods: Tensor, hp: dict[str, Any], c: float,
    decay_scale: float,
) -> None:  # fmt: skip
    """The scale-invariant projection of every ``ndim > 1`` tensor of the run, from segment sums
    of ``prods`` (``(4, N)``; :func:`basin.optim._kernels.scale_invariant_projection`'s test
    and coefficients, per row and per tensor), then ``p <- p (1 - decay_scale r) + c u_proj``
    (``r = wd_ratio`` where projected) by :func:`_flat_apply`; the result is scattered back."""
    row, spans, tensor_of_row, rows, cols, numel, matrix = run.extra(_flat_rows)
    eps, delta, dtype = hp["eps"], hp["delta"], prods.dtype
    # per-row sums: one contiguous reduction per span of equal row length (one span for a
    # stack of equal layers; segment_reduce over the rows was 5x slower on CPU)
    sums = torch.cat(
        [prods[:, o : o + r * n].reshape(4, r, n).sum(2) for o, r, n in spans], dim=1
    ).T  # (rows, 4)
    p_norm, g_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
    pg, pu = sums[:, 2], sums[:, 3]
    cos_rows = pg.abs() / (p_norm.clamp_min(eps) * g_norm.clamp_min(eps))
    cos_max = torch.segment_reduce(cos_rows, "max", lengths=rows)
    by_rows = (cos_max < (delta / cols.sqrt()).to(dtype)) & matrix
    per_tensor = torch.segment_reduce(
        torch.stack([p_norm.square(), g_norm.square(), pg, pu], dim=1), "sum", lengths=rows
    )
    p_layer, g_layer = per_tensor[:, 0].sqrt(), per_tensor[:, 1].sqrt()
    layer_cos = per_tensor[:, 2].abs() / (p_layer.clamp_min(eps) * g_layer.clamp_min(eps))
    by_layer = (layer_cos < (delta / numel.sqrt()).to(dtype)) & matrix & ~by_rows
    coef_layer = per_tensor[:, 3] / (p_layer + eps) ** 2
    coef = torch.where(
        by_rows[tensor_of_row],
        pu / (p_norm + eps) ** 2,
        torch.where(by_layer[tensor_of_row], coef_layer[tensor_of_row], 0.0),
    )
    decay = torch.where(
        by_rows | by_layer,
        torch.tensor(1 - decay_scale * hp["wd_ratio"], dtype=torch.float64),
        torch.tensor(1 - decay_scale, dtype=torch.float64),
    ).to(p.dtype)[tensor_of_row]
    per_row = torch.stack([coef.to(p.dtype), decay])
    per_row = torch.cat([per_row, per_row.new_zeros(2, 1)], dim=1)
    coefs = torch.tensor(c, dtype=torch.float64)
    scatter(compiled_kernel(_flat_apply)(p, u, row, per_row, coefs), run)


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
        capabilities=ELEMENTWISE_CAPS | {"nesterov", "projection", "fused"},
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
        capabilities=ELEMENTWISE_CAPS | {"nesterov", "projection", "fused"},
        state_note="with momentum > 0 (the harness default, 0.9); 0 with momentum = 0",
        family="sgd",
        lr_scaling="linear",
        lr_from={"lr": ("sgd",)},
        defaults={"momentum": 0.9},
        search_space=SGD_SPACE,
        param_groups=decay_groups,
    )
)
