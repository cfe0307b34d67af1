"""Gradient-regularized Newton with approximate Hessians and the adaptive search on the
gradient-normalized smoothness (Semenov, Jaggi, Doikov, 2025, arXiv:2506.13710, Algorithm 1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BasinOptimizer,
    check_bool,
    check_grad,
    check_int,
    check_lr,
    check_range,
    scalar_lr,
)
from .registry import OptimInfo, Paper, register

__all__ = ["RegularizedNewton"]

SOLVERS = ("cg", "exact")


class RegularizedNewton(BasinOptimizer):
    r"""Newton steps regularized by the gradient norm, on the flat vector ``x`` of all the
    parameters::

        lambda_k = ||g_k|| / (gamma_k + eps)
        d_k      = -(A_k + lambda_k I)^{-1} g_k               (A_k: Hessian or an approximation)
        accept x+ = x_k + d_k if f(x_k) - f(x+) >= ||g(x+)||^2 / (8 lambda_k):
                  gamma_{k+1} = max(2 gamma_k, gamma_min); else gamma_k <- gamma_k / 2 and
                  solve again (at most ``max_search`` tries; the last one is taken)
        x_{k+1}  = x_k + lr d_k

    ``gamma_k`` estimates the gradient-normalized smoothness (the radius around ``x_k`` where
    ``A_k`` linearizes the gradient well); with ``adaptive=False`` it stays at ``gamma`` and
    one solve is taken per step (``gamma = sqrt(||g|| / H)`` is the ``lambda = sqrt(H ||g||)``
    rule of gradient-regularized Newton).

    ``step(closure)`` needs a closure that zeroes the gradients, computes the loss, calls
    ``backward()`` and returns the loss (``step`` returns its value at ``x_k``); one step costs one closure call at ``x_k`` plus one per
    try, plus the curvature products. ``curvature`` gives ``A_k``:

    - ``None``: Hessian-vector products by central differences of closure gradients,
      ``(g(x + h v) - g(x - h v)) / (2 h)`` with ``h = eps_dtype^(1/3) max(1, ||x||) / ||v||``
      (two closure calls per product; exact for quadratics up to rounding);
    - a callable ``curvature()`` called once per step at the current parameters, returning a
      :class:`basin.landscape.CurvatureOperator` (Hessian or GGN products on the current batch;
      its selection must be these parameters in the same order) or any function of a flat
      vector ``v`` returning ``A_k v``.

    ``solver``: ``"cg"`` solves the regularized system by conjugate gradients (``cg_iters``
    iterations at most, stopped at residual ``cg_tol * ||g||``), ``"exact"`` builds the dense
    ``A_k`` from ``n`` products and solves by Cholesky (small models). A system that is not
    positive definite (negative curvature of a non-convex ``A_k``) counts as a rejected try
    (``gamma`` halved, ``lambda`` larger).

    One parameter group (the step is one system on all parameters); a second group raises
    ``ValueError``. ``lr`` (1.0, >= 0; a float or a one-element tensor) scales the step that
    the search accepted (the search and ``gamma`` run on the full step, as in the paper):
    ``x+ = x_k + lr d_k``; ``lr=1`` is the paper's method. ``maximize``
    maximizes the closure's loss (the method runs on its negation).

    Arguments: ``lr`` 1.0, ``gamma`` 1.0 (> 0, the authors' ``gamma_0``), ``adaptive`` True, ``max_search``
    40 (>= 1), ``gamma_min`` 1e-9 (> 0), ``eps`` 1e-8 (>= 0), ``solver`` "cg", ``cg_iters`` 100
    (>= 1), ``cg_tol`` 1e-10 (>= 0), ``maximize`` False. State: ``gamma`` and ``lam`` (the last ``lambda_k``).

    Reference: Semenov, Jaggi, Doikov, "Gradient-Normalized Smoothness for Optimization with
    Approximate Hessians", 2025, arXiv:2506.13710; code github.com/epfml/grad-norm-smooth.
    """

    def __init__(
        self,
        params: Iterable[Any],
        gamma: float = 1.0,
        *,
        lr: float | Tensor = 1.0,
        adaptive: bool = True,
        max_search: int = 40,
        gamma_min: float = 1e-9,
        eps: float = 1e-8,
        curvature: Callable[[], Any] | None = None,
        solver: str = "cg",
        cg_iters: int = 100,
        cg_tol: float = 1e-10,
        maximize: bool = False,
    ) -> None:
        inf = math.inf
        check_bool("adaptive", adaptive)
        check_int("max_search", max_search, 1)
        if curvature is not None and not callable(curvature):
            raise ValueError(f"curvature must be None or a callable, got {curvature!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        check_int("cg_iters", cg_iters, 1)
        check_range("cg_tol", cg_tol, 0.0, inf)
        defaults = {
            "lr": lr,
            "gamma": gamma,
            "gamma_min": gamma_min,
            "eps": eps,
            "maximize": maximize,
        }
        super().__init__(params, defaults)
        self.adaptive = adaptive
        self.max_search = max_search
        self.curvature = curvature
        self.solver = solver
        self.cg_iters = cg_iters
        self.cg_tol = float(cg_tol)

    def _check_hparams(self, group: dict[str, Any]) -> None:
        inf = math.inf
        check_lr(group["lr"])
        check_range("gamma", group["gamma"], 0.0, inf, low_inclusive=False)
        check_range("gamma_min", group["gamma_min"], 0.0, inf, low_inclusive=False)
        check_range("eps", group["eps"], 0.0, inf)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validated as every basin optimizer's; a second group is refused (the step is one
        Newton system on all parameters, with one ``lambda``)."""
        super().add_param_group(param_group)
        if len(self.param_groups) > 1:
            self.param_groups.pop()
            raise ValueError(
                "RegularizedNewton takes one parameter group (the step is one Newton system on "
                "all parameters): pass all parameters in one group"
            )

    # ------------------------------------------------------------------ flat vectors
    def _params(self) -> list[Tensor]:
        return list(self.param_groups[0]["params"])

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    def _set_params(self, flat: Tensor) -> None:
        i = 0
        with torch.no_grad():
            for p in self._params():
                p.copy_(flat[i : i + p.numel()].view_as(p))
                i += p.numel()

    def _eval(self, closure: Callable[[], Any]) -> tuple[Any, float, Tensor]:
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError("the closure must return the loss")
        for p in self._params():
            if p.grad is not None:
                check_grad(p, "RegularizedNewton")
        grad = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                if p.grad is None
                else p.grad.detach().reshape(-1)
                for p in self._params()
            ]
        )
        value = float(loss.detach() if isinstance(loss, Tensor) else loss)
        if self.param_groups[0]["maximize"]:  # minimize the negation
            value, grad = -value, -grad
        if not math.isfinite(value) or not torch.isfinite(grad).all():
            raise ValueError(f"non-finite loss or gradient (loss {value})")
        return loss, value, grad.clone()

    # ------------------------------------------------------------------ curvature
    def _operator(self, closure: Callable[[], Any], x: Tensor) -> Callable[[Tensor], Tensor]:
        if self.curvature is None:
            scale = torch.finfo(x.dtype).eps ** (1 / 3) * max(1.0, float(x.norm()))

            def fd(v: Tensor) -> Tensor:
                nv = float(v.norm())
                if nv == 0.0:
                    return torch.zeros_like(v)
                h = scale / nv
                self._set_params(x + h * v)
                _, _, gp = self._eval(closure)
                self._set_params(x - h * v)
                _, _, gm = self._eval(closure)
                self._set_params(x)
                return (gp - gm) / (2 * h)

            return fd
        op = self.curvature()
        matvec = getattr(op, "matvec", None)
        if matvec is not None:
            leaves = getattr(op, "leaves", None)
            if isinstance(leaves, Mapping):
                ours = self._params()
                theirs = list(leaves.values())
                if len(theirs) != len(ours) or any(
                    a.data_ptr() != b.data_ptr() or a.shape != b.shape for a, b in zip(theirs, ours)
                ):
                    raise ValueError(
                        "curvature's CurvatureOperator must select exactly the optimizer's "
                        "parameters, in the same order"
                    )
        elif not callable(op):
            raise ValueError("curvature() must return a CurvatureOperator or a callable")
        else:
            matvec = op
        if self.param_groups[0]["maximize"]:  # the curvature of the negated loss
            return lambda v: -matvec(v)
        return matvec

    def _cg(self, av: Callable[[Tensor], Tensor], lam: float, g: Tensor) -> Tensor | None:
        """Solve (A + lam I) d = -g by conjugate gradients; None on non-positive curvature."""
        d = torch.zeros_like(g)
        r = -g.clone()
        p = r.clone()
        rr = float(r @ r)
        stop = (self.cg_tol * float(g.norm())) ** 2
        for _ in range(self.cg_iters):
            if rr <= stop:
                break
            q = av(p) + lam * p
            pq = float(p @ q)
            if not pq > 0.0:
                return None
            alpha = rr / pq
            d = d + alpha * p
            r = r - alpha * q
            rr_new = float(r @ r)
            p = r + (rr_new / rr) * p
            rr = rr_new
        return d

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if closure is None:
            raise ValueError("RegularizedNewton.step needs a closure that returns the loss")
        group = self.param_groups[0]
        state = self.state[self._params()[0]]
        gamma = float(state.get("gamma", float(group["gamma"])))
        eps, gamma_min = float(group["eps"]), float(group["gamma_min"])
        lr = float(scalar_lr(group["lr"]))
        x = self._flat_params()
        loss, f, g = self._eval(closure)
        g_norm = float(g.norm())
        if g_norm == 0.0:
            state["gamma"] = gamma
            return loss
        av = self._operator(closure, x)
        dense = eye = None
        if self.solver == "exact":
            eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
            dense = torch.stack([av(e) for e in eye], dim=1)
            dense = 0.5 * (dense + dense.T)
            if x.dtype not in (torch.float32, torch.float64):  # no Cholesky in half/bfloat16
                dense, eye = dense.float(), eye.float()
        lam = g_norm / (gamma + eps)
        moved = False
        taken: Tensor | None = None  # the last solved direction, tried at x_k + d
        for i in range(self.max_search + 1):
            if i == self.max_search:
                break  # tries exhausted: keep the last point
            lam = g_norm / (gamma + eps)
            if dense is not None and eye is not None:
                chol, info = torch.linalg.cholesky_ex(dense + lam * eye)
                rhs = -g[:, None].to(chol.dtype)
                d = None if int(info) != 0 else torch.cholesky_solve(rhs, chol)[:, 0].to(x.dtype)
            else:
                if moved:  # a rejected try moved the parameters: products at x_k again
                    self._set_params(x)
                    av = self._operator(closure, x)
                    moved = False
                d = self._cg(av, lam, g)
            if d is None:  # not positive definite: regularize more
                gamma *= 0.5
                continue
            self._set_params(x + d)
            moved, taken = True, d
            if not self.adaptive:
                break
            _, f_new, g_new = self._eval(closure)
            if f - f_new >= float(g_new @ g_new) / (8 * lam):
                gamma = max(2.0 * gamma, gamma_min)
                break
            gamma *= 0.5
        if taken is not None and lr != 1.0:  # the search ran on the full step; lr scales it
            self._set_params(x + lr * taken)
        state["gamma"] = gamma
        state["lam"] = lam
        return loss


register(
    OptimInfo(
        name="regularized_newton",
        cls=RegularizedNewton,
        paper=Paper(
            "Gradient-Normalized Smoothness for Optimization with Approximate Hessians",
            "Semenov, Jaggi, Doikov",
            "2506.13710",
            2025,
        ),
        state_memory=0.0,
        state_note=(
            "two numbers (gamma, lambda); a step holds ~6 flat copies of the parameters "
            "(x, g, CG's d, r, p, q) while it runs"
        ),
        # one system on all parameters: no foreach path, no per-group settings; eager only
        # (Python control flow on the search and CG)
        capabilities=frozenset({"maximize", "closure"}),
        family="quasi-newton",
        # a Newton step has its own scale: no workload lr, no batch-size rule
        lr_scaling="none",
        lr_from={},
        # the bench runs every entry on every workload (largest ~70k parameters): 10 CG
        # iterations of finite-difference products (21 closure calls) per try keeps a step
        # near 25 forward/backward passes
        defaults={"cg_iters": 10},
        search_space={
            "lr": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
            "gamma": {"type": "float", "low": 1e-2, "high": 1e2, "log": True},
        },
        needs_closure=True,
    )
)
