"""DP-SGD through Opacus (basin.distributed.make_private) and from `basin bench --dp-...`.

References: a float64 transcription of one DP-SGD step (per-sample gradients by a loop,
flat clipping, Gaussian noise from the same seeded generator, division by the expected batch
size); Opacus' own accountant, called independently with (noise, sample rate, steps, delta).
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("opacus")

from basin.distributed import make_private  # noqa: E402


def _data(n=60, d=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _model(d=4, k=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k))


def _independent_epsilon(noise, q, steps, delta, accountant="prv"):
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise, q, steps)]
    return acc.get_epsilon(delta=delta)


def test_one_step_matches_a_float64_transcription_of_dp_sgd() -> None:
    """Opacus' per-sample clipping and noise, wired by make_private, is the DP-SGD update
    x - lr (sum_i clip_C(g_i) + N(0, (sigma C)^2)) / (q n)."""
    x, y = _data()
    model = _model().double()
    ref = _model().double()
    ref.load_state_dict(model.state_dict())
    lr, sigma, clip = 0.5, 0.7, 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x.double(), y), batch_size=10,
                        generator=torch.Generator().manual_seed(3))  # fmt: skip
    p = make_private(model, opt, loader, noise_multiplier=sigma, max_grad_norm=clip,
                     noise_generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert p.sample_rate == pytest.approx(1 / 6)
    xb, yb = next(iter(p.data_loader))
    assert 0 < len(xb) < len(x)
    loss = nn.functional.cross_entropy(model(xb), yb)
    p.optimizer.zero_grad()
    loss.backward()
    p.optimizer.step()

    # the transcription: per-sample gradients one at a time
    params = list(ref.parameters())
    per = []
    for i in range(len(xb)):
        gi = torch.autograd.grad(nn.functional.cross_entropy(ref(xb[i : i + 1]), yb[i : i + 1]), params)
        per.append(gi)
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gi)) for gi in per])
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    gen = torch.Generator().manual_seed(5)
    expected_bs = int(len(x) * (1 / 6))
    with torch.no_grad():
        for j, w in enumerate(params):
            s = sum(factor[i] * per[i][j] for i in range(len(xb)))
            noise = torch.normal(0, sigma * clip, size=w.shape, generator=gen, dtype=w.dtype)
            w -= lr * (s + noise) / expected_bs
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert p.steps == 1
    assert p.epsilon() == pytest.approx(_independent_epsilon(sigma, 1 / 6, 1, 1e-5), rel=1e-12)


@pytest.mark.parametrize("name", ["adabelief", "muon", "torch:adamw", "schedulefree_adamw"])
def test_basin_optimizers_train_privately(name) -> None:
    from basin.optim import create

    x, y = _data()
    model = _model()
    opt = create(name, model, lr=1e-2)
    loader = DataLoader(TensorDataset(x, y), batch_size=12,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    p = make_private(model, opt, loader, noise_multiplier=1.1, max_grad_norm=1.0)
    if hasattr(opt, "train"):
        opt.train()
    before = [q.detach().clone() for q in model.parameters()]
    for xb, yb in p.data_loader:
        p.optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        p.optimizer.step()
    assert p.steps == 5
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert p.epsilon() == pytest.approx(_independent_epsilon(1.1, 0.2, 5, 1e-5), rel=1e-12)


def test_target_epsilon_sets_the_noise() -> None:
    x, y = _data()
    model = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=12)
    p = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                     target_epsilon=2.0, steps=20, delta=1e-4, accountant="rdp")  # fmt: skip
    eps = _independent_epsilon(p.noise_multiplier, 0.2, 20, 1e-4, "rdp")
    assert 2.0 - 0.05 < eps <= 2.0


def test_bad_configuration_raises() -> None:
    x, y = _data()

    def call(model=None, opt=None, **kw):
        model = model or _model()
        opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
        return make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=12), **kw)

    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        call()
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        call(noise_multiplier=1.0, target_epsilon=1.0, steps=3)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        call(noise_multiplier=1.0, delta=1.0)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        call(noise_multiplier=1.0, delta=0.0)
    with pytest.raises(ValueError, match="max_grad_norm must be a positive"):
        call(noise_multiplier=1.0, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="noise_multiplier must be a positive"):
        call(noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="give exactly one of epochs, steps"):
        call(target_epsilon=1.0)
    with pytest.raises(ValueError, match="accountant must be one of"):
        call(noise_multiplier=1.0, accountant="moments")
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*ModuleValidator\.fix"):
        call(model=bn, noise_multiplier=1.0)
    from basin.optim import SAM, create

    m = _model()
    with pytest.raises(ValueError, match="sam .*several times per step"):
        call(model=m, opt=create("sam", m, lr=0.1), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="SAM wrapper|several times"):
        call(model=m, opt=SAM(m.parameters(), torch.optim.SGD, lr=0.1), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="torch:lbfgs"):
        call(model=m, opt=torch.optim.LBFGS(m.parameters()), noise_multiplier=1.0)


def test_missing_opacus_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)
    m = _model()
    with pytest.raises(ImportError, match=r"pip install basin-optim\[dp\]"):
        make_private(m, torch.optim.SGD(m.parameters(), lr=0.1),
                     DataLoader(TensorDataset(*_data()), batch_size=12), noise_multiplier=1.0)  # fmt: skip


# ------------------------------------------------------------------ basin bench --dp-...

N_DIGITS_TRAIN = 1437  # digits_cnn's fixed training split


@pytest.mark.slow  # a whole `basin bench` process (imports, training, report): ~20-40 s
def test_bench_dp_noise_records_the_accountants_epsilon(tmp_path) -> None:
    from basin.bench import Store

    db = tmp_path / "dp.db"
    args = ["bench", "-w", "digits_cnn", "-o", "adabelief", "--seeds", "1", "--steps", "4",
            "--batch-size", "64", "--eval-every", "4", "--dp-noise", "1.3", "--dp-delta", "1e-5",
            "--dp-max-grad-norm", "0.5", "--storage", str(db), "--quiet", "--threads", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "basin", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (rec,) = Store(str(db)).runs()
    assert rec["status"] == "ok"
    assert rec["config"]["dp"] == {"noise_multiplier": 1.3, "target_epsilon": None,
                                   "delta": 1e-5, "max_grad_norm": 0.5, "accountant": "prv"}  # fmt: skip
    priv = rec["privacy"]
    q = 1 / math.ceil(N_DIGITS_TRAIN / 64)
    assert priv["sample_rate"] == pytest.approx(q, rel=1e-15)
    assert priv["steps"] == 4 and priv["noise_multiplier"] == 1.3 and priv["delta"] == 1e-5
    assert priv["epsilon"] == pytest.approx(_independent_epsilon(1.3, q, 4, 1e-5), rel=1e-12)
    html = (tmp_path / "dp-report" / "report.html").read_text()
    assert "privacy &epsilon;" in html and f"{priv['epsilon']:.4g} (1e-05)" in html
    assert "dp_epsilon" in (tmp_path / "dp-report" / "runs.csv").read_text().splitlines()[0]


@pytest.mark.slow  # Opacus' noise search runs the PRV accountant some 20 times: ~10-20 s
def test_bench_dp_epsilon_spends_at_most_the_target(tmp_path, capsys) -> None:
    from basin.bench import Store
    from basin.cli import main

    db = tmp_path / "e.db"
    assert main(["bench", "-w", "digits_cnn", "-o", "torch:sgd", "--seeds", "1", "--steps", "3",
                 "--batch-size", "128", "--eval-every", "3", "--dp-epsilon", "2.5",
                 "--storage", str(db), "--no-report"]) == 0  # fmt: skip
    assert "DP epsilon" in capsys.readouterr().out  # the text summary's column
    (rec,) = Store(str(db)).runs()
    priv = rec["privacy"]
    assert priv["steps"] == 3 and priv["target_epsilon"] == 2.5
    assert 2.5 - 0.05 < priv["epsilon"] <= 2.5
    q = 1 / math.ceil(N_DIGITS_TRAIN / 128)
    assert priv["epsilon"] == pytest.approx(
        _independent_epsilon(priv["noise_multiplier"], q, 3, 1e-5), rel=1e-12
    )


def test_dp_settings_make_distinct_keys_and_old_keys_stay() -> None:
    from basin.bench.runner import RunConfig, make_config

    plain = make_config("digits_cnn", "adabelief", steps=5)
    assert "dp" not in plain.to_dict()  # non-private keys as before DP existed
    a = make_config("digits_cnn", "adabelief", steps=5, dp={"noise_multiplier": 1.0})
    b = make_config("digits_cnn", "adabelief", steps=5, dp={"noise_multiplier": 2.0})
    c = make_config("digits_cnn", "adabelief", steps=5, dp={"target_epsilon": 3.0})
    assert len({plain.key(), a.key(), b.key(), c.key()}) == 4
    assert RunConfig.from_dict(a.to_dict()).key() == a.key()


BN_WORKLOAD = """
import torch
from torch import nn
from basin.bench import Workload

g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
workload = Workload.from_tensors(
    "bn_net", lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
    train=(x, y), eval=(x, y), steps=3, batch_size=16)
"""


@pytest.mark.parametrize(
    "extra, match",
    [
        (["-w", "{bn}"], "1 (BatchNorm1d)"),
        (["-w", "quadratic_deep"], "generated, not drawn from a fixed training set"),
        (["-o", "sam"], "several times per step"),
        (["--sharpness-every", "2"], "--sharpness-every is not available with DP"),
        (["--dp-epsilon", "1", "--steps", "3"], "exactly one of --dp-noise"),
        (["--dp-delta", "2"], "delta must be in (0, 1)"),
        (["--dp-max-grad-norm", "0"], "--dp-max-grad-norm must be a positive"),
        (["--tune", "2"], "--dp-* with --tune"),
    ],
)
def test_bench_dp_bad_configuration_exit_2(tmp_path, capsys, extra, match) -> None:
    from basin.cli import main

    bn = tmp_path / "bnwl.py"
    bn.write_text(textwrap.dedent(BN_WORKLOAD))
    extra = [e.replace("{bn}", f"{bn}:workload") for e in extra]
    db = tmp_path / "x.db"
    args = ["bench", "-w", "digits_cnn", "-o", "torch:sgd", "--seeds", "1", "--steps", "3",
            "--dp-noise", "1.0", "--storage", str(db), "--quiet", "--no-report", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("basin: error: "), err
    assert match in err[0]
    if "BatchNorm" in match:
        assert "ModuleValidator.fix" in err[0]


def test_dp_options_need_noise_or_epsilon(tmp_path, capsys) -> None:
    from basin.cli import main

    assert main(["bench", "-w", "f1", "-o", "torch:sgd", "--seeds", "1", "--steps", "2",
                 "--dp-delta", "1e-5", "--storage", str(tmp_path / "y.db"), "--quiet",
                 "--no-report"]) == 2  # fmt: skip
    assert "need --dp-noise or --dp-epsilon" in capsys.readouterr().err


def test_empty_poisson_batches_still_step_and_do_not_end_the_run() -> None:
    from basin.bench import Workload
    from basin.bench.runner import make_config, run

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 2, (30,), generator=g)
    w = Workload.from_tensors("dp_tiny", _model, train=(x, y), eval=(x, y), steps=12, batch_size=1)
    # the run's sampler (seed 0, q = 1/30) draws these batch sizes: four are empty
    s = torch.Generator().manual_seed(0)
    sizes = [int((torch.rand(30, generator=s) < 1 / 30).sum()) for _ in range(12)]
    assert sizes.count(0) == 4
    cfg = make_config(w, "torch:sgd", steps=12, eval_every=12, log_every=3,
                      dp={"noise_multiplier": 1.0})  # fmt: skip
    res = run(cfg)
    assert res.status == "ok" and res.privacy["steps"] == 12
    assert res.series["train"]["step"] == [3, 6, 9, 12]
    assert all(math.isfinite(v) for v in res.series["train"]["loss"])


def test_report_labels_and_summary_tell_private_runs_apart() -> None:
    from basin.bench.report import labels, summarize

    base = {"workload": "w", "optimizer": "torch:sgd", "hparams": {"lr": 0.1}, "seed": 0,
            "steps": 3, "batch_size": 8, "schedule": {"name": "constant"}, "eval_every": 3}  # fmt: skip
    dp = {"noise_multiplier": 1.5, "target_epsilon": None, "delta": 1e-5, "max_grad_norm": 0.5,
          "accountant": "prv"}  # fmt: skip

    def rec(key, cfg, privacy):
        return {"key": key, "config": cfg, "status": "ok", "final": {"metric": 0.5},
                "series": {}, "time_to_target": None, "step_time": 0.01, "state_bytes": 0,
                "workload_meta": {"metric": "accuracy", "metric_mode": "max", "target": None},
                "privacy": privacy}  # fmt: skip

    runs = [rec("a", base, None), rec("b", {**base, "dp": dp}, {"epsilon": 2.25, "delta": 1e-5})]
    lab = labels(runs)
    assert lab == {"a": "torch:sgd (non-private)", "b": "torch:sgd (DP noise=1.5 C=0.5)"}
    rows = {r["optimizer"]: r for r in summarize(runs)}
    assert rows["torch:sgd (DP noise=1.5 C=0.5)"]["dp_epsilon"] == 2.25
    assert rows["torch:sgd (non-private)"]["dp_epsilon"] is None
