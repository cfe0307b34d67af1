"""Optimizers that train at one point and evaluate at another (Schedule-Free: the parameters
hold y while training, the average x after ``optimizer.eval()``).

The harness evaluates, measures sharpness and runs the final diagnostics at the evaluation
point, and trains at the training point. Which optimizers need this is read from the registry
(the ``train_eval`` capability) or, for third-party optimizers (schedulefree's,
pytorch_optimizer's schedule-free ones), from their having callable ``train()`` and
``eval()``; no optimizer is named here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["at_eval_point", "has_eval_point", "to_eval_point", "to_train_point"]

CAPABILITY = "train_eval"


def has_eval_point(opt: Any, name: str | None = None) -> bool:
    """True when ``opt`` (built from the registry name ``name``, if given) switches its
    parameters with ``opt.train()`` / ``opt.eval()``."""
    if name is not None:
        from basin.optim import info

        if CAPABILITY in info(name).capabilities:
            return True
    return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))


def to_train_point(opt: Any, name: str | None = None) -> None:
    """``opt.train()`` for such optimizers (some start in eval mode), else nothing."""
    if has_eval_point(opt, name):
        opt.train()


def to_eval_point(opt: Any, name: str | None = None) -> None:
    """``opt.eval()`` for such optimizers (the parameters then hold the evaluation point)."""
    if has_eval_point(opt, name):
        opt.eval()


@contextlib.contextmanager
def at_eval_point(opt: Any, name: str | None = None) -> Iterator[None]:
    """The parameters at the evaluation point inside the block, back at the training point
    after it (also when the block raises or breaks out of a loop)."""
    if not has_eval_point(opt, name):
        yield
        return
    opt.eval()
    try:
        yield
    finally:
        opt.train()
