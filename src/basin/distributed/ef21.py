"""EF21 / EF21-W Top-K error feedback as a DDP communication hook.

EF21 (Richtárik, Sokolov, Fatkhullin, arXiv:2106.05203, Algorithm 1), per DDP bucket: rank i
keeps ``g_i``, its compressed estimate of its own gradient, and every rank keeps the same global
estimate ``g``. On each step, with ``grad_i`` the rank's local gradient (the bucket buffer)::

    c_i = TopK(grad_i - g_i)         # K largest magnitudes, the rest zero
    g_i <- g_i + c_i
    g   <- g + mean_i c_i            # = mean_i g_i, maintained incrementally

and the hook returns ``g``, which DDP writes into the parameters' ``.grad``. The first step
(and any step where DDP hands over a bucket it has not seen in that layout, e.g. after its
bucket rebuild at iteration 1) initialises ``g_i = grad_i``, ``g = mean_i grad_i`` with an
uncompressed allreduce, as the paper's ``g_i^0 = grad f_i(x^0)``.

EF21-W (Richtárik, Gasanov, Burlachenko, arXiv:2402.10774, "EF21-W", the weighted variant):
with smoothness constants ``L_i`` and ``w_i = L_i / sum_j L_j``::

    c_i = TopK(grad_i / (n w_i) - g_i);  g_i <- g_i + c_i;  g <- g + sum_i w_i c_i

so that ``g = sum_i w_i g_i`` tracks ``sum_i w_i grad_i / (n w_i) = mean_i grad_i``; equal
weights give EF21 exactly (provenance of the ``1/(n w_i)`` scaling: docs/distributed.md,
"EF21-W").

Communication. Top-K indices differ per rank, so the compressed messages are exchanged either
*sparse* (``all_gather`` of K values and K indices per rank; int32 indices while the bucket has
fewer than 2^31 elements) or *dense* (``allreduce`` of the dense ``w_i c_i``). ``comm="auto"``
(default) picks, per bucket, the one that puts fewer bytes on the wire under a ring algorithm
(what gloo and NCCL run): all_gather sends ``(n - 1) K (value + index bytes)`` per rank,
allreduce ``2 (n - 1) / n * numel * value bytes``. With float32 values and int32 indices sparse
wins when ``n K < numel``, i.e. density below about ``1 / world_size``. ``state.bytes_sent``
counts those wire bytes (warm-up and initialisation allreduces included).

K equal to the bucket size makes TopK the identity; EF21 then is plain averaging
(``g_i = grad_i``, ``g = mean grad_i``) and the hook sends exactly that dense average, so
``density=1`` reproduces DDP's own allreduce bit for bit.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["EF21State", "ef21_hook"]

_COMM = ("auto", "sparse", "dense")


@dataclass
class _Bucket:
    layout: tuple  # (data_ptr, numel) of each parameter, in buffer order
    k: int
    g_local: torch.Tensor  # g_i
    g_global: torch.Tensor  # g = sum_i w_i g_i (EF21: the mean)


class EF21State:
    """State of :func:`ef21_hook`: ``model.register_comm_hook(EF21State(density=0.01), ef21_hook)``.

    Args:
        density: fraction of each bucket sent per rank per step, in (0, 1]; K =
            ``ceil(density * bucket numel)`` (at least 1). Default 0.01 when ``k`` is not given.
        k: an explicit K per bucket (>= 1) instead of ``density``; a bucket smaller than ``k`` is
            refused with a ``ValueError`` at the first step that sees it (lower ``k``, use
            ``density``, or raise DDP's ``bucket_cap_mb``).
        warmup_steps: steps (>= 0) of plain allreduce averaging before EF21 starts (as PowerSGD's
            ``start_powerSGD_iter``); EF21's uncompressed initialisation then follows at step
            ``warmup_steps``. Any value works with DDP's bucket rebuild at iteration 1: a bucket
            whose parameter layout changed is re-initialised (one more uncompressed step).
        process_group: the group to communicate over (default: the world). Needs >= 2 ranks.
        weights: EF21-W smoothness constants ``L_i``, one positive finite number per rank of the
            group (the same list on every rank); ``None`` is plain EF21.
        comm: ``"auto"`` (the cheaper of the two on the wire, per bucket), ``"sparse"``
            (all_gather of values and indices) or ``"dense"`` (allreduce of the dense message).

    Counters (this rank): ``bytes_sent`` (total wire bytes under the ring model), ``last_step_bytes``,
    ``steps`` (completed DDP iterations), ``dense_bytes`` (what plain allreduce of the same
    buckets would have cost in total, for ratios).
    """

    def __init__(
        self,
        density: float | None = None,
        k: int | None = None,
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        weights: Sequence[float] | None = None,
        comm: str = "auto",
    ) -> None:
        if density is not None and k is not None:
            raise ValueError("EF21State: give density or k, not both")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"EF21State: k must be an integer >= 1, got {k!r}")
        else:
            density = 0.01 if density is None else density
            if (
                isinstance(density, bool)
                or not isinstance(density, (int, float))
                or not (0.0 < float(density) <= 1.0)
            ):
                raise ValueError(f"EF21State: density must be in (0, 1], got {density!r}")
            density = float(density)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"EF21State: warmup_steps must be an integer >= 0, got {warmup_steps!r}"
            )
        if comm not in _COMM:
            raise ValueError(f"EF21State: comm must be one of {_COMM}, got {comm!r}")
        if weights is not None:
            weights = [float(w) for w in weights]
            if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(
                    f"EF21State: weights (EF21-W smoothness constants) must be positive and finite, got {weights!r}"
                )
        self.density, self.k, self.warmup_steps = density, k, warmup_steps
        self.process_group, self.comm = process_group, comm
        self.smoothness = weights
        self.buckets: dict[int, _Bucket] = {}
        self.steps = 0
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.last_step_bytes = 0
        self._step_bytes = 0
        self._checked = False
        if dist.is_available() and dist.is_initialized():
            self._check_group()

    # ------------------------------------------------------------------ configuration
    def _check_group(self) -> None:
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        n = dist.get_world_size(group)
        if n < 2:
            raise ValueError(
                f"EF21State: ef21_hook needs a process group of at least 2 ranks, this one has {n} "
                "(with one process there is nothing to compress; train without the hook)"
            )
        if self.smoothness is not None and len(self.smoothness) != n:
            raise ValueError(
                f"EF21State: weights must have one smoothness constant per rank ({n}), "
                f"got {len(self.smoothness)}"
            )
        self.world_size = n
        self.rank = dist.get_rank(group)
        if self.smoothness is None:
            self.w = None
            self.scale = 1.0
        else:
            total = sum(self.smoothness)
            self.w = [L / total for L in self.smoothness]
            self.scale = 1.0 / (n * self.w[self.rank])
        self._checked = True

    def bucket_k(self, numel: int, index: int = 0) -> int:
        """K for a bucket of ``numel`` elements (raises for an explicit k above it)."""
        if self.k is not None:
            if self.k > numel:
                raise ValueError(
                    f"EF21State: k={self.k} is larger than DDP bucket {index} ({numel} elements); "
                    "k must be <= the smallest bucket: lower k, give density instead, or raise "
                    "DDP's bucket_cap_mb"
                )
            return self.k
        density = (
            self.density if self.density is not None else 1.0
        )  # __init__ sets one of k, density
        return max(1, min(numel, math.ceil(density * numel)))

    def _sparse_cheaper(self, k: int, numel: int, value_bytes: int, index_bytes: int) -> bool:
        if self.comm != "auto":
            return self.comm == "sparse"
        n = self.world_size
        return (n - 1) * k * (value_bytes + index_bytes) < 2 * (n - 1) / n * numel * value_bytes

    def _dense_wire(self, numel: int, value_bytes: int) -> int:
        n = self.world_size
        return int(round(2 * (n - 1) / n * numel * value_bytes))

    def _count(self, nbytes: int, bucket: dist.GradBucket, dense: int) -> None:
        self.bytes_sent += nbytes
        self.dense_bytes += dense
        self._step_bytes += nbytes
        if bucket.is_last():
            self.last_step_bytes, self._step_bytes = self._step_bytes, 0
            self.steps += 1


def _group(state: EF21State):
    return state.process_group if state.process_group is not None else dist.group.WORLD


def _average(state: EF21State, buffer: torch.Tensor) -> torch.futures.Future:
    """Plain averaging, as torch's default allreduce hook: divide, then allreduce."""
    buffer.div_(state.world_size)
    fut = dist.all_reduce(buffer, group=_group(state), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def ef21_hook(state: EF21State, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook running EF21 (EF21-W with ``state`` weights) on every bucket."""
    if not state._checked:
        state._check_group()
    buffer = bucket.buffer()
    numel, index = buffer.numel(), bucket.index()
    value_bytes = buffer.element_size()
    dense = state._dense_wire(numel, value_bytes)
    layout = tuple((p.data_ptr(), p.numel()) for p in bucket.parameters())
    k = state.bucket_k(numel, index)  # refuses an explicit k above the bucket on the first call
    step = state.steps

    if step < state.warmup_steps:
        state._count(dense, bucket, dense)
        return _average(state, buffer)

    entry = state.buckets.get(index)
    if entry is None or entry.layout != layout or k == numel:
        # EF21's initialisation g_i = grad_i / (n w_i), g = sum_i w_i g_i = mean_i grad_i; also
        # the whole step when K = numel (TopK is the identity, EF21 is plain averaging).
        g_local = buffer.detach().clone()
        if state.scale != 1.0:
            g_local.mul_(state.scale)
        state._count(dense, bucket, dense)

        def init(fut: torch.futures.Future) -> torch.Tensor:
            out = fut.value()
            state.buckets[index] = _Bucket(layout, k, g_local, out.detach().clone())
            return out

        return _average(state, buffer).then(init)

    g_local, g_global = entry.g_local, entry.g_global
    target = buffer if state.scale == 1.0 else buffer * state.scale
    diff = target - g_local
    idx = torch.topk(diff.abs(), k, sorted=False).indices
    vals = diff[idx]
    g_local[idx] = target[idx]  # g_i + c_i on the support, exactly: c_i = target - g_i there
    group = _group(state)
    n = state.world_size
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    index_bytes = torch.empty((), dtype=index_dtype).element_size()

    if state._sparse_cheaper(k, numel, value_bytes, index_bytes):
        state._count((n - 1) * k * (value_bytes + index_bytes), bucket, dense)
        all_vals = [torch.empty_like(vals) for _ in range(n)]
        all_idx = [torch.empty(k, dtype=index_dtype, device=buffer.device) for _ in range(n)]
        fv = dist.all_gather(all_vals, vals, group=group, async_op=True).get_future()
        fi = dist.all_gather(all_idx, idx.to(index_dtype), group=group, async_op=True).get_future()

        def scatter(_: torch.futures.Future) -> torch.Tensor:
            agg = torch.zeros_like(g_global)
            for r in range(n):  # fixed rank order: every rank computes the same g
                v = all_vals[r] if state.w is None else all_vals[r] * state.w[r]
                agg.index_add_(0, all_idx[r].long(), v)
            if state.w is None:
                agg.div_(n)
            g_global.add_(agg)
            buffer.copy_(g_global)
            return buffer

        return torch.futures.collect_all([fv, fi]).then(scatter)

    state._count(dense, bucket, dense)
    msg = torch.zeros_like(g_global)
    msg[idx] = vals if state.w is None else vals * state.w[state.rank]
    fut = dist.all_reduce(msg, group=group, async_op=True).get_future()

    def add(f: torch.futures.Future) -> torch.Tensor:
        agg = f.value()[0]
        if state.w is None:
            agg.div_(n)
        g_global.add_(agg)
        buffer.copy_(g_global)
        return buffer

    return fut.then(add)
