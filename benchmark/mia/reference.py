"""Reference models for membership inference, the pure part: which pool examples each one
trains on and with which seed.  Declaring and running them as training jobs (the recipe
hash, the cache layout, loading) is :mod:`cfbench.execution.reference`.

**Subsets (paired complementary draws).**  The pool has ``P`` examples and the target trains
on ``M`` of them (``M = round(member_fraction * P)``).  Reference model ``i`` trains on ``M``
pool examples too (the same data size as the target): for the pair ``j = i // 2`` a random
permutation ``pi_j`` of the pool is drawn from ``(reference_seed, j)``; model ``2j`` takes
its first ``M`` entries and model ``2j + 1`` its last ``M``.  With ``M = P / 2`` (the
default split of an even pool) the two are complementary halves, so every example is IN for
exactly one model of each pair -- the standard LiRA / RMIA construction, exactly ``K / 2``
IN models per example for even ``K``.  With an odd pool or ``member_fraction != 0.5`` the
two draws overlap (``2M > P``) or leave ``P - 2M`` examples OUT of both, and the IN count is
``K * M / P`` on average.  An odd ``K`` leaves the last model unpaired.  Carlini et al.'s
reference code instead draws, per example, exactly ``K * M / P`` IN models (so the models'
training-set sizes vary); cfbench keeps every reference model's training set the same size
as the target's, as the recipe must match.

**Training seed** of model ``i``: 31 bits of ``sha256("cfbench-mia-ref:<reference_seed>:<i>")``,
independent of the target's seed, so every later run of the same recipe (any target seed)
reuses the same reference models.

The recipe hash and the cache layout are documented in :mod:`cfbench.execution.reference`.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["REFERENCE_SCHEME_VERSION", "reference_in_mask", "reference_subset", "reference_train_seed"]

#: bump when the subset construction or the training of reference models changes
REFERENCE_SCHEME_VERSION = 1
_TAG = 0x4D4941  # "MIA": keeps the subset stream apart from other seeded streams


# --------------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------------
def reference_subset(n_pool: int, n_members: int, index: int, seed: int = 0) -> np.ndarray:
    """Boolean mask over the pool: the examples reference model ``index`` trains on.

    Model ``2j`` takes the first ``n_members`` entries of a permutation drawn from
    ``(seed, j)``, model ``2j + 1`` the last ``n_members`` (see the module docstring).
    """
    if not 0 < n_members < n_pool:
        raise ValueError(f"need 0 < n_members < n_pool, got {n_members} and {n_pool}")
    if index < 0:
        raise ValueError(f"reference index must be >= 0, got {index}")
    perm = np.random.default_rng([_TAG, int(seed), int(index) // 2]).permutation(n_pool)
    chosen = perm[:n_members] if index % 2 == 0 else perm[n_pool - n_members:]
    mask = np.zeros(n_pool, dtype=bool)
    mask[chosen] = True
    return mask


def reference_in_mask(n_pool: int, n_members: int, k: int, seed: int = 0) -> np.ndarray:
    """``(k, n_pool)`` boolean matrix: ``[i, n]`` = reference model ``i`` trains on example ``n``."""
    if k == 0:
        return np.zeros((0, n_pool), dtype=bool)
    return np.stack([reference_subset(n_pool, n_members, i, seed) for i in range(k)])


def reference_train_seed(index: int, seed: int = 0) -> int:
    """The torch seed of reference model ``index`` (31 bits of a sha256)."""
    h = hashlib.sha256(f"cfbench-mia-ref:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
