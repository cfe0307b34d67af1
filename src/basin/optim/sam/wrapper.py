"""SAM and ASAM: sharpness-aware minimization as a wrapper over any base optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._base import check_bool, check_nonnegative, check_positive, grad_of, use_foreach
from .._wrapper import WrapperOptimizer
from .passes import average_over_ranks, ddp_no_sync, finite, frozen_bn_stats
from .perturb import ascent_step

__all__ = ["SAM"]


class SAM(WrapperOptimizer):
    r"""SAM (Foret et al., 2020) and, with ``adaptive=True``, ASAM (Kwon et al., 2021): minimize
    the loss at the worst point of a neighbourhood, by a wrapper over any base optimizer.

    One step, two gradients (``g`` at ``w``, then ``g'`` at ``w + e``)::

        SAM:  e = rho g / ||g||                      (global 2-norm over perturbed params)
        ASAM: e = rho T^2 g / ||T g||,  T = |w| + eta for "weight" params, 1 for the others
        w_old = copy(w);  w <- w + e;  g' = grad L(w);  w <- w_old (a copy, bit-exact);
        base_optimizer.step() with g'

    ``step(closure)`` follows torch (``LBFGS``): the optimizer calls ``closure`` (which zeroes
    the gradients, computes the loss, calls ``backward`` and returns the loss) twice and returns
    the first loss. ``first_step()`` / ``second_step()`` are the same step in two phases, for
    loops that run the passes themselves (AMP, gradient clipping). ``step()`` without a closure
    runs the next phase (first, then second), so two ``backward(); step()`` per batch are one
    SAM step.

    By name (``create("sam", ...)``, ``basin bench -o sam``) the base is ``torch.optim.SGD``
    with momentum 0.9, as in the paper's experiments (:class:`SAMSGD`; ``"asam"``:
    :class:`ASAMSGD`, rho 0.5); the harness runs them with ``nonfinite="skip"``.

    The param groups are the base optimizer's (the same dicts): LR schedulers on the wrapper
    drive the base's learning rate, and ``add_param_group`` adds to both. Group keys ``rho``,
    ``adaptive``, ``eta`` and ``perturb`` (``False``: not perturbed, and left out of the norm)
    may differ per group.

    Args:
        params: parameters, named parameters (ASAM uses the names) or groups.
        base_optimizer: an optimizer class, or a registry name (``"torch:sgd"``, ``"adabelief"``).
        rho: neighbourhood radius, > 0 (default 0.05, the paper's; ASAM's authors use 0.5).
        adaptive: ASAM (default False).
        eta: ASAM's offset ``T = |w| + eta``, >= 0 (default 0.01).
        perturb_eps: added to the norm; None (default): the authors' (0 for SAM, 1e-16 for
            ASAM); a zero gradient gives no perturbation either way.
        sync_perturbation: average the first gradient over the default process group before
            perturbing (default False: each rank perturbs with its own, as the authors).
        model: the module the closure runs (optional): its BatchNorm statistics are kept from
            the first pass only (:func:`frozen_bn_stats`), and if it is ``DistributedDataParallel``
            the first pass of ``step(closure)`` runs under ``no_sync()`` (local gradients).
        nonfinite: ``"raise"`` (default) or ``"skip"`` for a NaN/inf gradient in either pass;
            the weights end where the step began either way (see ``second_step``).
        **base_hp: the base optimizer's hyperparameters (``lr``, ``momentum``, ...).

    AMP (``torch.amp.GradScaler``)::

        scaler.scale(loss_fn(model(x), y)).backward()
        if opt.first_step(zero_grad=True, scaler=scaler):        # unscales, checks, perturbs
            scaler.scale(loss_fn(model(x), y)).backward()
            opt.second_step(zero_grad=True, scaler=scaler, max_grad_norm=1.0)
        scaler.update()

    The first pass is unscaled on the wrapper and the second on the base optimizer (each
    once per ``update()``); a non-finite pass skips the whole step (weights restored, no base
    step) and ``update()`` lowers the scale.

    References:
        Pierre Foret, Ariel Kleiner, Hossein Mobahi, Behnam Neyshabur. "Sharpness-Aware
        Minimization for Efficiently Improving Generalization." arXiv:2010.01412, 2020
        (google-research/sam). Jungmin Kwon, Jeongseop Kim, Hyunseo Park, In Kwon Choi.
        "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural
        Networks." arXiv:2102.11600, 2021 (SamsungLabs/ASAM).

    Differences from the reference code:
        * The perturbation uses ``p.grad``: weight decay applied by the base optimizer (even
          torch SGD's coupled L2) is not in it. The authors put L2 in the loss, so their
          perturbation includes it: put it in the loss to follow them exactly.
        * ASAM scales parameters whose name contains ``"weight"`` (the authors' rule) when
          names are known (named parameters, or ``create("asam", model)``); without names every
          parameter is scaled.
        * Weights are restored by copy (ASAM's code subtracts ``e``, which is not bit-exact).
    """

    _algo = "SAM"
    _registry_names = ("sam", "asam")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | str,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.01,
        perturb_eps: float | None = None,
        sync_perturbation: bool = False,
        model: nn.Module | None = None,
        nonfinite: str = "raise",
        **base_hp: Any,
    ) -> None:
        check_bool("sync_perturbation", sync_perturbation)
        if perturb_eps is not None:
            check_nonnegative("perturb_eps", perturb_eps)
        own = dict(rho=rho, adaptive=adaptive, eta=eta, perturb=True, nonfinite=nonfinite)
        self._wrap(params, base_optimizer, own, base_hp)
        self.perturb_eps, self.sync_perturbation, self.model = perturb_eps, sync_perturbation, model
        self._skipped_first = False

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_positive("rho", group["rho"])
        check_bool("adaptive", group["adaptive"])
        check_nonnegative("eta", group["eta"])
        check_bool("perturb", group["perturb"])

    # ------------------------------------------------------------ the two phases

    def _perturbed_params(self) -> Iterator[tuple[dict[str, Any], Tensor, str | None]]:
        for group in self.param_groups:
            if not group.get("perturb", True):
                continue
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    yield group, p, names[i] if names else None

    def _grads_ok(self, scaler: Any) -> bool:
        if scaler is None:
            return self._check_grads()  # raises (naming the parameter) or False for "skip"
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return finite(grads)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: Any = None) -> bool:
        """Save the weights and move to ``w + e`` (gradients of the first pass). With a
        ``GradScaler``, the gradients are unscaled first (``scaler.unscale_(self)``). Returns
        False, changing nothing, when a gradient is not finite (the step is skipped)."""
        if self._backup:
            raise RuntimeError("SAM.first_step() called twice: call second_step() in between")
        if scaler is not None:
            scaler.unscale_(self)
        ok = self._grads_ok(scaler)
        self._skipped_first = not ok
        if not ok:
            self.skipped_steps += 1
        else:
            self._perturb()
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return ok

    def _perturb(self) -> None:
        items = list(self._perturbed_params())
        if not items:
            return
        if self.sync_perturbation:
            average_over_ranks([grad_of(p) for _, p, _ in items])
        adaptive = any(group.get("adaptive", False) for group, _, _ in items)
        eps = self.perturb_eps if self.perturb_eps is not None else (1e-16 if adaptive else 0.0)
        foreach = use_foreach(self.defaults.get("foreach"), [p for _, p, _ in items])
        for (_, p, _), e in zip(items, ascent_step(items, eps, foreach)):
            self._backup[p] = p.detach().clone(memory_format=torch.preserve_format)
            p.add_(e)

    @torch.no_grad()
    def second_step(
        self, zero_grad: bool = False, scaler: Any = None, max_grad_norm: float | None = None
    ) -> bool:
        """Restore the weights (copy) and step the base optimizer with the gradients at
        ``w + e``. With a ``GradScaler``: unscale on the base optimizer (unless done already),
        clip to ``max_grad_norm`` if given, ``scaler.step(base_optimizer)``. A non-finite
        gradient: weights restored, no base step; ``nonfinite="raise"`` then raises. Returns
        whether the base optimizer stepped."""
        if not self._backup:
            if self._skipped_first:  # the first pass was skipped: so is the whole step
                self._skipped_first = False
                if zero_grad:
                    self.zero_grad(set_to_none=True)
                return False
            raise RuntimeError("SAM.second_step() called before first_step()")
        if scaler is not None:
            try:
                scaler.unscale_(self.base_optimizer)
            except RuntimeError as err:  # the caller unscaled (to clip) already
                if "already been called" not in str(err):
                    raise
        try:
            ok = self._grads_ok(scaler)
        finally:  # the weights go back whatever happens (a raise included)
            for p, old in self._backup.items():
                p.copy_(old)
            self._backup.clear()
        if ok and max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.param_groups for p in g["params"]], max_grad_norm
            )
        if not ok:
            self.skipped_steps += 1
        elif scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return ok

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step with ``closure`` (called twice; returns its first loss); without a
        closure, the next phase (see the class docstring)."""
        if closure is None:
            if self._backup:
                self.second_step()
            else:
                self.first_step()
            return None
        with torch.enable_grad(), ddp_no_sync(self.model):
            loss = closure()
        if not self.first_step(zero_grad=True):
            return loss
        with torch.enable_grad(), frozen_bn_stats(self.model):
            closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------ state

    def _extra_state(self, index: dict[int, int]) -> dict[str, Any]:
        return {"skipped_first": self._skipped_first}

    def _load_extra_state(self, own: dict[str, Any], params: list[Tensor]) -> None:
        self._skipped_first = own.get("skipped_first", False)
