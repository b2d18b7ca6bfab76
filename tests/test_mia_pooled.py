"""Pooled multi-target evaluation (cfbench.mia.suite) on synthetic model pools.

* row 0 of the pool is exactly the single-target evaluation of the target against all K
  reference models;
* the partner rule: with complementary paired references, keeping a reference model's partner
  among its references inflates RMIA-online (the IN count of its references then carries the
  answer); leaving it out gives reference models the same AUC distribution as the target,
  which has no partner;
* pooled metrics and their per-model spread against scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pytest
from cfbench.mia import reference as R
from cfbench.mia.suite import (
    attack_scores,
    model_features,
    pool_attack_scores,
    pool_partners,
    pooled_summary,
    stack_features,
)
from sklearn.metrics import roc_auc_score


def _pool(seed=0, k=8, n=2000, z=300, shift=1.5, noise=1.0):
    """K + 1 models of 2-class logits [0, s]: s = offset_x + shift * IN + noise (the target: row 0)."""
    rng = np.random.default_rng(seed)
    member = np.zeros(n, dtype=bool)
    member[rng.permutation(n)[: n // 2]] = True
    in_pool = np.concatenate([member[None], R.reference_in_mask(n, n // 2, k, seed)])
    offset = rng.normal(0, 2, n)
    s = offset[None] + shift * in_pool + rng.normal(0, noise, in_pool.shape)
    pop = rng.normal(0, 2, z)[None] + rng.normal(0, noise, (k + 1, z))
    labels = np.ones(n, dtype=np.int64)
    two = lambda v: np.stack([np.zeros_like(v), v], -1)[:, None, :]
    feats = [model_features(two(s[m]), labels, two(pop[m]), np.ones(z, dtype=np.int64)) for m in range(k + 1)]
    return labels, feats, in_pool


def test_pool_partners():
    assert pool_partners(0) == [None]
    assert pool_partners(3) == [None, 2, 1, None]          # ref 2 is unpaired
    assert pool_partners(4) == [None, 2, 1, 4, 3]


def test_row_zero_is_the_single_target_evaluation():
    labels, feats, in_pool = _pool(n=300, k=4)
    pooled, extras, refs = pool_attack_scores(labels, feats, in_pool, num_classes=2)
    single, extra = attack_scores(labels, feats[0], stack_features(feats[1:]), in_pool[1:], num_classes=2)
    assert refs[0] == [1, 2, 3, 4] and refs[1] == [0, 3, 4] and refs[4] == [0, 1, 2]
    assert set(pooled) == set(single)
    for a in single:
        np.testing.assert_array_equal(pooled[a][0], single[a])
    assert extras[0] == extra


def _row_aucs(scores, in_pool):
    return np.array([roc_auc_score(in_pool[m], scores[m]) for m in range(in_pool.shape[0])])


def test_partner_rule_removes_the_rmia_inflation():
    labels, feats, in_pool = _pool(seed=1)
    k = in_pool.shape[0] - 1
    fair, _, _ = pool_attack_scores(labels, feats, in_pool, num_classes=2)
    leaky, _, _ = pool_attack_scores(labels, feats, in_pool, num_classes=2, partners=[None] * (k + 1))
    fair_auc = _row_aucs(fair["rmia_online"], in_pool)
    leaky_auc = _row_aucs(leaky["rmia_online"], in_pool)
    target = fair_auc[0]                                   # no partner: unbiased in both
    assert leaky_auc[0] == fair_auc[0]
    # with the partner, every reference row beats the target; without, they scatter around it
    assert leaky_auc[1:].min() > target + 0.01
    assert leaky_auc[1:].mean() - fair_auc[1:].mean() > 0.02
    assert abs(fair_auc[1:].mean() - target) < 0.015


def test_pooled_summary_against_sklearn_and_spread():
    labels, feats, in_pool = _pool(seed=2, n=400, k=4)
    scores, _, _ = pool_attack_scores(labels, feats, in_pool, num_classes=2)
    scores["only_target"] = np.full(in_pool.shape, np.nan)
    scores["only_target"][0] = np.arange(400.0)
    metrics, _roc, per_model = pooled_summary(scores, in_pool, (0.1, 0.001))
    assert "mia.pooled.only_target.auc" not in metrics and "only_target" not in per_model
    for a in ("rmia_online", "lira_online_fixed", "loss"):
        s = scores[a]
        e = metrics[f"mia.pooled.{a}.auc"]
        assert e["value"] == pytest.approx(roc_auc_score(in_pool.ravel(), s.ravel()), abs=1e-12)
        aucs = _row_aucs(s, in_pool)
        assert e["per_model"]["mean"] == pytest.approx(aucs.mean(), abs=1e-12)
        assert e["per_model"]["std"] == pytest.approx(aucs.std(ddof=1), abs=1e-12)
        assert e["n_models"] == 5 and e["n_nonmembers"] == (~in_pool).sum()
        # 0.001 < 10 / 1000 non-member trials: n/a; per model (200 non-members) too
        t = metrics[f"mia.pooled.{a}.tpr_at_fpr.0.001"]
        assert t["value"] is None and t["per_model"]["n_models"] == 0
        assert metrics[f"mia.pooled.{a}.tpr_at_fpr.0.1"]["per_model"]["n_models"] == 5
    assert metrics["mia.pooled.best.auc"]["selection_biased"] is True
    assert metrics["mia.pooled.confidence.auc"]["same_ranking_as"] == "loss"
