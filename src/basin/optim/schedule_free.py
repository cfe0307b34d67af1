"""Schedule-Free AdamW and SGD: no learning-rate schedule, an online average of the iterates
instead (one method, two base steps: the mode switches and the averaging weights are shared)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_int,
    check_lr,
    check_nonnegative,
    check_range,
    get_value,
    group_by_device_and_dtype,
    is_compiling,
    scalar_lr,
    use_foreach,
)
from .param_groups import decay_groups
from .registry import (
    BETA1,
    BETA2,
    LR_ADAPTIVE,
    LR_SGD,
    MOMENTUM,
    WEIGHT_DECAY,
    OptimInfo,
    Paper,
    register,
)

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeSGD", "schedule_free_adamw", "schedule_free_sgd"]


class _ScheduleFree(BasinOptimizer):
    """The train/eval switches shared by the Schedule-Free optimizers: the parameters hold y
    in train mode and x = lerp(y, z, 1 - 1/b1) in eval mode, ``b1`` from :meth:`_interp`."""

    @staticmethod
    def _interp(group: dict[str, Any]) -> float:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; a new group joins in the optimizer's current mode."""
        mode = self.param_groups[0]["train_mode"] if self.param_groups else True
        param_group.setdefault("train_mode", mode)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("train_mode", True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, except that ``lr_max`` and ``weight_sum`` stay float64
        CPU scalars, as the steps keep them (torch casts state to each parameter's dtype and
        device: float32 would round the averaging weights, a GPU copy would sync per read)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key in ("lr_max", "weight_sum"):
                value = saved.get(i, {}).get(key)
                if isinstance(value, Tensor):
                    self.state[p][key] = value.detach().to("cpu", torch.float64, copy=True)

    @property
    def training(self) -> bool:
        """True in train mode (the parameters hold y), False in eval mode (they hold x)."""
        return all(g["train_mode"] for g in self.param_groups)

    @torch.no_grad()
    def eval(self) -> _ScheduleFree:
        """Put the averaged point x into the parameters (for evaluation, diagnostics,
        checkpoints); a no-op in eval mode. Returns the optimizer."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta1 = self._interp(group)
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        p.lerp_(z.to(p.device), 1 - 1 / beta1)
                group["train_mode"] = False
        return self

    @torch.no_grad()
    def train(self, mode: bool = True) -> _ScheduleFree:
        """Put the gradient point y back into the parameters (``train(False)`` is
        :meth:`eval`); a no-op in train mode. Returns the optimizer."""
        if not mode:
            return self.eval()
        for group in self.param_groups:
            if not group["train_mode"]:
                beta1 = self._interp(group)
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        p.lerp_(z.to(p.device), 1 - beta1)
                group["train_mode"] = True
        return self

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Schedule-Free step (see the class docstring); ``RuntimeError`` in eval mode."""
        if not self.training:
            raise RuntimeError(
                f"{type(self).__name__}.step() was called in eval mode: the parameters hold the "
                "averaged point x, not the point y where gradients are taken. Call "
                "optimizer.train() before training and optimizer.eval() before evaluating or "
                "saving the model."
            )
        return super().step(closure)

    def _averaging_state(self, params: list[Tensor]) -> tuple[list, list, list]:
        """z (the base sequence, y at the first step), the running maximum of the learning rate
        and the sum of the averaging weights of each parameter, created on first use."""
        zs, lr_maxs, weight_sums = [], [], []
        for p in params:
            state = self.state[p]
            if "z" not in state:
                state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                state["lr_max"] = torch.tensor(0.0, dtype=torch.float64)
                state["weight_sum"] = torch.tensor(0.0, dtype=torch.float64)
            zs.append(state["z"])
            lr_maxs.append(state["lr_max"])
            weight_sums.append(state["weight_sum"])
        return zs, lr_maxs, weight_sums


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-Free AdamW (Defazio et al., 2024): three sequences instead of a schedule. The
    base sequence ``z`` takes Adam-normalised steps, ``x`` is a weighted average of the ``z``
    iterates (the point to evaluate), and the gradient is taken at their interpolation ``y``::

        lr_t   = lr * min(1, t / warmup_steps)                 (lr when warmup_steps = 0)
        w_t    = t**r * max_{s<=t}(lr_s)**weight_lr_power;   c_t = w_t / sum_{s<=t} w_s
        v      = b2 v + (1-b2) g^2                              (g taken at y)
        u      = g / (sqrt(v / (1-b2^t)) + eps) + wd * y
        z     <- z - lr_t u
        x     <- (1 - c_t) x + c_t z
        y      = b1 x + (1 - b1) z

    **The parameters hold y while training and x while evaluating**: call
    ``optimizer.eval()`` before evaluating, measuring or saving the model, and
    ``optimizer.train()`` before training again (``step()`` in eval mode raises
    ``RuntimeError``). x is not stored: as in the authors' ``AdamWScheduleFree``, the state is
    ``z`` and ``v`` (the memory of AdamW), y is updated in place
    (``y <- lerp(y, z, c_t) + lr_t (b1 (1 - c_t) - 1) u``, then the z step) and the switches
    are ``x = lerp(y, z, 1 - 1/b1)`` and ``y = lerp(x, z, 1 - b1)``. BatchNorm running
    statistics are those of y: recompute them at x before evaluating, as the authors advise.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 0.0025).
        betas: interpolation ``b1`` between x and z, in (0, 1), and the second-moment
            coefficient ``b2`` in [0, 1) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decay coefficient, taken at y and applied through the z step (default 0).
        warmup_steps: linear learning-rate warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the largest learning rate so far in the averaging weights
            (default 2).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        nonfinite: ``"raise"`` (default) or ``"skip"``: a NaN/inf gradient raises
            ``ValueError`` naming the parameter, or skips the step; either way nothing is
            changed (eager steps; see :class:`basin.optim._base.BasinOptimizer`).

    References:
        Aaron Defazio, Xingyu Alice Yang, Harsh Mehta, Konstantin Mishchenko, Ahmed Khaled,
        Ashok Cutkosky. "The Road Less Scheduled." NeurIPS 2024, arXiv:2405.15682. Reference
        code: schedulefree 1.4.1 (facebookresearch/schedule_free), ``AdamWScheduleFree`` and
        ``AdamWScheduleFreeReference``.

    Differences from the reference code:
        * A new optimizer starts in train mode (the reference starts in eval mode and raises at
          the first ``step()`` unless ``train()`` was called); before the first step the two
          modes hold the same point, so this only removes the need for the first ``train()``.
        * The step counter, the running maximum of the learning rate and the sum of the
          averaging weights are kept per parameter (float64 tensors, so that the compiled step
          does not recompile as they change), not per group: they differ from the reference
          only for a parameter that had no gradient at some steps, which basin averages over
          its own steps.
        * ``p.grad`` is not overwritten (the reference divides it in place); ``maximize``.
        * ``betas[0]`` must be in (0, 1): x is recovered from y and z by dividing by it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(
                f"betas must be a pair (beta1 in (0, 1), beta2 in [0, 1)), got {betas!r}"
            )
        check_range("betas[0]", betas[0], 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_inclusive=False)
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_int("warmup_steps", group["warmup_steps"], 0)
        check_nonnegative("r", group["r"])
        check_nonnegative("weight_lr_power", group["weight_lr_power"])

    @staticmethod
    def _interp(group: dict[str, Any]) -> float:
        return group["betas"][0]

    # ------------------------------------------------------------ step

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, steps, (vs,) = self._gather(group, ("exp_avg_sq",))
        zs, lr_maxs, weight_sums = self._averaging_state(params)
        if params:
            schedule_free_adamw(
                params, grads, zs, vs, steps, lr_maxs, weight_sums, **self._hyperparameters(group)
            )


def _coefficients(
    step: Any, lr_max: Tensor, weight_sum: Tensor, *, lr, warmup_steps, r, weight_lr_power
) -> tuple[Any, Any]:
    """The scheduled learning rate and the averaging weight ``c_t`` of one parameter at step
    ``step`` (already advanced), updating its ``lr_max`` and ``weight_sum``: Python numbers
    eagerly (the reference's float64 arithmetic), 0-d tensors under ``torch.compile``."""
    if isinstance(step, Tensor):
        lr_t = lr * torch.clamp(step / warmup_steps, max=1.0) if warmup_steps else lr
        # one-element foreach updates: torch 2.13's Inductor drops a plain in-place update
        # (add_, copy_) of a 0-d CPU tensor input (measured), a foreach one it keeps
        torch._foreach_maximum_([lr_max], [torch.as_tensor(lr_t, dtype=torch.float64)])
        weight = step**r * lr_max**weight_lr_power
        torch._foreach_add_([weight_sum], [weight])
        ckp1 = torch.where(weight_sum > 0, weight / weight_sum, 0.0)
        return lr_t, ckp1
    lr_t = lr * (min(step / warmup_steps, 1.0) if warmup_steps else 1.0)
    top = max(lr_t, lr_max.item())
    lr_max.fill_(top)
    weight = step**r * top**weight_lr_power
    total = weight_sum.item() + weight
    weight_sum.fill_(total)
    return lr_t, (weight / total if total else 0.0)


def _shared_coefficients(
    steps: list[Tensor], lr_maxs: list[Tensor], weight_sums: list[Tensor], **hp: Any
) -> tuple[float, float, float] | None:
    """Eagerly, when every tensor's (step, lr_max, weight_sum) are equal (all had gradients at
    the same steps: the common case), the step (already advanced), ``lr_t`` and ``c_t`` computed
    once by :func:`_coefficients` on the first tensor, whose updated ``lr_max`` / ``weight_sum``
    the others then copy (one foreach call each). None under
    ``torch.compile`` or when they differ or are not float64 CPU scalars (then per tensor)."""
    if is_compiling() or not steps:
        return None
    step, top, total = steps[0].item(), lr_maxs[0].item(), weight_sums[0].item()
    for t, m, s in zip(steps, lr_maxs, weight_sums):
        if m.dtype != torch.float64 or s.dtype != torch.float64 or not (m.is_cpu and s.is_cpu):
            return None
        if t.item() != step or m.item() != top or s.item() != total:
            return None
    lr_t, ckp1 = _coefficients(step, lr_maxs[0], weight_sums[0], **hp)  # updates the first
    rest = len(lr_maxs) - 1  # the others hold the same numbers: copies of the first's
    if rest:
        torch._foreach_copy_(lr_maxs[1:], [lr_maxs[0]] * rest)
        torch._foreach_copy_(weight_sums[1:], [weight_sums[0]] * rest)
    return step, lr_t, ckp1


def schedule_free_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr_maxs: list[Tensor],
    weight_sums: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional Schedule-Free AdamW on y (the parameters, in train mode); see
    :class:`ScheduleFreeAdamW`."""
    lr = scalar_lr(lr)
    multi = use_foreach(foreach, params) and not is_compiling()  # compiled: Inductor fuses
    fn = _multi_tensor_schedule_free_adamw if multi else _single_tensor_schedule_free_adamw
    fn(
        params, grads, zs, exp_avg_sqs, state_steps, lr_maxs, weight_sums, lr=lr, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
        weight_lr_power=weight_lr_power, maximize=maximize,
    )  # fmt: skip


def _single_tensor_schedule_free_adamw(
    params, grads, zs, exp_avg_sqs, state_steps, lr_maxs, weight_sums, *, lr, beta1, beta2, eps,
    weight_decay, warmup_steps, r, weight_lr_power, maximize,
):  # fmt: skip
    torch._foreach_add_(state_steps, 1.0)  # a float: an int scalar takes a slow path on CPU
    hp = dict(lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
    shared = _shared_coefficients(state_steps, lr_maxs, weight_sums, **hp)
    for i, y in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        z, v = zs[i], exp_avg_sqs[i]
        if shared is not None:
            step, lr_t, ckp1 = shared
        else:
            step = get_value(state_steps[i])
            lr_t, ckp1 = _coefficients(step, lr_maxs[i], weight_sums[i], **hp)

        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(1 - beta2**step).sqrt_().add_(eps)
        u = g.div(denom)
        if weight_decay != 0:
            u.add_(y, alpha=weight_decay)  # decay taken at y

        if isinstance(ckp1, Tensor):  # compiled: coefficients are 0-d tensors
            y.lerp_(z, ckp1.to(y.dtype))
            y.add_(u * (lr_t * (beta1 * (1 - ckp1) - 1)).to(y.dtype))
            z.sub_(u * (lr_t.to(z.dtype) if isinstance(lr_t, Tensor) else lr_t))
        else:
            y.lerp_(z, ckp1)  # x step and the move of y, without x itself
            y.add_(u, alpha=lr_t * (beta1 * (1 - ckp1) - 1))
            z.sub_(u, alpha=lr_t)


def _multi_tensor_schedule_free_adamw(
    params, grads, zs, exp_avg_sqs, state_steps, lr_maxs, weight_sums, *, lr, beta1, beta2, eps,
    weight_decay, warmup_steps, r, weight_lr_power, maximize,
):  # fmt: skip
    lists = [params, grads, zs, exp_avg_sqs, state_steps, lr_maxs, weight_sums]
    for ys, gs, zs_, vs, steps, maxs, sums in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1.0)
        hp = dict(lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
        shared = _shared_coefficients(steps, maxs, sums, **hp)
        if shared is not None:
            step, lr_t, ckp1 = shared
            bias = 1 - beta2**step
            coefs = (lr_t, ckp1)
        else:
            step_values = [get_value(t) for t in steps]
            bias = [1 - beta2**t for t in step_values]
            coefs = [_coefficients(t, m, s, **hp) for t, m, s in zip(step_values, maxs, sums)]
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        denom = torch._foreach_div(vs, bias)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        us = torch._foreach_div(gs, denom)
        if weight_decay != 0:
            torch._foreach_add_(us, ys, alpha=weight_decay)
        _foreach_average_and_step(ys, zs_, us, coefs, beta1)


def _foreach_average_and_step(
    ys: list[Tensor],
    zs: list[Tensor],
    us: list[Tensor],
    coefs: list[tuple[Any, Any]] | tuple[float, float],
    beta: float,
) -> None:
    """The update both Schedule-Free methods share, given each tensor's direction ``u`` and
    ``(lr_t, c_t)`` (a list, one per tensor, or one pair for all):
    ``y <- (1 - c) y + c z + lr (beta (1 - c) - 1) u``, ``z <- z - lr u``."""
    if isinstance(coefs, tuple):  # one pair: scalar foreach calls, no temporaries
        lr_t, c = coefs
        torch._foreach_lerp_(ys, zs, c)
        torch._foreach_add_(ys, us, alpha=lr_t * (beta * (1 - c) - 1))
        torch._foreach_add_(zs, us, alpha=-lr_t)
        return
    torch._foreach_lerp_(ys, zs, [c for _, c in coefs])
    y_coefs = [lt * (beta * (1 - c) - 1) for lt, c in coefs]
    torch._foreach_add_(ys, torch._foreach_mul(us, y_coefs))
    torch._foreach_add_(zs, torch._foreach_mul(us, [-lt for lt, _ in coefs]))


register(
    OptimInfo(
        name="schedulefree_adamw",
        cls=ScheduleFreeAdamW,
        paper=Paper("The Road Less Scheduled", "Defazio et al.", "2405.15682", 2024),
        state_memory=2.0,
        state_note="z and v; x is recovered from y and z (optimizer.eval())",
        capabilities=frozenset(
            {"foreach", "compile", "maximize", "param_groups", "closure", "train_eval"}
        ),
        search_space={
            "lr": LR_ADAPTIVE,
            "betas[0]": BETA1,
            "betas[1]": BETA2,
            "weight_decay": WEIGHT_DECAY,
            "warmup_steps": {"type": "int", "low": 0, "high": 200},
        },
        param_groups=decay_groups,
    )
)


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-Free SGD (Defazio et al., 2024): the three sequences of
    :class:`ScheduleFreeAdamW` with a plain gradient step for ``z``::

        lr_t, c_t as in ScheduleFreeAdamW (warmup, averaging weights t**r * max lr**power)
        u      = g + wd * y                                     (g taken at y)
        z     <- z - lr_t u
        x     <- (1 - c_t) x + c_t z
        y      = m x + (1 - m) z

    The parameters hold y while training and x after ``optimizer.eval()`` (call
    ``optimizer.train()`` before training again; ``step()`` in eval mode raises
    ``RuntimeError``). The state is ``z`` alone (the memory of SGD with momentum): y moves in
    place by ``y <- lerp(y, z, c_t) + lr_t (m (1 - c_t) - 1) u``, as in the authors'
    ``SGDScheduleFree``.

    Args:
        params: iterable of parameters or parameter groups.
        lr: learning rate (default 1.0, the authors'; Schedule-Free SGD takes larger learning
            rates than SGD with a schedule).
        momentum: interpolation ``m`` between x and z, in (0, 1) (default 0.9).
        weight_decay: L2 coefficient, taken at y (default 0).
        warmup_steps: linear learning-rate warmup length in steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: power of the largest learning rate so far in the averaging weights
            (default 2).
        maximize: maximize the objective (default False).
        foreach: None picks per device (multi-tensor on accelerators, loop on CPU).
        nonfinite: ``"raise"`` (default) or ``"skip"`` a step with a NaN/inf gradient.

    References:
        Aaron Defazio, Xingyu Alice Yang, Harsh Mehta, Konstantin Mishchenko, Ahmed Khaled,
        Ashok Cutkosky. "The Road Less Scheduled." NeurIPS 2024, arXiv:2405.15682. Reference
        code: schedulefree 1.4.1, ``SGDScheduleFree`` and ``SGDScheduleFreeReference``.

    Differences from the reference code: those of :class:`ScheduleFreeAdamW` (starts in train
    mode; per-parameter step counts and averaging weights; ``p.grad`` is left unchanged by
    weight decay; ``maximize``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        nonfinite: str = "raise",
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            maximize=maximize,
            foreach=foreach,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range(
            "momentum", group["momentum"], 0.0, 1.0, low_inclusive=False, high_inclusive=False
        )
        check_nonnegative("weight_decay", group["weight_decay"])
        check_int("warmup_steps", group["warmup_steps"], 0)
        check_nonnegative("r", group["r"])
        check_nonnegative("weight_lr_power", group["weight_lr_power"])

    @staticmethod
    def _interp(group: dict[str, Any]) -> float:
        return group["momentum"]

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, steps, _ = self._gather(group)
        zs, lr_maxs, weight_sums = self._averaging_state(params)
        if params:
            schedule_free_sgd(
                params, grads, zs, steps, lr_maxs, weight_sums, **self._hyperparameters(group)
            )


def schedule_free_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    state_steps: list[Tensor],
    lr_maxs: list[Tensor],
    weight_sums: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    warmup_steps: int,
    r: float,
    weight_lr_power: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional Schedule-Free SGD on y (the parameters, in train mode); see
    :class:`ScheduleFreeSGD`."""
    lr = scalar_lr(lr)
    multi = use_foreach(foreach, params) and not is_compiling()
    fn = _multi_tensor_schedule_free_sgd if multi else _single_tensor_schedule_free_sgd
    fn(
        params, grads, zs, state_steps, lr_maxs, weight_sums, lr=lr, momentum=momentum,
        weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
        weight_lr_power=weight_lr_power, maximize=maximize,
    )  # fmt: skip


def _single_tensor_schedule_free_sgd(
    params, grads, zs, state_steps, lr_maxs, weight_sums, *, lr, momentum, weight_decay,
    warmup_steps, r, weight_lr_power, maximize,
):  # fmt: skip
    torch._foreach_add_(state_steps, 1.0)  # a float: an int scalar takes a slow path on CPU
    hp = dict(lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
    shared = _shared_coefficients(state_steps, lr_maxs, weight_sums, **hp)
    for i, y in enumerate(params):
        g = -grads[i] if maximize else grads[i]
        z = zs[i]
        if shared is not None:
            _, lr_t, ckp1 = shared
        else:
            lr_t, ckp1 = _coefficients(get_value(state_steps[i]), lr_maxs[i], weight_sums[i], **hp)
        u = g.add(y, alpha=weight_decay) if weight_decay != 0 else g
        if isinstance(ckp1, Tensor):  # compiled: coefficients are 0-d tensors
            y.lerp_(z, ckp1.to(y.dtype))
            y.add_(u * (lr_t * (momentum * (1 - ckp1) - 1)).to(y.dtype))
            z.sub_(u * (lr_t.to(z.dtype) if isinstance(lr_t, Tensor) else lr_t))
        else:
            y.lerp_(z, ckp1)
            y.add_(u, alpha=lr_t * (momentum * (1 - ckp1) - 1))
            z.sub_(u, alpha=lr_t)


def _multi_tensor_schedule_free_sgd(
    params, grads, zs, state_steps, lr_maxs, weight_sums, *, lr, momentum, weight_decay,
    warmup_steps, r, weight_lr_power, maximize,
):  # fmt: skip
    lists = [params, grads, zs, state_steps, lr_maxs, weight_sums]
    for ys, gs, zs_, steps, maxs, sums in group_by_device_and_dtype(lists).values():
        gs = torch._foreach_neg(gs) if maximize else gs
        torch._foreach_add_(steps, 1.0)
        hp = dict(lr=lr, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power)
        shared = _shared_coefficients(steps, maxs, sums, **hp)
        coefs = (
            shared[1:]
            if shared is not None
            else [_coefficients(get_value(t), m, s, **hp) for t, m, s in zip(steps, maxs, sums)]
        )
        us = torch._foreach_add(gs, ys, alpha=weight_decay) if weight_decay != 0 else gs
        _foreach_average_and_step(ys, zs_, us, coefs, momentum)


register(
    OptimInfo(
        name="schedulefree_sgd",
        cls=ScheduleFreeSGD,
        paper=Paper("The Road Less Scheduled", "Defazio et al.", "2405.15682", 2024),
        state_memory=1.0,
        state_note="z; x is recovered from y and z (optimizer.eval())",
        capabilities=frozenset(
            {"foreach", "compile", "maximize", "param_groups", "closure", "train_eval"}
        ),
        family="sgd",
        lr_scaling="linear",
        lr_from={"lr": ("schedulefree_sgd", "sgd")},
        search_space={
            "lr": LR_SGD,
            "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY,
            "warmup_steps": {"type": "int", "low": 0, "high": 200},
        },
        param_groups=decay_groups,
    )
)
