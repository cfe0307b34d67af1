"""DP-SGD through Opacus: any basin (or torch) optimizer made differentially private.

:func:`make_private` hands the model, the optimizer and the data loader to Opacus'
``PrivacyEngine``: per-sample gradients (Opacus' grad samplers), per-sample clipping to
``max_grad_norm``, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``
added to the sum and divided by the expected batch size, Poisson sampling of the batches, and
the privacy accountant (PRV by default). Given ``target_epsilon`` instead of a noise
multiplier, Opacus finds the smallest noise that keeps the run's epsilon at or below it.

References: Abadi et al., "Deep Learning with Differential Privacy", arXiv:1607.00133 (2016);
Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch",
arXiv:2109.12298 (2021).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from basin.optim._base import check_int

__all__ = ["PrivateTraining", "check_dp_model", "check_dp_optimizer", "make_private"]

ACCOUNTANTS = ("prv", "rdp", "gdp")


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise ImportError(
            "differentially private training needs Opacus: pip install basin-optim[dp]"
        ) from None
    return opacus


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns. Train with ``model``, ``optimizer`` and
    ``data_loader`` as usual (the loader yields Poisson-sampled batches of varying size);
    :meth:`epsilon` is the privacy spent so far at ``delta``.

    ``model`` is the module passed in (Opacus' hooks attached to it, not a wrapper);
    ``hooks.cleanup()`` removes them. ``noise_multiplier`` is the one in use (found by Opacus
    when ``target_epsilon`` was given); ``sample_rate`` the Poisson sampling probability of
    each example per step."""

    model: nn.Module
    optimizer: Any
    data_loader: Any
    engine: Any
    hooks: Any
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    accountant: str
    target_epsilon: float | None = None

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far (Opacus' accountant) at ``delta`` (default: the run's)."""
        d = self.delta if delta is None else _check_delta(delta)
        if self.steps == 0:
            return 0.0
        return float(self.engine.get_epsilon(d))

    @property
    def steps(self) -> int:
        """Noisy steps the accountant has counted."""
        return sum(int(n) for _, _, n in self.engine.accountant.history)


def _check_delta(delta: Any) -> float:
    if (
        isinstance(delta, bool)
        or not isinstance(delta, (int, float))
        or not (0.0 < float(delta) < 1.0)
    ):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_dp_model(model: nn.Module) -> None:
    """``ValueError`` naming every layer of ``model`` that Opacus cannot train privately
    (BatchNorm mixes examples of a batch; a fix replaces it with GroupNorm)."""
    _opacus()
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    bad = []
    for name, sub in trainable_modules(model):
        check = ModuleValidator.VALIDATORS.get(type(sub))
        if check is None:
            continue
        for err in check(sub):
            bad.append(f"{name or '<root>'} ({type(sub).__name__}): {err}")
    if bad:
        raise ValueError(
            "the model has layers that differentially private training cannot use: "
            + "; ".join(bad)
            + " -- opacus.validators.ModuleValidator.fix(model) replaces them "
            "(BatchNorm -> GroupNorm)"
        )


def check_dp_optimizer(optimizer: Any) -> None:
    """``ValueError`` for optimizers whose step evaluates the gradient more than once
    (SAM/ASAM, L-BFGS and every registry entry that ``needs_closure``): DP-SGD privatizes
    one gradient per step, so the extra gradients would leak unaccounted."""
    from basin.optim import infos

    classes: list[type] = [torch.optim.LBFGS]
    names: dict[type, str] = {torch.optim.LBFGS: "torch:lbfgs"}
    for entry in infos():
        if entry.needs_closure:
            classes.append(entry.cls)
            names[entry.cls] = entry.name
    for cls in classes:
        if isinstance(optimizer, cls):
            raise ValueError(
                f"optimizer {names[cls]} ({type(optimizer).__name__}) evaluates the gradient "
                "several times per step (it needs a closure); DP-SGD privatizes one gradient "
                "per step, so it cannot be made private -- use a single-gradient optimizer"
            )
    from basin.optim.sam.wrapper import SAM

    if isinstance(optimizer, SAM):
        raise ValueError(
            f"optimizer {type(optimizer).__name__} is a SAM wrapper (two gradients per step); "
            "DP-SGD privatizes one gradient per step -- use its base optimizer alone"
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    accountant: str = "prv",
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
    grad_sample_mode: str = "hooks",
) -> PrivateTraining:
    """DP-SGD (Abadi et al., arXiv:1607.00133) on ``model`` with ``optimizer``, through
    Opacus' ``PrivacyEngine``.

    Give exactly one of ``noise_multiplier`` (the noise standard deviation over
    ``max_grad_norm``) and ``target_epsilon`` (with the run's length, ``epochs`` or
    ``steps``: Opacus picks the noise so that epsilon at ``delta`` after that many steps is at
    most ``target_epsilon``). ``max_grad_norm``: the per-sample clipping norm (flat, over all
    parameters). ``accountant``: ``"prv"`` (default), ``"rdp"`` or ``"gdp"``.
    ``poisson_sampling``: the loader draws every example independently with probability
    ``1 / len(data_loader)`` per step (what the accountant assumes); seed it with the loader's
    ``generator``. ``noise_generator`` seeds the noise. The loss must be a mean over the batch.

    Any single-gradient optimizer works (basin's, torch's, their parameter groups, Muon's
    matrix/fallback split); :func:`check_dp_optimizer` refuses SAM-like ones. Layers Opacus
    cannot train privately (BatchNorm) raise ``ValueError`` naming them
    (:func:`check_dp_model`)."""
    _opacus()
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "give exactly one of noise_multiplier and target_epsilon, got "
            f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
        )
    delta = _check_delta(delta)
    max_grad_norm = _check_positive("max_grad_norm", max_grad_norm)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if grad_sample_mode not in ("hooks", "functorch"):
        raise ValueError(
            f"grad_sample_mode must be 'hooks' or 'functorch', got {grad_sample_mode!r}"
        )
    if target_epsilon is not None:
        target_epsilon = _check_positive("target_epsilon", target_epsilon)
        if (epochs is None) == (steps is None):
            raise ValueError(
                "target_epsilon needs the run's length: give exactly one of epochs, steps"
            )
        if epochs is not None:
            check_int("epochs", epochs, 1)
        else:
            check_int("steps", steps, 1)
    else:
        noise_multiplier = _check_positive("noise_multiplier", noise_multiplier)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(data_loader, torch.utils.data.DataLoader):
        raise ValueError(
            f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}"
        )
    if isinstance(data_loader.dataset, torch.utils.data.IterableDataset):
        raise ValueError("Poisson sampling needs a map-style dataset, not an IterableDataset")
    if len(data_loader) < 1:
        raise ValueError("data_loader is empty")
    check_dp_optimizer(optimizer)
    params = {id(p) for p in model.parameters()}
    if any(id(p) not in params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's")
    model.train()
    check_dp_model(model)
    sample_rate = 1.0 / len(data_loader)
    if target_epsilon is not None:
        n_steps = steps if steps is not None else int(cast(float, epochs) / sample_rate)
        try:
            noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=n_steps,
                    accountant=accountant,
                )
            )
        except ValueError as exc:  # Opacus: "The privacy budget is too low."
            raise ValueError(
                f"target_epsilon={target_epsilon:g} at delta={delta:g} over {n_steps} steps "
                f"cannot be reached: {exc}"
            ) from None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=accountant)
        try:
            hooks, dp_opt, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=data_loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=poisson_sampling,
                noise_generator=noise_generator,
                grad_sample_mode=grad_sample_mode,
                wrap_model=False,
            )
        except NotImplementedError as exc:  # a layer without a per-sample gradient rule
            raise ValueError(
                f"Opacus cannot compute per-sample gradients of this model: {exc}"
            ) from None
    return PrivateTraining(
        model=model,
        optimizer=dp_opt,
        data_loader=dp_loader,
        engine=engine,
        hooks=hooks,
        noise_multiplier=float(cast(float, noise_multiplier)),
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        delta=delta,
        accountant=accountant,
        target_epsilon=target_epsilon,
    )
