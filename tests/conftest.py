"""Test-session settings: one intra-op thread per test process (pytest-xdist runs one process
per core, so more threads only oversubscribe the cores and make runs slower and noisier)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
