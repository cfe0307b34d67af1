"""Every registered optimizer through every harness path, by looping over the registry.

The registry (``basin.optim.infos()``) is the single source of truth: these tests fail when an
entry lacks what the harness needs, when ``tests/optim_db.py`` and the registry disagree, and
when any registered optimizer cannot run in ``bench`` (every workload), ``tune``, ``pbt`` or
``landscape``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from optim_db import CASES_BY_NAME
from torch import nn

import basin.optim as bo
from basin.bench import make_config, run
from basin.bench import workloads as wl
from basin.bench.space import default_space, parse_space

NAMES = [i.name for i in bo.infos()]

# Entries with a training method (OptimInfo.method) need something of the workload: the
# built-in workloads each accepts, by what they have. saf: per-sample class logits and sample
# indices (the in-memory classification workloads); mesa: class logits, per sample or per
# token (those and charlm). Every other built-in workload must be refused at make_config with
# a ValueError that says what is missing. A new method entry must be added here.
METHOD_WORKLOADS = {
    "saf": {"digits_cnn", "mnist1d_bnn", "mnist1d_cnn", "mnist1d_mlp"},
    "mesa": {"charlm", "digits_cnn", "mnist1d_bnn", "mnist1d_cnn", "mnist1d_mlp"},
    # tract: a first layer that is a Linear/Conv (not charlm's embedding, not a bare point)
    "tract": {"digits_cnn", "mnist1d_bnn", "mnist1d_cnn", "mnist1d_mlp"},
    "tract_adamw": {"digits_cnn", "mnist1d_bnn", "mnist1d_cnn", "mnist1d_mlp"},
    # nap: weight matrices to project (not the bare points)
    "nap": {"charlm", "digits_cnn", "mnist1d_bnn", "mnist1d_cnn", "mnist1d_mlp"},
    # reste, biper: hidden layers marked BinarizableLinear (the binary-network workload only)
    "reste": {"mnist1d_bnn"},
    "biper": {"mnist1d_bnn"},
}


def home(name: str) -> str:
    """The workload the tune / landscape / pbt loops run ``name`` on."""
    return "mnist1d_bnn" if name in ("reste", "biper") else "mnist1d_mlp"


class _Mixed(nn.Module):
    """Embedding, conv kernel, hidden matrix, norm, head: every routing case."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(x).transpose(1, 2)).mean(-1)
        return self.head(self.norm(torch.relu(self.hidden(h))))


def test_optim_db_and_registry_agree() -> None:
    assert set(CASES_BY_NAME) == set(NAMES)
    for name in NAMES:
        assert CASES_BY_NAME[name].cls is bo.info(name).cls
        # a method entry is marked as one in the table, and has its own tests
        assert CASES_BY_NAME[name].method == (bo.info(name).method is not None)
        assert set(METHOD_WORKLOADS) == {n for n in NAMES if bo.info(n).method is not None}


@pytest.mark.parametrize("name", NAMES)
def test_entry_has_what_the_harness_needs(name: str) -> None:
    info = bo.info(name)
    assert info.paper is not None and info.paper.arxiv
    assert info.state_memory is not None and info.state_memory >= 0
    assert info.family in bo.registry.FAMILIES and info.lr_scaling in ("linear", "sqrt", "none")
    # "none" (no batch-size rule) only for second-order methods, whose step has its own scale
    assert info.lr_scaling != "none" or info.family == "quasi-newton"
    # its search space is valid for its own class, and every learning-rate key it takes from a
    # workload is a real hyperparameter
    space = parse_space({k: dict(v) for k, v in info.search_space.items()}, name)
    assert "lr" in {p.base for p in space.values()} or any("lr" in k for k in space)
    accepted = bo.registry._accepted_hyperparameters(info.cls)
    assert set(info.lr_from) <= accepted and set(info.defaults) <= accepted
    # built from a model, its parameter groups cover every trainable parameter exactly once
    model = _Mixed()
    opt = bo.create(name, model, **{"lr": 1e-2, **info.defaults})
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    x = torch.randint(0, 11, (4, 5))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    closure()
    before = [p.detach().clone() for p in model.parameters()]
    # an entry that needs_closure gets one, as the harness gives it (RegularizedNewton
    # re-evaluates the loss); the others step on the gradient already there
    step = (lambda: opt.step(closure)) if info.needs_closure else opt.step
    step()
    step()  # SOAP's first gradient only seeds its preconditioner (the authors' rule)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # the harness's defaults per workload resolve from the entry
    for w in wl.workloads():
        hp = wl.default_hparams(w, name)
        for key, entries in info.lr_from.items():
            if any(e in w.lr for e in entries):
                assert hp[key] == next(w.lr[e] for e in entries if e in w.lr)


def test_bare_names_resolve_to_torch_then_pytorch_optimizer() -> None:
    assert bo.resolve("adamw") == "torch:adamw"
    assert bo.resolve("SGD") == "torch:sgd"
    assert bo.resolve("lion") == "pytorch_optimizer:lion"
    assert bo.resolve("adabelief") == "adabelief"  # basin's own first
    assert bo.resolve("adamp") == "adamp"  # not pytorch_optimizer's AdamP
    with pytest.raises(ValueError, match="did you mean"):
        bo.resolve("adamww")
    cfg = make_config("f1", "adamw", steps=2)
    assert cfg.optimizer == "torch:adamw"
    assert make_config("f1", "sgd", steps=2).hparams == {"lr": 0.01, "momentum": 0.9}


def test_external_entries_come_from_the_registry() -> None:
    assert bo.info("torch:lbfgs").needs_closure
    assert bo.info("torch:sgd").lr_scaling == "linear"
    assert bo.info("pytorch_optimizer:lion").lr_scaling == "sqrt"
    assert set(default_space("torch:adamw")) == {"lr", "betas[0]", "betas[1]", "weight_decay"}
    # an optimizer the registry knows nothing more about: learning rate alone, plain params
    generic = bo.info("torch:adagrad")
    assert set(generic.search_space) == {"lr"} and generic.param_groups is None


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_benchmarks_every_workload(name: str) -> None:
    """The real bug: muon/swan failed, cosmos exited 2 (fake 2x2 probe, rank 64 > 40). A run
    may diverge (Beale's steep start does that to SGD at the workload's lr, as before), but it
    never fails, and every run on the learned workloads ends ok."""
    for w in [w.name for w in wl.workloads() if w.family != "own"]:  # the built-in ones
        if name in METHOD_WORKLOADS and w not in METHOD_WORKLOADS[name]:
            with pytest.raises(ValueError, match=rf"^{name} needs ") as exc:
                make_config(w, name, steps=3, eval_every=3, log_every=1)
            assert "\n" not in str(exc.value)
            continue
        r = run(make_config(w, name, steps=3, eval_every=3, log_every=1))
        assert r.status in ("ok", "diverged"), (w, r.status, r.error)
        if r.status == "ok":
            assert r.final["metric"] is not None and math.isfinite(r.final["metric"])
        elif wl.get(w).family != "synthetic":
            raise AssertionError((w, name, "diverged", r.diverged_step))


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_tunes(name: str, tmp_path) -> None:
    from basin.bench.tune import prepare, tune

    spec = prepare(home(name), name, 2, sampler="qmc", pruner="none",
                   storage=f"sqlite:///{tmp_path}/t.db", steps=4, eval_every=2)  # fmt: skip
    res = tune(spec)
    assert res.n_complete + res.n_pruned == 2 and res.n_failed == 0


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_gets_a_landscape_record(name: str) -> None:
    r = run(make_config(home(name), name, steps=5, landscape=True))
    assert r.status == "ok"
    assert r.final["top_eigenvalue"] > 0 and math.isfinite(r.final["hessian_trace"])
    # the run hands back its trained model: its evaluation is the recorded final metric
    task = wl.get(home(name)).build(0)
    assert math.isclose(task.evaluate(r.model)["metric"], r.final["metric"], rel_tol=1e-9)
    assert "model" not in r.to_dict()


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray (2 CPUs) for this module's PBT cases, shut down after the last."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")  # fmt: skip
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_runs_pbt(name: str, ray_cluster, tmp_path) -> None:
    """One case per entry (each a few seconds: a hang or failure names its optimizer)."""
    from basin.bench.pbt import pbt

    w = "f1" if name not in METHOD_WORKLOADS else home(name)
    r = pbt(w, name, population=2, steps=4, interval=2, out_dir=tmp_path, seed=0)
    assert len(r.trials) == 2, name
    assert all(t["error"] is None for t in r.trials), (name, r.trials)
    assert r.best_metric is not None and math.isfinite(r.best_metric), name


def _basin(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "basin", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)  # fmt: skip


def test_cli_issue_command_runs_every_new_optimizer_ok(tmp_path) -> None:
    db = f"sqlite:///{tmp_path}/b.db"
    p = _basin("bench", "-w", "mnist1d_mlp", "-o", "muon,swan,cosmos,frugal,adabelief,adamw",
               "--seeds", "1", "--steps", "100", "--storage", db, "--quiet", "--no-report")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "6 run(s) done" in p.stderr and "failed" not in p.stderr
    from basin.bench import Store

    runs = Store(db).runs()
    assert sorted(r["config"]["optimizer"] for r in runs) == sorted(
        ["muon", "swan", "cosmos", "frugal", "adabelief", "torch:adamw"]
    )
    assert {r["status"] for r in runs} == {"ok"}
    p = _basin("tune", "-w", "mnist1d_mlp", "-o", "muon,swan,cosmos,frugal,adabelief,adamw",
               "--trials", "1", "--steps", "20", "--storage", db, "--quiet")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("1 complete") == 6, p.stderr


@pytest.mark.parametrize("w", ["mnist1d_mlp", "charlm", "rosenbrock"])
def test_cli_landscape_works_on_bench_workloads(w: str, tmp_path) -> None:
    p = _basin("landscape", "-w", w, "--out", str(tmp_path / "o"), "--k", "1",
               "--trace-hvp", "3", "--probes", "0", "--surface-steps", "0")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "does not expose" not in p.stderr
