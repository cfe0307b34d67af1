"""basin.distributed: training beyond one process, built on torch.distributed.

``EF21State`` / ``ef21_hook``: EF21 and EF21-W Top-K error feedback as a DDP communication hook::

    model.register_comm_hook(EF21State(density=0.01), ef21_hook)

Distributed Muon (Newton-Schulz shared across data-parallel ranks, bit-identical to one process)
is an option of the optimizer, ``basin.optim.Muon(model.module, distributed=True)``
(docs/distributed.md).

``make_private``: DP-SGD through Opacus with any single-gradient optimizer; ``DIFF2``: private
optimization by gradient differences; ``epsilon_posterior``: the Bayesian estimate of epsilon
from a membership-inference attack's outcomes (docs/privacy.md).
"""

from basin.distributed.bayes_epsilon import EpsilonPosterior, epsilon_from_rates, epsilon_posterior
from basin.distributed.diff2 import DIFF2
from basin.distributed.dp import PrivateTraining, make_private
from basin.distributed.ef21 import EF21State, ef21_hook

__all__ = [
    "DIFF2",
    "EF21State",
    "EpsilonPosterior",
    "PrivateTraining",
    "ef21_hook",
    "epsilon_from_rates",
    "epsilon_posterior",
    "make_private",
]
