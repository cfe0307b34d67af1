"""The custom ops through which a compiled FRUGAL step runs its eager phases: the projector
rebuild (``basin::frugal_rebuild``) and the block re-selection (``basin::frugal_reselect``).
Each is one extern call in the graph, with its in-place mutations declared; eager steps call
the Python functions themselves."""

from __future__ import annotations

from typing import Any

import torch

from .blocks import _reselect
from .projectors import _rebuild


def _opaque_op(name: str, fn: Any, mutates_args: tuple[str, ...]) -> Any:
    """``fn`` (in place, returns None) as the custom op ``basin::<name>``: one extern call in a
    compiled graph, so no graph break and no recompile; its Python control flow reads the
    counters at run time, eagerly. Eager steps call ``fn`` itself."""
    op = torch.library.custom_op(f"basin::{name}", fn, mutates_args=mutates_args)
    op.register_fake(lambda *args: None)
    return op


rebuild_op = _opaque_op(
    "frugal_rebuild", _rebuild, ("proj", "exp_avg", "exp_avg_sq", "step", "rng_state")
)


reselect_op = _opaque_op(
    "frugal_reselect",
    _reselect,
    ("block_draws", "rng_state", "active", "offset", "steps", "pools"),
)
