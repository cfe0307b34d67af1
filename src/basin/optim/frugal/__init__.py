"""FRUGAL: AdamW on a low-dimensional projection of the gradient, state-free signSGD on the rest.

``optimizer`` holds the :class:`FRUGAL` class and its registry entry; ``step`` the projected
step of one matrix (``frugal``); ``projectors`` the projection maths; ``blocks`` and
``block_step`` the block variant (``proj_type="block"``); ``compile_ops`` the custom ops of the
compiled step."""

from .optimizer import FRUGAL
from .step import frugal, init_frugal_state

__all__ = ["FRUGAL", "frugal", "init_frugal_state"]
