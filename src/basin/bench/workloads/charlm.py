"""Character-level transformer language model on Python standard-library source text.

The corpus is a fixed list of standard-library modules (present on every Python install),
read in order, mapped to 7-bit ASCII (other characters -> 0) and cut to ``CORPUS_CHARS``. The
first 90% is the training text and the last 10% the validation text. Training windows are
drawn at seed-determined offsets; evaluation uses fixed evenly spaced validation windows.
Metric: validation cross-entropy in bits per character (minimised).

The exact text depends on the Python version (its standard library); the environment of every
run records that version."""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Task, Workload, register

MODULES = (
    "abc.py", "argparse.py", "bisect.py", "calendar.py", "contextlib.py", "copy.py",
    "dataclasses.py", "fractions.py", "functools.py", "heapq.py", "random.py", "shlex.py",
    "statistics.py", "string.py", "textwrap.py", "typing.py",
)  # fmt: skip
CORPUS_CHARS = 400_000
VOCAB = 128
CONTEXT = 64


@cache
def corpus() -> tuple[Tensor, Tensor]:
    """(train, validation) as int64 tensors of character codes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in MODULES:
        path = root / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)[:CORPUS_CHARS]
    if len(text) < 50_000:
        raise RuntimeError(f"standard-library corpus too small ({len(text)} chars) under {root}")
    codes = torch.tensor([c if c < VOCAB else 0 for c in text.encode("ascii", "replace")])
    split = int(0.9 * len(codes))
    return codes[:split], codes[split:]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = CONTEXT):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(context, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _Windows:
    """Random training windows; ``epoch``: the passes over the training text (in tokens) that
    the batches before the last one returned made (windows are drawn with replacement)."""

    def __init__(self, text: Tensor, batch_size: int, seed: int) -> None:
        self.text, self.bs = text, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(CONTEXT + 1)
        self.epoch, self._drawn = 0, 0

    def __iter__(self) -> _Windows:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(self.text) - CONTEXT - 1, (self.bs,), generator=self.gen)
        self.epoch = self._drawn * self.bs * CONTEXT // len(self.text)
        self._drawn += 1
        w = self.text[starts[:, None] + self.offsets]
        return w[:, :-1], w[:, 1:]


def _build(seed: int, batch_size: int) -> Task:
    train, val = corpus()
    model = CharTransformer()
    probe = next(_Windows(train, 32, seed + 1_000_003))
    return Task(
        model,
        lm_loss,
        _Windows(train, batch_size, seed),
        _evaluator(val),
        probe,
        evaluate_train=_evaluator(train),
    )


def _evaluator(text: Tensor, n_windows: int = 128) -> Callable[[nn.Module], dict[str, float]]:
    """Mean loss and bits/char over ``n_windows`` evenly spaced windows of ``text``."""
    starts = torch.linspace(0, len(text) - CONTEXT - 2, n_windows).long()
    w = text[starts[:, None] + torch.arange(CONTEXT + 1)]
    vx, vy = w[:, :-1], w[:, 1:]

    def evaluate(m: nn.Module) -> dict[str, float]:
        was = m.training
        m.eval()
        with torch.no_grad():
            loss = float(lm_loss(m(vx), vy))
        m.train(was)
        return {"eval_loss": loss, "metric": loss / math.log(2)}

    return evaluate


register(
    Workload(
        name="charlm",
        family="charlm",
        description="char-level transformer (2 layers, d=64, context 64) on stdlib source; "
        "metric validation bits/char",
        builder=_build,
        metric="bits_per_char",
        metric_mode="min",
        target=3.2,
        batch_size=32,
        steps=600,
        eval_every=100,
        lr={"adaptive": 3e-3, "sgd": 0.1, "sgdsai": 1e-2},
        tokens_per_sample=CONTEXT,
    )
)
