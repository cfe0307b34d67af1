"""Parameter-group helpers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

__all__ = ["matrix_param_groups", "stores_in_out", "weight_decay_groups"]

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def weight_decay_groups(
    model: nn.Module, weight_decay: float | None, **group_options: Any
) -> list[dict[str, Any]]:
    """Two parameter groups: weight decay on weight matrices and kernels, none on biases,
    normalisation parameters and any other tensor with ``ndim <= 1``.

    ``weight_decay=None`` leaves the first group without a ``weight_decay`` key, so it takes
    the optimizer's own (``create(name, model)`` builds its groups this way).

    Extra keyword arguments (e.g. ``lr``) are added to both groups. Parameters that do not
    require gradients are left out; shared parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim <= 1 or name == "bias" or isinstance(module, _NORM_TYPES):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, **({} if weight_decay is None else {"weight_decay": weight_decay})},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    for g in groups:
        g.update(group_options)
    return [g for g in groups if g["params"]]


def stores_in_out(module: nn.Module) -> bool:
    """Does ``module`` store its ``weight`` as ``(in, out, ...)``, the transpose of
    ``nn.Linear``'s ``(out, in)``? True for HF transformers' ``Conv1D`` (GPT-2, GPT, ...:
    recognised by its class name and ``nf`` attribute, without importing transformers) and for
    ``nn.ConvTranspose1d/2d/3d`` with ``groups=1``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return module.groups == 1
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and weight.size(1) == module.nf
    )


def _named_ids(model: nn.Module, names: Iterable[str], what: str) -> dict[str, set[int]]:
    """The parameter ids of each module or parameter name (``ValueError`` for unknown names)."""
    modules = dict(model.named_modules())
    named = dict(model.named_parameters())
    names = list(names)
    unknown = sorted(n for n in names if n not in modules and n not in named)
    if unknown:
        raise ValueError(
            f"{what}: no module or parameter named {', '.join(map(repr, unknown))} in the model"
        )
    return {
        n: {id(named[n])} if n in named else {id(p) for p in modules[n].parameters()} for n in names
    }


def matrix_param_groups(
    model: nn.Module,
    *,
    head: str | Iterable[str] | None = "auto",
    matrix: dict[str, Any] | None = None,
    fallback: dict[str, Any] | None = None,
    transposed: Iterable[str] | Mapping[str, bool] | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters for a matrix optimizer (Muon, SWAN, COSMOS, FRUGAL): hidden
    weight matrices and convolution kernels in a group with ``matrix_rule=True``; embeddings
    (``nn.Embedding``, ``nn.EmbeddingBag``), the output head and every parameter with
    ``ndim < 2`` (biases, gains) in a group with ``matrix_rule=False``, which the optimizer
    updates with its AdamW fallback::

        opt = Muon(matrix_param_groups(model, head=["lm_head"]), lr=0.02, adamw_lr=3e-4)
        opt = COSMOS(matrix_param_groups(model, fallback={"lr": 3e-4}), lr=1e-3)

    ``head``: ``"auto"`` takes the last ``nn.Linear`` in ``model.modules()`` order as the output
    head; ``None`` means no head; otherwise an iterable of module or parameter names (as in
    ``model.named_modules()`` / ``model.named_parameters()``) whose parameters go to the fallback.
    ``matrix`` / ``fallback`` are extra options of the two groups (e.g. ``{"lr": 0.02}``).
    Parameters that do not require gradients are left out; shared parameters appear once (a
    head tied to the token embedding, as in GPT-2, is the embedding: fallback); empty groups
    are dropped.

    Orientation: the matrix rules read a weight as ``(out, in)``. Weights stored ``(in, out)``
    -- HF transformers' ``Conv1D`` (GPT-2's attention and MLP) and ``nn.ConvTranspose*d`` (see
    :func:`stores_in_out`) -- go to a second matrix group with ``transposed=True``, in which the
    optimizers update them as their transpose (the update of the same layer as ``nn.Linear``).
    ``transposed`` overrides the detection: module or parameter names stored ``(in, out)``, or a
    mapping ``{name: True | False}`` (False: stored ``(out, in)`` although detected)."""
    if isinstance(head, str) and head != "auto":
        head = [head]
    head_ids: set[int] = set()
    if head == "auto":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            head_ids = {id(p) for p in linears[-1].parameters()}
    elif head is not None:
        for ids in _named_ids(model, set(head), "head").values():
            head_ids |= ids
    flip: dict[int, bool] = {}
    if transposed is not None:
        spec = (
            dict(transposed) if isinstance(transposed, Mapping) else dict.fromkeys(transposed, True)
        )
        bad = [n for n, v in spec.items() if not isinstance(v, bool)]
        if bad:
            raise ValueError(
                f"transposed: values must be True or False, got {spec[bad[0]]!r} for {bad[0]!r}"
            )
        named_ids = _named_ids(model, spec, "transposed")
        # module names first, then parameter names (the more specific one wins)
        params = dict(model.named_parameters())
        for n in sorted(spec, key=lambda n: n in params):
            flip.update(dict.fromkeys(named_ids[n], spec[n]))
    matrix_params, transposed_params, fallback_params, seen = [], [], [], set()
    for module in model.modules():
        in_out = stores_in_out(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if (
                p.ndim < 2
                or id(p) in head_ids
                or isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            ):
                fallback_params.append(p)
            elif flip.get(id(p), in_out and name == "weight"):
                transposed_params.append(p)
            else:
                matrix_params.append(p)
    groups = [
        {"params": matrix_params, "matrix_rule": True, **(matrix or {})},
        {"params": transposed_params, "matrix_rule": True, "transposed": True, **(matrix or {})},
        {"params": fallback_params, "matrix_rule": False, **(fallback or {})},
    ]
    return [g for g in groups if g["params"]]


def decay_groups(
    model: nn.Module, weight_decay: float | None = None, **group_options: Any
) -> list[dict[str, Any]]:
    """:func:`weight_decay_groups`, by default with the optimizer's own weight decay on the
    first group (the builder of the elementwise optimizers' registry entries; options from
    ``create(name, model, groups={...})``)."""
    return weight_decay_groups(model, weight_decay, **group_options)


def matrix_groups(model: nn.Module, **options: Any) -> list[dict[str, Any]]:
    """:func:`matrix_param_groups` (the matrix optimizers' builder; options such as ``head=``
    and ``transposed=`` from ``create(name, model, groups={...})``)."""
    return matrix_param_groups(model, **options)
