"""Small pure math functions shared by several optimizers (compile boundaries)."""

from __future__ import annotations

__all__: list[str] = []
