"""Pure math of the membership-inference suite (cfbench.mia.metrics / cfbench.mia.scores).

Every vectorised function is checked against an independent reference: sklearn / scipy for
the metrics, and direct per-example loops transcribing the papers' formulas or the reference
code for the attack scores.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cfbench.mia import metrics as M
from cfbench.mia import scores as S
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ============================================================================================
# metrics
# ============================================================================================
scores_labels = st.integers(2, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(-4, 4), min_size=n, max_size=n),      # few values -> many ties
    st.lists(st.integers(0, 1), min_size=n, max_size=n)))


@FAST
@given(scores_labels)
def test_roc_and_auc_match_sklearn_with_ties(sl):
    s, y = np.array(sl[0], dtype=float) / 2, np.array(sl[1])
    assume(0 < y.sum() < y.size)
    fpr, tpr, thr = M.roc(s, y)
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, f2)
    np.testing.assert_array_equal(tpr, t2)
    np.testing.assert_array_equal(thr, th2)
    assert M.auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@FAST
@given(scores_labels, st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.5, 1.0]))
def test_tpr_at_fpr_matches_sklearn_curve(sl, target):
    s, y = np.array(sl[0], dtype=float), np.array(sl[1])
    n_out = int((y == 0).sum())
    assume(0 < y.sum() < y.size)
    res = M.tpr_at_fpr(s, y, target, min_false_positives=1)
    if target < 1 / n_out:
        assert res["value"] is None and "reason" in res
        return
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    i = np.where(f2 <= target)[0][-1]                    # "<=", see the docstring
    assert res["value"] == t2[i]
    assert res["fpr"] == f2[i]
    assert res["k"] == round(t2[i] * y.sum())
    # the threshold reproduces the operating point
    if res["threshold"] is None:
        assert res["value"] == 0.0
    else:
        flagged = s >= res["threshold"]
        assert flagged[y == 1].mean() == res["value"]
        assert flagged[y == 0].mean() == res["fpr"] <= target
    lo, hi = stats.binomtest(res["k"], int(y.sum())).proportion_ci(0.95, method="exact")
    assert res["ci_low"] == pytest.approx(lo, abs=1e-9)
    assert res["ci_high"] == pytest.approx(hi, abs=1e-9)


def test_auc_and_tpr_on_continuous_scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5000)
    s = rng.normal(size=5000).astype(np.float32) + y
    assert M.auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    f2, t2, _ = roc_curve(y, s)
    for target in (0.01, 0.1):
        assert M.tpr_at_fpr(s, y, target)["value"] == t2[np.where(f2 <= target)[0][-1]]


def test_balanced_accuracy_is_best_threshold():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)
    brute = max(0.5 * ((s[y == 1] >= t).mean() + (s[y == 0] < t).mean())
                for t in np.r_[s, np.inf])
    assert M.balanced_accuracy(s, y) == pytest.approx(brute, abs=1e-12)
    assert M.balanced_accuracy(-s * 0 + 1, y) == 0.5          # constant score: chance


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 10), (10, 10), (3, 10), (1, 1000),
                                 (999, 1000), (517, 1000), (0, 100000), (7, 100000)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_clopper_pearson_matches_scipy(k, n, conf):
    lo, hi = M.clopper_pearson(k, n, conf)
    ref = stats.binomtest(k, n).proportion_ci(conf, method="exact")
    assert lo == pytest.approx(ref.low, rel=1e-7, abs=1e-12)
    assert hi == pytest.approx(ref.high, rel=1e-7, abs=1e-12)
    if k == 0:
        assert lo == 0.0
    if k == n:
        assert hi == 1.0


def test_clopper_pearson_vectorised_and_checks():
    k = np.array([0, 3, 10])
    lo, hi = M.clopper_pearson(k, 10)
    for i, ki in enumerate(k):
        assert (lo[i], hi[i]) == pytest.approx(M.clopper_pearson(int(ki), 10))
    with pytest.raises(ValueError):
        M.clopper_pearson(11, 10)
    with pytest.raises(ValueError):
        M.clopper_pearson(1, 10, confidence=1.0)


def test_tpr_at_fpr_not_supported_when_too_few_nonmembers():
    rng = np.random.default_rng(2)
    for n_out, target, supported in [(999, 0.01, False), (1000, 0.01, True),
                                     (10000, 0.001, True), (9999, 0.001, False),
                                     (100000, 0.0001, True), (50, 0.1, False)]:
        y = np.r_[np.ones(100), np.zeros(n_out)]
        s = rng.normal(size=y.size) + y
        res = M.tpr_at_fpr(s, y, target)
        assert (res["value"] is not None) == supported, (n_out, target)
        assert res["n"] == 100 and res["n_nonmembers"] == n_out
        if not supported:
            assert "not supported" in res["reason"] and res["ci_low"] is None


def test_roc_infinite_scores_tie():
    s = np.array([np.inf, np.inf, 1.0, -np.inf, -np.inf])
    y = np.array([1, 0, 1, 0, 1])
    fpr, tpr, thr = M.roc(s, y)
    np.testing.assert_array_equal(fpr, [0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 1 / 3, 2 / 3, 1])
    assert M.auc(s, y) == pytest.approx(roc_auc_score(y, [2.0, 2.0, 1.0, 0.0, 0.0]))


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        M.auc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="both"):
        M.auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        M.auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        M.roc([0.1, 0.2, 0.3], [0, 1])


def test_downsample_roc_keeps_vertices_log_spaced():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(20000), np.zeros(20000)]
    s = rng.normal(size=y.size) + 2 * y
    fpr, tpr, _ = M.roc(s, y)
    f, t = M.downsample_roc(fpr, tpr, 200, n_nonmembers=20000)
    assert 10 < len(f) <= 202 and len(f) == len(t)
    assert f[0] == pytest.approx(fpr[fpr > 0][0], rel=1e-5)       # first non-zero FPR
    assert (f[-1], t[-1]) == (1.0, 1.0)
    assert all(x > 0 for x in f)
    assert np.all(np.diff(f) > 0) and np.all(np.diff(t) >= 0)
    # every kept point is an ROC vertex (up to the 6-digit rounding), and the TPR at each
    # kept FPR is the largest TPR at that FPR (step function)
    for fi, ti in zip(f, t):
        j = np.searchsorted(fpr, fi * (1 + 1e-5), side="right") - 1
        assert tpr[j] == pytest.approx(ti, rel=1e-5)
    # roughly log-spaced: no decade of FPR is empty
    logf = np.log10(f)
    assert np.all(np.diff(logf) < 0.5)
    # tiny curve and curve without positive FPR
    assert M.downsample_roc([0, 1], [0, 1]) == ([1.0], [1.0])
    assert M.downsample_roc([0.0], [0.0]) == ([], [])


def test_summarize_structure_and_json():
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(3000), np.zeros(3000)]
    s = rng.normal(size=y.size) + y
    out = M.summarize(s, y)
    json.dumps(out, allow_nan=False)
    assert out["n_members"] == 3000 and out["n_nonmembers"] == 3000
    assert out["auc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert out["auc"]["ci_low"] < out["auc"]["value"] < out["auc"]["ci_high"]
    assert out["balanced_accuracy"]["value"] == pytest.approx(M.balanced_accuracy(s, y))
    assert set(out["tpr_at_fpr"]) == {"0.01", "0.001", "0.0001"}
    assert out["tpr_at_fpr"]["0.01"] == M.tpr_at_fpr(s, y, 0.01)
    assert out["tpr_at_fpr"]["0.001"]["value"] is None          # 10/3000 > 0.001
    assert len(out["roc"]["fpr"]) <= 202


def test_hanley_mcneil_se():
    # Hanley & McNeil (1982), Table: A = 0.9, n_A = n_N = 50 -> SE ~ 0.0304 (closed form)
    r = M.auc_hanley_mcneil(0.9, 50, 50)
    q1, q2 = 0.9 / 1.1, 2 * 0.81 / 1.9
    se = math.sqrt((0.09 + 49 * (q1 - 0.81) + 49 * (q2 - 0.81)) / 2500)
    assert r["se"] == pytest.approx(se)
    assert r["ci_high"] == pytest.approx(0.9 + 1.959963984540054 * se)
    # the SE shrinks like 1/sqrt(n) and is coherent with the empirical AUC spread
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(400), np.zeros(400)]
    aucs = [roc_auc_score(y, rng.normal(size=800) + y) for _ in range(200)]
    se_hm = M.auc_hanley_mcneil(np.mean(aucs), 400, 400)["se"]
    assert np.std(aucs) == pytest.approx(se_hm, rel=0.25)


def test_best_of_picks_max_and_ignores_na():
    def summ(a, b, t1, t2):
        return {"auc": {"value": a}, "balanced_accuracy": {"value": b},
                "tpr_at_fpr": {"0.01": {"value": t1}, "0.001": {"value": t2}}}
    summaries = {
        "loss": summ(0.60, 0.58, 0.02, None),
        "lira": summ(0.70, 0.64, 0.10, None),
        "rmia": summ(0.72, 0.63, 0.08, None),
        "broken": summ(float("nan"), None, None, None),
    }
    best = M.best_of(summaries)
    assert best["auc"] == {"attack": "rmia", "value": 0.72}
    assert best["balanced_accuracy"] == {"attack": "lira", "value": 0.64}
    assert best["tpr_at_fpr"]["0.01"] == {"attack": "lira", "value": 0.10}
    assert best["tpr_at_fpr"]["0.001"] == {"attack": None, "value": None}
    # works on real summaries; ties go to the first attack
    rng = np.random.default_rng(6)
    y = np.r_[np.ones(2000), np.zeros(2000)]
    s = rng.normal(size=y.size) + y
    a, b = M.summarize(s, y), M.summarize(s, y)
    assert M.best_of({"a": a, "b": b})["auc"]["attack"] == "a"


# ============================================================================================
# threshold-attack scores (reference: inspire-group/membership-inference-evaluation)
# ============================================================================================
def _ref_entr(pred):                     # transcription of _entr_comp
    e = 0.0
    for num in pred:
        if num != 0:
            e += -1 * num * np.log(num)
    return e


def _ref_m_entr(pred, label):            # transcription of _m_entr_comp
    e = 0.0
    for i in range(len(pred)):
        p = pred[i]
        if i == label:
            e += -1 * 1 * np.log(1e-30) if p == 0 else -1 * (1 - p) * np.log(p)
        else:
            e += -1 * 1 * np.log(1e-30) if p == 1 else -1 * p * np.log(1 - p)
    return e


def _probs_with_extremes(rng, n=200, c=7):
    logits = rng.normal(scale=3, size=(n, c))
    p = S.softmax(logits)
    p[0] = np.eye(c)[2]                  # exact one-hot on the label
    p[1] = np.eye(c)[0]                  # exact one-hot on a wrong class (p_y = 0)
    y = rng.integers(0, c, n)
    y[0], y[1] = 2, 3
    return logits, p, y


def test_threshold_scores_against_loops():
    rng = np.random.default_rng(7)
    logits, p, y = _probs_with_extremes(rng)
    conf = S.confidence_score(p, y)
    loss = S.loss_score(p, y)
    ent = S.entropy_score(p, y)
    ment = S.modified_entropy_score(p, y)
    for i in range(len(y)):
        assert conf[i] == p[i, y[i]]
        assert loss[i] == pytest.approx(np.log(max(p[i, y[i]], 1e-45)))
        assert ent[i] == pytest.approx(-_ref_entr(p[i]), abs=1e-12)
        assert ment[i] == pytest.approx(-_ref_m_entr(p[i], y[i]), rel=1e-12, abs=1e-12)
    assert np.isfinite(ment).all() and np.isfinite(loss).all()


def test_threshold_scores_from_logits_match_probs():
    rng = np.random.default_rng(8)
    logits = rng.normal(scale=4, size=(300, 10))
    y = rng.integers(0, 10, 300)
    p = S.softmax(logits)
    for fn in (S.loss_score, S.confidence_score, S.entropy_score, S.modified_entropy_score):
        np.testing.assert_allclose(fn(logits, y, from_logits=True), fn(p, y), rtol=1e-9,
                                   atol=1e-12, err_msg=fn.__name__)
    # CE matches the textbook definition and is finite for extreme logits
    ce = -np.log(p[np.arange(300), y])
    np.testing.assert_allclose(-S.loss_score(logits, y, from_logits=True), ce, rtol=1e-10)
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(S.loss_score(big, [2], from_logits=True)).all()
    assert np.isfinite(S.modified_entropy_score(big, [1], from_logits=True)).all()
    # leading dims
    assert S.loss_score(logits.reshape(3, 100, 10), y.reshape(3, 100), from_logits=True
                        ).shape == (3, 100)


def _ref_thre_setting(tr_values, te_values):     # O(n^2) transcription of _thre_setting
    value_list = np.concatenate((tr_values, te_values))
    thre, max_acc = 0, 0
    for value in value_list:
        tr_ratio = np.sum(tr_values >= value) / (len(tr_values) + 0.0)
        te_ratio = np.sum(te_values < value) / (len(te_values) + 0.0)
        acc = 0.5 * (tr_ratio + te_ratio)
        if acc > max_acc:
            thre, max_acc = value, acc
    return thre


@FAST
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 40), st.booleans())
def test_best_threshold_matches_reference(seed, n_in, n_out, ties):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 1, n_in)
    b = rng.normal(0, 1, n_out)
    if ties:
        a, b = np.round(a), np.round(b)
    assert S.best_threshold(a, b) == _ref_thre_setting(a, b)


def test_class_thresholds_match_reference_and_fallback():
    rng = np.random.default_rng(9)
    c = 5
    y_in, y_out = rng.integers(0, c, 300), rng.integers(0, c, 250)
    y_out[y_out == 4] = 3                       # class 4: no shadow non-members
    s_in = np.round(rng.normal(0.3, 1, 300), 1) + 0.2 * y_in
    s_out = np.round(rng.normal(0, 1, 250), 1) + 0.2 * y_out
    tau = S.fit_class_thresholds(s_in, y_in, s_out, y_out, num_classes=c + 1)  # class 5 empty
    glob = _ref_thre_setting(s_in, s_out)
    for k in range(c + 1):
        a, b = s_in[y_in == k], s_out[y_out == k]
        expect = _ref_thre_setting(a, b) if a.size and b.size else glob
        assert tau[k] == expect, k
    # score and hard decision
    s_t, y_t = rng.normal(size=100), rng.integers(0, c, 100)
    sc = S.class_threshold_score(s_t, y_t, tau)
    np.testing.assert_array_equal(sc >= 0, s_t >= tau[y_t])
    np.testing.assert_allclose(sc, [s_t[i] - tau[y_t[i]] for i in range(100)])


# ============================================================================================
# LiRA
# ============================================================================================
def test_lira_phi():
    rng = np.random.default_rng(10)
    logits = rng.normal(scale=5, size=(4, 30, 2, 10))          # (K, N, A, C)
    y = rng.integers(0, 10, 30)
    phi = S.lira_phi(logits, y[:, None])
    assert phi.shape == (4, 30, 2)
    p = S.softmax(logits)
    for k in range(4):
        for n in range(30):
            for a in range(2):
                py = p[k, n, a, y[n]]
                assert phi[k, n, a] == pytest.approx(np.log(py) - np.log(1 - py), rel=1e-8,
                                                     abs=1e-8)
    np.testing.assert_allclose(S.lira_phi(p, y[:, None], from_logits=False), phi, rtol=1e-7,
                               atol=1e-7)
    # extreme logits: exact and finite (probabilities would saturate)
    big = np.array([[60.0, 0.0, 0.0], [0.0, 0.0, -200.0]])
    np.testing.assert_allclose(S.lira_phi(big, [0, 2]), [60 - np.log(2), -200 - np.log(2)])
    assert S.lira_phi(big.astype(np.float32), [0, 2]).dtype == np.float32
    with pytest.raises(ValueError, match="broadcast"):
        S.lira_phi(logits, y)


def _synthetic_lira(rng, n=300, k=16, a=2, shift=1.0):
    """Per-example offsets m_n; IN signals ~ N(m_n + shift, 1), OUT ~ N(m_n, 1)."""
    m = rng.normal(0, 3, n)
    # the paper's design: each example is IN for exactly half of the reference models
    in_mask = np.argsort(rng.random((k, n)), axis=0) < k // 2
    ref = m[None, :, None] + shift * in_mask[:, :, None] + rng.normal(size=(k, n, a))
    member = rng.random(n) < 0.5
    target = m[:, None] + shift * member[:, None] + rng.normal(size=(n, a))
    return target, ref, in_mask, member


def _loop_stats(ref, mask, n):
    d = ref[mask[:, n], n, :]
    return d, np.median(d, 0), np.std(d, 0)


def _pooled(ref, mask):
    ss = cnt = 0.0
    for n in range(ref.shape[1]):
        d = ref[mask[:, n], n, :]
        if len(d):
            ss += np.sum((d - d.mean(0)) ** 2)
            cnt += d.size
    return math.sqrt(ss / cnt)


@pytest.mark.parametrize("fix", [False, True, "shared"])
def test_lira_online_matches_loop(fix):
    rng = np.random.default_rng(11)
    target, ref, in_mask, _ = _synthetic_lira(rng, n=80, k=10)
    in_mask[:, 0] = False                 # no IN model -> NaN
    in_mask[:, 1] = False
    in_mask[0, 1] = True                  # one IN model: NaN per-example, fine if fixed
    got = S.lira_online(target, ref.astype(np.float32), in_mask, fix_variance=fix)
    got64 = S.lira_online(target, ref, in_mask, fix_variance=fix)
    if fix is True:
        s_in, s_out = _pooled(ref, in_mask), _pooled(ref, ~in_mask)
    elif fix == "shared":
        s_in = s_out = math.sqrt(
            (_pooled(ref, in_mask) ** 2 * in_mask.sum() + _pooled(ref, ~in_mask) ** 2
             * (~in_mask).sum()) / in_mask.size)
    for n in range(80):
        if in_mask[:, n].sum() == 0 or (not fix and in_mask[:, n].sum() < 2):
            assert np.isnan(got[n]) and np.isnan(got64[n])
            continue
        _, mu_in, sd_in = _loop_stats(ref, in_mask, n)
        _, mu_out, sd_out = _loop_stats(ref, ~in_mask, n)
        if fix:
            sd_in, sd_out = s_in, s_out
        pr_in = -stats.norm.logpdf(target[n], mu_in, sd_in + 1e-30)      # reference plot.py
        pr_out = -stats.norm.logpdf(target[n], mu_out, sd_out + 1e-30)
        expect = -(pr_in - pr_out).mean()
        assert got64[n] == pytest.approx(expect, rel=1e-9, abs=1e-9)
        assert got[n] == pytest.approx(expect, rel=1e-4, abs=1e-4)


def test_lira_shared_variance_ranks_like_reference_code():
    """The reference's fixed variance (std of all raw IN signals, used for IN and OUT) and
    our pooled shared sigma differ by a global factor only: score * sigma^2 is invariant."""
    rng = np.random.default_rng(12)
    target, ref, in_mask, _ = _synthetic_lira(rng, n=60, k=8)
    ours = S.lira_online(target, ref, in_mask, fix_variance="shared")
    sigma_ref = np.std(np.concatenate([ref[in_mask[:, n], n, :] for n in range(60)]))
    ref_scores = []
    for n in range(60):
        mu_in = np.median(ref[in_mask[:, n], n, :], 0)
        mu_out = np.median(ref[~in_mask[:, n], n, :], 0)
        ref_scores.append((stats.norm.logpdf(target[n], mu_in, sigma_ref)
                           - stats.norm.logpdf(target[n], mu_out, sigma_ref)).mean())
    sigma_ours = math.sqrt((_pooled(ref, in_mask) ** 2 * in_mask.sum()
                            + _pooled(ref, ~in_mask) ** 2 * (~in_mask).sum()) / in_mask.size)
    np.testing.assert_allclose(ours * sigma_ours ** 2, np.array(ref_scores) * sigma_ref ** 2,
                               rtol=1e-9, atol=1e-9)


def test_lira_online_mean_center():
    rng = np.random.default_rng(13)
    target, ref, in_mask, _ = _synthetic_lira(rng, n=40, k=9)
    got = S.lira_online(target, ref, in_mask, center="mean")
    for n in range(40):
        d_in, d_out = ref[in_mask[:, n], n], ref[~in_mask[:, n], n]
        expect = (stats.norm.logpdf(target[n], d_in.mean(0), d_in.std(0))
                  - stats.norm.logpdf(target[n], d_out.mean(0), d_out.std(0))).mean()
        assert got[n] == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("two_sided", [False, True])
@pytest.mark.parametrize("fix", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_lira_offline_matches_loop(two_sided, fix, with_mask):
    rng = np.random.default_rng(14)
    target, ref, in_mask, _ = _synthetic_lira(rng, n=70, k=10)
    if with_mask:
        in_mask[:, 3] = True              # no OUT model -> NaN
    mask = in_mask if with_mask else None
    out_mask = ~in_mask if with_mask else np.ones_like(in_mask)
    got = S.lira_offline(target, ref, mask, fix_variance=fix, two_sided=two_sided)
    s_out = _pooled(ref, out_mask)
    for n in range(70):
        if out_mask[:, n].sum() == 0:
            assert np.isnan(got[n])
            continue
        _, mu, sd = _loop_stats(ref, out_mask, n)
        if fix:
            sd = s_out
        if two_sided:                    # reference generate_ours_offline, negated by sweep()
            expect = -stats.norm.logpdf(target[n], mu, sd + 1e-30).mean()
        else:                            # paper: one-sided, Phi(z) ranked by z = (phi - mu) / sd
            expect = ((target[n] - mu) / (sd + 1e-30)).mean()
        assert got[n] == pytest.approx(expect, rel=1e-9, abs=1e-9)


def test_lira_offline_one_sided_does_not_saturate():
    """z far in the tail (log Phi(z) == 0.0 in float64 from z ~ 38 on) still ranks."""
    from scipy import special

    ref = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])[:, :, None]      # mu = 0.5, sd = 0.5 per example
    target = np.array([[25.0], [50.0], [100.0]])
    assert special.log_ndtr((target[1:, 0] - 0.5) / 0.5).tolist() == [0.0, 0.0]   # the old score tied
    got = S.lira_offline(target, ref, None, fix_variance=False)
    np.testing.assert_allclose(got, (target[:, 0] - 0.5) / 0.5)
    assert np.all(np.diff(got) > 0)


def test_lira_auc_close_to_analytic():
    """IN phi ~ N(m_n + 1, 1), OUT phi ~ N(m_n, 1) with per-example offsets m_n ~ N(0, 9).

    With known parameters the online LLR averaged over A = 2 augmentations is
    ``mean_a phi_a - m_n - 1/2``: N(1/2, 1/2) for members, N(-1/2, 1/2) for non-members,
    so AUC = Phi(1) = 0.8413.  A global threshold on phi is much weaker (offsets dominate).
    """
    rng = np.random.default_rng(15)
    target, ref, in_mask, member = _synthetic_lira(rng, n=4000, k=64, a=2)
    analytic = stats.norm.cdf(1.0)
    for fix in (False, True):
        auc = M.auc(S.lira_online(target, ref.astype(np.float32), in_mask, fix), member)
        assert auc == pytest.approx(analytic, abs=0.025), fix
    # offline (one-sided) with A = 1 sees only the OUT side: AUC = Phi(1/sqrt(2)) = 0.760
    auc_off = M.auc(S.lira_offline(target[:, :1], ref[:, :, :1], in_mask, True), member)
    assert auc_off == pytest.approx(stats.norm.cdf(1 / math.sqrt(2)), abs=0.025)
    assert M.auc(target.mean(1), member) < 0.65


def test_lira_input_checks():
    rng = np.random.default_rng(16)
    target, ref, in_mask, _ = _synthetic_lira(rng, n=10, k=4)
    with pytest.raises(ValueError):
        S.lira_online(target, ref, None)
    with pytest.raises(ValueError):
        S.lira_online(target, ref, in_mask.astype(int))
    with pytest.raises(ValueError):
        S.lira_online(target[:5], ref, in_mask)
    with pytest.raises(ValueError):
        S.lira_online(target, ref, in_mask, fix_variance="nope")
    # 1-D target / 2-D reference means A = 1
    assert S.lira_offline(target[:, 0], ref[:, :, 0]).shape == (10,)
    # min_models guard
    got = S.lira_online(target, ref, in_mask, min_models=100)
    assert np.isnan(got).all()


# ============================================================================================
# RMIA
# ============================================================================================
def _ref_rmia(tp, rp, in_mask, tz, rz, gamma, a, online):
    """Direct O(N * Z) double loop over the paper's definition."""
    n, z = tp.size, tz.size
    out = np.empty(n)
    def p_of(vals):                      # p(.) offline from OUT values
        return 0.5 * ((1 + a) * np.mean(vals) + (1 - a))
    for i in range(n):
        if online:
            px = np.mean(rp[:, i])
        else:
            outs = rp[:, i] if in_mask is None else rp[~in_mask[:, i], i]
            if outs.size == 0:
                out[i] = np.nan           # no OUT reference model for x_i
                continue
            px = p_of(outs)
        cnt = 0
        for j in range(z):
            pz = np.mean(rz[:, j]) if online else p_of(rz[:, j])
            lr = (tp[i] / px) / (tz[j] / pz)
            cnt += lr >= gamma
        out[i] = cnt / z
    return out


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("gamma,a", [(1.0, 0.3), (2.0, 0.5), (0.7, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("use_mask", [True, False])
def test_rmia_matches_double_loop(online, gamma, a, use_mask):
    rng = np.random.default_rng(17)
    k, n, z = 4, 60, 45
    in_mask = rng.random((k, n)) < 0.5
    in_mask[:, 0] = True                  # x_0 has no OUT model
    member = rng.random(n) < 0.5
    rp = np.clip(rng.beta(4, 2, (k, n)) + 0.15 * in_mask, 0, 1)
    tp = np.clip(rng.beta(4, 2, n) + 0.15 * member, 0, 1)
    rz, tz = rng.beta(4, 2, (k, z)), rng.beta(4, 2, z)
    mask = in_mask if use_mask else None
    got = S.rmia_scores(tp, rp, mask, tz, rz, gamma=gamma, a=a, online=online)
    assert np.isnan(got[0]) == (not online and use_mask)
    np.testing.assert_allclose(got, _ref_rmia(tp, rp, mask, tz, rz, gamma, a, online))


def test_rmia_strict_and_ties():
    tz = np.array([0.5, 0.5, 0.5, 0.8])
    rz = np.full((2, 4), 0.5)
    tp = np.array([0.5])
    rp = np.full((2, 1), 0.5)
    # r_x = 1, r_z = (1, 1, 1, 1.6): LR >= 1 for 3 of 4, LR > 1 for none
    assert S.rmia_scores(tp, rp, None, tz, rz, online=True)[0] == 0.75
    assert S.rmia_scores(tp, rp, None, tz, rz, online=True, strict=True)[0] == 0.0


def test_rmia_ranking_is_monotone_in_ratio():
    rng = np.random.default_rng(18)
    rp, tp = rng.random((2, 500)) * 0.9 + 0.05, rng.random(500) * 0.9 + 0.05
    rz, tz = rng.random((2, 300)) * 0.9 + 0.05, rng.random(300) * 0.9 + 0.05
    sc = S.rmia_scores(tp, rp, None, tz, rz, online=True)
    r = tp / rp.mean(0)
    o = np.argsort(r)
    assert np.all(np.diff(sc[o]) >= 0)
    with pytest.raises(ValueError):
        S.rmia_scores(tp, rp, None, tz, rz[:1])
    with pytest.raises(ValueError):
        S.rmia_scores(tp, rp, None, tz, rz, a=1.5)


def _slow_rmia_log(lt, lr, mask, lzt, lzr, gamma, a, online):
    """The paper's definition written out per (x, z) pair in float64 log space: lower and upper
    counts (``LR > gamma + tol`` and ``LR >= gamma - tol``), so that a rounding tie at exactly
    ``gamma`` cannot decide the comparison."""
    k, n = lr.shape
    lo, hi = np.zeros(n), np.zeros(n)

    def log_mean(v):
        m = max(v)
        return m + math.log(sum(math.exp(x - m) for x in v) / len(v)) if m > -math.inf else -math.inf

    def log_off(lp_out):
        return math.log(0.5 * ((1 + a) * math.exp(lp_out) + (1 - a)))

    for i in range(n):
        if online:
            lpx = log_mean(list(lr[:, i]))
        else:
            outs = [lr[j, i] for j in range(k) if mask is None or not mask[j, i]]
            if not outs:
                lo[i] = hi[i] = np.nan
                continue
            lpx = log_off(log_mean(outs))
        for w in range(lzt.size):
            lpz = log_mean(list(lzr[:, w])) if online else log_off(log_mean(list(lzr[:, w])))
            llr = (lt[i] - lpx) - (lzt[w] - lpz)
            lo[i] += llr > math.log(gamma) + 1e-9
            hi[i] += llr >= math.log(gamma) - 1e-9
    return lo, hi


log_probs = st.floats(-8.0, 0.0, allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 10), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from([0.0, 0.3, 1.0]), st.booleans(), st.data())
def test_rmia_log_space_matches_slow_transcription(k, n, z, gamma, a, online, data):
    arr = lambda shape: np.array(data.draw(st.lists(log_probs, min_size=int(np.prod(shape)),
                                                    max_size=int(np.prod(shape))))).reshape(shape)
    lt, lr, lzt, lzr = arr((n,)), arr((k, n)), arr((z,)), arr((k, z))
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=k * n, max_size=k * n))).reshape(k, n)
    got = S.rmia_scores(lt, lr, mask, lzt, lzr, gamma=gamma, a=a, online=online, log_inputs=True)
    lo, hi = _slow_rmia_log(lt, lr, mask, lzt, lzr, gamma, a, online)
    nan = np.isnan(lo)
    assert np.array_equal(np.isnan(got), nan)
    assert np.all(got[~nan] * z >= lo[~nan] - 1e-9) and np.all(got[~nan] * z <= hi[~nan] + 1e-9)
    # the continuous score keeps the discrete count: floor(Z * score) == count
    cont = S.rmia_scores(lt, lr, mask, lzt, lzr, gamma=gamma, a=a, online=online, log_inputs=True,
                         continuous=True)
    np.testing.assert_array_equal(np.floor(cont[~nan] * z + 1e-9), np.round(got[~nan] * z))


def test_rmia_log_inputs_equal_probability_inputs():
    rng = np.random.default_rng(19)
    k, n, z = 5, 80, 60
    in_mask = rng.random((k, n)) < 0.5
    rp, tp = rng.beta(4, 2, (k, n)), rng.beta(4, 2, n)
    rz, tz = rng.beta(4, 2, (k, z)), rng.beta(4, 2, z)
    for online in (True, False):
        a = S.rmia_scores(tp, rp, in_mask, tz, rz, online=online, continuous=True)
        b = S.rmia_scores(np.log(tp), np.log(rp), in_mask, np.log(tz), np.log(rz), online=online,
                          log_inputs=True, continuous=True)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_rmia_continuous_breaks_ties_and_is_monotone():
    rng = np.random.default_rng(20)
    rp, tp = rng.random((3, 400)) * 0.9 + 0.05, rng.random(400) * 0.9 + 0.05
    rz, tz = rng.random((3, 20)) * 0.9 + 0.05, rng.random(20) * 0.3 + 0.3      # small, narrow Z: many ties
    disc = S.rmia_scores(tp, rp, None, tz, rz, online=True)
    cont = S.rmia_scores(tp, rp, None, tz, rz, online=True, continuous=True)
    r = tp / rp.mean(0)
    o = np.argsort(r)
    assert len(np.unique(disc)) < 25                          # the discrete score has <= Z + 1 values
    assert np.all(np.diff(cont[o]) > 0)                       # strictly increasing in r_x: no ties left
    np.testing.assert_array_equal(np.floor(cont * 20 + 1e-12), disc * 20)
    top = disc == 1.0
    assert top.sum() > 1 and len(np.unique(cont[top])) == top.sum()   # the tied top is ordered by r_x
    assert cont.max() < 1 + 1 / 20
    with pytest.raises(ValueError, match="strict"):
        S.rmia_scores(tp, rp, None, tz, rz, strict=True, continuous=True)


def test_rmia_log_space_survives_saturated_probabilities():
    """Confident models: p_y = 1 - 1e-9 .. 1 - 1e-8 rounds to exactly 1.0 in float32 (cfbench
    version 1 stored reference probabilities so); float64 log-probabilities keep them apart."""
    lt = np.array([-1e-9, -3e-9, -2e-8])
    lr = np.full((2, 3), -1e-8)
    lzt, lzr = np.array([-5e-9, -4e-9]), np.full((2, 2), -1e-8)
    got = S.rmia_scores(lt, lr, None, lzt, lzr, online=True, log_inputs=True, continuous=True)
    assert got[0] > got[1] > got[2]
    p32 = lambda v: np.exp(v).astype(np.float32)
    assert p32(lt).tolist() == [1.0, 1.0, 1.0]
    flat = S.rmia_scores(p32(lt), p32(lr), None, p32(lzt), p32(lzr), online=True, continuous=True)
    assert len(np.unique(flat)) == 1                          # all rounded to 1.0: one tie


# ============================================================================================
# advantage, lowest supported FPR, same ranking
# ============================================================================================
@FAST
@given(scores_labels)
def test_advantage_is_max_tpr_minus_fpr(sl):
    s, y = np.array(sl[0], dtype=float), np.array(sl[1])
    assume(0 < y.sum() < y.size)
    brute = max((s[y == 1] >= t).mean() - (s[y == 0] >= t).mean() for t in np.r_[s, np.inf])
    assert M.advantage(s, y) == pytest.approx(brute, abs=1e-12)
    assert M.advantage(s, y) == pytest.approx(2 * M.balanced_accuracy(s, y) - 1, abs=1e-12)
    summ = M.summarize(s, y, (0.5,), min_false_positives=1)
    assert summ["advantage"]["value"] == pytest.approx(brute, abs=1e-12)


def test_lowest_supported_fpr_and_its_tpr():
    assert M.lowest_supported_fpr(649) == 10 / 649
    assert M.lowest_supported_fpr(9) is None
    rng = np.random.default_rng(21)
    y = np.r_[np.ones(300), np.zeros(2000)].astype(int)
    s = rng.normal(size=y.size) + y
    summ = M.summarize(s, y, (0.001,))
    assert summ["lowest_fpr"]["value"] == 10 / 2000
    low = summ["tpr_at_lowest_fpr"]
    assert low == M.tpr_at_fpr(s, y, 10 / 2000)
    assert summ["tpr_at_fpr"]["0.001"]["value"] is None       # 0.001 < 10 / 2000
    assert M.summarize(s[:305], y[:305], (0.5,))["tpr_at_lowest_fpr"]["value"] is None    # 5 non-members


def test_same_ranking():
    rng = np.random.default_rng(22)
    x = rng.normal(size=50)
    assert M.same_ranking(x, np.exp(x)) and M.same_ranking(x, 3 * x - 1)
    assert not M.same_ranking(x, -x)
    assert not M.same_ranking(x, x + rng.normal(size=50))
    xn = x.copy()
    xn[3] = np.nan
    assert M.same_ranking(xn, np.exp(xn)) and not M.same_ranking(xn, np.exp(x))
    ties = np.round(x)
    assert not M.same_ranking(x, ties)                        # a coarsening is not the same ranking


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(2, 7), st.integers(1, 8), st.integers(1, 3), st.sampled_from(["median", "mean"]), st.data())
def test_lira_matches_slow_transcription_hypothesis(k, n, a, center, data):
    """Per-example LiRA online (per-example sigmas) and offline (one-sided z) written out with
    Python floats, on arbitrary small pools (IN sets drawn per example)."""
    vals = st.floats(-20, 20, allow_nan=False)
    ref = np.array(data.draw(st.lists(vals, min_size=k * n * a, max_size=k * n * a))).reshape(k, n, a)
    tgt = np.array(data.draw(st.lists(vals, min_size=n * a, max_size=n * a))).reshape(n, a)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=k * n, max_size=k * n))).reshape(k, n)
    on = S.lira_online(tgt, ref, mask, False, center=center)
    off = S.lira_offline(tgt, ref, mask, False, center=center)

    def stats_of(xs):
        xs = sorted(xs)
        m = len(xs)
        mean = sum(xs) / m
        loc = mean if center == "mean" else (xs[(m - 1) // 2] + xs[m // 2]) / 2
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / m) + 1e-30
        return loc, sd

    for j in range(n):
        ins = [r for r in range(k) if mask[r, j]]
        outs = [r for r in range(k) if not mask[r, j]]
        if len(ins) < 2 or len(outs) < 2:
            assert math.isnan(on[j])
        else:
            acc = 0.0
            for q in range(a):
                li, si = stats_of([ref[r, j, q] for r in ins])
                lo, so = stats_of([ref[r, j, q] for r in outs])
                x = tgt[j, q]
                acc += (-0.5 * ((x - li) / si) ** 2 - math.log(si)) - (-0.5 * ((x - lo) / so) ** 2 - math.log(so))
            expect = acc / a
            if math.isfinite(expect):
                assert on[j] == pytest.approx(expect, rel=1e-9, abs=1e-9)
        if len(outs) < 2:
            assert math.isnan(off[j])
        else:
            z = []
            for q in range(a):
                lo, so = stats_of([ref[r, j, q] for r in outs])
                z.append((tgt[j, q] - lo) / so)
            expect = sum(z) / a
            if math.isfinite(expect):
                assert off[j] == pytest.approx(expect, rel=1e-9, abs=1e-9)
