"""Transcription of SAF's and MESA's loss from the authors' code (github.com/AngusDujw/SAF,
``SAF_train.py`` lines 716-737 and ``MESA_train.py`` lines 716-731 / 751-752, with timm's
``ModelEmaV2`` from ``timm/utils/model_ema.py``), written literally with torch in place of
their numpy bank; nothing of basin is used. Du et al., "Sharpness-Aware Training for Free",
arXiv:2205.14083.

SAF, per batch ``(indices, input, target)`` of epoch ``epoch``::

    output = model(input)
    train_logits[indices, epoch % (minus_epoch + 1)] = output.detach()
    loss = loss_fn(output, target)
    if epoch > kl_start_epoch and epoch < kl_end_epoch:
        ref = train_logits[indices, (epoch - minus_epoch) % (minus_epoch + 1)]
        KL_loss = F.kl_div(F.softmax(output / T).log(), F.softmax(ref / T), reduction="none")
                  .sum(-1).mean() * T**2
        loss += KL_loss * reinforce

MESA: the same KL with ``ref = model_ema.module(input)`` (under no_grad, the EMA module in eval
mode), and ``model_ema.update(model)`` after ``optimizer.step()``.
"""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import nn


class SAFPaper:
    """``train_logits`` and the loss of ``SAF_train.py`` (their bank is numpy float32; this one
    has the dtype asked for, float64 in the tests)."""

    def __init__(self, n, classes, reinforce, temperature, kl_start_epoch, minus_epoch,
                 kl_end_epoch, dtype=torch.float64):  # fmt: skip
        self.train_logits = torch.zeros((n, minus_epoch + 1, classes), dtype=dtype)
        self.reinforce, self.temperature = reinforce, temperature
        self.kl_start_epoch, self.minus_epoch, self.kl_end_epoch = (
            kl_start_epoch,
            minus_epoch,
            kl_end_epoch,
        )

    def loss(self, output, target, indices, epoch, loss_fn=F.cross_entropy):
        """The batch's loss; ``self.kl`` is the KL term alone (None when inactive)."""
        self.train_logits[indices, epoch % (self.minus_epoch + 1)] = output.detach()
        loss = loss_fn(output, target)
        self.kl = None
        if epoch > self.kl_start_epoch and epoch < self.kl_end_epoch:
            gpu_train_logits = self.train_logits[
                indices, (epoch - self.minus_epoch) % (self.minus_epoch + 1)
            ]
            T = self.temperature
            KL_loss = F.kl_div(
                F.softmax(output / T, dim=1).log(),
                F.softmax(gpu_train_logits / T, dim=1),
                reduction="none",
            ).sum(-1).mean() * (T**2)
            self.kl = KL_loss
            loss += KL_loss * self.reinforce
        return loss


class ModelEmaV2Paper(nn.Module):
    """timm's ``ModelEmaV2``: every state-dict entry, in order, ``decay * e + (1 - decay) * m``."""

    def __init__(self, model, decay=0.9999):
        super().__init__()
        self.module = deepcopy(model)
        self.module.eval()
        self.decay = decay

    def update(self, model):
        with torch.no_grad():
            for ema_v, model_v in zip(
                self.module.state_dict().values(), model.state_dict().values()
            ):
                ema_v.copy_(self.decay * ema_v + (1.0 - self.decay) * model_v)


def mesa_paper_loss(output, target, ema_output, epoch, reinforce, temperature, kl_start_epoch,
                    kl_end_epoch, loss_fn=F.cross_entropy):  # fmt: skip
    """``MESA_train.py``'s loss with the EMA module's output ``ema_output`` on the same input."""
    loss = loss_fn(output, target)
    if epoch > kl_start_epoch and epoch < kl_end_epoch:
        T = temperature
        KL_loss = F.kl_div(
            F.softmax(output / T, dim=1).log(),
            F.softmax(ema_output / T, dim=1),
            reduction="none",
        ).sum(-1).mean() * (T**2)
        loss += KL_loss * reinforce
    return loss
