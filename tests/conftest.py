"""Shared fixtures: tiny digits data and fast run settings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CFBENCH_TEST", "1")

# The test models are tiny: one intra-op thread is faster than two (thread hand-offs cost more
# than the convolutions), and far faster when other processes share the two cores.
torch.set_num_threads(1)

#: settings that make a digits run take seconds (the real defaults take minutes)
FAST = {"epochs": 3, "autoattack.n_examples": 20, "pgd.n_examples": 100, "pgd.steps": 5}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits():
    from cfbench.data.specs import Digits

    return Digits().load()


@pytest.fixture(scope="session")
def digits_split(digits):
    from cfbench.data.splits import make_split

    return make_split(digits, None, 0.5, 0)
