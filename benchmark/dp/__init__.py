"""Shared differential-privacy machinery of the DP defenses (``dp-sgd``, ``dp-at``), built
on Opacus (Yousefpour et al. 2021); nothing re-implements its mathematics.

* :mod:`.accounting` -- pure accounting and Poisson-sampling functions;
* :mod:`.glue` -- Opacus model preparation, wrapping, optimizers, ghost clipping.
"""

from .accounting import (ACCOUNTANTS, default_delta, epsilon, noise_for_epsilon, poisson_batches,
                         poisson_generator, rdp_epsilon, sample_rate, steps_per_epoch)
from .glue import (GRAD_SAMPLE_MODES, GhostClipping, choose_mode, dp_optimizer, incompatible_layers,
                   make_compatible, plain, quiet_hooks, release, unwrap, wrap)

__all__ = [
    "ACCOUNTANTS", "default_delta", "epsilon", "noise_for_epsilon", "poisson_batches", "poisson_generator",
    "rdp_epsilon", "sample_rate", "steps_per_epoch", "GRAD_SAMPLE_MODES", "GhostClipping", "choose_mode",
    "dp_optimizer", "incompatible_layers", "make_compatible", "plain", "quiet_hooks", "release", "unwrap", "wrap",
]
