"""Step Law (arXiv:2503.04715): the fitted constants against the paper's printed law, the
non-embedding parameter count, token counting, and ``basin bench --lr-rule steplaw`` end to
end."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from basin.bench import Store, non_embedding_params, steplaw_batch_size, steplaw_lr
from basin.bench import workloads as wl
from basin.bench.steplaw import steplaw_hparams, steplaw_tokens
from basin.cli import main

# the paper's law, printed to three significant digits: lr = 1.79 N^-0.713 D^0.307 and
# B = 0.58 D^0.571 tokens
PAPER = {"lr": (1.79, -0.713, 0.307), "bs": (0.58, 0.571)}


@pytest.mark.parametrize("n, d", [(2.1e8, 4e9), (1e9, 1e11), (7e9, 1.4e12), (1e5, 1e6)])
def test_matches_the_papers_law_to_its_printed_digits(n, d) -> None:
    """Each printed constant is the fitted one to its last digit (half a unit in an exponent:
    a factor exp(0.0005 |log x|); the prefactor 1.79: within [1.785, 1.8), the authors'
    mean fit gives 1.797), so the two laws agree within that bound and no closer is asserted."""
    a, b, c = PAPER["lr"]
    paper_lr = a * n**b * d**c
    slack = 0.0005 * (math.log(n) + math.log(d))
    assert math.log(1.785 / a) - slack <= math.log(steplaw_lr(n, d) / paper_lr)
    assert math.log(steplaw_lr(n, d) / paper_lr) <= math.log(1.8 / a) + slack
    k, e = PAPER["bs"]
    bs_slack = math.log(0.585 / 0.575) + 0.0005 * math.log(d)
    assert abs(math.log(steplaw_batch_size(d) / (k * d**e))) <= bs_slack


def test_exponents_and_prefactors() -> None:
    """lr(2N, D) / lr(N, D) = 2^-0.7129, lr(N, 2D) / lr(N, D) = 2^0.3075, B(2D) / B(D) =
    2^0.5709; lr(1, 1) = 1.797 and B(1) = 0.5807 (the means of the authors' bootstrap fits)."""
    n, d = 3e8, 2e10
    assert steplaw_lr(2 * n, d) / steplaw_lr(n, d) == pytest.approx(2**-0.7129, rel=1e-4)
    assert steplaw_lr(n, 2 * d) / steplaw_lr(n, d) == pytest.approx(2**0.3075, rel=1e-4)
    assert steplaw_batch_size(2 * d) / steplaw_batch_size(d) == pytest.approx(2**0.5709, rel=1e-4)
    assert steplaw_lr(1, 1) == pytest.approx(1.7973, rel=1e-4)
    assert steplaw_batch_size(1) == pytest.approx(0.58069, rel=1e-4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: steplaw_lr(0, 1e9), "n_params must be a positive finite number"),
        (lambda: steplaw_lr(1e8, -1), "n_tokens must be a positive finite number"),
        (lambda: steplaw_lr(float("nan"), 1e9), "n_params"),
        (lambda: steplaw_lr("1e8", 1e9), "n_params must be a positive number"),
        (lambda: steplaw_batch_size(float("inf")), "n_tokens"),
        (lambda: steplaw_batch_size(True), "n_tokens"),
    ],
)
def test_bad_inputs_raise(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_non_embedding_params_skips_embeddings_and_counts_tied_weights_once() -> None:
    emb = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied: an embedding parameter, not counted
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    model = nn.Sequential(emb, nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), head, frozen)
    assert non_embedding_params(model) == (8 * 16 + 16) + (16 * 8 + 8)
    assert non_embedding_params(nn.EmbeddingBag(10, 4)) == 0


def test_tokens_are_steps_times_batch_times_tokens_per_sample() -> None:
    w = wl.get("charlm")
    assert w.tokens_per_sample == 64
    assert steplaw_tokens(w, None, None) == w.steps * w.batch_size * 64
    assert steplaw_tokens(w, 10, 8) == 10 * 8 * 64
    with pytest.raises(ValueError, match="declares no tokens_per_sample.*--scale-lr"):
        steplaw_tokens(wl.get("mnist1d_mlp"), 10, 8)
    # only Adam-type learning rates: SGD keeps its default, Muon's AdamW fallback gets it
    assert steplaw_hparams(w, "torch:sgd", 10, 8) == {}
    assert set(steplaw_hparams(w, "muon", 10, 8, n_params=1000)) == {"adamw_lr"}
    own = wl.Workload.from_tensors(
        "own_lm", lambda: nn.Linear(4, 4), train=(torch.randn(8, 4), torch.randn(8, 4)),
        eval=(torch.randn(8, 4), torch.randn(8, 4)), loss="mse", metric="loss",
        tokens_per_sample=16, steps=5, batch_size=4,
    )  # fmt: skip
    assert steplaw_tokens(own, None, None) == 5 * 4 * 16
    with pytest.raises(ValueError, match="tokens_per_sample must be an integer >= 1"):
        wl.Workload.from_tensors(
            "bad", lambda: nn.Linear(4, 4), train=(torch.randn(8, 4), torch.randn(8, 4)),
            eval=(torch.randn(8, 4), torch.randn(8, 4)), tokens_per_sample=0,
        )  # fmt: skip


def test_cli_lr_rule_steplaw_records_the_laws_lr(tmp_path) -> None:
    """``basin bench -w charlm --lr-rule steplaw`` in a subprocess: AdamW's stored lr is
    1.797 N^-0.713 D^0.307 with N the model's non-embedding count and D = 3 x 16 x 64
    tokens; SGD keeps the workload's lr; --hp still wins."""
    db = tmp_path / "s.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "basin", "bench", "-w", "charlm", "-o", "torch:adamw,torch:sgd,adabelief",
         "--seeds", "1", "--steps", "3", "--batch-size", "16", "--lr-rule", "steplaw",
         "--hp", "adabelief.lr=0.002", "--storage", str(db), "--quiet", "--no-report"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    w = wl.get("charlm")
    n = non_embedding_params(w.build(0, 1).model)
    expected = 1.7973 * n**-0.71292 * (3 * 16 * 64) ** 0.30749
    hp = {r["config"]["optimizer"]: r["config"]["hparams"] for r in Store(str(db)).runs()}
    assert hp["torch:adamw"]["lr"] == pytest.approx(expected, rel=1e-4)
    assert hp["torch:sgd"]["lr"] == w.lr["sgd"]
    assert hp["adabelief"]["lr"] == 0.002
    assert f"N={n} non-embedding parameters, D={3 * 16 * 64} tokens" in proc.stderr


@pytest.mark.parametrize(
    "workload, steps, extra, match",
    [
        ("mnist1d_mlp", "2", [], "--lr-rule steplaw: workload 'mnist1d_mlp' declares no "
                                 "tokens_per_sample"),
        ("charlm", "2", ["--lr-rule", "kaplan"], "--lr-rule must be default or steplaw, got "
                                                 "'kaplan'"),
        ("charlm", "2", ["--scale-lr", "--batch-size", "8"], "not with --tune or --scale-lr"),
        ("charlm", "2", ["--tune", "2"], "not with --tune or --scale-lr"),
        ("charlm", None, ["--time-budget", "5"], "counts tokens from a step budget"),
    ],
)  # fmt: skip
def test_cli_lr_rule_bad_input_exits_2(tmp_path, capsys, workload, steps, extra, match) -> None:
    args = ["bench", "-w", workload, "-o", "torch:adamw", "--seeds", "1", "--lr-rule", "steplaw",
            *(["--steps", steps] if steps else []), "--storage", str(tmp_path / "x.db"),
            "--quiet", "--no-report", *extra]  # fmt: skip
    assert main(args) == 2
    assert match in capsys.readouterr().err
