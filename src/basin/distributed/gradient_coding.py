"""Gradient coding against stragglers: Tandon et al.'s codes and the selective-reattempt
sequential scheme of Krishnan et al.

Gradient coding (Tandon, Lei, Dimakis, Karampatziakis, arXiv:1612.03301): the data are split
into ``n`` parts with partial gradients ``g_0..g_{n-1}``; worker ``i`` computes the parts in the
support of row ``i`` of an ``n x n`` encoding matrix ``C`` and sends ``sum_j C_ij g_j``. Any
``n - s`` responders ``F`` suffice: there is ``a`` with ``a^T C_F = 1^T``, so
``sum_{i in F} a_i msg_i = sum_j g_j``. Two constructions: ``"cyclic"`` (rows supported on
``s + 1`` cyclically consecutive parts, entries from a random ``s x n`` matrix ``H`` with
``H 1 = 0``: each row is in ``null(H)``, which contains ``1``), and ``"fractional"`` (needs
``(s + 1) | n``: groups of ``s + 1`` workers all send the sum of the group's ``s + 1`` parts).

Sequential gradient coding (Krishnan, Ebrahimi, Khisti, ICLR 2023, arXiv:2211.13802),
selective-reattempt scheme (SR-SGC) for the ``(B, W, lambda)``-bursty straggler model (in any
``W`` consecutive rounds at most ``lambda`` distinct workers straggle, and each of them within a
span of at most ``B`` rounds): job ``t`` (the gradient started in round ``t``) is coded with a
code tolerating ``s = ceil(B lambda / (W - 1 + B))`` stragglers, so each worker's load is
``(s + 1) / n`` of the data instead of ``(lambda + 1) / n``. If ``v > s`` workers did not
deliver job ``t`` in round ``t``, ``v - s`` of them (the lowest indices) re-attempt their job
``t`` task in round ``t + B`` instead of their job ``t + B`` task; job ``t`` is decoded at the
end of round ``t + B`` (delay ``T = B``) from its ``n - s`` delivered tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from basin.optim._base import check_int

__all__ = [
    "GradientCode",
    "SelectiveReattemptSGC",
    "coded_gradient",
    "follows_bursty_model",
    "run_sequential_gradient_coding",
    "simulate_sequential_gradient_coding",
]

_SCHEMES = ("cyclic", "fractional")


class GradientCode:
    """A gradient code for ``n`` workers and ``n`` data parts tolerating ``s`` stragglers.

    Args:
        n: workers (= data parts), >= 2.
        s: stragglers tolerated, ``0 <= s < n``.
        scheme: ``"cyclic"`` (any ``n``, ``s``; float64 random coefficients from ``seed``) or
            ``"fractional"`` (``(s + 1)`` divides ``n``; 0/1 coefficients).
        seed: seed of the cyclic code's random ``H``.

    ``C`` is the ``n x n`` float64 encoding matrix, ``parts(i)`` worker ``i``'s data parts.
    """

    def __init__(self, n: int, s: int, scheme: str = "cyclic", seed: int = 0):
        check_int("n", n, 2)
        check_int("s", s, 0)
        if s >= n:
            raise ValueError(f"s must be in [0, n - 1] = [0, {n - 1}], got {s}")
        if scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")
        self.n, self.s, self.scheme = n, s, scheme
        c = torch.zeros(n, n, dtype=torch.float64)
        if scheme == "fractional":
            if n % (s + 1):
                raise ValueError(f"scheme='fractional' needs (s + 1) to divide n, got n={n}, s={s}")
            for i in range(n):
                g = i // (s + 1)
                c[i, g * (s + 1) : (g + 1) * (s + 1)] = 1.0
        elif s == 0:
            c = torch.eye(n, dtype=torch.float64)
        else:
            gen = torch.Generator().manual_seed(seed)
            h = torch.randn(s, n, generator=gen, dtype=torch.float64)
            h[:, -1] = -h[:, :-1].sum(1)  # H 1 = 0
            for i in range(n):
                others = [(i + k) % n for k in range(1, s + 1)]
                x = torch.linalg.solve(h[:, others], -h[:, i])
                c[i, i] = 1.0
                c[i, others] = x
        self.C = c

    def parts(self, worker: int) -> list[int]:
        """The data parts worker ``worker`` computes partial gradients of."""
        return torch.nonzero(self.C[worker]).flatten().tolist()

    def encode(self, worker: int, partial: Callable[[int], Tensor] | Sequence[Tensor]) -> Tensor:
        """Worker ``worker``'s message ``sum_j C_ij g_j``; ``partial(j)`` (or ``partial[j]``)
        gives ``g_j`` and is only evaluated on the worker's own parts."""
        get = partial if callable(partial) else partial.__getitem__
        out = None
        for j in self.parts(worker):
            g = get(j)
            term = g * self.C[worker, j].to(g.dtype)
            out = term if out is None else out + term
        assert out is not None
        return out

    def decoding_vector(self, responders: Iterable[int]) -> Tensor:
        """``a`` (length ``n``, zero outside ``responders``) with ``a^T C = 1^T``; ``ValueError``
        when fewer than ``n - s`` distinct responders (or, numerically, none exists)."""
        f = sorted(set(responders))
        if any(not 0 <= i < self.n for i in f):
            raise ValueError(f"responders must be worker indices in [0, {self.n - 1}], got {f}")
        if len(f) < self.n - self.s:
            raise ValueError(
                f"{len(f)} responders cannot be decoded: need at least n - s = {self.n - self.s}"
            )
        if self.scheme == "fractional":
            a = torch.zeros(self.n, dtype=torch.float64)
            for g in range(self.n // (self.s + 1)):
                a[next(i for i in f if i // (self.s + 1) == g)] = 1.0
            return a
        cf = self.C[f]  # (|F|, n)
        ones = torch.ones(self.n, 1, dtype=torch.float64)
        sol = torch.linalg.lstsq(cf.T, ones).solution.flatten()
        if (cf.T @ sol - 1).abs().max() > 1e-9:
            raise ValueError(f"responders {f} do not span the all-ones vector")
        a = torch.zeros(self.n, dtype=torch.float64)
        a[f] = sol
        return a

    def decode(self, messages: dict[int, Tensor]) -> Tensor:
        """``sum_j g_j`` from the messages of the responders (worker -> message)."""
        a = self.decoding_vector(messages)
        out = None
        for i, m in messages.items():
            if a[i] == 0:
                continue
            term = m * a[i].to(m.dtype)
            out = term if out is None else out + term
        assert out is not None
        return out


def follows_bursty_model(
    stragglers: Sequence[Iterable[int]], burst: int, window: int, lam: int
) -> bool:
    """Whether a straggler pattern (one set of workers per round) fits the
    ``(B, W, lambda)``-bursty model: in every ``W`` consecutive rounds at most ``lambda``
    distinct stragglers, each straggling only within a span of at most ``B`` rounds."""
    rounds = [set(r) for r in stragglers]
    for t0 in range(max(1, len(rounds) - window + 1)):
        win = rounds[t0 : t0 + window]
        seen: dict[int, list[int]] = {}
        for k, r in enumerate(win):
            for i in r:
                seen.setdefault(i, []).append(k)
        if len(seen) > lam or any(ks[-1] - ks[0] + 1 > burst for ks in seen.values()):
            return False
    return True


class SelectiveReattemptSGC:
    """Selective-reattempt sequential gradient coding (SR-SGC, arXiv:2211.13802) for ``n``
    workers under the ``(B, W, lambda)``-bursty straggler model.

    Args:
        n: workers, >= 2.
        burst: ``B`` >= 1, the longest span of rounds one worker straggles within a window
            (also the decoding delay ``T``).
        window: ``W`` > ``B`` with ``B | (W - 1)``.
        lam: ``lambda``, distinct stragglers per window, ``1 <= lambda <= n - 1``.
        scheme: the per-job :class:`GradientCode`'s scheme (``s = ceil(B lambda / (W - 1 + B))``).
        seed: the per-job code's seed.

    Drive it round by round, one instance per run of ``num_jobs`` jobs over ``num_jobs + B``
    rounds: ``tasks(r, num_jobs)`` (worker -> job it computes in round ``r``, or ``None``), then
    ``deliver(r, num_jobs, responders)`` records who delivered and names job ``r - B``, whose
    ``n - s`` tasks are then in. If a pattern breaks the model and job ``r - B`` could not be
    decoded, the master waits for every worker of round ``r`` (``waits`` counts such rounds).
    """

    def __init__(
        self,
        n: int,
        burst: int,
        window: int,
        lam: int,
        scheme: str = "cyclic",
        seed: int = 0,
    ):
        check_int("n", n, 2)
        check_int("burst", burst, 1)
        check_int("window", window, burst + 1)
        if (window - 1) % burst:
            raise ValueError(f"burst must divide window - 1, got burst={burst}, window={window}")
        check_int("lam", lam, 1)
        if lam >= n:
            raise ValueError(f"lam must be in [1, n - 1] = [1, {n - 1}], got {lam}")
        self.n, self.burst, self.window, self.lam = n, burst, window, lam
        self.s = math.ceil(burst * lam / (window - 1 + burst))
        self.code = GradientCode(n, self.s, scheme=scheme, seed=seed)
        self.delay = burst
        self.load = (self.s + 1) / n
        self.delivered: dict[int, set[int]] = {}  # job -> workers whose task for it arrived
        self._tasks: dict[int, dict[int, int | None]] = {}
        self.waits = 0

    def tasks(self, r: int, num_jobs: int) -> dict[int, int | None]:
        """Worker -> job computed in round ``r`` (``None``: idle) when ``num_jobs`` jobs run in
        ``num_jobs + B`` rounds; deterministic given the earlier rounds' deliveries."""
        if r in self._tasks:
            return self._tasks[r]
        plan: dict[int, int | None] = {i: (r if r < num_jobs else None) for i in range(self.n)}
        old = r - self.burst
        if old >= 0:
            missing = [i for i in range(self.n) if i not in self.delivered.get(old, set())]
            for i in missing[: max(0, len(missing) - self.s)]:
                plan[i] = old
        self._tasks[r] = plan
        return plan

    def deliver(
        self, r: int, num_jobs: int, responders: Iterable[int]
    ) -> tuple[set[int], int | None]:
        """Record round ``r``'s responders; returns ``(responders used, decodable job)``: the
        responders after a possible wait, and ``r - B`` when that job is now decodable."""
        plan = self.tasks(r, num_jobs)
        busy = {i for i, j in plan.items() if j is not None}
        resp = set(responders) & busy
        old = r - self.burst
        if old >= 0:
            have = self.delivered.get(old, set()) | {i for i in resp if plan[i] == old}
            if len(have) < self.n - self.s:
                resp = busy
                self.waits += 1
        for i in resp:
            self.delivered.setdefault(plan[i], set()).add(i)  # type: ignore[arg-type]
        return resp, (old if old >= 0 else None)


def coded_gradient(
    code: GradientCode,
    partial: Callable[[int], Tensor],
    stragglers: Iterable[int] = (),
    process_group: dist.ProcessGroup | None = None,
    master: int = 0,
) -> Tensor:
    """One coded gradient step on a process group of ``code.n`` ranks (rank ``i`` worker ``i``;
    group rank ``master`` also decodes). Every rank computes its message from ``partial(j)``;
    stragglers' messages do not reach the master (they send NaN, which it never reads); the
    master decodes ``sum_j g_j`` from the others and broadcasts it. Returns it on every rank."""
    n = dist.get_world_size(process_group)
    if n != code.n:
        raise ValueError(f"the process group has {n} ranks, the code {code.n} workers")
    rank = dist.get_rank(process_group)
    late = set(stragglers)
    msg = code.encode(rank, partial).contiguous()
    if rank in late:
        msg = torch.full_like(msg, float("nan"))
    src = master if process_group is None else dist.get_global_rank(process_group, master)
    gathered = [torch.empty_like(msg) for _ in range(n)] if rank == master else None
    dist.gather(msg, gathered, dst=src, group=process_group)
    if rank == master:
        assert gathered is not None
        out = code.decode({i: gathered[i] for i in range(n) if i not in late})
    else:
        out = torch.empty_like(msg)
    dist.broadcast(out, src=src, group=process_group)
    return out


def _parts_of(partial: Callable[[int, int], Tensor], job: int) -> Callable[[int], Tensor]:
    """``partial`` with the job fixed: part -> partial gradient of that part for ``job``."""
    return lambda part: partial(job, part)


def run_sequential_gradient_coding(
    scheme: SelectiveReattemptSGC,
    partial: Callable[[int, int], Tensor],
    num_jobs: int,
    stragglers: Sequence[Iterable[int]] = (),
    process_group: dist.ProcessGroup | None = None,
    master: int = 0,
) -> list[Tensor]:
    """Run ``num_jobs`` jobs through SR-SGC on ``scheme.n`` ranks over ``num_jobs + B`` rounds.

    ``partial(job, part)`` is the partial gradient of data part ``part`` for job ``job``;
    ``stragglers[r]`` the workers that straggle in round ``r`` (missing rounds: none). Each
    round every rank computes its task's coded message, one ``gather`` brings the messages to
    the master (stragglers' are NaN and unread), and each job is decoded at the end of round
    ``job + B`` and broadcast. Returns every job's decoded ``sum_j g_j`` on every rank. Every
    rank must pass the same ``stragglers`` (the simulation's injected pattern).
    """
    n = dist.get_world_size(process_group)
    if n != scheme.n:
        raise ValueError(f"the process group has {n} ranks, the scheme {scheme.n} workers")
    check_int("num_jobs", num_jobs, 1)
    rank = dist.get_rank(process_group)
    src = master if process_group is None else dist.get_global_rank(process_group, master)
    store: dict[int, dict[int, Tensor]] = {}
    out: list[Tensor] = []
    template: Tensor | None = None  # round 0 gives every worker a task, so this is set there
    for r in range(num_jobs + scheme.burst):
        plan = scheme.tasks(r, num_jobs)
        late = set(stragglers[r]) if r < len(stragglers) else set()
        resp, job_ready = scheme.deliver(r, num_jobs, set(range(n)) - late)
        job = plan[rank]
        if job is None:
            assert template is not None
            msg = torch.zeros_like(template)
        else:
            msg = scheme.code.encode(rank, _parts_of(partial, job)).contiguous()
            template = msg if template is None else template
        if rank not in resp:
            msg = torch.full_like(msg, float("nan"))
        gathered = [torch.empty_like(msg) for _ in range(n)] if rank == master else None
        dist.gather(msg, gathered, dst=src, group=process_group)
        if rank == master:
            assert gathered is not None
            for i in resp:
                store.setdefault(plan[i], {})[i] = gathered[i]  # type: ignore[arg-type]
        if job_ready is not None:
            g = (
                scheme.code.decode(store.pop(job_ready))
                if rank == master
                else torch.empty_like(msg)
            )
            dist.broadcast(g, src=src, group=process_group)
            out.append(g)
    return out


def simulate_sequential_gradient_coding(
    scheme: SelectiveReattemptSGC,
    partial: Callable[[int, int], Tensor],
    num_jobs: int,
    stragglers: Sequence[Iterable[int]] = (),
) -> list[Tensor]:
    """The same rounds as :func:`run_sequential_gradient_coding`, in one process."""
    store: dict[int, dict[int, Tensor]] = {}
    out = []
    for r in range(num_jobs + scheme.burst):
        plan = scheme.tasks(r, num_jobs)
        late = set(stragglers[r]) if r < len(stragglers) else set()
        resp, job_ready = scheme.deliver(r, num_jobs, set(range(scheme.n)) - late)
        for i in resp:
            job = plan[i]
            assert job is not None  # a responder had a job this round
            store.setdefault(job, {})[i] = scheme.code.encode(i, _parts_of(partial, job))
        if job_ready is not None:
            out.append(scheme.code.decode(store.pop(job_ready)))
    return out
