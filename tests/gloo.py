"""The process group of the tests' spawned gloo ranks."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def init_gloo(store: str, rank: int, world: int) -> None:
    """Join a gloo group of ``world`` ranks through the file ``store``; a collective waits at
    most 300 s, so a dead rank fails its test instead of waiting torch's default 30 min."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
