"""float64 transcription of SAR's ``forward_and_adapt_sar`` (Niu et al., arXiv:2302.12400;
mr-eggplant/SAR, ``sar.py`` and ``sam.py``), written from reading the authors' code, nothing of
basin used:

    outputs = model(x);  E = entropy(outputs);  ids1 = where(E < margin)
    mean(E[ids1]).backward();  SAM first step: e = rho g / (||g|| + 1e-12), w <- w + e
    E2 = entropy(model(x))[ids1];  ids2 = where(E2 < margin);  loss2 = mean(E2[ids2])
    if loss2 is not NaN: ema = loss2 if ema is None else 0.9 ema + 0.1 loss2
    loss2.backward();  SAM second step: w <- w_old;  SGD: buf = g (first) / 0.9 buf + g; w -= lr buf
    reset when ema < reset_constant (0.2): model and optimizer to their initial state, ema None

The adapted parameters and the model's configuration (``collect_params`` / ``configure_model``)
are the authors': norm layers' weight and bias, top blocks skipped by name, BatchNorm with batch
statistics. SGD and SAM are written out by hand.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def configure_model(model):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.requires_grad_(True)
    return model


def collect_params(model):
    params = []
    for nm, m in model.named_modules():
        if "layer4" in nm or "blocks.9" in nm or "blocks.10" in nm or "blocks.11" in nm:
            continue
        if "norm." in nm or nm == "norm":
            continue
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            for pn, p in m.named_parameters():
                if pn in ("weight", "bias"):
                    params.append(p)
    return params


IMAGENET_MARGIN = 0.4 * math.log(1000)


class SARPaper:
    def __init__(self, model, lr, rho=0.05, margin=IMAGENET_MARGIN, reset_constant=0.2):
        self.model = configure_model(model)
        self.params = collect_params(self.model)
        self.lr, self.rho, self.margin, self.reset_constant = lr, rho, margin, reset_constant
        self.bufs = [None] * len(self.params)
        self.ema = None
        self.resets = 0
        self.saved_model = copy.deepcopy(self.model.state_dict())

    def reset(self):
        self.model.load_state_dict(self.saved_model)
        self.bufs = [None] * len(self.params)
        self.ema = None

    def grads(self):
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def forward(self, x):
        self.zero_grad()
        with torch.enable_grad():
            outputs = self.model(x)
            e = entropy(outputs)
            ids1 = torch.where(e < self.margin)
            e[ids1].mean(0).backward()
        g = self.grads()
        self.zero_grad()
        norm = math.sqrt(sum(float((gi * gi).sum()) for gi in g))
        old = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, gi in zip(self.params, g):
                p.add_(gi * (self.rho / (norm + 1e-12)))
        with torch.enable_grad():
            e2 = entropy(self.model(x))[ids1]
            ids2 = torch.where(e2 < self.margin)
            loss2 = e2[ids2].mean(0)
            value = loss2.item()
            if not math.isnan(value):
                self.ema = value if self.ema is None else 0.9 * self.ema + (1 - 0.9) * value
            loss2.backward()
        g2 = self.grads()
        self.zero_grad()
        with torch.no_grad():
            for i, (p, w, gi) in enumerate(zip(self.params, old, g2)):
                p.copy_(w)
                self.bufs[i] = gi.clone() if self.bufs[i] is None else 0.9 * self.bufs[i] + gi
                p.sub_(self.lr * self.bufs[i])
        if self.ema is not None and self.ema < self.reset_constant:
            self.reset()
            self.resets += 1
        return outputs.detach()
