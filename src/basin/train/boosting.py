"""Gradient-boosted sequential training of a network (Emami & Martínez-Muñoz, "Sequential
Training of Neural Networks with Gradient Boosting", arXiv:1909.12098)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from basin.optim._base import check_int, check_range

__all__ = ["BoostedNet", "fit_boosted", "pseudo_residual"]

_LOSSES = ("squared", "logistic")


def _loss(y: Tensor, F: Tensor, loss: str) -> Tensor:
    """Per-sample loss: ``1/2 (y - F)^2`` summed over outputs, or the logistic loss of the
    logit ``F`` for a 0/1 label ``y``."""
    if loss == "squared":
        return 0.5 * ((y - F) ** 2).sum(-1)
    return (nn.functional.softplus(F) - y * F).sum(-1)


def pseudo_residual(y: Tensor, F: Tensor, loss: str = "squared") -> Tensor:
    """The negative gradient of the per-sample loss w.r.t. the ensemble output ``F``:
    ``y - F`` (squared), ``y - sigmoid(F)`` (logistic)."""
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    return y - F if loss == "squared" else y - torch.sigmoid(F)


def _line_search(y: Tensor, F: Tensor, h: Tensor, loss: str) -> float:
    """``argmin_rho sum_i L(y_i, F_i + rho h_i)``: closed form for squared loss, bisection on
    the (monotone) derivative for the logistic loss, in float64."""
    y, F, h = y.double(), F.double(), h.double()
    hh = float((h * h).sum())
    if hh == 0.0:
        return 0.0
    if loss == "squared":
        return float(((y - F) * h).sum()) / hh

    def slope(rho: float) -> float:
        return float(((torch.sigmoid(F + rho * h) - y) * h).sum())

    lo, hi = -1.0, 1.0
    while slope(lo) > 0 and lo > -1e12:
        lo *= 2
    while slope(hi) < 0 and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


class BoostedNet(nn.Module):
    """``F(x) = bias + sum_t weights[t] * stages[t](x)``; ``forward(x, n_stages=k)`` uses the
    first ``k`` stages only (the paper's switching off of the last-trained units)."""

    bias: Tensor
    weights: Tensor

    def __init__(self, bias: Tensor, stages: list[nn.Module], weights: list[float]) -> None:
        super().__init__()
        self.register_buffer("bias", bias.detach().clone())
        self.stages = nn.ModuleList(stages)
        self.register_buffer("weights", torch.tensor(weights, dtype=bias.dtype))
        self.train_losses: list[float] = []
        self.rhos: list[float] = []

    def forward(self, x: Tensor, n_stages: int | None = None) -> Tensor:
        k = len(self.stages) if n_stages is None else n_stages
        if not 0 <= k <= len(self.stages):
            raise ValueError(f"n_stages must be in [0, {len(self.stages)}], got {n_stages!r}")
        out = self.bias.expand(x.shape[0], -1).clone()
        for t in range(k):
            out = out + self.weights[t] * self.stages[t](x)
        return out

    def to_sequential(self) -> nn.Sequential:
        """The paper's integrated network: when every stage is ``Linear -> ReLU -> Linear``,
        one ``Linear(d, sum hidden) -> ReLU -> Linear(sum hidden, k)`` with the same output
        (output weights scaled by ``weights[t]``, biases summed with ``bias``)."""
        firsts: list[nn.Linear] = []
        lasts: list[nn.Linear] = []
        for stage in self.stages:
            mods = list(stage.children()) if isinstance(stage, nn.Sequential) else []
            kinds = [type(m) for m in mods]
            if kinds != [nn.Linear, nn.ReLU, nn.Linear]:
                raise ValueError("to_sequential needs every stage to be Linear -> ReLU -> Linear")
            first, last = mods[0], mods[2]
            assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
            firsts.append(first)
            lasts.append(last)
        W1 = torch.cat([f.weight for f in firsts])
        b1 = torch.cat(
            [f.bias if f.bias is not None else W1.new_zeros(f.out_features) for f in firsts]
        )
        W2 = torch.cat([c * g.weight for c, g in zip(self.weights, lasts)], dim=1)
        b2 = self.bias.clone()
        for c, g in zip(self.weights, lasts):
            if g.bias is not None:
                b2 = b2 + c * g.bias
        hidden = nn.Linear(W1.shape[1], W1.shape[0], dtype=W1.dtype)
        out = nn.Linear(W2.shape[1], W2.shape[0], dtype=W2.dtype)
        with torch.no_grad():
            hidden.weight.copy_(W1)
            hidden.bias.copy_(b1)
            out.weight.copy_(W2)
            out.bias.copy_(b2)
        return nn.Sequential(hidden, nn.ReLU(), out)


def _default_block(d: int, k: int, hidden: int, dtype: torch.dtype) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(d, hidden, dtype=dtype), nn.ReLU(), nn.Linear(hidden, k, dtype=dtype)
        )

    return make


def fit_boosted(
    X: Tensor,
    y: Tensor,
    n_stages: int,
    *,
    hidden: int = 4,
    block: Callable[[], nn.Module] | None = None,
    nu: float = 0.1,
    loss: str = "squared",
    line_search: bool = True,
    epochs: int = 200,
    lr: float = 1e-2,
    batch_size: int | None = None,
    seed: int = 0,
    on_stage: Callable[[int, Tensor], None] | None = None,
) -> BoostedNet:
    r"""Train a network as a gradient-boosted sum of blocks (arXiv:1909.12098)::

        F_0 = argmin_c sum_i L(y_i, c)                 (mean / log-odds)
        for t = 1..T:
            r_t = -dL(y, F)/dF at F_{t-1}              (pseudo-residual: y - F for squared loss)
            h_t = block fitted to r_t by Adam on 1/2 ||h_t(x) - r_t||^2 (``epochs`` passes)
            rho_t = argmin_rho sum_i L(y_i, F_{t-1} + rho h_t)   (1 without ``line_search``)
            F_t = F_{t-1} + nu rho_t h_t

    ``block()`` builds one stage (default: ``Linear(d, hidden) -> ReLU -> Linear(hidden, k)``,
    so ``T`` stages are one hidden layer of ``T * hidden`` units); it is called under
    ``torch.manual_seed(seed + t)`` (the global RNG is restored after). ``y`` is ``(n,)`` or
    ``(n, k)``; ``loss="logistic"`` takes 0/1 labels and fits logits (``k = 1``).
    ``on_stage(t, r_t)`` sees each stage's target. The returned :class:`BoostedNet` records
    the mean training loss after ``F_0`` and each stage (``train_losses``) and the ``rhos``;
    with the line search and ``0 < nu <= 1`` the loss does not increase over stages."""
    check_int("n_stages", n_stages, 1)
    check_int("hidden", hidden, 1)
    check_int("epochs", epochs, 0)
    nu = check_range("nu", nu, 0.0, 1.0, low_inclusive=False)
    lr = check_range("lr", lr, 0.0, float("inf"), low_inclusive=False)
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if batch_size is not None:
        check_int("batch_size", batch_size, 1)
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"X must be a non-empty (n, d) tensor, got shape {tuple(X.shape)}")
    Y = y.reshape(-1, 1) if y.ndim == 1 else y
    if Y.ndim != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be (n,) or (n, k) with n = {X.shape[0]}, got {tuple(y.shape)}")
    Y = Y.to(X.dtype)
    if loss == "logistic":
        if Y.shape[1] != 1 or not bool(((Y == 0) | (Y == 1)).all()):
            raise ValueError("loss='logistic' needs y of 0/1 labels with one output")
        p = float(Y.mean())
        if not 0.0 < p < 1.0:
            raise ValueError("loss='logistic' needs both labels in y")
        bias = torch.logit(torch.tensor([p], dtype=torch.float64))
    else:
        bias = Y.double().mean(0)
    bias = bias.to(X.dtype)
    make = block or _default_block(X.shape[1], Y.shape[1], hidden, X.dtype)
    n = X.shape[0]
    bs = n if batch_size is None else min(batch_size, n)
    F = bias.expand(n, -1).clone()
    stages: list[nn.Module] = []
    weights: list[float] = []
    rhos: list[float] = []
    losses = [float(_loss(Y, F, loss).mean())]
    gen = torch.Generator().manual_seed(seed)
    for t in range(n_stages):
        r = pseudo_residual(Y, F, loss)
        if on_stage is not None:
            on_stage(t, r.clone())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + t)
            h_net = make()
        opt = torch.optim.Adam(h_net.parameters(), lr=lr)
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                opt.zero_grad()
                (0.5 * ((h_net(X[idx]) - r[idx]) ** 2).sum(-1).mean()).backward()
                opt.step()
        with torch.no_grad():
            h = h_net(X)
            rho = _line_search(Y, F, h, loss) if line_search else 1.0
            F = F + (nu * rho) * h
        h_net.requires_grad_(False)
        stages.append(h_net)
        weights.append(nu * rho)
        rhos.append(rho)
        losses.append(float(_loss(Y, F, loss).mean()))
    net = BoostedNet(bias, stages, weights)
    net.train_losses, net.rhos = losses, rhos
    return net
