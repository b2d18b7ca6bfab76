"""Label-only boundary distance (cfbench.mia.label_only) against the closed form of a linear
classifier: the L2 distance to the hyperplane w.x + b = 0 is |w.x + b| / ||w||_2, the Linf one
|w.x + b| / ||w||_1; misclassified points score 0; a point no perturbation flips keeps the cap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cfbench.mia.label_only import boundary_distance, default_max_radius


class _Linear(torch.nn.Module):
    """Two classes: logits [0, w.x + b]."""

    def __init__(self, w, b):
        super().__init__()
        self.w = torch.nn.Parameter(torch.as_tensor(w, dtype=torch.float32))
        self.b = torch.nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


class _Constant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.stack([x.flatten(1).sum(1) * 0 + 1 + self.p, torch.zeros(len(x))], 1)


@pytest.mark.parametrize("norm", ["L2", "Linf"])
def test_distance_to_a_hyperplane(norm):
    rng = np.random.default_rng(0)
    w = rng.normal(size=64)
    x = torch.full((40, 1, 8, 8), 0.5) + torch.from_numpy(rng.uniform(-0.05, 0.05, (40, 1, 8, 8))).float()
    s0 = x.flatten(1).double().numpy() @ w
    b = -np.median(s0)                              # half the points on each side
    model = _Linear(w, b)
    score = s0 + b
    y = torch.from_numpy((score > 0).astype(np.int64))
    y[:3] = 1 - y[:3]                               # three misclassified points
    dual = np.abs(w).sum() if norm == "Linf" else np.linalg.norm(w)
    true = np.abs(score) / dual
    d, counts = boundary_distance(model, x, y, norm=norm, search_steps=12, pgd_steps=10)
    big_r = default_max_radius((1, 8, 8), norm)
    assert big_r == (8.0 if norm == "L2" else 1.0)
    res = big_r / 2 ** 12
    assert counts == {"misclassified": 3, "not_flipped": 0}
    np.testing.assert_array_equal(d[:3], 0.0)
    assert np.all(d[3:] >= true[3:] - 1e-5)                   # never below the true distance
    assert np.all(d[3:] <= true[3:] + res + 1e-5)             # within one bisection step above it
    assert d.dtype == np.float64


def test_unflippable_points_keep_the_cap_and_input_checks():
    x = torch.rand(5, 1, 8, 8)
    y = torch.zeros(5, dtype=torch.long)
    d, counts = boundary_distance(_Constant(), x, y, search_steps=3, pgd_steps=2)
    np.testing.assert_array_equal(d, math.sqrt(64))
    assert counts == {"misclassified": 0, "not_flipped": 5}
    with pytest.raises(ValueError, match="norm"):
        boundary_distance(_Constant(), x, y, norm="L1")
    with pytest.raises(ValueError, match="steps"):
        boundary_distance(_Constant(), x, y, search_steps=0)
