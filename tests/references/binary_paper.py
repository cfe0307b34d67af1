"""Elementwise float64 transcriptions of the binary-network estimators in the authors' code;
nothing of basin is used.

ReSTE (github.com/DravenALG/ReSTE, ``model/binary_module/binarized_modules.py``,
``Binary_ReSTE.backward`` with ``interval = 0.1`` and ``t = 1.5``; ``main.py``'s ``ReSTE(epoch)``
for the schedule of ``o``; arXiv:2308.06689). The authors assign by masks, in this order::

    slope = 0
    interval < x <= t:        slope = (1/o) * x ** ((1 - o) / o)
    -t <= x < -interval:      slope = (1/o) * (-x) ** ((1 - o) / o)
    0 <= x <= interval:       slope = interval ** (1/o) / interval
    -interval <= x <= 0:      slope = -(-(interval ** (1/o))) / interval
    o(epoch) = 1 + (o_end - 1) * (1 - cos(epoch / epochs * pi / 2))

Their layer scales the binarized weight by ``mean(|W|)`` (not detached).

BiPer (github.com/edmav4/BiPer, ``cifar10/modules/binarized_modules.py``; arXiv:2404.01278):
``BinaryQuantize`` is sign forward / identity backward; ``BinaryQuantize_a`` is sign forward with
backward ``clamp(2 - |2 a|, min=0)``; the layer computes, in training mode,
``a0 = a / sqrt(var(a, dims 1..) + 1e-5)``, ``bw = sin(freq w)`` (stage 1) or
``BinaryQuantize(sin(freq w))`` (stage 2), ``out = conv(BinaryQuantize_a(a0), bw) * alpha``.
"""

from __future__ import annotations

import math


def reste_slope(x: float, o: float, t: float = 1.5, interval: float = 0.1) -> float:
    slope = 0.0
    if interval < x <= t:
        slope = (1.0 / o) * x ** ((1.0 - o) / o)
    if -t <= x < -interval:
        slope = (1.0 / o) * (-x) ** ((1.0 - o) / o)
    if 0.0 <= x <= interval:
        slope = math.pow(interval, 1.0 / o) / interval
    if -interval <= x <= 0.0:
        approx = -math.pow(interval, 1.0 / o)  # their approximate_function(-interval, o)
        slope = -approx / interval
    return slope


def reste_o(epoch: int, epochs: int, o_end: float = 3.0) -> float:
    beta = 1.0 - math.cos(epoch / epochs * math.pi * 0.5)
    return 1.0 + beta * (o_end - 1.0)


def biper_activation_slope(a: float) -> float:
    return max(2.0 - abs(2.0 * a), 0.0)


def biper_weight_slope(w: float, freq: float) -> float:
    """d/dw of the stage-2 weight under the identity STE through sign: that of sin(freq w)."""
    return freq * math.cos(freq * w)
