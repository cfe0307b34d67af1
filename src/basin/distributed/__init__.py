"""basin.distributed: training beyond one process, built on torch.distributed.

``EF21State`` / ``ef21_hook``: EF21 and EF21-W Top-K error feedback as a DDP communication hook::

    model.register_comm_hook(EF21State(density=0.01), ef21_hook)

Distributed Muon (Newton-Schulz shared across data-parallel ranks, bit-identical to one process)
is an option of the optimizer, ``basin.optim.Muon(model.module, distributed=True)``
(docs/distributed.md).

Decentralized and federated: ``Gossip`` (gossip SGD over a topology, ``merge()`` for the single
global merge), ``fedsvd_round`` (FedAvg of LoRA with FedSVD's SVD re-orthogonalization),
``monna`` (robust aggregation); straggler-tolerant gradient coding: ``GradientCode``,
``SelectiveReattemptSGC`` and their ``torch.distributed`` runners.

``make_private``: DP-SGD through Opacus with any single-gradient optimizer; ``DIFF2``: private
optimization by gradient differences; ``epsilon_posterior``: the Bayesian estimate of epsilon
from a membership-inference attack's outcomes (docs/privacy.md).
"""

from basin.distributed.bayes_epsilon import EpsilonPosterior, epsilon_from_rates, epsilon_posterior
from basin.distributed.diff2 import DIFF2
from basin.distributed.dp import PrivateTraining, make_private
from basin.distributed.ef21 import EF21State, ef21_hook
from basin.distributed.fedsvd import fedsvd_aggregate, fedsvd_freeze_a, fedsvd_round
from basin.distributed.gossip import TOPOLOGIES, Gossip, check_mixing_matrix, mixing_matrix
from basin.distributed.gradient_coding import (
    GradientCode,
    SelectiveReattemptSGC,
    coded_gradient,
    follows_bursty_model,
    run_sequential_gradient_coding,
    simulate_sequential_gradient_coding,
)
from basin.distributed.monna import monna

__all__ = [
    "DIFF2",
    "EF21State",
    "EpsilonPosterior",
    "Gossip",
    "GradientCode",
    "PrivateTraining",
    "SelectiveReattemptSGC",
    "TOPOLOGIES",
    "check_mixing_matrix",
    "coded_gradient",
    "ef21_hook",
    "epsilon_from_rates",
    "epsilon_posterior",
    "fedsvd_aggregate",
    "fedsvd_freeze_a",
    "fedsvd_round",
    "follows_bursty_model",
    "make_private",
    "mixing_matrix",
    "monna",
    "run_sequential_gradient_coding",
    "simulate_sequential_gradient_coding",
]
