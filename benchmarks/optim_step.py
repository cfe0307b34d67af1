"""Optimizer step time and state memory: basin against its peers, in one run.

For every algorithm in ``ENTRIES`` this times ``opt.step()`` of basin's implementation (eager,
``fused=True`` where the registry lists the ``fused`` capability, and compiled with
``torch.compile(opt.step)``) beside the same algorithm in pytorch_optimizer,
the authors' package where one exists, and torch.optim.AdamW (fused, foreach, for-loop) as
context, on

* ``4m``          32 x Linear(352, 352): 3.98M parameters in 64 tensors,
* ``mlp``         a small MLP (Linear 32-64-64-10, 7k parameters, 6 tensors),
* ``transformer`` (matrix optimizers only) a 2-layer nn.TransformerEncoder with embedding and
                  head (0.6M parameters).

Gradients are set once (random, seeded) so that only the optimizer step is timed; every
implementation gets its own copy of the same parameters and gradients. After warm-up steps
(which include torch.compile's compilation) the implementations are stepped round-robin, one
step each per round, and the median per-step time is reported; interleaving keeps load changes
on a shared machine from favouring one implementation. Compiled runs are checked for
recompiles during the timed steps with ``torch._dynamo`` counters.

Targets: basin eager <= 0.8 x the fastest peer implementation of the same algorithm;
basin compiled <= 1.5 x torch.optim.AdamW(fused=True); basin fused both (and its first step,
which compiles its kernel, "1st step s", <= 30 s on 2 cores). The first-step column is the
wall time of each implementation's first warm-up step; for a cold compile run with
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` (otherwise Inductor's on-disk cache may serve it).

State memory: bytes of all (non-scalar) state tensors / (numel * element size) of the
parameters, measured after the warm-up steps (Adam = 2.0); for the matrix optimizers also
"matrix B/B", the same ratio over only the parameters routed to the matrix rule (the hidden
weight matrices: SWAN 0, Muon 1, COSMOS ``1 + r/n + r/m + r^2/(mn)``, FRUGAL ``2 * density``
plus its projector). ``--state-only`` measures just these (one step each, no timing).

    python benchmarks/optim_step.py                     # everything
    python benchmarks/optim_step.py --only adabelief --no-compile --quick
    python benchmarks/optim_step.py --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import basin.optim as bo

# A factory gets the model (its own copy) and the entry's shared hyperparameters.
Factory = Callable[[nn.Module, dict[str, Any]], Optimizer]

TARGET_EAGER = 0.8  # basin eager / fastest peer of the same algorithm
TARGET_COMPILED = 1.5  # basin compiled / torch AdamW(fused=True)
TARGET_FIRST_STEP_S = 30.0  # basin fused: first step (kernel compilation included), seconds


class Skip(Exception):
    """A runner that cannot be built here (package missing, API mismatch)."""


def quiet(fn: Callable[[], Optimizer]) -> Optimizer:
    """Reference packages print banners and warnings on construction."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _import(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise Skip(f"{module} not installed") from e


def po_class(name: str) -> type[Optimizer]:
    po = _import("pytorch_optimizer")
    try:
        return po.load_optimizer(name)
    except Exception as e:
        raise Skip(f"pytorch_optimizer has no {name}") from e


# ------------------------------------------------------------------ parameter groups


def matrix_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Hidden weight matrices (ndim >= 2, not the embedding or the output head) vs the rest,
    the split Muon's authors prescribe."""
    emb_head = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            emb_head.add(m.weight)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        emb_head.add(head.weight)
    matrices = [p for p in model.parameters() if p.ndim >= 2 and p not in emb_head]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return matrices, rest


def po_muon_groups(model: nn.Module, hp: dict[str, Any]) -> list[dict[str, Any]]:
    matrices, rest = matrix_split(model)
    groups = [dict(params=matrices, lr=hp["lr"], weight_decay=hp["weight_decay"], use_muon=True)]
    if rest:
        groups.append(dict(params=rest, lr=hp["adamw_lr"], weight_decay=0.0, use_muon=False))
    return groups


def author_muon_groups(model: nn.Module, hp: dict[str, Any]) -> list[dict[str, Any]]:
    matrices, rest = matrix_split(model)
    groups = [
        dict(
            params=matrices,
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
            use_muon=True,
        )
    ]
    if rest:
        groups.append(
            dict(
                params=rest,
                lr=hp["adamw_lr"],
                betas=(0.9, 0.95),
                eps=1e-10,
                weight_decay=0.0,
                use_muon=False,
            )
        )
    return groups


# ------------------------------------------------------------------ the table


@dataclass
class Peer:
    label: str
    build: Factory


@dataclass
class Entry:
    """One algorithm: basin's registry name, hyperparameters shared by every implementation
    (matched defaults), the peer implementations and which models it runs on."""

    name: str
    hp: dict[str, Any]
    peers: list[Peer]
    # hyperparameters passed to basin only on top of ``hp`` (basin-specific names)
    basin_hp: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ("4m", "mlp")
    matrix: bool = False
    # hyperparameter names basin does not take (peer-only ones such as adamw_lr)
    peer_only: tuple[str, ...] = ()


def _pick(hp: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: hp[k] for k in names if k in hp}


ADAM_HP = ("lr", "betas", "eps", "weight_decay")

ENTRIES: list[Entry] = [
    Entry(
        "adabelief",
        dict(
            lr=1e-3,
            betas=(0.9, 0.999),
            eps=1e-16,
            weight_decay=1e-2,
            weight_decouple=True,
            rectify=True,
            degenerated_to_sgd=True,
            amsgrad=False,
        ),
        [
            Peer(
                "adabelief_pytorch",
                lambda m, hp: quiet(
                    lambda: _import("adabelief_pytorch").AdaBelief(
                        m.parameters(), print_change_log=False, **hp
                    )
                ),
            ),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("adabelief")(
                    m.parameters(), foreach=False, **_po_adabelief(hp)
                ),
            ),
            Peer(
                "pytorch_optimizer foreach",
                lambda m, hp: po_class("adabelief")(
                    m.parameters(), foreach=True, **_po_adabelief(hp)
                ),
            ),
        ],
    ),
    Entry(
        "diffgrad",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        [
            Peer(
                "torch_optimizer",
                lambda m, hp: _import("torch_optimizer").DiffGrad(m.parameters(), **hp),
            ),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("diffgrad")(
                    m.parameters(), weight_decouple=False, foreach=False, **hp
                ),
            ),
        ],
    ),
    Entry(
        "exadam",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        [
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("exadam")(m.parameters(), foreach=False, **hp),
            ),
        ],
    ),
    Entry(
        "adamp",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, delta=0.1, wd_ratio=0.1),
        [
            Peer("adamp", lambda m, hp: _import("adamp").AdamP(m.parameters(), **hp)),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("adamp")(
                    m.parameters(), weight_decouple=False, foreach=False, **hp
                ),
            ),
        ],
    ),
    Entry(
        "sgdp",
        dict(lr=1e-2, momentum=0.9, weight_decay=1e-2, eps=1e-8, delta=0.1, wd_ratio=0.1),
        [
            Peer("adamp", lambda m, hp: _import("adamp").SGDP(m.parameters(), **hp)),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("sgdp")(
                    m.parameters(), weight_decouple=False, foreach=False, **hp
                ),
            ),
        ],
    ),
    Entry(
        "sgdsai",
        dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2),
        [
            Peer("sgd_sai", lambda m, hp: _import("sgd_sai").SGD_sai(m.parameters(), **hp)),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("sgdsai")(m.parameters(), foreach=False, **hp),
            ),
        ],
    ),
    Entry(
        "muon",
        dict(lr=2e-2, momentum=0.95, weight_decay=0.0, adamw_lr=3e-4),
        [
            Peer(
                "pytorch_optimizer",
                lambda m, hp: po_class("muon")(po_muon_groups(m, hp)),
            ),
            Peer(
                "muon (author)",
                lambda m, hp: _import("muon").SingleDeviceMuonWithAuxAdam(
                    author_muon_groups(m, hp)
                ),
            ),
        ],
        models=("transformer", "mlp"),
        matrix=True,
        peer_only=("adamw_lr",),
    ),
    Entry(
        "schedulefree_adamw",
        dict(lr=2.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0),
        [
            Peer(
                "schedulefree",
                lambda m, hp: _training(
                    _import("schedulefree").AdamWScheduleFree(m.parameters(), **hp)
                ),
            ),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: _training(po_class("schedulefreeadamw")(m.parameters(), **hp)),
            ),
        ],
    ),
    Entry(
        "schedulefree_sgd",
        dict(lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0),
        [
            Peer(
                "schedulefree",
                lambda m, hp: _training(
                    _import("schedulefree").SGDScheduleFree(m.parameters(), **hp)
                ),
            ),
            Peer(
                "pytorch_optimizer",
                lambda m, hp: _training(po_class("schedulefreesgd")(m.parameters(), **hp)),
            ),
        ],
    ),
    Entry(
        "soap",
        dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=1e-2, precondition_frequency=10),
        [Peer("pytorch_optimizer", lambda m, hp: po_class("soap")(m.parameters(), **hp))],
        models=("transformer", "mlp"),
    ),
    # no public peer implementation: basin's own paths only
    Entry("hyperp_adamw", dict(lr=0.02), []),
    Entry("hyperp_muon", dict(lr=0.02), [], models=("transformer", "mlp"), matrix=True),
    Entry("nap", dict(lr=1e-3), []),
    Entry("swan", dict(lr=1e-3), [], models=("transformer", "mlp"), matrix=True),
    Entry("cosmos", dict(lr=1e-3), [], models=("transformer", "mlp"), matrix=True),
    Entry("frugal", dict(lr=1e-3), [], models=("transformer", "mlp"), matrix=True),
]


def _training(opt: Any) -> Any:
    """Schedule-free optimizers step only in train mode (the parameters at y)."""
    opt.train()
    return opt


def _po_adabelief(hp: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in hp.items() if k != "amsgrad"}
    out["ams_bound"] = hp.get("amsgrad", False)
    return out


ADAMW_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
ADAMW_CONTEXT: list[tuple[str, dict[str, Any]]] = [
    ("torch AdamW fused", dict(fused=True)),
    ("torch AdamW foreach", dict(foreach=True)),
    ("torch AdamW for-loop", dict(foreach=False)),
]


# ------------------------------------------------------------------ models


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "4m": lambda: nn.Sequential(*[nn.Linear(352, 352) for _ in range(32)]),
    "mlp": lambda: nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)
    ),
    "transformer": TinyTransformer,
}


def model_copy(kind: str, seed: int) -> nn.Module:
    """The same parameters and gradients for every implementation."""
    torch.manual_seed(seed)
    model = MODELS[kind]()
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-2
    return model


# ------------------------------------------------------------------ measurement


@dataclass
class Runner:
    label: str
    kind: str  # "basin", "basin-fused", "basin-compiled", "peer", "adamw", "adamw-compiled"
    opt: Optimizer
    step: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    note: str = ""
    graphs_during_timing: int | None = None
    first_step_s: float | None = None  # wall time of the first warm-up step (compiles)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.times) * 1e3

    matrix_ids: frozenset[int] | None = None  # parameters routed to the matrix rule

    def state_bytes_per_param(self) -> float:
        return state_bytes_ratio(self.opt)

    def matrix_state_bytes_per_param(self) -> float | None:
        return None if self.matrix_ids is None else state_bytes_ratio(self.opt, self.matrix_ids)


def state_bytes_ratio(opt: Optimizer, only: frozenset[int] | None = None) -> float:
    """Bytes of the (non-scalar) state tensors of ``opt``'s parameters / those parameters'
    bytes; ``only``: restrict both to the parameters with these ``id``s."""
    state_bytes = 0
    param_bytes = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if only is not None and id(p) not in only:
                continue
            param_bytes += p.numel() * p.element_size()
            for v in opt.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    state_bytes += v.numel() * v.element_size()
    return state_bytes / param_bytes


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compiled(opt: Optimizer, fullgraph: bool) -> Callable[[], Any]:
    # lr and every other hyperparameter stay Python floats that never change here, so Dynamo
    # bakes them in as constants; the step counters are tensors (basin) so nothing in the
    # guards changes from step to step. Recompiles are counted during the timed steps.
    return torch.compile(opt.step, fullgraph=fullgraph)


def build_runners(
    entry: Entry | None, kind: str, seed: int, do_compile: bool, notes: list[str]
) -> list[Runner]:
    runners: list[Runner] = []
    matrix = entry is not None and entry.matrix  # report the matrix-rule-only state too

    def add(label: str, rkind: str, make: Callable[[nn.Module], Optimizer], comp: bool) -> None:
        model = model_copy(kind, seed)
        try:
            opt = make(model)
        except Skip as e:
            notes.append(f"{kind}: {label} skipped ({e})")
            return
        except (ValueError, TypeError) as e:
            notes.append(f"{kind}: {label} skipped ({type(e).__name__}: {e})")
            return
        step = compiled(opt, fullgraph=rkind == "basin-compiled") if comp else opt.step
        ids = frozenset(id(p) for p in matrix_split(model)[0]) if matrix else None
        runners.append(Runner(label, rkind, opt, step, matrix_ids=ids))

    if entry is None:  # AdamW context rows
        for label, extra in ADAMW_CONTEXT:
            add(label, "adamw", lambda m, e=extra: torch.optim.AdamW(m.parameters(), **ADAMW_HP, **e), False)  # fmt: skip
        if do_compile:
            add(
                "torch AdamW compiled",
                "adamw-compiled",
                lambda m: torch.optim.AdamW(m.parameters(), **ADAMW_HP, foreach=False),
                True,
            )
        return runners

    basin_hp = {k: v for k, v in entry.hp.items() if k not in entry.peer_only}
    basin_hp.update(entry.basin_hp)

    def make_basin(m: nn.Module, **extra: Any) -> Optimizer:
        if entry.matrix:  # the same split the peers get; the rest goes to basin's AdamW fallback
            matrices, rest = matrix_split(m)
            groups = [{"params": matrices, "matrix_rule": True}]
            groups += [{"params": rest, "matrix_rule": False}] if rest else []
            return bo.create(entry.name, groups, **basin_hp, **extra)
        return bo.create(entry.name, m.parameters(), **basin_hp, **extra)

    add("basin", "basin", make_basin, False)
    add("basin foreach", "basin-foreach", lambda m: make_basin(m, foreach=True), False)
    if "fused" in bo.info(entry.name).capabilities:
        add("basin fused", "basin-fused", lambda m: make_basin(m, fused=True), False)
    if do_compile:
        add("basin compiled", "basin-compiled", make_basin, True)
    for peer in entry.peers:
        add(peer.label, "peer", lambda m, p=peer: p.build(m, dict(entry.hp)), False)
    return runners


def measure(runners: list[Runner], warmup: int, steps: int, seed: int, notes: list[str]) -> None:
    torch._dynamo.reset()
    alive = []
    for r in runners:
        try:
            t0 = time.perf_counter()
            r.step()
            r.first_step_s = time.perf_counter() - t0
            for _ in range(warmup - 1):
                r.step()
        except Exception as e:  # a peer or a compile that fails here: report, keep going
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            notes.append(f"{r.label} failed: {type(e).__name__}: {msg}")
            continue
        alive.append(r)
    runners[:] = alive
    graphs_before = unique_graphs()
    rng = random.Random(seed)
    order = list(runners)
    for _ in range(steps):
        rng.shuffle(order)
        for r in order:
            t0 = time.perf_counter()
            r.step()
            r.times.append(time.perf_counter() - t0)
    new_graphs = unique_graphs() - graphs_before
    for r in runners:
        if r.kind.endswith("compiled") or r.kind == "basin-fused":
            r.graphs_during_timing = new_graphs
            if new_graphs:
                r.note = f"{new_graphs} recompile(s) during timing"


# ------------------------------------------------------------------ report


def fmt_ratio(x: float | None, target: float | None) -> str:
    if x is None:
        return ""
    mark = "" if target is None else (" ok" if x <= target else " MISS")
    return f"{x:.2f}x{mark}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    only = {n.strip().lower() for n in args.only.split(",")} if args.only else None
    registered = set(bo.available())
    notes: list[str] = []
    entries = []
    for e in ENTRIES:
        if only is not None and e.name not in only:
            continue
        if e.name not in registered:
            notes.append(f"{e.name}: not in basin.optim.available() on this branch; skipped")
            continue
        entries.append(e)
    if only is not None:
        unknown = only - {e.name for e in ENTRIES}
        if unknown:
            print(f"error: unknown --only name(s): {', '.join(sorted(unknown))}", file=sys.stderr)
            raise SystemExit(2)

    warmup, steps = (3, 5) if args.quick else (args.warmup, args.steps)
    if args.state_only:  # state sizes only: one step each, no compile, no timing
        warmup, steps, args.no_compile = 1, 1, True
    models = [m for m in ("4m", "mlp", "transformer") if m in set(args.models.split(","))]
    rows: list[dict[str, Any]] = []
    do_compile = not args.no_compile

    for kind in models:
        kind_entries = [e for e in entries if kind in e.models]
        if not kind_entries:
            continue
        # the AdamW trio (+ compiled AdamW) as context and as the compiled target
        ctx = build_runners(None, kind, args.seed, do_compile, notes)
        measure(ctx, warmup, steps, args.seed, notes)
        fused = next((r.median_ms for r in ctx if r.label == "torch AdamW fused"), None)
        for r in ctx:
            rows.append(_row(kind, "adamw", r, None, fused))
        for entry in kind_entries:
            runners = build_runners(entry, kind, args.seed, do_compile, notes)
            measure(runners, warmup, steps, args.seed, notes)
            peers = [r.median_ms for r in runners if r.kind == "peer"]
            fastest = min(peers) if peers else None
            for r in runners:
                rows.append(_row(kind, entry.name, r, fastest, fused))
            print(f"  measured {entry.name} on {kind}", file=sys.stderr, flush=True)

    result = dict(
        env=dict(
            torch=torch.__version__,
            python=platform.python_version(),
            machine=platform.machine(),
            threads=torch.get_num_threads(),
            warmup=warmup,
            steps=steps,
        ),
        rows=rows,
        notes=notes,
    )
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _row(
    kind: str, algo: str, r: Runner, fastest_peer: float | None, fused: float | None
) -> dict[str, Any]:
    ms = r.median_ms
    vs_peer = ms / fastest_peer if fastest_peer and r.kind.startswith("basin") else None
    vs_fused = ms / fused if fused else None
    return dict(
        model=kind,
        algorithm=algo,
        impl=r.label,
        kind=r.kind,
        median_ms=ms,
        min_ms=r.min_ms,
        vs_fastest_peer=vs_peer,
        vs_fused_adamw=vs_fused,
        state_bytes_per_param=r.state_bytes_per_param(),
        matrix_state_bytes_per_param=r.matrix_state_bytes_per_param(),
        recompiles_during_timing=r.graphs_during_timing,
        first_step_s=r.first_step_s,
        note=r.note,
    )


def print_table(result: dict[str, Any]) -> None:
    env = result["env"]
    print(
        f"optimizer step, median (and min) of {env['steps']} steps after {env['warmup']} warm-up; "
        f"torch {env['torch']}, {env['threads']} threads, {env['machine']}"
    )
    print(
        f"targets: basin eager <= {TARGET_EAGER}x fastest peer; "
        f"basin compiled <= {TARGET_COMPILED}x torch AdamW fused; basin fused both, "
        f"first step <= {TARGET_FIRST_STEP_S:g} s"
    )
    head = (
        f"{'model':<11} {'algorithm':<10} {'implementation':<26} {'ms/step':>9} {'min ms':>8} "
        f"{'/fastest peer':>13} {'/AdamW fused':>13} {'1st step s':>10} {'state B/B':>9} "
        f"{'matrix B/B':>10}  note"
    )
    print(head)
    print("-" * len(head))
    last = None
    for row in result["rows"]:
        key = (row["model"], row["algorithm"])
        if last is not None and key != last:
            print()
        last = key
        peer_target = TARGET_EAGER if row["kind"] in ("basin", "basin-fused") else None
        fused_target = (
            TARGET_COMPILED if row["kind"] in ("basin-compiled", "basin-fused") else None
        )
        vs_fused = row["vs_fused_adamw"] if row["kind"] != "peer" else None
        print(
            f"{row['model']:<11} {row['algorithm']:<10} {row['impl']:<26} "
            f"{row['median_ms']:>9.3f} {row['min_ms']:>8.3f} "
            f"{fmt_ratio(row['vs_fastest_peer'], peer_target):>13} "
            f"{fmt_ratio(vs_fused, fused_target):>13} {_fmt_first(row):>10} "
            f"{row['state_bytes_per_param']:>9.2f} {_fmt_state(row):>10}  {row['note']}"
        )
    if result["notes"]:
        print("\nnotes:")
        for n in result["notes"]:
            print(f"  - {n}")


def _fmt_first(row: dict[str, Any]) -> str:
    v = row.get("first_step_s")
    if v is None:
        return ""
    mark = " ok" if v <= TARGET_FIRST_STEP_S else " MISS"
    return f"{v:.1f}{mark if row['kind'] == 'basin-fused' else ''}"


def _fmt_state(row: dict[str, Any]) -> str:
    v = row.get("matrix_state_bytes_per_param")
    return "" if v is None else f"{v:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 warm-up + 5 timed steps (smoke test)")
    ap.add_argument("--only", default="", help="comma-separated basin names, e.g. adabelief,muon")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument(
        "--state-only",
        action="store_true",
        help="state bytes only: one step per implementation, no compile (timings meaningless)",
    )
    ap.add_argument("--json", default="", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--models", default="4m,mlp,transformer", help="subset of 4m,mlp,transformer")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50, help="timed steps (>= 30 for a report)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
