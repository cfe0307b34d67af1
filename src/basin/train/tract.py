"""TrAct: training the first layer's activations (Petersen et al., NeurIPS 2024,
arXiv:2410.23970)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from basin.optim._base import check_range

__all__ = [
    "TrActConv1d",
    "TrActConv2d",
    "TrActLinear",
    "bench_method",
    "bench_method_adamw",
    "first_layer",
    "tract",
    "tract_linear",
    "tract_weight_grad",
]

SOLVERS = ("auto", "direct", "woodbury")


@dataclass(frozen=True)
class _Spec:
    """How a layer turns its input into the rows ``A`` ([groups, b, d]) of its weight gradient."""

    kind: str  # "linear" | "conv"
    lambda_: float
    solver: str
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    pad: tuple[int, ...] = ()  # F.pad order (last dim first), applied before unfolding
    pad_mode: str = "constant"
    groups: int = 1


def _check(lambda_: Any, solver: Any) -> tuple[float, str]:
    lam = check_range("lambda_", lambda_, 0.0, math.inf, low_inclusive=False, high_inclusive=False)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return lam, solver


def _activations(x: Tensor, spec: _Spec) -> Tensor:
    """``A`` of the layer: ``[groups, b, d]`` with ``b`` = batch x positions and ``d`` the fan-in
    of one output unit (``in_features``, or ``in_channels / groups x prod(kernel)``)."""
    if spec.kind == "linear":
        return x.reshape(1, -1, x.shape[-1])
    if any(spec.pad):
        x = F.pad(x, list(spec.pad), mode=spec.pad_mode)
    ks, st, dl = spec.kernel_size, spec.stride, spec.dilation
    if len(ks) == 1:  # Conv1d: a 1 x L image
        x, ks, st, dl = x.unsqueeze(-2), (1, *ks), (1, *st), (1, *dl)
    cols = F.unfold(x, ks, dilation=dl, padding=0, stride=st)  # [N, C * k, P], c-major
    n, ck, p = cols.shape
    g = spec.groups
    cols = cols.reshape(n, g, ck // g, p).permute(1, 0, 3, 2)  # [g, N, P, C/g * k]
    return cols.reshape(g, n * p, ck // g)


def tract_weight_grad(
    grad: Tensor, a: Tensor, lambda_: float = 0.1, solver: str = "auto"
) -> Tensor:
    """TrAct's weight gradient from the plain one: ``grad @ (A^T A / b + lambda I)^-1`` per group,
    i.e. ``G^T A (A^T A / b + lambda I)^-1``, since the plain weight gradient is ``G^T A``.

    ``grad``: ``[groups, out / groups, d]``; ``a``: ``[groups, b, d]``. ``solver``: ``"direct"``
    (a ``d x d`` Cholesky solve), ``"woodbury"`` (a ``b x b`` one, through
    ``(A^T A / b + lambda I)^-1 = (I - A^T (b lambda I + A A^T)^-1 A) / lambda``) or ``"auto"``
    (Woodbury when ``b < d``). Computed in float64 for float64 inputs, float32 otherwise."""
    lam, solver = _check(lambda_, solver)
    work = torch.float64 if grad.dtype == torch.float64 else torch.float32
    g, a = grad.to(work), a.to(work)
    b, d = a.shape[-2], a.shape[-1]
    if solver == "woodbury" or (solver == "auto" and b < d):
        k = a @ a.mT  # [groups, b, b]
        k.diagonal(dim1=-2, dim2=-1).add_(b * lam)
        x = torch.cholesky_solve((g @ a.mT).mT, torch.linalg.cholesky(k))  # [groups, b, out/g]
        out = (g - x.mT @ a) / lam
    else:
        m = a.mT @ a / b  # [groups, d, d]
        m.diagonal(dim1=-2, dim2=-1).add_(lam)
        out = torch.cholesky_solve(g.mT, torch.linalg.cholesky(m)).mT
    return out.to(grad.dtype)


class _TrActGrad(torch.autograd.Function):
    """Identity on the weight; its backward turns the plain weight gradient into TrAct's. A
    graph-building backward (``create_graph=True``: Hessian-vector products) passes the plain
    gradient through, so curvature diagnostics describe the loss itself."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, x: Tensor, spec: _Spec) -> Tensor:
        ctx.save_for_backward(x)
        ctx.spec = spec
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if torch.is_grad_enabled():
            return grad, None, None
        (x,) = ctx.saved_tensors
        spec: _Spec = ctx.spec
        a = _activations(x, spec)
        shape = grad.shape
        g = grad.reshape(spec.groups, shape[0] // spec.groups, -1)
        out = tract_weight_grad(g, a, spec.lambda_, spec.solver)
        return out.reshape(shape), None, None


def tract_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    lambda_: float = 0.1,
    solver: str = "auto",
) -> Tensor:
    """``F.linear(input, weight, bias)`` whose weight gradient is TrAct's, with
    ``A = input.reshape(-1, in_features)`` (every leading position is a row)."""
    lam, solver = _check(lambda_, solver)
    w = _TrActGrad.apply(weight, input.detach(), _Spec("linear", lam, solver))
    return F.linear(input, w, bias)


class TrActLinear(nn.Linear):
    r"""``nn.Linear`` trained with TrAct (Petersen et al., arXiv:2410.23970): the forward is the
    plain layer's; the weight gradient is ``G^T A (A^T A / b + lambda_ I)^-1`` (``A``: the
    ``b`` input rows, ``G``: the output gradient), the bias gradient the plain one.
    ``lambda_`` 0.1 (the paper's default, > 0); ``solver`` ``"auto"`` (Woodbury when
    ``b < in_features``), ``"direct"`` or ``"woodbury"``. Build one from an existing layer,
    sharing its parameters, with :meth:`from_module` or :func:`tract`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        lambda_: float = 0.1,
        solver: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.lambda_, self.solver = _check(lambda_, solver)

    @classmethod
    def from_module(cls, layer: nn.Linear, lambda_: float = 0.1, solver: str = "auto") -> Any:
        return _converted(cls, layer, lambda_, solver)

    def forward(self, input: Tensor) -> Tensor:
        return tract_linear(input, self.weight, self.bias, self.lambda_, self.solver)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_={self.lambda_:g}"


class _TrActConv:
    """The conv forward with TrAct's weight gradient; every setting of the layer kept."""

    lambda_: float
    solver: str

    def _spec(self) -> _Spec:
        c: Any = self
        # the padding the conv applies (string paddings resolved by torch), as F.pad takes it
        pad = tuple(c._reversed_padding_repeated_twice)
        mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
        return _Spec(
            "conv", self.lambda_, self.solver, tuple(c.kernel_size), tuple(c.stride),
            tuple(c.dilation), pad, mode, c.groups,
        )  # fmt: skip

    def forward(self, input: Tensor) -> Tensor:
        c: Any = self
        w = _TrActGrad.apply(c.weight, input.detach(), self._spec())
        return c._conv_forward(input, w, c.bias)

    @classmethod
    def from_module(cls, layer: nn.Module, lambda_: float = 0.1, solver: str = "auto") -> Any:
        return _converted(cls, layer, lambda_, solver)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda_={self.lambda_:g}"  # type: ignore[misc]


class TrActConv1d(_TrActConv, nn.Conv1d):
    """``nn.Conv1d`` trained with TrAct (arXiv:2410.23970): ``A`` is the unfolded input (one row
    per sample and output position, per group); stride, padding, ``padding_mode``, dilation,
    groups and bias as the plain layer. ``lambda_`` 0.1, ``solver`` as :class:`TrActLinear`."""

    def __init__(self, *args: Any, lambda_: float = 0.1, solver: str = "auto", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lambda_, self.solver = _check(lambda_, solver)


class TrActConv2d(_TrActConv, nn.Conv2d):
    """``nn.Conv2d`` trained with TrAct (arXiv:2410.23970); see :class:`TrActConv1d`."""

    def __init__(self, *args: Any, lambda_: float = 0.1, solver: str = "auto", **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lambda_, self.solver = _check(lambda_, solver)


_KINDS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Linear, TrActLinear),
    (nn.Conv1d, TrActConv1d),
    (nn.Conv2d, TrActConv2d),
)


def _converted(cls: type, layer: nn.Module, lambda_: float, solver: str) -> Any:
    """A ``cls`` sharing ``layer``'s parameters, buffers, hooks and settings."""
    base = next((b for b, t in _KINDS if t is cls), None)
    if base is None or type(layer) is not base:
        want = base.__name__ if base is not None else "a Linear/Conv1d/Conv2d"
        raise ValueError(f"{cls.__name__}.from_module needs an nn.{want}, got {type(layer)!r}")
    lam, solver = _check(lambda_, solver)
    new: Any = copy.copy(layer)
    for k, v in vars(layer).items():  # containers of its own, the same parameter objects
        if isinstance(v, (dict, set)):
            object.__setattr__(new, k, copy.copy(v))
    new.__class__ = cls
    new.lambda_, new.solver = lam, solver
    return new


def first_layer(model: nn.Module, example_input: Any = None) -> tuple[str, nn.Module]:
    """``(name, module)`` of the first module with parameters of its own: the first to run on
    ``example_input`` when given (a tensor or a tuple of arguments; eval mode, no grad), else
    the first in ``model.named_modules()`` order."""
    owners = [
        (n, m) for n, m in model.named_modules() if next(m.parameters(False), None) is not None
    ]
    if not owners:
        raise ValueError("the model has no parameters")
    if example_input is None:
        return owners[0]
    order: list[tuple[str, nn.Module]] = []

    def seen(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            order.append((name, mod))

        return hook

    handles = [m.register_forward_pre_hook(seen(n)) for n, m in owners]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("no module with parameters ran on the example input")
    return order[0]


def tract(
    model: nn.Module,
    lambda_: float = 0.1,
    *,
    layer: str | None = None,
    example_input: Any = None,
    solver: str = "auto",
) -> nn.Module:
    """Train ``model``'s first layer with TrAct: the module named ``layer`` (default: the first
    layer, :func:`first_layer`) is replaced by its TrAct version, which shares its parameters
    (an optimizer built before still trains them; state-dict keys unchanged). Returns the model
    (the new layer itself when ``model`` is that layer). ``ValueError`` unless that layer is
    an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``."""
    if layer is None:
        name, mod = first_layer(model, example_input)
    else:
        mod = model.get_submodule(layer)
        name = layer
    target = next((t for b, t in _KINDS if type(mod) is b), None)
    if target is None:
        if type(mod) in {t for _, t in _KINDS}:
            return model  # already TrAct
        raise ValueError(
            f"TrAct needs the first layer to be nn.Linear, nn.Conv1d or nn.Conv2d; "
            f"{name or 'the model'} is {type(mod).__name__}"
        )
    new = target.from_module(mod, lambda_, solver)  # type: ignore[attr-defined]
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


class _BenchTrAct:
    """TrAct in the harness: the layer swap is the whole method; nothing added to the loss."""

    state_bytes = 0

    def penalty(self, x: Any, y: Any, out: Tensor) -> Tensor:
        return out.new_zeros(())

    def after_step(self, model: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def bench_method(task: Any, lambda_: float = 0.1) -> _BenchTrAct:
    """The harness's TrAct (registry entries ``tract``, ``tract_adamw``): the first layer to run
    on the task's probe batch becomes its TrAct version, in place. ``ValueError`` when that
    layer is not a Linear/Conv1d/Conv2d (embeddings, bare parameters)."""
    return _bench(task, "tract", lambda_)


def bench_method_adamw(task: Any, lambda_: float = 0.1) -> _BenchTrAct:
    """:func:`bench_method` for the ``tract_adamw`` entry."""
    return _bench(task, "tract_adamw", lambda_)


def _bench(task: Any, name_of: str, lam: float) -> _BenchTrAct:
    _check(lam, "auto")
    x, _ = task.probe_batch
    try:
        name, mod = first_layer(task.model, x)
    except ValueError as err:
        raise ValueError(f"{name_of} needs a first layer: {err}") from None
    if type(mod) not in {b for b, _ in _KINDS} | {t for _, t in _KINDS}:
        raise ValueError(
            f"{name_of} needs the model's first layer to be nn.Linear, nn.Conv1d or nn.Conv2d; "
            f"this workload's is {type(mod).__name__} ({name or 'the model itself'})"
        )
    tract(task.model, lam, layer=name)
    return _BenchTrAct()


def _register() -> None:
    from basin.optim.param_groups import decay_groups
    from basin.optim.registry import (
        ADAM_SPACE,
        LR_SGD,
        OptimInfo,
        Paper,
        register,
    )

    paper = Paper(
        "TrAct: Making First-layer Pre-Activations Trainable", "Petersen et al.", "2410.23970",
        2024,
    )  # fmt: skip
    lam_space = {"type": "float", "low": 0.01, "high": 1.0, "log": True}
    register(
        OptimInfo(
            name="tract",
            cls=torch.optim.SGD,
            paper=paper,
            state_memory=1.0,
            state_note="SGD momentum; TrAct keeps no state (one d x d or b x b solve per step)",
            capabilities=frozenset({"method"}),
            family="sgd",
            lr_scaling="linear",
            lr_from={"lr": ("tract", "sgd")},
            defaults={"momentum": 0.9},
            search_space={"lr": LR_SGD, "lambda_": lam_space},
            param_groups=decay_groups,
            method="basin.train.tract:bench_method",
            method_defaults={"lambda_": 0.1},
        )
    )
    register(
        OptimInfo(
            name="tract_adamw",
            cls=torch.optim.AdamW,
            paper=paper,
            state_memory=2.0,
            state_note="AdamW moments; TrAct keeps no state",
            capabilities=frozenset({"method"}),
            family="adaptive",
            lr_scaling="sqrt",
            lr_from={"lr": ("tract_adamw", "adaptive")},
            search_space={**ADAM_SPACE, "lambda_": lam_space},
            param_groups=decay_groups,
            method="basin.train.tract:bench_method_adamw",
            method_defaults={"lambda_": 0.1},
        )
    )


_register()
