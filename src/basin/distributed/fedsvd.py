"""FedAvg of LoRA with FedSVD's SVD re-orthogonalization of the adapters.

FedSVD (Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with
LoRA", arXiv:2505.12805; authors' code seanie12/fed-svd): clients train only ``B`` of each LoRA
layer (``A`` frozen), the server averages the clients' ``B`` and re-factors the product::

    B_bar = sum_k w_k B_k,    B_bar A = U S V^T (thin SVD),    A <- V_r^T,    B <- U_r S_r

so ``B A`` (the layer's update) is unchanged and the next round's frozen ``A`` has orthonormal
rows spanning the principal input directions of the aggregated update.

:func:`fedsvd_aggregate` is the server step on tensors; :func:`fedsvd_round` applies it to
every :class:`basin.train.LoRALinear` of a model, with the clients either the ranks of a
``torch.distributed`` process group (``all_reduce`` of ``w_k B_k``) or model copies in one
process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from basin.train.lora import LoRALinear

__all__ = ["fedsvd_aggregate", "fedsvd_freeze_a", "fedsvd_round"]


def _weights(n: int, weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n or not all(x >= 0 and x < float("inf") for x in w) or sum(w) <= 0:
        raise ValueError(
            f"weights must be {n} finite non-negative numbers with a positive sum, got {weights!r}"
        )
    s = sum(w)
    return [x / s for x in w]


def _refactor(b_bar: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    r = a.shape[0]
    u, s, vh = torch.linalg.svd((b_bar @ a).to(torch.float64), full_matrices=False)
    return vh[:r].to(a.dtype), (u[:, :r] * s[:r]).to(b_bar.dtype)


@torch.no_grad()
def fedsvd_aggregate(
    bs: Sequence[Tensor], a: Tensor, weights: Sequence[float] | None = None
) -> tuple[Tensor, Tensor]:
    """The FedSVD server step for one layer: ``(A_new, B_new)`` from the clients' ``B_k``
    (``out x r``) and the shared frozen ``A`` (``r x in``).

    ``weights``: client weights (e.g. local dataset sizes), normalised to sum 1; default equal.
    The SVD runs in float64; ``A_new`` has orthonormal rows and ``B_new A_new`` equals
    ``(sum_k w_k B_k) A``.
    """
    if len(bs) == 0:
        raise ValueError("bs must hold at least one client's B")
    if a.ndim != 2 or any(b.ndim != 2 or b.shape[1] != a.shape[0] for b in bs):
        raise ValueError(
            f"each B must be (out, r) with r = A.shape[0] = {a.shape[0] if a.ndim == 2 else '?'}"
        )
    w = _weights(len(bs), weights)
    b_bar = cast(Tensor, sum(wk * b.to(torch.float64) for wk, b in zip(w, bs)))
    a_new, b_new = _refactor(b_bar, a)
    return a_new, b_new.to(bs[0].dtype)


def _lora_layers(model: nn.Module) -> list[LoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("model has no basin.train.LoRALinear layer (use basin.train.add_lora)")
    return layers


def fedsvd_freeze_a(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every ``lora_A`` of ``model`` and return the ``lora_B`` matrices (what a FedSVD
    client trains)."""
    out = []
    for m in _lora_layers(model):
        m.lora_A.requires_grad_(False)
        m.lora_B.requires_grad_(True)
        out.append(m.lora_B)
    return out


@torch.no_grad()
def fedsvd_round(
    model: nn.Module | Sequence[nn.Module],
    weight: float | Sequence[float] | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """One FedSVD server round, in place.

    Distributed (``model`` one module, run on every rank of ``process_group``): each rank is a
    client with its trained ``B``; ``weight`` is this rank's client weight (default 1). The
    weighted ``B`` and the weight are summed with ``all_reduce``; the SVD is computed on
    rank 0 of the group and broadcast, so every rank ends with identical ``A``, ``B``.

    In one process (``model`` a sequence of client models with the same ``A``): ``weight`` is
    one weight per client (default equal); every client model gets the new ``A``, ``B``.
    """
    if isinstance(model, nn.Module):
        if not dist.is_initialized():
            raise ValueError("fedsvd_round on one model needs an initialised process group")
        w = 1.0 if weight is None else float(cast(float, weight))
        if not (w >= 0 and w < float("inf")):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        layers = _lora_layers(model)
        src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
        leader = dist.get_rank(process_group) == 0
        for m in layers:
            b = m.lora_B.detach().to(torch.float64)
            buf = torch.cat([(w * b).reshape(-1), b.new_tensor([w])])
            dist.all_reduce(buf, group=process_group)
            if buf[-1] <= 0:
                raise ValueError("the client weights sum to 0")
            na = m.lora_A.numel()
            if leader:  # one SVD, broadcast: every rank gets the same signs
                b_bar = (buf[:-1] / buf[-1]).view_as(b)
                a_new, b_new = _refactor(b_bar, m.lora_A.detach().to(torch.float64))
                packed = torch.cat([a_new.reshape(-1), b_new.reshape(-1)])
            else:
                packed = torch.empty(na + b.numel(), dtype=torch.float64, device=b.device)
            dist.broadcast(packed, src=src, group=process_group)
            m.lora_A.copy_(packed[:na].view_as(m.lora_A))
            m.lora_B.copy_(packed[na:].view_as(m.lora_B))
        return
    clients = list(model)
    if not clients:
        raise ValueError("model must be a module or a non-empty sequence of client models")
    per_client = [_lora_layers(c) for c in clients]
    if len({len(p) for p in per_client}) != 1:
        raise ValueError("client models must have the same LoRA layers")
    wts = _weights(len(clients), None if weight is None else list(weight))  # type: ignore[arg-type]
    for layer in zip(*per_client):
        a = layer[0].lora_A.detach()
        if any(not torch.equal(m.lora_A, a) for m in layer):
            raise ValueError("client models must share the same (frozen) lora_A")
        a_new, b_new = fedsvd_aggregate([m.lora_B for m in layer], a, wts)
        for m in layer:
            m.lora_A.copy_(a_new)
            m.lora_B.copy_(b_new)
