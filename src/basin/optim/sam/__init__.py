"""SAM (Foret et al., arXiv:2010.01412) and ASAM (Kwon et al., arXiv:2102.11600): a wrapper
over any base optimizer (``wrapper``), its ascent step (``perturb``: loop and multi-tensor
paths), the helpers around the two passes (``passes``) and the registry's SGD-based entries
(``registered``)."""

from .passes import frozen_bn_stats
from .registered import ASAMSGD, SAMSGD, named_decay_groups
from .wrapper import SAM

__all__ = ["ASAMSGD", "SAM", "SAMSGD", "frozen_bn_stats", "named_decay_groups"]
