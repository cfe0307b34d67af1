"""DIFF2: differentially private optimization via gradient differences (arXiv:2302.03884).

Every ``restart_period`` steps a private gradient (per-sample gradients clipped to
``max_grad_norm``, summed, Gaussian noise added, divided by the batch size); in between, the
estimator moves by a private mean of per-sample gradient *differences* at the current and the
previous point, clipped to their own (smaller) threshold, so the noise it needs shrinks as the
steps do; the parameters take a gradient-descent step along the estimator.

Reference: Murata, Suzuki, "DIFF2: Differential Private Optimization via Gradient Differences
for Nonconvex Distributed Learning", ICML 2023, arXiv:2302.03884.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from basin.optim._base import check_int

__all__ = ["DIFF2"]


def _check_nonneg(name: str, value: Any, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        what = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {what} finite number, got {value!r}")
    return float(value)


class DIFF2:
    """DIFF2 with its gradient-descent subroutine (DIFF2-GD) on ``model``.

    Update, at step ``t`` on a batch ``B_t`` (``g_i(x)``: example ``i``'s gradient of
    ``loss_fn``; ``clip_C(u) = u min(1, C / ||u||)`` over all parameters together;
    ``xi ~ N(0, I)`` fresh each step)::

        t % restart_period == 0:  v_t = (sum_i clip_C1(g_i(x_t)) + sigma1 C1 xi) / |B|
        otherwise:                v_t = v_{t-1}
                                        + (sum_i clip_C2(g_i(x_t) - g_i(x_{t-1})) + sigma2 C2 xi) / |B|
        x_{t+1} = x_t - lr v_t

    Args:
        model: the module trained (its parameters are updated in place).
        loss_fn: ``loss_fn(output, target)``, a mean over the batch; the per-sample gradients
            are those of ``loss_fn`` on single examples (``torch.func.vmap`` of ``grad``).
        lr: step size.
        restart_period: steps between private full gradients (``b``; 1 is DP-GD).
        max_grad_norm: clipping threshold ``C1`` of the gradients (default 1.0).
        diff_max_grad_norm: clipping threshold ``C2`` of the gradient differences
            (default: ``max_grad_norm``).
        noise_multiplier: ``sigma1``, noise standard deviation over ``C1`` (default 1.0; 0 turns
            the noise off, and privacy with it).
        diff_noise_multiplier: ``sigma2`` (default: ``noise_multiplier``).
        expected_batch_size: the divisor ``|B|`` (default: each batch's length; give the
            expected size when batches are Poisson-sampled, as DP-SGD does).
        generator: the noise's ``torch.Generator`` (default: the global one).
        distributed: the paper's distributed setting over ``torch.distributed`` (initialised
            first): each rank computes its message (the bracket above, on its own batch, with
            its own noise: seed every rank's ``generator`` differently) and every rank adds the
            mean of the messages (one ``all_reduce``); start all ranks from equal parameters.
        process_group: the group of the workers (default: the world).

    :meth:`epsilon` accounts the run with Opacus' accountant (docs/privacy.md).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        lr: float,
        restart_period: int,
        max_grad_norm: float = 1.0,
        diff_max_grad_norm: float | None = None,
        noise_multiplier: float = 1.0,
        diff_noise_multiplier: float | None = None,
        expected_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        distributed: bool = False,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        self.lr = _check_nonneg("lr", lr, positive=True)
        self.restart_period = check_int("restart_period", restart_period, 1)
        self.c1 = _check_nonneg("max_grad_norm", max_grad_norm, positive=True)
        self.c2 = (
            self.c1
            if diff_max_grad_norm is None
            else _check_nonneg("diff_max_grad_norm", diff_max_grad_norm, positive=True)
        )
        self.sigma1 = _check_nonneg("noise_multiplier", noise_multiplier)
        self.sigma2 = (
            self.sigma1
            if diff_noise_multiplier is None
            else _check_nonneg("diff_noise_multiplier", diff_noise_multiplier)
        )
        if expected_batch_size is not None:
            check_int("expected_batch_size", expected_batch_size, 1)
        self.expected_batch_size = expected_batch_size
        self.model, self.loss_fn, self.generator = model, loss_fn, generator
        if not isinstance(distributed, bool):
            raise ValueError(f"distributed must be True or False, got {distributed!r}")
        if distributed and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ValueError("distributed=True needs torch.distributed.init_process_group first")
        self.distributed, self.process_group = distributed, process_group
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        self.t = 0
        self.v: list[Tensor] | None = None
        self.prev: list[Tensor] | None = None
        self.n_full, self.n_diff = 0, 0

    # ---------------------------------------------------------------- per-sample gradients

    def _per_sample(
        self, params: list[Tensor], x: Tensor, y: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        from torch.func import functional_call, grad_and_value, vmap

        buffers = dict(self.model.named_buffers())

        def one(ps: tuple[Tensor, ...], xi: Tensor, yi: Tensor) -> Tensor:
            out = functional_call(self.model, ({**dict(zip(self.names, ps)), **buffers}),
                                  (xi.unsqueeze(0),))  # fmt: skip
            return self.loss_fn(out, yi.unsqueeze(0))

        grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0))(tuple(params), x, y)
        return list(grads), losses

    def _clipped_sum(self, per: list[Tensor], c: float) -> list[Tensor]:
        norms = torch.sqrt(cast(Tensor, sum(g.reshape(len(g), -1).pow(2).sum(1) for g in per)))
        factor = (c / norms.clamp_min(1e-12)).clamp(max=1.0)
        return [torch.einsum("i,i...->...", factor.to(g.dtype), g) for g in per]

    def _noise(self, like: Tensor, std: float) -> Tensor:
        if std == 0:
            return torch.zeros_like(like)
        z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)
        return std * z

    def _mean_over_workers(self, msg: list[Tensor]) -> list[Tensor]:
        if not self.distributed:
            return msg
        import torch.distributed as dist

        flat = torch.cat([m.reshape(-1) for m in msg])
        dist.all_reduce(flat, group=self.process_group)
        flat /= dist.get_world_size(self.process_group)
        out, k = [], 0
        for m in msg:
            out.append(flat[k : k + m.numel()].view_as(m))
            k += m.numel()
        return out

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One DIFF2 step on the batch ``(inputs, targets)``; returns the batch's mean loss at
        the point before the step."""
        if len(inputs) != len(targets):
            raise ValueError(
                f"inputs and targets differ in length: {len(inputs)} vs {len(targets)}"
            )
        if len(inputs) == 0 and self.expected_batch_size is None:
            raise ValueError("an empty batch needs expected_batch_size")
        x_t = [p.detach().clone() for p in self.params]
        with torch.enable_grad():
            g_now, losses = self._per_sample(x_t, inputs, targets)
        denom = float(self.expected_batch_size or len(inputs))
        if self.t % self.restart_period == 0 or self.v is None:
            s = self._clipped_sum(g_now, self.c1)
            msg = [(si + self._noise(si, self.sigma1 * self.c1)) / denom for si in s]
            self.v = self._mean_over_workers(msg)
            self.n_full += 1
        else:
            assert self.prev is not None  # set by the first (full) step
            with torch.enable_grad():
                g_prev, _ = self._per_sample(self.prev, inputs, targets)
            s = self._clipped_sum([a - b for a, b in zip(g_now, g_prev)], self.c2)
            msg = [(si + self._noise(si, self.sigma2 * self.c2)) / denom for si in s]
            self.v = [v + m for v, m in zip(self.v, self._mean_over_workers(msg))]
            self.n_diff += 1
        for p, v in zip(self.params, self.v):
            p.sub_(self.lr * v)
        self.prev = x_t
        self.t += 1
        return losses.mean() if len(losses) else torch.tensor(float("nan"))

    # ---------------------------------------------------------------- accounting

    def history(self, sample_rate: float = 1.0) -> list[tuple[float, float, int]]:
        """The run as Opacus accountant history: ``(noise multiplier, sample rate, steps)`` of
        the full-gradient steps and of the difference steps."""
        return [
            (s, sample_rate, n)
            for s, n in ((self.sigma1, self.n_full), (self.sigma2, self.n_diff))
            if n
        ]

    def epsilon(self, delta: float, sample_rate: float = 1.0, accountant: str = "rdp") -> float:
        """Epsilon at ``delta`` of the steps taken: each step releases one Gaussian mechanism
        (sensitivity ``C1`` or ``C2``, noise ``sigma1 C1`` or ``sigma2 C2``), composed by
        Opacus' accountant; ``sample_rate``: each example's probability of being in a batch
        (1: full batches, the paper's setting)."""
        from basin.distributed.dp import _check_delta, _opacus

        _opacus()
        from opacus.accountants import create_accountant

        delta = _check_delta(delta)
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        hist = self.history(sample_rate)
        if not hist:
            return 0.0
        if any(s == 0 for s, _, _ in hist):
            return math.inf
        acc = create_accountant(mechanism=accountant)
        acc.history = hist
        return float(acc.get_epsilon(delta=delta))
