"""The empirical DP audit (cfbench.mia.audit): the epsilon lower bound against scipy's exact
binomial intervals written out by hand, against a mechanism whose epsilon is known exactly
(randomised response), and end to end on a DP-SGD run (bound <= the accountant's epsilon)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cfbench.config import make_config
from cfbench.evaluators.mia import MembershipInference
from cfbench.mia import audit as AU
from cfbench.testing.tiny import eval_context
from cfbench.training.recipe import fit_recipe, load_data
from scipy import stats


def _cp(k, n, conf=0.95):
    ci = stats.binomtest(int(k), int(n)).proportion_ci(conf, method="exact")
    return ci.low, ci.high


def _brute_max(s, y, delta, conf=0.95):
    """max over every threshold of both directions, from scipy's binomtest intervals."""
    n_in, n_out = int(y.sum()), int((~y).sum())
    best = -math.inf
    for t in np.r_[np.inf, np.unique(s)]:
        f = s >= t
        tpr_lo = _cp((f & y).sum(), n_in, conf)[0]
        fpr_hi = _cp((f & ~y).sum(), n_out, conf)[1]
        if tpr_lo - delta > 0:
            best = max(best, math.log((tpr_lo - delta) / fpr_hi))
        if 1 - fpr_hi - delta > 0 and tpr_lo < 1:
            best = max(best, math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return max(0.0, best)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.05])
def test_max_over_thresholds_matches_brute_force(seed, delta):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.4
    s = np.round(rng.normal(size=300) + 1.5 * y, 1)           # ties
    got = AU.epsilon_lower_bound_max(s, y, delta)
    assert got["value"] == pytest.approx(_brute_max(s, y, delta), rel=1e-9, abs=1e-12)
    assert got["optimistic"] is True and got["delta"] == delta
    # the reported operating point reproduces the bound
    if got["threshold"] is not None and got["value"] > 0:
        f = s >= got["threshold"]
        assert got["k_tp"] == (f & y).sum() and got["k_fp"] == (f & ~y).sum()
        lo, hi = _cp(got["k_tp"], y.sum())[0], _cp(got["k_fp"], (~y).sum())[1]
        assert got["tpr_low"] == pytest.approx(lo) and got["fpr_high"] == pytest.approx(hi)


def test_held_out_bound_is_evaluated_on_the_other_half():
    rng = np.random.default_rng(3)
    y = rng.random(2000) < 0.5
    s = rng.normal(size=2000) + 2 * y
    got = AU.epsilon_lower_bound(s, y, 1e-4, seed=7)
    assert got["optimistic"] is False
    assert got["n_members"] + got["selection"]["n_members"] == y.sum()
    assert got["n_nonmembers"] + got["selection"]["n_nonmembers"] == (~y).sum()
    tpr_lo, fpr_hi = _cp(got["k_tp"], got["n_members"])[0], _cp(got["k_fp"], got["n_nonmembers"])[1]
    if got["direction"].startswith("TPR"):
        expect = math.log((tpr_lo - 1e-4) / fpr_hi)
    else:
        expect = math.log((1 - fpr_hi - 1e-4) / (1 - tpr_lo))
    assert got["value"] == pytest.approx(max(0.0, expect), rel=1e-9)
    assert AU.epsilon_lower_bound(s, y, 1e-4, seed=7) == got                 # seeded


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0])
def test_randomised_response_bound_is_below_and_near_the_true_epsilon(eps):
    """Randomised response answers "member" with probability e^eps / (1 + e^eps) for a member and
    1 / (1 + e^eps) for a non-member: exactly eps-DP, and the best test achieves eps."""
    rng = np.random.default_rng(int(eps * 10))
    n = 20_000
    y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    p = math.exp(eps) / (1 + math.exp(eps))
    s = np.where(y, rng.random(2 * n) < p, rng.random(2 * n) < 1 - p).astype(float)
    lb = AU.epsilon_lower_bound(s, y, 0.0)
    lb_max = AU.epsilon_lower_bound_max(s, y, 0.0)
    assert lb["value"] <= eps and lb_max["value"] <= eps
    assert lb["value"] > 0.85 * eps                      # 10,000 trials per side: a tight bound


def test_no_signal_proves_nothing():
    rng = np.random.default_rng(4)
    y = rng.random(4000) < 0.5
    s = rng.normal(size=4000)
    assert AU.epsilon_lower_bound(s, y, 1e-5)["value"] == 0.0
    assert AU.epsilon_lower_bound_max(s, y, 1e-5)["value"] < 0.2
    with pytest.raises(ValueError, match="delta"):
        AU.epsilon_bounds([1], 10, [1], 10, delta=1.5)


def test_dp_sgd_run_bound_does_not_exceed_the_accountant(tmp_path):
    """DP-SGD at epsilon = 1 on tiny digits, pooled with 2 reference models: the audit's bound
    (both variants) stays at or below the accountant's epsilon."""
    torch.manual_seed(0)
    sets = {"epochs": 3, "train.batch_size": 16, "data.pool_size": 200, "mia.reference_models": 2,
            "mia.adversarial": False, "mia.label_only": False, "mia.fprs": "0.1", "target_epsilon": 1.0}
    cfg = make_config(dataset="digits", defense="dp-sgd", evaluators=["mia"], sets=sets)
    data = load_data(cfg)
    model, fctx = fit_recipe(cfg, data, data.x_train, data.y_train, seed=0, checkpoint_dir=None, cache_dir=None,
                             progress=False)
    accounted = fctx.metrics["dp.epsilon"]
    assert 0 < accounted <= 1.0 + 1e-6
    ctx = eval_context(cfg, model, tmp_path / "run", data, cache_dir=tmp_path / "_cache",
                       defense_metrics=dict(fctx.metrics))
    (tmp_path / "run").mkdir()
    res = MembershipInference(cfg.evaluator_params["mia"]).evaluate(ctx)
    lb, lb_max = res.metrics["mia.audit.epsilon_lb"], res.metrics["mia.audit.epsilon_lb_max"]
    assert lb["delta"] == fctx.metrics["dp.delta"] and lb["delta_source"].startswith("dp.delta")
    assert lb["accountant_epsilon"] == pytest.approx(accounted)
    assert lb["n_members"] + lb["selection"]["n_members"] == 3 * 100          # 3 pool models x 100 members
    assert 0.0 <= lb["value"] <= accounted and 0.0 <= lb_max["value"] <= accounted
    assert not any("exceeds the accountant" in w for w in res.warnings)
