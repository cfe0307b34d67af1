"""SGD-SaI: SGD with momentum and per-tensor learning rates fixed at initialisation."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import (
    BasinOptimizer,
    check_grad,
    check_lr,
    check_nonnegative,
    check_range,
    get_value,
    scalar_lr,
    use_foreach,
)
from ._fused import FlatRun, fused_step, use_fused
from .param_groups import decay_groups
from .registry import ELEMENTWISE_CAPS, SGD_SPACE, OptimInfo, Paper, register

__all__ = ["SGDSaI", "gradient_snr", "sgd_sai"]


def gradient_snr(grad: Tensor, eps: float) -> Tensor:
    """g-SNR of one tensor: ``||g||_2 / (std(g) + eps)`` with the unbiased std over all entries,
    taken as 0 when undefined (a single entry). float32 or wider; a 0-d tensor."""
    g = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    norm = torch.linalg.vector_norm(g)
    if g.numel() < 2:  # the reference's std() is NaN here and nan_to_num makes it 0
        return norm / eps
    return norm / (g.std().nan_to_num_() + eps)


class SGDSaI(BasinOptimizer):
    r"""SGD-SaI (Xu et al., 2024): SGD with momentum where each parameter tensor gets a fixed
    learning-rate scale, its gradient signal-to-noise ratio at the first step.

    Update (per tensor; ``gsnr`` and ``buf`` are set from the tensor's first gradient)::

        gsnr = ||g_1||_2 / (std(g_1) + eps)       (unbiased std; 0 for a single entry)
        buf  = g_1, then buf = momentum buf + (1 - momentum) g
        p   <- p (1 - lr wd) - lr gsnr buf

    With ``momentum=0`` the buffer is the gradient itself (no state besides ``gsnr``).

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1e-2).
        momentum: momentum factor in [0, 1) (default 0.9).
        eps: added to the gradient std (default 1e-8).
        weight_decay: decoupled weight decay, applied to every tensor (default 1e-2).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        fused: True runs one compiled kernel per step over flat state buffers, whatever the
            number of tensors (:mod:`basin.optim._fused`; the g-SNR scales are expanded once
            per layout into a per-element buffer; the first step compiles the kernel); None
            (default) and False use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).

    References:
        Minghao Xu, Lichuan Xiang, Xu Cai, Hongkai Wen. "No More Adam: Learning Rate Scaling at
        Initialization is All You Need." arXiv:2412.11768, 2024. Reference code: sgd-sai 1.0.3
        (AnonymousAlethiometer/SGD_SaI), the release of the paper's time.

    Differences from the reference code:
        * g-SNR follows 1.0.3 (the paper era): ``||g|| / (std(g) + eps)``. Later releases changed
          the normalisation (1.0.4 divides by the largest g-SNR over all tensors, 1.1.0 by
          ``sqrt(numel)``); basin does not follow them.
        * ``momentum=0`` works (plain SGD with the g-SNR scale); the reference raises
          (``buf`` is never assigned).
        * The reference computes g-SNR once, for the tensors that have a gradient at the
          optimizer's first step (a tensor first receiving a gradient later raises KeyError);
          basin computes it for each tensor at its own first gradient. No printing.
        * The buffer starts as a copy of the first gradient and is then updated uniformly, so the
          first step's buffer is ``momentum*g + (1-momentum)*g`` (equal to ``g`` up to rounding),
          which keeps the compiled step free of a first-step branch.
        * bfloat16/float16 parameters: the g-SNR is computed and kept in float32.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-2,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])

    def _init_state(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """g-SNR and momentum buffer of the parameters seeing their first gradient."""
        eps, momentum = group["eps"], group["momentum"]
        for p in params:
            state, grad = self.state[p], p.grad
            assert grad is not None
            if "gsnr" not in state:
                state["gsnr"] = gradient_snr(grad, eps)
            if momentum != 0 and "momentum_buffer" not in state:
                g = grad.neg() if group["maximize"] else grad
                state["momentum_buffer"] = g.clone(memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any]) -> None:
        if use_fused(group.get("fused"), group["params"]):
            buf = "momentum_buffer" if group["momentum"] != 0 else None
            init = functools.partial(self._init_state, group)
            fused_step(self, group, (buf,), _flat_sgd_sai, _flat_coefficients, buf is not None,
                       inputs=self._flat_scales, counted=False, init=init)  # fmt: skip
            return
        params = []
        for p in group["params"]:
            if p.grad is not None:
                check_grad(p, "SGDSaI")
                params.append(p)
        if not params:
            return
        self._init_state(group, params)
        states = [self.state[p] for p in params]
        hyperparameters = self._hyperparameters(group)
        del hyperparameters["eps"]  # the g-SNR's, used above
        sgd_sai(
            params,
            [p.grad for p in params],
            [st.get("momentum_buffer") for st in states],
            [st["gsnr"] for st in states],
            **hyperparameters,
        )

    def _flat_scales(self, run: FlatRun) -> tuple[Tensor]:
        """The fused kernel's per-element g-SNR scale (built once per layout)."""
        p0 = run.params[0]
        parts = [self.state[p]["gsnr"].to(p0.dtype).expand(p.numel()) for p in run.params]
        return (torch.cat(parts),)


def _flat_coefficients(
    step: float, *, lr: float, momentum: float, weight_decay: float, maximize: bool, **_: Any
) -> Tensor:
    """The step's scalars for :func:`_flat_sgd_sai`: (momentum, gradient coefficient of the
    buffer, decay factor, -lr), one float64 tensor."""
    sign = -1.0 if maximize else 1.0
    values = [momentum, sign * (1 - momentum), 1 - lr * weight_decay, -lr]
    return torch.tensor(values, dtype=torch.float64)


def _flat_sgd_sai(
    p: Tensor, g: Tensor, buf: Tensor | None, scale: Tensor, c: Tensor, momentum: bool
) -> Tensor:
    """One SGD-SaI step over flat tensors (the fused path's kernel): updates ``buf`` in place
    and returns the new parameters; ``scale`` is the per-element g-SNR, ``c`` from
    :func:`_flat_coefficients`. Same operations, in the same order, as the single-tensor path."""
    if momentum:
        assert buf is not None
        buf.copy_(buf * c[0] + g * c[1])
        u = buf
    else:
        u = g * c[1]
    return p * c[2] + (c[3] * scale) * u


def sgd_sai(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    gsnrs: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional SGD-SaI; see :class:`SGDSaI`. Buffers must start as the first gradient."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_sgd_sai if use_foreach(foreach, params) else _single_tensor_sgd_sai
    fn(
        params,
        grads,
        momentum_buffers,
        gsnrs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        maximize=maximize,
    )


def _single_tensor_sgd_sai(
    params, grads, momentum_buffers, gsnrs, *, lr, momentum, weight_decay, maximize
):
    decay = 1 - lr * weight_decay
    for i, p in enumerate(params):
        if momentum != 0:
            buf = momentum_buffers[i]
            buf.mul_(momentum).add_(grads[i], alpha=-(1 - momentum) if maximize else 1 - momentum)
        else:
            buf = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            p.mul_(decay)
        scale = get_value(gsnrs[i])
        if isinstance(scale, Tensor):  # compiled: tensor scalars, no .item()
            p.sub_(buf * (lr * scale))
        else:
            p.add_(buf, alpha=-lr * scale)


def _multi_tensor_sgd_sai(
    params, grads, momentum_buffers, gsnrs, *, lr, momentum, weight_decay, maximize
):
    # g-SNRs may be float32 beside low-precision params: keep them out of the grouping
    scales = [-lr * get_value(s) for s in gsnrs]
    lists = [params, grads, momentum_buffers]
    grouped = Optimizer._group_tensors_by_device_and_dtype(lists, with_indices=True)
    for (ps, gs, bufs), indices in grouped.values():
        if momentum != 0:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, gs, alpha=-(1 - momentum) if maximize else 1 - momentum)
        else:
            bufs = torch._foreach_neg(gs) if maximize else gs
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_add_(ps, torch._foreach_mul(bufs, [scales[j] for j in indices]))


register(
    OptimInfo(
        name="sgdsai",
        cls=SGDSaI,
        paper=Paper(
            "No More Adam: Learning Rate Scaling at Initialization is All You Need",
            "Xu et al.",
            "2412.11768",
            2024,
        ),
        state_memory=1.0,
        capabilities=ELEMENTWISE_CAPS | {"fused"},
        state_note="+1 scalar (g-SNR) per tensor; 0 + scalar with momentum = 0",
        family="sgd",
        lr_scaling="linear",
        lr_from={"lr": ("sgdsai", "sgd")},
        search_space=SGD_SPACE,
        param_groups=decay_groups,
    )
)
