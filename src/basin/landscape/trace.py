"""Hessian (or GGN) trace by Hutch++, Hutchinson, XTrace or the Gauss-Newton split, with a
standard error (XTrace and XNysTrace are in :mod:`basin.landscape.xtrace`).

References: M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
Laplacian smoothing splines", 1989; R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++:
Optimal Stochastic Trace Estimation", arXiv:2010.09649, 2021.

Hutch++ with a budget of ``m`` products: ``m/3`` to sketch ``H S`` (``S`` Rademacher), whose
orthonormal basis ``Q`` captures the top of the spectrum, ``m/3`` for the exact
``tr(Q^T H Q)``, and ``m/3`` Rademacher probes ``g`` for Hutchinson on the deflated remainder,
``tr((I-QQ^T) H (I-QQ^T)) ~ mean g^T (I-QQ^T) H (I-QQ^T) g``. The standard error is the sample
standard deviation of those probe values over the square root of their number (the deflated part
is the only random part that remains once ``Q`` is fixed). On a decaying spectrum this needs far
fewer products than Hutchinson for the same error.

``method="gn-split"`` splits the Hessian into the generalised Gauss-Newton matrix and the rest,
``H = G + R`` with ``G = J^T H_L J`` and ``R = sum_i r_i d2f_i/dw2`` (``r = dL/df``), and
estimates ``tr(H) = tr(G) + tr(R)``: ``tr(G)`` is computed exactly, with no sampling, as
``sum_n sum_k lambda_nk |J_n^T u_nk|^2`` from the eigenpairs ``(lambda_nk, u_nk)`` of each
example's ``C x C`` output Hessian block and one vmapped per-example Jacobian-transpose pass per
output direction (``C`` passes per batch; the per-block diagonal of BackPACK's exact GGN, Dangel
et al., "BackPACK: Packing more into backprop", ICLR 2020). Only ``tr(R)`` is estimated, by
Hutchinson with ``n_hvp`` residual products. Near a minimum ``r`` is small and ``R`` carries a
small part of the Frobenius mass, so the error is several times smaller than Hutchinson's or
Hutch++'s on ``H`` for the same products, even on the bulk-dominated spectra where Hutch++'s
deflation gains nothing (on the trained 1,642-parameter MLP of ``benchmarks/hessian.py``, 11x
less variance per probe than Hutchinson on ``H``, measured with the dense matrices). It needs a loss that is a sum or mean of per-example terms (checked), a model that treats
examples independently (no BatchNorm in train mode) and at most ``max_outputs`` outputs per
example. With ``kind="ggn"`` it returns the exact ``tr(G)`` (standard error 0).

Differences from PyHessian: PyHessian stops Hutchinson when the running mean changes by less than
1e-3 between probes, which says nothing about the error; here the budget is fixed and the
standard error is reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from ._hvp import (
    NONFINITE,
    CurvatureOperator,
    autocast_off,
    full_precision,
    make_operator,
)
from .xtrace import xnystrace, xtrace

__all__ = ["TraceResult", "hessian_trace"]


@dataclass(frozen=True)
class TraceResult:
    """``trace`` estimate, its ``stderr``, the ``method``, products ``n_hvp`` and ``seconds``;
    ``samples`` are the Hutchinson probe values (of the deflated part for Hutch++, of the
    residual ``H - G`` for ``"gn-split"``); ``ggn_trace`` is the exact Gauss-Newton part and
    ``n_jacobian_passes`` the per-example Jacobian-transpose passes it took (``"gn-split"``
    only; each is one vmapped backward over a batch)."""

    trace: float
    stderr: float
    method: str
    n_hvp: int
    seconds: float
    samples: tuple[float, ...]
    ggn_trace: float | None = None
    n_jacobian_passes: int = 0


METHODS = ("auto", "hutch++", "hutchinson", "xtrace", "xnystrace", "gn-split", "gn-xtrace")
# the fewest products that give a standard error
MIN_PRODUCTS = {
    "auto": 4,
    "hutch++": 3,
    "hutchinson": 2,
    "xtrace": 4,
    "xnystrace": 2,
    "gn-split": 2,
    "gn-xtrace": 4,
}
GN_METHODS = ("gn-split", "gn-xtrace")


class GNSplitInapplicable(ValueError):
    """The model or loss does not allow the exact Gauss-Newton split (``method="auto"`` then
    falls back to XTrace on the whole operator)."""


def _rademacher(n: int, dtype, device, gen) -> Tensor:
    return (torch.randint(0, 2, (n,), generator=gen, device=device) * 2 - 1).to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the small dense parts (QR of the sketch, probe dot products, output-Hessian
    eigendecompositions): float32 for half-precision models, which torch's QR and eigh do not
    support and whose rounding would swamp a dot product over all parameters."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dot(a: Tensor, b: Tensor) -> float:
    return float(a.double() @ b.double())


def _mean_se(samples: list[float]) -> tuple[float, float]:
    t = torch.tensor(samples, dtype=torch.float64)
    mean = float(t.mean())
    se = float(t.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
    return mean, se


def hutchinson(matvec: Callable[[Tensor], Tensor], n: int, m: int, dtype, device, gen):
    """Plain Hutchinson: ``m`` Rademacher probes -> (estimate, stderr, samples)."""
    samples = []
    for _ in range(m):
        z = _rademacher(n, dtype, device, gen)
        samples.append(_dot(z, matvec(z)))
    mean, se = _mean_se(samples)
    return mean, se, samples


def hutchpp(matvec: Callable[[Tensor], Tensor], n: int, m: int, dtype, device, gen):
    """Hutch++ with ``m`` products -> (estimate, stderr, samples)."""
    s = m // 3
    g = m - 2 * s
    work = _work_dtype(dtype)
    S = torch.stack([_rademacher(n, dtype, device, gen) for _ in range(s)], dim=1)
    Y = torch.stack([matvec(S[:, i]).to(work) for i in range(s)], dim=1)
    Q, _ = torch.linalg.qr(Y)
    exact = sum(_dot(Q[:, i], matvec(Q[:, i].to(dtype))) for i in range(s))
    samples = []
    for _ in range(g):
        z = _rademacher(n, work, device, gen)
        z = z - Q @ (Q.T @ z)
        samples.append(_dot(z, matvec(z.to(dtype))))
    mean, se = _mean_se(samples)
    return exact + mean, se, samples


def _train_mode_batchnorm(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return name or type(m).__name__
    return None


def _train_mode_dropout(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return name or type(m).__name__
    return None


def _output_hessian_blocks(op: CurvatureOperator, out: Tensor, y: Tensor) -> Tensor:
    """(N, C, C) per-example blocks of the Hessian of the batch loss w.r.t. the outputs, one
    loss-only product per output direction; raises if the loss couples examples."""
    n = out.shape[0]
    z = out.detach().reshape(n, -1).requires_grad_(True)
    c = z.shape[1]
    with torch.enable_grad():
        loss = op.loss(z.view_as(out), y)
        gz = torch.autograd.grad(loss, z, create_graph=True)[0]
        if not gz.requires_grad:  # loss linear in the outputs: H_L = 0
            return torch.zeros(n, c, c, dtype=z.dtype, device=z.device)

        def hvp(v):
            return torch.autograd.grad(gz, z, v, retain_graph=True, allow_unused=True)[0]

        if n > 1:  # a loss that is a sum of per-example terms has a block-diagonal H_L
            probe = torch.zeros_like(z)
            probe[0] = 1.0
            hp = hvp(probe)
            if hp is not None and float(hp[1:].abs().max()) > 1e-6 * float(hp.abs().max()):
                raise GNSplitInapplicable(
                    "method='gn-split' needs a loss that is a sum or mean of per-example terms; "
                    "this loss_fn couples examples (use method='hutch++')"
                )
        cols = []
        for k in range(c):
            v = torch.zeros_like(z)
            v[:, k] = 1.0
            h = hvp(v)
            cols.append(torch.zeros_like(z) if h is None else h)
    blocks = torch.stack(cols, dim=2).detach()
    return 0.5 * (blocks + blocks.transpose(1, 2))


def _linear_sq_norms(a: Tensor, d: Tensor, weight: bool, bias: bool) -> Tensor:
    """Per-example squared norms of a Linear layer's parameter gradients, from its inputs
    ``a`` (N, ..., d_in) and output gradients ``d`` (N, ..., d_out), without forming them
    when there is one position per example (``|d a^T|^2 = |d|^2 |a|^2``)."""
    n = a.shape[0]
    a, d = a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1])
    out = torch.zeros(n, dtype=d.dtype, device=d.device)
    if weight:
        if a.shape[1] == 1:
            out = out + a.square().sum((1, 2)) * d.square().sum((1, 2))
        elif a.shape[1] ** 2 <= a.shape[2] * d.shape[2]:  # Gram form, O(T^2 (d_in + d_out))
            out = out + ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
        else:
            out = out + (d.transpose(1, 2) @ a).square().sum((1, 2))
    if bias:
        out = out + d.sum(1).square().sum(1)
    return out


def _checked_linear_pass(op, linear, fast, flat: Tensor, u: Tensor) -> dict[str, Tensor]:
    """Output gradients of the hooked Linear layers for the cotangent ``u``, keeping only the
    layers whose parameter gradient they reproduce (``sum_n d_n a_n^T``): a weight also used
    outside its module's forward would be missed by the per-layer formula."""
    acts = [fast[m][1] for m in fast]
    own = op.leaves
    leaves = [own[n] for m in fast for n in linear[m][1]]
    got = torch.autograd.grad(
        flat, acts + leaves, u, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    grads = iter(got[len(acts) :])
    # rounding of the working precision: 1e-8 (float64), 1e-3 (float32), 3e-2 (half: eps 1e-3
    # for float16, 8e-3 for bfloat16); a weight also used elsewhere differs by O(1)
    tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(flat.dtype, 3e-2)
    kept = {}
    work = _work_dtype(flat.dtype)
    for (m, (a, _)), d in zip(fast.items(), got[: len(acts)]):
        a2 = a.detach().reshape(-1, a.shape[-1]).to(work)
        d2 = d.reshape(-1, d.shape[-1]).to(work)
        want = ([d2.T @ a2] if linear[m][2] else []) + ([d2.sum(0)] if linear[m][3] else [])
        if all(
            float((w - g.to(work)).norm()) <= tol * max(float(g.norm()), 1e-30)
            for w, g in zip(want, [next(grads) for _ in want])
        ):
            kept[m] = d
    return kept


def _exact_ggn_trace(op: CurvatureOperator, max_outputs: int, memory: int = 2**26):
    """Exact ``tr(J^T H_L J) = sum_n sum_k lambda_nk |J_n^T u_nk|^2`` over the data
    (batch-size weighted) -> (trace, passes).

    ``nn.Linear`` layers get their per-example squared gradient norms from their inputs and
    output gradients (one backward pass to the activations per output direction ``k``); every
    other selected parameter (convolutions, norms, embeddings, shared layers) from per-example
    Jacobian-transpose products by ``torch.func.vmap``."""
    model = op.model
    bn = _train_mode_batchnorm(model)
    if bn is not None:
        raise GNSplitInapplicable(
            f"method='gn-split' needs examples that are independent, but {bn} is a BatchNorm in "
            "train mode: call model.eval() or use method='hutch++'"
        )
    drop = _train_mode_dropout(model)
    if drop is not None:
        raise GNSplitInapplicable(
            f"method='gn-split' needs a deterministic forward (its per-example passes cannot "
            f"reuse the batch's masks), but {drop} is a Dropout in train mode: call "
            "model.eval() or use method='hutch++'"
        )
    selected = set(op.names)
    linear = {}  # module name -> (module, [selected parameter names], weight?, bias?)
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            prefix = f"{name}." if name else ""
            w, b = prefix + "weight", prefix + "bias"
            ws, bs = w in selected, mod.bias is not None and b in selected
            if ws or bs:
                linear[name] = (mod, [n for n, on in ((w, ws), (b, bs)) if on], ws, bs)
    in_linear = {n for v in linear.values() for n in v[1]}
    rest = [n for n in op.names if n not in in_linear]
    total, passes = 0.0, 0
    for i, (x, y, nb) in enumerate(op.batches):
        seen: dict[str, list] = {m: [] for m in linear}
        hooks = [
            mod.register_forward_hook(
                lambda _m, i, o, key=m, seen=seen: seen[key].append((i[0], o))
            )
            for m, (mod, *_) in linear.items()
        ]
        try:
            out = op.output(i)
        finally:
            for h in hooks:
                h.remove()
        c = out[0].numel()
        if c > max_outputs:
            raise GNSplitInapplicable(
                f"method='gn-split' computes one Jacobian pass per output; the model has {c} "
                f"outputs per example, more than max_outputs={max_outputs} (raise it, or use "
                "method='hutch++')"
            )
        # eigh in float32 at least (not implemented for half precision); the eigenvectors go
        # back to the model's dtype as cotangents
        work = _work_dtype(out.dtype)
        blocks = _output_hessian_blocks(op, out.detach(), y).to(work)
        if not torch.isfinite(blocks).all():
            raise ValueError(NONFINITE)
        lam, vecs = torch.linalg.eigh(blocks)
        vecs = vecs.to(out.dtype)
        fast = {m: v[0] for m, v in seen.items() if len(v) == 1 and v[0][1].requires_grad}
        # a layer called more than once per forward (shared weights) sums its contributions
        # before the norm: those go through the generic path
        slow = rest + [n for m, v in linear.items() if m not in fast for n in v[1]]
        sq = torch.zeros(nb, c, dtype=work, device=out.device)
        if fast:
            flat = out.reshape(nb, c)
            first = _checked_linear_pass(op, linear, fast, flat, vecs[:, :, 0])
            slow += [n for m in linear if m in fast and m not in first for n in linear[m][1]]
            fast = {m: v for m, v in fast.items() if m in first}
        if fast:
            acts = [fast[m][1] for m in fast]
            for k in range(c):
                ds = (
                    list(first.values())
                    if k == 0
                    else torch.autograd.grad(
                        flat,
                        acts,
                        vecs[:, :, k],
                        retain_graph=True,
                        allow_unused=True,
                        materialize_grads=True,
                    )
                )
                for (m, (a, _)), d in zip(fast.items(), ds):
                    sq[:, k] += _linear_sq_norms(
                        a.detach().to(work), d.to(work), linear[m][2], linear[m][3]
                    )
        if slow:
            sq += _per_example_sq(op, slow, x, vecs, memory).to(work)
        del out
        # H_L of the batch-mean loss already carries 1/nb; batches are weighted by size
        total += nb / op.total * float((lam.double() * sq.double()).sum())
        passes += c
    if not math.isfinite(total):
        raise ValueError(NONFINITE)
    return total, passes


def _per_example_sq(op: CurvatureOperator, names, x, vecs: Tensor, memory: int) -> Tensor:
    """(N, C): ``|J_n^T u_nk|^2`` restricted to ``names``, by vmapped per-example vjps."""
    own = op.leaves
    chosen = {n: own[n].detach() for n in names}
    size = sum(t.numel() for t in chosen.values())

    def one(x_n, u_n):  # u_n: (C, C), row k = k-th unit eigenvector of this example's block
        def f(p):
            x1 = tree_map(lambda t: t.unsqueeze(0), x_n)
            return op.call(p, x1).reshape(-1)

        _, pull = vjp(f, chosen)
        g = vmap(pull)(u_n)[0]
        return sum(t.reshape(t.shape[0], -1).square().sum(1) for t in g.values())

    n, c = vecs.shape[0], vecs.shape[1]
    chunk = max(1, min(n, memory // max(1, c * size)))
    return vmap(one, chunk_size=chunk)(x, vecs.transpose(1, 2).contiguous())


@full_precision
def hessian_trace(
    model: nn.Module | CurvatureOperator,
    loss_fn=None,
    data: Any = None,
    *,
    n_hvp: int = 99,
    method: str = "hutch++",
    params: str | Sequence[str] | None = None,
    kind: str | None = None,
    seed: int = 0,
    max_outputs: int = 256,
) -> TraceResult:
    """Trace of the Hessian (or GGN, ``kind="ggn"``) of the data loss.

    Args:
        n_hvp: budget of curvature-vector products (Hutch++ needs >= 3, Hutchinson >= 2).
        method: ``"hutch++"`` (default), ``"hutchinson"``, ``"xtrace"`` (XTrace,
            arXiv:2301.07825: ``n_hvp // 2`` Gaussian test vectors, error estimate from its
            leave-one-out estimates), ``"xnystrace"`` (XNysTrace, for the positive semidefinite
            ``kind="ggn"`` only), ``"gn-split"`` (exact Gauss-Newton trace plus Hutchinson on
            the residual ``H - G`` with ``n_hvp`` products; see the module notes for when it
            applies), ``"gn-xtrace"`` (the same split with XTrace on the residual), or
            ``"auto"``: ``"gn-split"`` (exact for ``kind="ggn"``) where the split applies,
            else ``"xtrace"`` (``"xnystrace"`` for ``kind="ggn"``). The result's ``method``
            names the one that ran.
        max_outputs: ``"gn-split"`` refuses models with more outputs per example (it makes
            one per-example Jacobian pass per output).
        kind: ``"hessian"`` (default) or ``"ggn"``. A ``CurvatureOperator`` passed as
            ``model`` fixes the kind and selection: ``params``/``kind`` may only repeat them
            (else ``ValueError``); with ``"gn-split"`` its kind must be ``"hessian"`` or
            ``"ggn"``, and the residual operator is built by ``op.with_kind("residual")``.
        params: parameter names / prefixes (per-layer trace); seed: seeds the probes and the
            random ops of the forward (Dropout in train mode; see
            :func:`~basin.landscape.hessian_eigenvalues`).

    Half-precision models (float16, bfloat16) get their products in their own dtype and the
    small dense parts (QR, eigh, dot products) in float32. A non-finite product or Gauss-Newton
    trace (NaN/inf loss or inputs) raises ``ValueError``, as the eigenvalue and density
    functions do.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lo = MIN_PRODUCTS[method]
    if isinstance(n_hvp, bool) or not isinstance(n_hvp, int) or n_hvp < lo:
        raise ValueError(f"n_hvp must be an integer >= {lo} for {method}, got {n_hvp!r}")
    ggn, passes, op = None, 0, None
    if method in GN_METHODS or method == "auto":
        if isinstance(model, CurvatureOperator):
            base = make_operator(model, loss_fn, data, params=params, kind=kind)
            kind = base.kind
        else:
            base = None
            kind = "hessian" if kind is None else kind
        if kind not in ("hessian", "ggn"):
            if method != "auto":
                raise ValueError(f"method='{method}' needs kind 'hessian' or 'ggn', got {kind!r}")
            op, method = base, "xtrace"
        else:
            if base is not None:  # reuse its model, data, selection and seed
                op = base.with_kind("residual")
            else:
                op = make_operator(model, loss_fn, data, params=params, kind="residual", seed=seed)
            try:
                with autocast_off(op.device):
                    ggn, passes = _exact_ggn_trace(op, max_outputs)
                if method == "auto":  # Hutchinson beats XTrace on the bulk residual
                    method = "gn-split"
            except GNSplitInapplicable:
                if method != "auto":
                    raise
                method = "xnystrace" if kind == "ggn" else "xtrace"
                op = base if base is not None else None
    if op is None:
        op = make_operator(model, loss_fn, data, params=params, kind=kind, seed=seed)
    if method == "hutch++" and n_hvp // 3 >= op.n:
        raise ValueError(f"n_hvp={n_hvp} is more than 3x the parameter count {op.n}")
    if method in ("xtrace", "gn-xtrace") and n_hvp // 2 >= op.n:
        raise ValueError(f"n_hvp={n_hvp} is more than 2x the parameter count {op.n}")
    if method == "xnystrace":
        if op.kind != "ggn":
            raise ValueError(
                f"method='xnystrace' needs a positive semidefinite operator (kind='ggn'), got "
                f"kind {op.kind!r}; use method='xtrace'"
            )
        if n_hvp > op.n:
            raise ValueError(f"n_hvp={n_hvp} is more than the parameter count {op.n}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    start = op.n_products
    estimators = {
        "hutch++": hutchpp,
        "hutchinson": hutchinson,
        "gn-split": hutchinson,
        "xtrace": xtrace,
        "gn-xtrace": xtrace,
        "xnystrace": xnystrace,
    }
    if ggn is not None and kind == "ggn":
        est, se, samples = ggn, 0.0, []
    else:
        est, se, samples = estimators[method](op.matvec, op.n, n_hvp, op.dtype, op.device, gen)
        if ggn is not None:
            est += ggn
    return TraceResult(
        trace=est,
        stderr=se,
        method=method,
        n_hvp=op.n_products - start,
        seconds=time.perf_counter() - t0,
        samples=tuple(samples),
        ggn_trace=ggn,
        n_jacobian_passes=passes,
    )
