"""Loss-landscape diagnostics: pure functions over ``(model, loss_fn, data)``.

``data`` is one batch ``(inputs, targets)`` or an iterable of batches (averaged, weighted by batch
size). Every function returns a frozen dataclass with its estimate and its cost (``n_hvp``,
``seconds``) and leaves the model's parameters, buffers and train/eval mode as they were.
Plotting lives in :mod:`basin.landscape.plot` (needs matplotlib)."""

from ._hvp import CurvatureOperator, ggn_vector_product, hessian_vector_product
from .callbacks import SharpnessRecord, SharpnessTracker, lightning_callback, trainer_callback
from .connectivity import LMCResult, lmc_barrier
from .density import DensityResult, hessian_density
from .directions import direction_to, eigenvector_direction, filter_normalize, random_direction
from .eigen import EigenResult, hessian_eigenvalues
from .gradients import (
    CoherenceResult,
    ExampleScores,
    NoiseScaleResult,
    example_scores,
    gradient_coherence,
    gradient_noise_scale,
    per_example_gradients,
)
from .hf import hf_adapter
from .report import LandscapeReport, run_landscape
from .surface import SurfaceResult, loss_surface
from .trace import TraceResult, hessian_trace

__all__ = [
    "CoherenceResult",
    "CurvatureOperator",
    "DensityResult",
    "EigenResult",
    "ExampleScores",
    "LMCResult",
    "LandscapeReport",
    "NoiseScaleResult",
    "SharpnessRecord",
    "SharpnessTracker",
    "SurfaceResult",
    "TraceResult",
    "direction_to",
    "eigenvector_direction",
    "example_scores",
    "filter_normalize",
    "ggn_vector_product",
    "gradient_coherence",
    "gradient_noise_scale",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "hf_adapter",
    "lightning_callback",
    "lmc_barrier",
    "loss_surface",
    "per_example_gradients",
    "random_direction",
    "run_landscape",
    "trainer_callback",
]
