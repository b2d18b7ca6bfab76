"""Fixed, seeded splits for training and membership inference.

From a dataset's training split, a population *pool* of ``pool_size`` examples is drawn
(seeded by ``data.split_seed``); the pool is split into *members* (the target model's
training set, ``member_fraction`` of the pool) and *non-members*.  Reference models for
membership inference draw their own halves from the same pool.  The test split is used for
accuracy and robustness.  All indices are saved beside the record (``splits.npz``) and
summarised in it (sizes, seed, sha256), so every split can be audited.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .specs import ArrayDataset


@dataclass
class RunData:
    """The tensors of one run (images in [0, 1], NCHW) and the indices they came from."""

    dataset: ArrayDataset
    pool_idx: np.ndarray          # indices into the dataset's training split
    member_mask: np.ndarray       # bool over the pool: True = member (target trains on it)
    test_idx: np.ndarray          # indices into the test split
    split_seed: int

    @property
    def member_idx(self) -> np.ndarray:
        return self.pool_idx[self.member_mask]

    @property
    def nonmember_idx(self) -> np.ndarray:
        return self.pool_idx[~self.member_mask]

    @property
    def x_pool(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.x_train[self.pool_idx])

    @property
    def y_pool(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.y_train[self.pool_idx])

    @property
    def x_train(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.x_train[self.member_idx])

    @property
    def y_train(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.y_train[self.member_idx])

    @property
    def x_test(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.x_test[self.test_idx])

    @property
    def y_test(self) -> torch.Tensor:
        return torch.from_numpy(self.dataset.y_test[self.test_idx])

    def summary(self) -> dict[str, Any]:
        def sha(a):
            return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]

        return {"split_seed": self.split_seed, "pool_size": int(len(self.pool_idx)),
                "members": int(self.member_mask.sum()), "nonmembers": int((~self.member_mask).sum()),
                "test": int(len(self.test_idx)), "pool_sha256": sha(self.pool_idx),
                "members_sha256": sha(self.member_idx), "test_sha256": sha(self.test_idx),
                "dataset_sha256": self.dataset.fingerprint()[:16], "file": "splits.npz"}

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, pool_idx=self.pool_idx, member_mask=self.member_mask, test_idx=self.test_idx,
                            split_seed=np.array(self.split_seed))
        tmp.replace(path)


def make_split(ds: ArrayDataset, pool_size: int | None, member_fraction: float, split_seed: int,
               test_size: int | None = None) -> RunData:
    n_train = len(ds.x_train)
    pool_size = pool_size or n_train
    if pool_size > n_train:
        raise UsageError(f"data.pool_size={pool_size} is larger than the training split of {ds.name} "
                         f"({n_train} examples); choose at most {n_train}.")
    rng = np.random.default_rng(split_seed)
    pool = np.sort(rng.permutation(n_train)[:pool_size])
    n_members = int(round(member_fraction * pool_size))
    if n_members < 1 or n_members >= pool_size:
        raise UsageError(f"data.member_fraction={member_fraction} leaves no members or no non-members in a "
                         f"pool of {pool_size}; choose a value in (0, 1) with both parts non-empty.")
    mask = np.zeros(pool_size, dtype=bool)
    mask[rng.permutation(pool_size)[:n_members]] = True
    n_test = len(ds.x_test)
    test_size = min(test_size or n_test, n_test)
    test_idx = np.arange(test_size)
    return RunData(ds, pool, mask, test_idx, split_seed)
