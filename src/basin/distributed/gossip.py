"""Gossip SGD over a sparse topology with one final global merge.

Decentralized SGD (each rank one node): local optimizer steps, then a gossip step
``x_i <- sum_j W_ij x_j`` with a doubly stochastic mixing matrix ``W`` supported on the
topology's edges; at the end one exact global average gives the model that is used (Zhu, Zhang,
Wang, Zhou, Wang, "On the Surprising Effectiveness of a Single Global Merging in Decentralized
Learning", ICLR 2026, arXiv:2507.06542: gossip on a sparse graph, one switch to the complete
graph at the last step).

Neighbours exchange their flattened parameters with point-to-point ``isend``/``irecv``
(batched), so a node sends ``deg`` copies of its parameters per gossip step instead of the
``n - 1`` an ``all_gather`` would move; the complete topology and the final merge use one
``all_reduce``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from basin.optim._base import check_int

__all__ = ["TOPOLOGIES", "Gossip", "check_mixing_matrix", "mixing_matrix"]

TOPOLOGIES = ("ring", "torus", "exponential", "complete")


def _grid(n: int) -> tuple[int, int]:
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def _metropolis(n: int, edges: set[tuple[int, int]]) -> Tensor:
    """Symmetric Metropolis-Hastings weights: ``W_ij = 1 / (1 + max(d_i, d_j))`` on each edge,
    the rest on the diagonal (doubly stochastic for any undirected graph)."""
    deg = [0] * n
    for i, _ in edges:
        deg[i] += 1
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edges:
        w[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
    w += torch.diag(1.0 - w.sum(1))
    return w


def mixing_matrix(topology: str, n: int) -> Tensor:
    """The ``n x n`` float64 doubly stochastic mixing matrix of a topology.

    ``"ring"``: each node averages itself and its two neighbours (weight 1/3 each; n = 2 gives
    1/2). ``"torus"``: the near-square ``a x b`` grid (``a * b = n``, ``a <= b``) with
    wrap-around, Metropolis-Hastings weights (1/5 on a torus of degree 4). ``"exponential"``:
    the static exponential graph, node ``i`` listens to ``i + 2^k mod n`` for
    ``k = 0..ceil(log2 n) - 1``, each weight ``1 / (ceil(log2 n) + 1)`` (a circulant, so doubly
    stochastic; directed). ``"complete"``: every entry ``1/n``.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    check_int("n", n, 1)
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if topology == "complete":
        return torch.full((n, n), 1.0 / n, dtype=torch.float64)
    if topology == "exponential":
        offsets = [0] + [2**k for k in range(math.ceil(math.log2(n)))]
        w = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for o in offsets:
                w[i, (i + o) % n] = 1.0 / len(offsets)
        return w
    edges: set[tuple[int, int]] = set()
    if topology == "ring":
        pairs = [(i, (i + 1) % n) for i in range(n)]
    else:
        a, b = _grid(n)
        pairs = []
        for r in range(a):
            for c in range(b):
                i = r * b + c
                pairs += [(i, r * b + (c + 1) % b), (i, ((r + 1) % a) * b + c)]
    for i, j in pairs:
        if i != j:
            edges |= {(i, j), (j, i)}
    return _metropolis(n, edges)


def check_mixing_matrix(w: Tensor, n: int | None = None, tol: float = 1e-10) -> Tensor:
    """``w`` as a float64 tensor after checking it is an ``n x n`` doubly stochastic matrix
    (non-negative, finite, rows and columns summing to 1 within ``tol``); else ``ValueError``."""
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.ndim != 2 or w.shape[0] != w.shape[1] or (n is not None and w.shape[0] != n):
        want = f"{n} x {n}" if n is not None else "square"
        raise ValueError(f"mixing matrix W must be {want}, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("mixing matrix W must have finite non-negative entries")
    err = max((w.sum(0) - 1).abs().max().item(), (w.sum(1) - 1).abs().max().item())
    if err > tol:
        raise ValueError(
            f"mixing matrix W must be doubly stochastic (rows and columns sum to 1), "
            f"off by {err:.3g}"
        )
    return w


class Gossip:
    """Gossip averaging of ``params`` across the ranks of a process group (one node per rank).

    ``step()`` replaces this rank's parameters ``x_i`` by ``sum_j W_ij x_j``; ``merge()`` sets
    every rank's parameters to the exact average over ranks (the single global merge). Call
    ``step()`` after the local optimizer step(s); any optimizer works (its state stays local).

    Args:
        params: the parameters to mix (a module or an iterable of tensors), the same shapes and
            dtype on every rank.
        topology: one of :data:`TOPOLOGIES` or an explicit ``n x n`` doubly stochastic matrix
            (the same on every rank; row ``i`` is rank ``i``'s weights).
        process_group: the group (default: the world); needs >= 2 ranks.

    Counters: ``bytes_sent`` (this rank, payload bytes), ``steps``.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor],
        topology: str | Tensor = "ring",
        process_group: dist.ProcessGroup | None = None,
    ):
        if isinstance(params, nn.Module):
            params = params.parameters()
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty")
        if len({(p.dtype, p.device) for p in self.params}) != 1:
            raise ValueError("params must share one dtype and device")
        if not dist.is_initialized():
            raise ValueError("Gossip needs an initialised torch.distributed process group")
        self.group = process_group
        self.n = dist.get_world_size(process_group)
        if self.n < 2:
            raise ValueError(f"Gossip needs a process group of >= 2 ranks, got world size {self.n}")
        self.rank = dist.get_rank(process_group)
        if isinstance(topology, str):
            self.topology = topology
            self.W = mixing_matrix(topology, self.n)
        else:
            self.topology = "custom"
            self.W = check_mixing_matrix(topology, self.n)
        row, col = self.W[self.rank], self.W[:, self.rank]
        self.in_neighbours = [j for j in range(self.n) if j != self.rank and row[j] > 0]
        self.out_neighbours = [j for j in range(self.n) if j != self.rank and col[j] > 0]
        self.complete = bool((self.W == 1.0 / self.n).all())
        self.bytes_sent = 0
        self.steps = 0

    def _global(self, j: int) -> int:
        return j if self.group is None else dist.get_global_rank(self.group, j)

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    @torch.no_grad()
    def _write(self, flat: Tensor) -> None:
        i = 0
        for p in self.params:
            p.copy_(flat[i : i + p.numel()].view_as(p))
            i += p.numel()

    @torch.no_grad()
    def step(self) -> None:
        """One gossip step ``x_i <- sum_j W_ij x_j``."""
        x = self._flat()
        nbytes = x.numel() * x.element_size()
        if self.complete:
            self.merge()
            return
        bufs = {j: torch.empty_like(x) for j in self.in_neighbours}
        ops = [dist.P2POp(dist.isend, x, self._global(j), self.group) for j in self.out_neighbours]
        ops += [dist.P2POp(dist.irecv, bufs[j], self._global(j), self.group) for j in bufs]
        for req in dist.batch_isend_irecv(ops) if ops else []:
            req.wait()
        out = x * self.W[self.rank, self.rank].to(x.dtype)
        for j in self.in_neighbours:
            out.add_(bufs[j], alpha=self.W[self.rank, j].item())
        self._write(out)
        self.bytes_sent += nbytes * len(self.out_neighbours)
        self.steps += 1

    @torch.no_grad()
    def merge(self) -> None:
        """The single global merge: every rank's parameters become the exact mean over ranks."""
        x = self._flat()
        dist.all_reduce(x, group=self.group)
        x /= self.n
        self._write(x)
        self.bytes_sent += int(2 * (self.n - 1) / self.n * x.numel() * x.element_size())
        self.steps += 1
