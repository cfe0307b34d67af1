"""LoRA-GGPO: gradient-guided random weight perturbation in one forward/backward pass, as a
wrapper over any base optimizer (AdamW by name)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._base import (
    check_betas,
    check_bool,
    check_foreach,
    check_lr,
    check_nonnegative,
    scalar_lr,
)
from ._wrapper import WrapperOptimizer
from .param_groups import decay_groups
from .registry import LR_ADAPTIVE, OptimInfo, Paper, register

__all__ = ["GGPO", "GGPOAdamW", "VARIANTS"]

VARIANTS = ("paper", "port")


class GGPO(WrapperOptimizer):
    r"""LoRA-GGPO (Chang et al., 2025, arXiv:2502.14538v1): before the forward, every perturbed
    weight matrix gets a Gaussian perturbation whose per-row scale grows with the row's weight
    norm and with the row's gradient norm of the previous step; after the backward the weights
    are restored (a copy, bit-exact) and the base optimizer steps with the gradient taken at the
    perturbed point. One forward/backward per step (SAM needs two).

    For a weight ``W`` (``m x n``: rows = dim 0, the rest flattened), ``g`` its gradient of the
    previous step (zero before the first) and ``z ~ N(0, I)``::

        variant="paper":  s_i = sqrt( sigma^2 / n * ||W_i||^2 + beta * ||g_i||^2 )
        variant="port":   s_i = sigma * ||W_i|| + beta * ||g_i||^2
        W_saved = copy(W);  W <- W + s_i z_ij;  g' = grad L(W);  W <- W_saved;
        base_optimizer.step() with g';  remember ||g'_i||^2 for the next perturbation

    ``step(closure)`` follows torch (like :class:`~basin.optim.SAM`): the closure zeroes the
    gradients, computes the loss, calls ``backward`` and returns the loss; GGPO perturbs, calls
    it once, restores and steps, and returns the loss. For a loop that runs the pass itself (AMP,
    gradient clipping: the norms kept are then those of the clipped gradient)::

        opt.perturb()                       # before the forward
        loss_fn(model(x), y).backward()
        clip_grad_norm_(params, 1.0)        # optional
        opt.step()                          # restores (bit-exact), then the base step
        opt.zero_grad()

    Between steps the model always holds the clean weights. ``step()`` without a closure after a
    forward that :meth:`perturb` did not precede is the base optimizer's step alone (GGPO warns
    once): the perturbation has to exist before the forward.

    Which parameters: every parameter with ``ndim >= 2`` that requires a gradient (the LoRA
    matrices ``A`` and ``B`` of :func:`basin.train.add_lora`), in groups whose ``perturb`` is
    True (default; ``False``: never perturbed). Vectors (biases, norms) are not perturbed.
    ``sigma``, ``beta`` and ``perturb`` may differ per group.

    Args:
        params: parameters or groups (the base optimizer's too).
        base_optimizer: an optimizer class, or a registry name (``"torch:adamw"``).
        sigma: weight-norm coefficient, >= 0 (default 0.03).
        beta: gradient-norm coefficient, >= 0 (default 0.01).
        variant: ``"paper"`` (default) or ``"port"``: the per-row scale above.
        seed: seeds the optimizer's own generator (one per device), saved in ``state_dict``, so
            a run and its resumption draw the same perturbations; ``None``: torch's global RNG
            (not saved). Default 0. The draws are float32 standard normals on the parameter's
            device (the same numbers for float64, float32 and bfloat16 parameters), cast to the
            computation dtype (float64 for float64 parameters, float32 otherwise).
        nonfinite: ``"raise"`` (default) or ``"skip"`` for a NaN/inf gradient: nothing changes
            (no base step, no new norms, no new draw); with a closure the weights are restored
            first, so the step ends where it began.
        **base_hp: the base optimizer's hyperparameters (``lr``, ``betas``, ``weight_decay``...).

    Differences from the paper (arXiv:2502.14538v1; no authors' code):
        * The form of the paper's gradient term is a choice: ``variant`` offers two readings.
        * ``A`` and ``B`` are perturbed, not the merged weight ``W + AB``.
        * The gradient norms are one step stale (zero before the first step).

    Provenance and details: docs/optimizers.md#lora-ggpo.
    """

    _algo = "GGPO"
    _registry_names = ("ggpo",)

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | str,
        sigma: float = 0.03,
        beta: float = 0.01,
        *,
        variant: str = "paper",
        seed: int | None = 0,
        nonfinite: str = "raise",
        **base_hp: Any,
    ) -> None:
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
        ):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
        own = dict(sigma=sigma, beta=beta, variant=variant, perturb=True, nonfinite=nonfinite)
        self._wrap(params, base_optimizer, own, base_hp)
        self.seed = seed
        self._grad_sq: dict[Tensor, Tensor] = {}  # per-row ||g_i||^2 of the last step
        self._generators: dict[str, torch.Generator] = {}
        self._warned = False

    def _check_hparams(self, group: dict[str, Any]) -> None:
        _check_adamw_keys(group)
        check_nonnegative("sigma", group["sigma"])
        check_nonnegative("beta", group["beta"])
        if group["variant"] not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {group['variant']!r}")
        check_bool("perturb", group["perturb"])

    def _perturbed_params(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.param_groups:
            if group.get("perturb", True):
                for p in group["params"]:
                    if p.ndim >= 2 and p.requires_grad:
                        yield group, p

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def row_scale(self, p: Tensor, group: dict[str, Any] | None = None) -> Tensor:
        """The per-row standard deviation ``s`` of the next perturbation of ``p`` (float64 for
        float64 parameters, float32 otherwise)."""
        if group is None:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        w = p.detach().reshape(p.shape[0], -1).to(dtype)
        w_sq = w.square().sum(1)
        g_sq = self._grad_sq.get(p)
        g_sq = torch.zeros_like(w_sq) if g_sq is None else g_sq.to(dtype)
        sigma, beta = group["sigma"], group["beta"]
        if group["variant"] == "paper":
            return (sigma**2 / w.shape[1] * w_sq + beta * g_sq).sqrt()
        return sigma * w_sq.sqrt() + beta * g_sq

    @torch.no_grad()
    def perturb(self) -> None:
        """Save the weights and add the perturbation (before the forward). Does nothing if they
        are perturbed already."""
        if self._backup:
            return
        for group, p in self._perturbed_params():
            scale = self.row_scale(p, group)
            z = torch.randn(
                p.shape, generator=self._generator(p.device), dtype=torch.float32, device=p.device
            )
            eps = z.to(scale.dtype).reshape(p.shape[0], -1) * scale[:, None]
            self._backup[p] = p.detach().clone(memory_format=torch.preserve_format)
            p.add_(eps.reshape(p.shape).to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved weights back (a copy: bit-exact). Does nothing if not perturbed."""
        for p, old in self._backup.items():
            p.copy_(old)
        self._backup.clear()

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """The clean weights inside (evaluation, checkpoints); the same perturbation again on
        exit if there was one."""
        saved = {p: p.detach().clone() for p in self._backup}
        backup = dict(self._backup)
        self.restore()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in saved.items():
                    p.copy_(v)
            self._backup.update(backup)

    @torch.no_grad()
    def _record_grad_norms(self) -> None:
        for _, p in self._perturbed_params():
            if p.grad is not None:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                self._grad_sq[p] = p.grad.reshape(p.shape[0], -1).to(dtype).square().sum(1)

    # ------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One GGPO step. With ``closure``: perturb, call it once, restore, step the base
        optimizer; returns the loss. Without: restore the weights (if :meth:`perturb` ran before
        the forward) and step the base optimizer with the gradients in ``p.grad``."""
        if closure is None:
            if not self._backup and not self._warned:
                self._warned = True
                warnings.warn(
                    "GGPO.step() without a closure, and perturb() was not called before the "
                    "forward: this step is the base optimizer's alone. Pass a closure, or call "
                    "opt.perturb() before each forward.",
                    stacklevel=3,
                )
            try:
                ok = self._check_grads()  # raises, or False for "skip"
            finally:  # the weights go back whatever happens (a raise included)
                self.restore()
        else:
            self.perturb()
            try:
                with torch.enable_grad():
                    loss = closure()
                ok = self._check_grads()
            finally:
                self.restore()
        if not ok:
            self.skipped_steps += 1
        else:
            with _scalar_lrs(self.param_groups):
                self.base_optimizer.step()
            self._record_grad_norms()
        return None if closure is None else loss

    # ------------------------------------------------------------ state

    def _extra_state(self, index: dict[int, int]) -> dict[str, Any]:
        """The last gradient norms and the generators' states."""
        return {
            "grad_sq": {index[id(p)]: v.clone() for p, v in self._grad_sq.items()},
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def _load_extra_state(self, own: dict[str, Any], params: list[Tensor]) -> None:
        self._grad_sq = {
            params[int(i)]: v.to(params[int(i)].device) for i, v in own.get("grad_sq", {}).items()
        }
        for key, st in own.get("generators", {}).items():
            generator = self._generator(torch.device(key))
            if generator is not None:
                generator.set_state(st)


def _check_adamw_keys(group: dict[str, Any]) -> None:
    """AdamW's hyperparameters where a group sets them (torch's own messages do not name
    ``lr``), so that ``add_param_group`` refuses them with basin's message."""
    if "lr" in group:
        check_lr(group["lr"])
    if "betas" in group:
        check_betas(group["betas"])
    for key in ("eps", "weight_decay"):
        if key in group:
            check_nonnegative(key, group[key])
    if "amsgrad" in group:
        check_bool("amsgrad", group["amsgrad"])


@contextlib.contextmanager
def _scalar_lrs(groups: list[dict[str, Any]]) -> Iterator[None]:
    """One-element tensor learning rates as Python numbers during the base step (torch's AdamW
    computes with a tensor lr in its dtype, float32, which would round a float64 run
    differently from the same lr as a float); the tensors, which schedulers update in place,
    are put back after."""
    saved = []
    for g in groups:
        lr = g.get("lr")
        if isinstance(lr, Tensor) and lr.numel() == 1 and not g.get("capturable", False):
            saved.append((g, lr))
            g["lr"] = scalar_lr(lr)
    try:
        yield
    finally:
        for g, lr in saved:
            g["lr"] = lr


class GGPOAdamW(GGPO):
    """``GGPO`` over ``torch.optim.AdamW`` (LoRA fine-tuning's optimizer, torch's defaults):
    what the registry builds for ``"ggpo"``. Same arguments as GGPO and AdamW."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        sigma: float = 0.03,
        beta: float = 0.01,
        variant: str = "paper",
        seed: int | None = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        _check_adamw_keys(
            {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad}
        )
        check_bool("maximize", maximize)
        check_foreach(foreach)
        super().__init__(
            params, torch.optim.AdamW, sigma, beta, variant=variant, seed=seed,
            nonfinite=nonfinite, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, foreach=foreach,
        )  # fmt: skip


def _lora_or_decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """:func:`basin.optim.weight_decay_groups` over the parameters that train (a LoRA model's
    frozen base weights are left out)."""
    groups = decay_groups(model)
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
    return [g for g in groups if g["params"]]


register(
    OptimInfo(
        name="ggpo",
        cls=GGPOAdamW,
        paper=Paper(
            "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided "
            "Perturbation Optimization",
            "Chang et al.",
            "2502.14538",
            2025,
        ),
        state_memory=3.0,
        capabilities=frozenset({"closure", "maximize", "param_groups", "wrapper"}),
        state_note="AdamW moments (2.0) + the weights saved during the step (1.0); 1 pass",
        family="adaptive",
        lr_scaling="sqrt",
        lr_from={"lr": ("ggpo", "adaptive")},
        search_space={
            "lr": LR_ADAPTIVE,
            "sigma": {"type": "float", "low": 3e-3, "high": 0.3, "log": True},
        },
        param_groups=_lora_or_decay_groups,
        needs_closure=True,
        # the harness skips a step whose gradient overflows (a diverging run ends as its loss
        # says, not with an exception), as for SAM
        defaults={"nonfinite": "skip"},
    )
)
