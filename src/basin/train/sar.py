"""SAR (Niu et al., ICLR 2023): sharpness-aware, reliable entropy minimization for test-time
adaptation, with model recovery."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from basin.optim import SAM
from basin.optim._base import check_range

__all__ = ["SAR", "authors_skip", "configure_norms", "norm_parameters", "softmax_entropy"]

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over dim 1, per sample."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def authors_skip(name: str) -> bool:
    """The authors' rule (``collect_params``): the top blocks are not adapted (``layer4`` of
    ResNets, ``blocks.9`` to ``blocks.11`` of ViT-Base) nor the final norm (``norm``,
    ``norm.*``)."""
    parts = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")
    return any(s in name for s in parts) or name == "norm"


def norm_parameters(
    model: nn.Module, skip: Callable[[str], bool] | None = authors_skip
) -> tuple[list[nn.Parameter], list[str]]:
    """The affine ``weight``/``bias`` of every BatchNorm, LayerNorm and GroupNorm of ``model``
    whose module name ``skip`` does not reject, and their names."""
    params, names = [], []
    for nm, m in model.named_modules():
        if skip is not None and skip(nm):
            continue
        if isinstance(m, NORMS):
            for pn, p in m.named_parameters(recurse=False):
                if pn in ("weight", "bias"):
                    params.append(p)
                    names.append(f"{nm}.{pn}")
    return params, names


def configure_norms(model: nn.Module) -> nn.Module:
    """The authors' ``configure_model``: train mode, every parameter frozen except the norms'
    affine ones, and BatchNorm normalising with the test batch's statistics (running statistics
    dropped)."""
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    return model


def _check(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False):
    """``value`` in ``[low, high)`` (``(low, high)`` with ``low_open``): basin's range check."""
    check_range(name, value, low, high, low_inclusive=not low_open, high_inclusive=False)


class SAR(nn.Module):
    r"""SAR: test-time adaptation of a classifier's normalization layers by sharpness-aware
    minimization of the entropy of reliable samples, with recovery when the model collapses.

    Per test batch ``x`` (``adapt(x)``, also ``forward(x)``), as the authors'
    ``forward_and_adapt_sar``::

        z = model(x);  E = entropy(softmax(z));  S1 = {i : E_i < margin}
        SAM first step with grad of mean_{S1} E             (w -> w + e)
        E' = entropy(softmax(model(x)))[S1];  S2 = {i in S1 : E'_i < margin}
        ema <- 0.9 ema + 0.1 mean_{S2} E'   (ema = that mean the first time; not when S2 = {})
        SAM second step with grad of mean_{S2} E'           (w restored, SGD momentum 0.9 step)
        ema < reset_constant  ->  model and optimizer back to their initial state, ema = None

    and returns ``z`` (the outputs before this batch's update). Only the affine parameters of
    the BatchNorm, LayerNorm and GroupNorm layers are adapted (``skip``: the authors' rule
    leaves out ``layer4``, ``blocks.9``-``blocks.11`` and the final ``norm``; pass ``None`` to
    adapt every norm layer, or any ``name -> bool``). BatchNorm normalises with the test batch's
    statistics (``configure=True``: :func:`configure_norms`, the authors' setup).

    SAR is test-time adaptation, not a training optimizer: it is not in the optimizer registry
    (``basin.optim.available()``); it uses :class:`basin.optim.SAM` over ``torch.optim.SGD``.

    Args:
        model: the classifier (outputs ``[N, C]`` logits); adapted in place.
        lr: SGD learning rate, > 0 (default 0.00025, the authors' ImageNet value at batch 64).
        rho: SAM radius, > 0 (default 0.05).
        momentum: SGD momentum in [0, 1) (default 0.9).
        margin: entropy margin E0; ``None``: ``0.4 ln C`` with C from the first batch's logits.
        reset_constant: the EMA threshold for recovery, > 0 (default 0.2).
        steps: adaptation steps per batch, >= 1 (default 1).
        episodic: reset before every batch (default False).
        skip: which norm modules are not adapted (see above).
        configure: apply :func:`configure_norms` (default True).
        skip_empty: when no sample passes the first filter, take no SAM step (default False:
            as the authors, a step with zero gradients, where SGD momentum still moves).

    References:
        Shuaicheng Niu, Jiaxiang Wu, Yifan Zhang, Zhiquan Wen, Yaofo Chen, Peilin Zhao, Mingkui
        Tan. "Towards Stable Test-Time Adaptation in Dynamic Wild World." arXiv:2302.12400,
        ICLR 2023 (mr-eggplant/SAR).

    Differences from the reference code:
        * The authors' reset threshold is hard-coded (``ema < 0.2``; their
          ``reset_constant_em`` argument is unused); here ``reset_constant`` (default 0.2) is
          the threshold.
        * Their SAM adds 1e-12 to the gradient norm; basin's SAM is given
          ``perturb_eps=1e-12`` to match it.
        * BatchNorm of any dimension is adapted (theirs: ``BatchNorm2d`` only).
        * ``margin=None`` reads C from the logits (theirs: ``0.4 ln 1000`` for ImageNet).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.00025,
        rho: float = 0.05,
        margin: float | None = None,
        reset_constant: float = 0.2,
        *,
        momentum: float = 0.9,
        steps: int = 1,
        episodic: bool = False,
        skip: Callable[[str], bool] | None = authors_skip,
        configure: bool = True,
        skip_empty: bool = False,
    ) -> None:
        super().__init__()
        _check("lr", lr, 0.0, low_open=True)
        _check("rho", rho, 0.0, low_open=True)
        _check("momentum", momentum, 0.0, 1.0)
        _check("reset_constant", reset_constant, 0.0, low_open=True)
        if margin is not None:
            _check("margin", margin, 0.0, low_open=True)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        for name, flag in (("episodic", episodic), ("configure", configure)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(skip_empty, bool):
            raise ValueError(f"skip_empty must be True or False, got {skip_empty!r}")
        if skip is not None and not callable(skip):
            raise ValueError(f"skip must be None or a callable name -> bool, got {skip!r}")
        self.model = configure_norms(model) if configure else model
        params, self.param_names = norm_parameters(self.model, skip)
        if not params:
            raise ValueError("SAR: the model has no norm-layer affine parameters to adapt")
        self.optimizer = SAM(
            params, torch.optim.SGD, rho=rho, perturb_eps=1e-12, lr=lr, momentum=momentum
        )
        self.margin, self.reset_constant = margin, float(reset_constant)
        self.steps, self.episodic, self.skip_empty = steps, episodic, skip_empty
        self.ema: float | None = None
        self.resets = 0
        self._model_state = copy.deepcopy(self.model.state_dict())
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Model and optimizer back to their state at construction; the EMA forgotten."""
        self.model.load_state_dict(self._model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))
        self.ema = None

    def forward(self, x: Tensor) -> Tensor:
        return self.adapt(x)

    def adapt(self, x: Tensor) -> Tensor:
        """Adapt on the batch ``x`` (``steps`` times) and return the model's outputs (of the
        last step, before its update)."""
        if self.episodic:
            self.reset()
        outputs = None
        for _ in range(self.steps):
            outputs, reset = self._forward_and_adapt(x)
            if reset:
                self.reset()
                self.resets += 1
        return outputs  # type: ignore[return-value]  # steps >= 1: set by the loop

    @torch.enable_grad()
    def _forward_and_adapt(self, x: Tensor) -> tuple[Tensor, bool]:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        outputs = self.model(x)
        margin = self.margin if self.margin is not None else 0.4 * math.log(outputs.shape[1])
        entropies = softmax_entropy(outputs)
        keep1 = torch.where(entropies < margin)
        if self.skip_empty and keep1[0].numel() == 0:
            return outputs.detach(), False
        entropies[keep1].mean(0).backward()
        _zero_missing_grads(opt)
        opt.first_step(zero_grad=True)
        entropies2 = softmax_entropy(self.model(x))[keep1]
        keep2 = torch.where(entropies2 < margin)
        loss2 = entropies2[keep2].mean(0)
        value = loss2.item()
        if not math.isnan(value):
            self.ema = value if self.ema is None else 0.9 * self.ema + (1 - 0.9) * value
        loss2.backward()
        _zero_missing_grads(opt)
        opt.second_step(zero_grad=True)
        reset = self.ema is not None and self.ema < self.reset_constant
        return outputs.detach(), reset


def _zero_missing_grads(opt: SAM) -> None:
    """A mean over no sample: zero gradients, as backward through an empty selection gives in
    the authors' code (parameters the loss does not reach get them too, so that SGD's momentum
    acts on every adapted parameter alike)."""
    for g in opt.param_groups:
        for p in g["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
