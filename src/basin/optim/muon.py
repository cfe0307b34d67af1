"""Muon: momentum orthogonalized by Newton-Schulz, for hidden weight matrices."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    check_bool,
    check_int,
    check_lr,
    check_nonnegative,
    check_range,
    grad_of,
    group_by_device_and_dtype,
    scalar_lr,
    use_foreach,
)
from ._distributed import data_parallel_group, shared_updates
from ._kernels import newton_schulz5
from ._matrix import (
    MatrixOptimizer,
    _decay_and_add,
    _foreach_decay_and_add,
    as_matrix,
    from_matrix,
    matrix_shape,
)
from .param_groups import matrix_groups
from .registry import ELEMENTWISE_CAPS, LR_ADAPTIVE, WEIGHT_DECAY, OptimInfo, Paper, register

__all__ = ["Muon", "distributed_muon", "muon"]


def check_ns_dtype(ns_dtype: Any) -> None:
    if ns_dtype is not None and ns_dtype not in (torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"ns_dtype must be torch.bfloat16, torch.float32, torch.float64 or None "
            f"(the parameter's dtype), got {ns_dtype!r}"
        )


class Muon(MatrixOptimizer):
    r"""Muon (Jordan et al., 2024; Liu et al., arXiv:2502.16982): SGD-momentum whose update of
    each hidden weight matrix is replaced by an approximately orthogonal matrix with the same
    singular vectors (quintic Newton-Schulz, :func:`basin.optim._kernels.newton_schulz5`);
    per matrix (``rows x cols`` as ``(out, in)``, ``ndim > 2`` viewed as ``(size(0), -1)``)::

        m <- b m + (1-b) g;   u = (1-b) g + b m  if nesterov else m
        O = NS5(u) * sqrt(max(1, rows/cols));   p <- p (1 - lr wd) - lr O

    ``transposed=True`` groups (e.g. GPT-2 ``Conv1D``, detected by
    :func:`basin.optim.matrix_param_groups` and ``Muon(model)``) get exactly the update of the
    same ``nn.Linear``, transposed. Routing: ``matrix_rule`` ``True`` (default) Muon, ``False``
    AdamW (:func:`basin.optim._matrix.adamw_fallback`; missing hyperparameters from the
    ``adamw_*`` options), ``None`` Muon for ``ndim >= 2`` and AdamW for the rest; a Muon group
    holding an ``ndim < 2`` parameter raises ``ValueError`` naming it. ``distributed=True``
    (DDP or any data parallelism with identical parameters and averaged gradients) splits
    Newton-Schulz across ranks and all-gathers the results, bit-identical to single-process
    Muon; eager steps only, every rank must step the same parameters.

    Args:
        params: parameters or parameter groups (see above).
        lr: learning rate of Muon groups, in units of spectral norm per update (default 0.02).
        momentum: momentum coefficient ``b`` in [0, 1) (default 0.95).
        weight_decay: decoupled weight decay of Muon groups (default 0).
        nesterov: use the Nesterov-style update ``lerp(g, m, b)`` (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: compute dtype of Newton-Schulz: ``torch.bfloat16`` (default, as the reference),
            ``torch.float32``/``torch.float64``, or None for the parameter's dtype.
        adamw_lr: the AdamW fallback's learning rate (default 3e-4, as the reference's
            ``SingleDeviceMuonWithAuxAdam``, like the other fallback defaults).
        adamw_betas: the fallback's betas (default (0.9, 0.95)).
        adamw_eps: the fallback's epsilon (default 1e-10).
        adamw_weight_decay: the fallback's decoupled weight decay (default 0).
        adamw_fallback: default ``matrix_rule=None`` (automatic routing) instead of True
            (default False).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        fused: True runs the AdamW fallback's step as one compiled kernel over flat state
            buffers (:mod:`basin.optim._fused`; the first step compiles it); the matrix rule
            is unchanged. None (default) and False use the paths above.
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; nothing changes (eager steps).
        distributed: share Newton-Schulz across data-parallel ranks (default False).
        process_group: the ranks to share it over (default: the world); only with
            ``distributed=True``.

    Differences from the reference code (muon-optimizer 0.1.0, KellerJordan/Muon):
        * ``ndim > 2`` kernels are flattened to ``(size(0), -1)`` and scaled by that shape.
        * ``p.grad`` is not modified (the reference overwrites it with the Nesterov blend).
        * Extra options: ``nesterov=False``, ``ns_steps``, ``ns_dtype``, ``maximize``,
          ``adamw_fallback``; ``lr`` may be a tensor.

    Provenance and details: docs/optimizers.md#muon.
    """

    _algo = "Muon"
    _fallback_kw = "adamw_fallback"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = torch.bfloat16,
        *,
        adamw_lr: float | Tensor = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        adamw_fallback: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = None,
        distributed: bool = False,
        process_group: Any = None,
    ) -> None:
        check_bool("adamw_fallback", adamw_fallback)
        check_bool("distributed", distributed)
        if process_group is not None:
            if not distributed:
                raise ValueError(
                    "process_group is used only with distributed=True (the group to share "
                    f"Newton-Schulz over), got process_group={process_group!r} with "
                    "distributed=False"
                )
            import torch.distributed as dist

            if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
                raise ValueError(
                    f"process_group must be a torch.distributed ProcessGroup or None (the world), "
                    f"got {process_group!r}"
                )
        self.distributed = distributed
        self.process_group = process_group
        self.ns_owner: dict[Tensor, int] = {}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )
        fallback = dict(
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        super().__init__(params, defaults, None if adamw_fallback else True, fallback, "adamw_")

    def __getstate__(self) -> dict[str, Any]:
        """torch's state plus ``distributed`` (a copy keeps sharing over the world; a process
        group cannot be copied, so a copy of an optimizer given one takes the plain path)."""
        state = super().__getstate__()
        if getattr(self, "distributed", False) and self.process_group is None:
            state["distributed"] = True
        return state

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range("momentum", group["momentum"], 0.0, 1.0, high_inclusive=False)
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("nesterov", group["nesterov"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_ns_dtype(group["ns_dtype"])

    def _matrix_step(self, group: dict[str, Any], group_params: list[Tensor]) -> None:
        params, grads, bufs = [], [], []
        for p in self._with_grad(group_params):
            state = self.state[p]
            if len(state) == 0:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad_of(p))
            bufs.append(state["momentum_buffer"])
        if not params:
            return
        # getattr: attributes, not hyperparameters (see __getstate__)
        distributed = getattr(self, "distributed", False)
        comm = data_parallel_group(self.process_group) if distributed else None
        if comm is not None:
            owners = distributed_muon(
                params,
                grads,
                bufs,
                **self._hyperparameters(group),
                comm=comm,
            )
            self.__dict__.setdefault("ns_owner", {}).update(zip(params, owners))
            return
        muon(params, grads, bufs, **self._hyperparameters(group))


def _orthogonalized(
    u: Tensor, ns_steps: int, ns_dtype: torch.dtype | None, transposed: bool = False
) -> Tensor:
    """NS5 of ``u`` viewed as an ``(out, in)`` matrix (:func:`basin.optim._matrix.as_matrix`),
    scaled by ``sqrt(max(1, rows/cols))``, in ``u``'s layout (and in the compute dtype: the
    caller adds it to the parameter)."""
    mat = as_matrix(u, transposed)
    rows, cols = mat.shape
    out = newton_schulz5(mat, ns_steps, dtype=ns_dtype)
    out = out * max(1.0, rows / cols) ** 0.5  # in the compute dtype, as the reference
    return from_matrix(out, u.shape, transposed)


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
    maximize: bool,
    foreach: bool | None = None,
    transposed: bool = False,
) -> None:
    """Functional Muon (matrix parameters only); see :class:`Muon`. ``transposed``: the
    parameters are stored ``(in, out)``."""
    lr = scalar_lr(lr)  # a one-element tensor lr on every path
    fn = _multi_tensor_muon if use_foreach(foreach, params) else _single_tensor_muon
    fn(
        params, grads, momentum_buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
        nesterov=nesterov, ns_steps=ns_steps, ns_dtype=ns_dtype, maximize=maximize,
        transposed=transposed,
    )  # fmt: skip


def _single_tensor_muon(
    params, grads, momentum_buffers, *, lr, momentum, weight_decay, nesterov, ns_steps, ns_dtype,
    maximize, transposed=False,
):  # fmt: skip
    for i, p in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        buf = momentum_buffers[i]
        buf.lerp_(g, 1 - momentum)
        u = g.lerp(buf, momentum) if nesterov else buf
        update = _orthogonalized(u, ns_steps, ns_dtype, transposed).to(p.dtype)
        _decay_and_add(p, update, lr, weight_decay)


def _multi_tensor_muon(
    params, grads, momentum_buffers, *, lr, momentum, weight_decay, nesterov, ns_steps, ns_dtype,
    maximize, transposed=False,
):  # fmt: skip
    for ps, gs, bufs in group_by_device_and_dtype([params, grads, momentum_buffers]).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_lerp_(bufs, gs, 1 - momentum)
        us = torch._foreach_lerp(gs, bufs, momentum) if nesterov else bufs
        # Newton-Schulz is a chain of matmuls per matrix: no foreach form
        updates = [
            _orthogonalized(u, ns_steps, ns_dtype, transposed).to(p.dtype) for u, p in zip(us, ps)
        ]
        _foreach_decay_and_add(ps, updates, lr, weight_decay)


@functools.lru_cache(maxsize=1024)
def _update_layout(
    shape: torch.Size,
    stride: tuple[int, ...],
    dtype: torch.dtype,
    p_dtype: torch.dtype,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
    transposed: bool,
) -> tuple[torch.Size, tuple[int, ...]]:
    """``(shape, stride)`` of ``_orthogonalized(u, ...).to(p.dtype)`` for a ``u`` of this
    shape, stride and dtype: the same computation on the ``meta`` device (no arithmetic)."""
    u = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    out = _orthogonalized(u, ns_steps, ns_dtype, transposed).to(p_dtype)
    return out.shape, out.stride()


def _ns_cost(p: Tensor, transposed: bool) -> float:
    """Newton-Schulz flops of ``p``'s matrix, up to a constant: with ``m <= n`` its sides,
    ``X X^T`` and ``poly X`` cost ``m^2 n`` each, ``gram @ gram`` ``m^3``."""
    m, n = sorted(matrix_shape(p, transposed))
    return float(m * m * (2 * n + m))


def distributed_muon(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: torch.dtype | None,
    maximize: bool,
    foreach: bool | None = None,
    transposed: bool = False,
    comm: tuple[Any, int, int],
) -> list[int]:
    """:func:`muon` with Newton-Schulz shared across the ranks of ``comm = (group, rank,
    world_size)`` (:func:`basin.optim._distributed.data_parallel_group`): every rank updates
    every momentum buffer and parameter, each runs Newton-Schulz for its share only, and the
    updates are all-gathered. The same arithmetic, on the same memory layouts, as :func:`muon`
    with the same ``foreach``: bit-identical. Returns the rank that orthogonalised each
    parameter. Collective: every rank calls it with the same parameters in the same order."""
    lr = scalar_lr(lr)
    multi = use_foreach(foreach, params)
    ps: list[Tensor] = []
    us: list[Tensor] = []
    buckets: list[tuple[list[Tensor], int, int]] = []  # (params, start, end) for the foreach add
    if multi:
        for bps, gs, bufs in group_by_device_and_dtype([params, grads, momentum_buffers]).values():
            gs = list(torch._foreach_neg(gs)) if maximize else gs
            torch._foreach_lerp_(bufs, gs, 1 - momentum)
            bus = torch._foreach_lerp(gs, bufs, momentum) if nesterov else bufs
            buckets.append((bps, len(ps), len(ps) + len(bps)))
            ps.extend(bps)
            us.extend(bus)
    else:
        for p, g, buf in zip(params, grads, momentum_buffers):
            g = -g if maximize else g
            buf.lerp_(g, 1 - momentum)
            ps.append(p)
            us.append(g.lerp(buf, momentum) if nesterov else buf)

    def compute(i: int) -> Tensor:
        return _orthogonalized(us[i], ns_steps, ns_dtype, transposed).to(ps[i].dtype)

    def layout(i: int) -> tuple[torch.Size, tuple[int, ...]]:
        u = us[i]
        return _update_layout(
            u.shape, u.stride(), u.dtype, ps[i].dtype, ns_steps, ns_dtype, transposed
        )

    group, rank, world = comm
    costs = [_ns_cost(p, transposed) for p in ps]
    updates, owners = shared_updates(ps, compute, layout, costs, group, rank, world)
    if multi:
        for bps, start, end in buckets:
            _foreach_decay_and_add(bps, updates[start:end], lr, weight_decay)
    else:
        for p, update in zip(ps, updates):
            _decay_and_add(p, update, lr, weight_decay)
    by_param = dict(zip(ps, owners))
    return [by_param[p] for p in params]


register(
    OptimInfo(
        name="muon",
        cls=Muon,
        paper=Paper(
            "Muon is Scalable for LLM Training (Muon: Jordan et al., blog, 2024)",
            "Liu et al.",
            "2502.16982",
            2025,
        ),
        state_memory=1.0,
        capabilities=ELEMENTWISE_CAPS | {"matrix", "fallback", "nesterov", "distributed", "fused"},
        state_note="matrices: momentum (1.0); AdamW fallback params (embeddings, head, ndim<2): 2.0",
        family="matrix",
        lr_from={"adamw_lr": ("adaptive",)},  # the matrix lr (0.02) is scale-free: its own
        search_space={
            "lr": {"type": "float", "low": 1e-3, "high": 0.3, "log": True},
            "momentum": {"type": "float", "low": 1e-2, "high": 0.3, "log": True, "one_minus": True},
            "adamw_lr": LR_ADAPTIVE,
            "weight_decay": WEIGHT_DECAY,
        },
        param_groups=matrix_groups,
    )
)
