"""Differential-privacy accounting and sampling: pure functions over the mechanism's
history ``(sigma, q, steps)``, answered by fresh Opacus accountants (``prv``: Gopi et al.
2021; ``rdp``: Mironov 2017 / Mironov et al. 2019) and memoised; Poisson sampling of the
Sampled Gaussian Mechanism with Opacus' ``UniformWithReplacementSampler`` driven by a
generator seeded per (run seed, epoch).  No model is touched here (that is :mod:`.glue`).

The sampling rate follows Opacus' ``make_private`` with a ``DataLoader(batch_size=B)``:
``q = 1 / ceil(N / B)`` and ``ceil(N / B)`` steps per epoch (one expected pass over the
data), the expected batch size being ``q * N`` (<= B).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import UsageError

ACCOUNTANTS = ("prv", "rdp")


# -- accounting (pure functions) ----------------------------------------------------------

def default_delta(n: int) -> float:
    """cfbench's default delta: ``1 / (10 N)``, below the ``1 / N`` that a delta must stay under."""
    return 1.0 / (10 * n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate ``q = 1 / ceil(N / B)`` (Opacus' ``make_private`` convention)."""
    return 1.0 / steps_per_epoch(n, batch_size)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Opacus' RDP note that the optimal order is at the edge of its default grid (the
    bound stays valid, only possibly loose; the PRV accountant calls RDP for its domain)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def _accountant(name: str):
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        raise UsageError(f"unknown accountant {name!r}. Valid choices: {', '.join(ACCOUNTANTS)}.")
    return create_accountant(mechanism=name)


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "prv") -> float:
    """epsilon of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    A fresh Opacus accountant of kind ``accountant`` with history
    ``[(noise_multiplier, sample_rate, steps)]`` answers ``get_epsilon(delta)`` (PRV with
    Opacus' default ``eps_error = 0.01``, reporting the upper bound; RDP over Opacus'
    default orders).  ``noise_multiplier == 0`` (clipping only) is ``inf``; no step is 0.
    """
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = _accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, float | None]:
    """RDP epsilon (as :func:`epsilon` with ``accountant="rdp"``) and the Renyi order attaining it."""
    if steps == 0:
        return 0.0, None
    if noise_multiplier == 0:
        return math.inf, None
    acc = _accountant("rdp")
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with _quiet():
        eps, order = acc.get_privacy_spent(delta=delta)
    return float(eps), float(order)


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "prv") -> float:
    """The noise multiplier that spends at most ``target_epsilon`` in ``steps`` steps.

    Opacus' ``get_noise_multiplier`` (bisection to within ``epsilon_tolerance = 0.01``
    below the target, the value a ``make_private_with_epsilon`` run would use).
    """
    from opacus.accountants.utils import get_noise_multiplier

    _accountant(accountant)
    try:
        with _quiet():
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as e:
        raise UsageError(
            f"target_epsilon={target_epsilon} cannot be reached with delta={delta:.3g}, sample rate "
            f"{sample_rate:.4g} and {steps} steps ({e}); choose a larger target_epsilon, fewer "
            "epochs or a larger batch_size.") from e


# -- sampling -----------------------------------------------------------------------------

def poisson_generator(seed: int, epoch: int) -> torch.Generator:
    """Generator of one epoch's Poisson draws: a function of (seed, epoch), distinct from the
    shared loop's per-epoch generator (used for augmentation), so a resumed run redraws the
    same batches."""
    state = np.random.SeedSequence([int(seed), int(epoch), 0xD9]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def poisson_batches(n: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` Poisson batches: every example is in each batch independently with
    probability ``sample_rate`` (Opacus' ``UniformWithReplacementSampler``).  A batch can be
    empty; it must still be a (noise-only) step for the accounting to hold."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator,
                                            steps=steps)
    return [torch.as_tensor(idx, dtype=torch.long) for idx in sampler]


