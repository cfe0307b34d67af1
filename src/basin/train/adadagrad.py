"""AdAdaGrad's adaptive batch sizes: grow the batch when the minibatch gradient is too noisy.

Lau, Liu and Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods",
arXiv:2402.11215, 2024 (tests of Byrd et al. 2012 and Bollapragada et al. 2018). From the
per-sample gradients ``g_i`` of a batch of ``b`` (``torch.func``: ``vmap(grad)``), their mean
``g`` and sample variances (correction 1)::

    norm test           b <- max(b, ceil( sum_j Var_i(g_ij)        / (eta^2   |g|^2) ))
    inner-product test  b <- max(b, ceil( Var_i(<g_i, g>)           / (theta^2 |g|^4) ))
    orthogonality test  b <- max(b, ceil( sum_j Var_i(g_ij - <g_i, g> g_j / |g|^2) / (nu^2 |g|^2) ))
    augmented           the larger of the inner-product and orthogonality tests

capped at ``max_batch_size``; the batch never shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from basin.optim._base import check_bool, check_int, check_range

__all__ = [
    "TESTS",
    "AdaptiveBatchSize",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
    "per_sample_gradients",
]

TESTS = ("norm", "inner_product", "augmented")


def per_sample_gradients(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
) -> tuple[Tensor, list[int]]:
    """The gradient of ``loss_fn(model(x_i), y_i)`` for every sample ``i`` at the model's
    current parameters (``torch.func.vmap`` of ``torch.func.grad``; the model and its
    gradients are left as they were): a ``(b, P)`` matrix over the trainable parameters, in
    ``model.parameters()`` order, and the sizes of those parameters."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("per-sample gradients are undefined for a model with BatchNorm layers")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(ps: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = torch.func.functional_call(
            model, {**ps, **frozen, **buffers}, (xi.unsqueeze(0),), strict=False
        )
        return loss_fn(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([grads[n].reshape(len(x), -1) for n in names], dim=1)
    return flat, [params[n].numel() for n in names]


def _blocks(g: Tensor, sizes: list[int] | None) -> list[Tensor]:
    return [g] if sizes is None else list(torch.split(g, sizes, dim=-1))


def norm_test(grads: Tensor, eta: float = 0.1) -> float:
    """The norm test's batch size ``sum_j Var_i(g_ij) / (eta^2 |g|^2)`` for per-sample
    gradients ``grads`` (``(b, P)``, ``b >= 2``; before the ceiling and the max with ``b``)."""
    g = grads.mean(0)
    return _ratio(grads.var(0, correction=1).sum(), eta**2 * g.square().sum())


def inner_product_test(grads: Tensor, theta: float = 0.1, sizes: list[int] | None = None) -> float:
    """The inner-product test's batch size ``Var_i(<g_i, g>) / (theta^2 |g|^4)``. ``sizes``
    (per-parameter column counts): the authors' code's form, the sum over parameter tensors of
    the variance of each tensor's inner product, for the same denominator."""
    g = grads.mean(0)
    var = sum(
        (gi @ gb).var(correction=1) for gi, gb in zip(_blocks(grads, sizes), _blocks(g, sizes))
    )
    return _ratio(var, theta**2 * g.square().sum() ** 2)


def orthogonality_test(grads: Tensor, nu: float = 0.1, sizes: list[int] | None = None) -> float:
    """The orthogonality test's batch size ``sum_j Var_i(g_i - <g_i, g> g / |g|^2)_j /
    (nu^2 |g|^2)``; ``sizes`` as in :func:`inner_product_test` (per tensor: each tensor's
    projection on its own part of ``g``)."""
    g = grads.mean(0)
    var: Any = 0.0
    for gi, gb in zip(_blocks(grads, sizes), _blocks(g, sizes)):
        ortho = gi - torch.outer(gi @ gb, gb) / gb.square().sum()
        var = var + ortho.var(0, correction=1).sum()
    return _ratio(var, nu**2 * g.square().sum())


def _ratio(numerator: Any, denominator: Any) -> float:
    num, den = float(numerator), float(denominator)
    if den > 0:
        return num / den
    return math.inf if num > 0 else 0.0  # zero mean gradient: as large a batch as allowed


class AdaptiveBatchSize:
    """AdAdaGrad's batch-size controller (arXiv:2402.11215): call :meth:`update` with a
    training batch at the current parameters (before the optimizer step, as the authors do);
    :attr:`batch_size` is then the size of the next batch.

    Args:
        batch_size: the initial batch size (>= 2: a variance needs two samples).
        max_batch_size: the cap (>= batch_size).
        test: ``"norm"``, ``"inner_product"`` or ``"augmented"`` (inner product and
            orthogonality, the larger of the two) (default ``"norm"``).
        eta: the norm test's constant (default 0.1, the authors').
        theta: the inner-product test's constant (default 0.1).
        nu: the orthogonality test's constant (default 0.1).
        every: run the test every this many updates (default 1).
        per_tensor: the inner-product and orthogonality statistics per parameter tensor,
            summed, as the authors' code computes them (default False: the paper's
            whole-vector inner product).
        test_samples: use at most this many samples of each batch for the statistics
            (default None: all; per-sample gradients take ``b x P`` memory).
    """

    def __init__(
        self,
        batch_size: int,
        max_batch_size: int,
        test: str = "norm",
        *,
        eta: float = 0.1,
        theta: float = 0.1,
        nu: float = 0.1,
        every: int = 1,
        per_tensor: bool = False,
        test_samples: int | None = None,
    ) -> None:
        check_int("batch_size", batch_size, 2)
        check_int("max_batch_size", max_batch_size, batch_size)
        if test not in TESTS:
            raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
        for name, v in (("eta", eta), ("theta", theta), ("nu", nu)):
            check_range(name, v, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
        check_int("every", every, 1)
        check_bool("per_tensor", per_tensor)
        if test_samples is not None:
            check_int("test_samples", test_samples, 2)
        self.batch_size, self.max_batch_size, self.test = batch_size, max_batch_size, test
        self.eta, self.theta, self.nu, self.every = eta, theta, nu, every
        self.per_tensor, self.test_samples = per_tensor, test_samples
        self.n_updates = 0
        self.last_statistic: float | None = None

    def statistic(self, grads: Tensor, sizes: list[int] | None = None) -> float:
        """The test's suggested batch size for per-sample gradients ``grads`` (``(b, P)``)."""
        sizes = sizes if self.per_tensor else None
        if self.test == "norm":
            return norm_test(grads, self.eta)
        ip = inner_product_test(grads, self.theta, sizes)
        if self.test == "inner_product":
            return ip
        return max(ip, orthogonality_test(grads, self.nu, sizes))

    def propose(self, suggested: float) -> int:
        """``min(max_batch_size, max(batch_size, ceil(suggested)))``, which becomes the
        batch size; a NaN statistic leaves it unchanged."""
        if not math.isnan(suggested):
            grown = self.max_batch_size if math.isinf(suggested) else math.ceil(suggested)
            self.batch_size = min(self.max_batch_size, max(self.batch_size, grown))
        return self.batch_size

    @torch.no_grad()
    def update(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor,
               y: Tensor) -> int:  # fmt: skip
        """Run the test on the batch ``(x, y)`` (every :attr:`every`-th call, and only below
        the cap) and return the next batch size."""
        self.n_updates += 1
        if self.batch_size >= self.max_batch_size or (self.n_updates - 1) % self.every:
            return self.batch_size
        if self.test_samples is not None:
            x, y = x[: self.test_samples], y[: self.test_samples]
        with torch.enable_grad():
            grads, sizes = per_sample_gradients(model, loss_fn, x, y)
        self.last_statistic = self.statistic(grads, sizes)
        return self.propose(self.last_statistic)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "n_updates": self.n_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size, self.n_updates = int(state["batch_size"]), int(state["n_updates"])
