"""basin: verified, fast research optimizers, loss-landscape diagnostics and an optimizer
benchmark for PyTorch. Subpackages are imported on demand (``basin.optim``, ...)."""

__version__ = "0.1.0"
