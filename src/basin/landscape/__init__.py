"""Loss-landscape diagnostics: pure functions over ``(model, loss_fn, data)``.

``data`` is one batch ``(inputs, targets)`` or an iterable of batches (averaged, weighted by batch
size). Every function returns a frozen dataclass with its estimate and its cost (``n_hvp``,
``seconds``) and leaves the model's parameters, buffers and train/eval mode as they were.
Plotting lives in :mod:`basin.landscape.plot` (needs matplotlib)."""

from ._hvp import CurvatureOperator, ggn_vector_product, hessian_vector_product
from .density import DensityResult, hessian_density
from .eigen import EigenResult, hessian_eigenvalues
from .trace import TraceResult, hessian_trace

__all__ = [
    "CurvatureOperator",
    "DensityResult",
    "EigenResult",
    "TraceResult",
    "ggn_vector_product",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
]
