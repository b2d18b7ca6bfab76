"""Speed of membership-inference scoring at CIFAR-10 scale.

Run with ``.venv/bin/pytest benchmarks/ --benchmark-only``.

Setting: 100,000 candidate examples, 64 reference models, 2 query augmentations (LiRA), and
a population of 10,000 points (RMIA).  Reference signals are float32 (LiRA's statistics are
accumulated in float64, so this is safe; it halves the memory: the (64, 100000, 2) array is
51 MB).  Synthetic data is generated once per module and is not timed.  The requirement is
that scoring takes a small fraction of the time needed to train one reference model.
"""

from __future__ import annotations

import numpy as np
import pytest
from cfbench.mia import metrics as M
from cfbench.mia import scores as S

K, N, A, Z = 64, 100_000, 2, 10_000


@pytest.fixture(scope="module")
def lira_data():
    rng = np.random.default_rng(0)
    offset = rng.normal(0, 3, N).astype(np.float32)
    in_mask = np.argsort(rng.random((K, N), dtype=np.float32), axis=0) < K // 2
    ref = rng.standard_normal((K, N, A), dtype=np.float32)
    ref += offset[None, :, None]
    ref += in_mask[:, :, None]
    member = rng.random(N) < 0.5
    target = offset[:, None] + member[:, None] + rng.standard_normal((N, A), dtype=np.float32)
    return target, ref, in_mask, member


@pytest.fixture(scope="module")
def rmia_data():
    rng = np.random.default_rng(1)
    in_mask = np.argsort(rng.random((K, N), dtype=np.float32), axis=0) < K // 2
    ref_p = rng.beta(4, 2, (K, N)).astype(np.float32)
    ref_p = np.minimum(ref_p + 0.1 * in_mask, 1.0)
    member = rng.random(N) < 0.5
    target_p = np.minimum(rng.beta(4, 2, N) + 0.1 * member, 1.0).astype(np.float32)
    ref_pop = rng.beta(4, 2, (K, Z)).astype(np.float32)
    target_pop = rng.beta(4, 2, Z).astype(np.float32)
    return target_p, ref_p, in_mask, target_pop, ref_pop, member


def _run(benchmark, fn, *args, **kwargs):
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=3, iterations=1,
                              warmup_rounds=0)


@pytest.mark.parametrize("fix_variance", [False, True])
def test_lira_online(benchmark, lira_data, fix_variance):
    target, ref, in_mask, member = lira_data
    sc = _run(benchmark, S.lira_online, target, ref, in_mask, fix_variance)
    assert sc.shape == (N,) and not np.isnan(sc).any()
    assert M.auc(sc, member) > 0.8


@pytest.mark.parametrize("two_sided", [False, True])
def test_lira_offline(benchmark, lira_data, two_sided):
    target, ref, in_mask, member = lira_data
    sc = _run(benchmark, S.lira_offline, target, ref, in_mask, False, two_sided=two_sided)
    assert sc.shape == (N,) and not np.isnan(sc).any()
    assert M.auc(sc, member) > (0.55 if two_sided else 0.75)


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("variant", ["probabilities", "log-continuous"])
def test_rmia(benchmark, rmia_data, online, variant):
    """Side by side: version 1's discrete score on probabilities and version 2's float64
    log-space score with the continuous tie-break (what the evaluator runs)."""
    target_p, ref_p, in_mask, target_pop, ref_pop, member = rmia_data
    if variant == "probabilities":
        args, kw = (target_p, ref_p, in_mask, target_pop, ref_pop), {}
    else:
        lg = lambda v: np.log(v.astype(np.float64))
        args, kw = (lg(target_p), lg(ref_p), in_mask, lg(target_pop), lg(ref_pop)), {"log_inputs": True,
                                                                                     "continuous": True}
    sc = _run(benchmark, S.rmia_scores, *args, online=online, **kw)
    assert sc.shape == (N,) and M.auc(sc, member) > 0.55


def test_audit_epsilon_lower_bound(benchmark, lira_data):
    """The DP audit's two bounds over 100,000 trials (every ROC vertex a candidate threshold)."""
    from cfbench.mia import audit as AU

    target, ref, in_mask, member = lira_data
    sc = S.lira_online(target, ref, in_mask, True)
    out = _run(benchmark, lambda: (AU.epsilon_lower_bound(sc, member, 1e-5),
                                   AU.epsilon_lower_bound_max(sc, member, 1e-5)))
    assert 0 < out[0]["value"] and 0 < out[1]["value"]


def test_lira_phi_from_logits(benchmark):
    """phi for one reference model's logits on all examples and augmentations."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((N, A, 10), dtype=np.float32) * 4
    labels = rng.integers(0, 10, N)
    phi = _run(benchmark, S.lira_phi, logits, labels[:, None])
    assert phi.shape == (N, A)


def test_summarize(benchmark, lira_data):
    target, ref, in_mask, member = lira_data
    sc = S.lira_online(target, ref, in_mask, True)
    out = _run(benchmark, M.summarize, sc, member)
    assert out["tpr_at_fpr"]["0.001"]["value"] is not None
    assert out["tpr_at_fpr"]["0.0001"]["value"] is None     # ~50,000 non-members < 10 / 1e-4
