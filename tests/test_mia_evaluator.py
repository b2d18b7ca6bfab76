"""The membership-inference evaluator (cfbench.evaluators.mia) end to end on tiny digits data.

* planted leak: a model that memorises a tiny member set with random labels is caught by
  every attack (AUC well above 0.5);
* null case: a model trained on neither the members nor the non-members gives AUCs whose
  interval contains 0.5;
* the per-example scores file reproduces every AUC and TPR@FPR with scikit-learn;
* n/a (not 0) for an FPR the non-member count cannot support;
* cache reuse: a second evaluation of the same recipe (even for another target seed) trains
  no reference model and recomputes no signal;
* the evaluator's composition of LiRA / RMIA / class thresholds against direct
  transcriptions of the papers' formulas on synthetic Gaussian signals.

The reference models of all end-to-end tests are trained once (module fixture) and reused
through the cache, which is itself part of what is tested.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from cfbench.config import make_config
from cfbench.data.specs import Digits
from cfbench.data.splits import make_split
from cfbench.errors import UsageError
from cfbench.evaluators.mia import (
    MembershipInference,
    attack_scores,
    model_features,
    stack_features,
    summarize_attacks,
)
from cfbench.execution import jobs as jobs_mod
from cfbench.execution import reference as XR
from cfbench.execution.jobs import run_job
from cfbench.mia import reference as R
from cfbench.testing.tiny import eval_context
from cfbench.training.recipe import fit_recipe
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

POOL = 160          # 80 members, 80 non-members
K = 4
SETS = {"epochs": 30, "train.batch_size": 16, "data.pool_size": POOL, "mia.reference_models": K,
        "mia.fprs": "0.2,0.01"}
THRESHOLD = ["loss", "confidence", "entropy", "modified_entropy"]
ALL_ATTACKS = (THRESHOLD + [f"{a}_class" for a in THRESHOLD]
               + ["robust_loss", "robust_confidence", "robust_modified_entropy", "label_only",
                  "lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed",
                  "rmia_online", "rmia_offline"])


def _random_label_data(seed: int = 0):
    """digits with the training labels permuted: fitting them means memorising them."""
    ds = Digits().load()
    ds.y_train = np.random.default_rng(seed).permutation(ds.y_train)
    return make_split(ds, POOL, 0.5, 0)


def _evaluate(cfg, data, model, tmp, run_name="run", seed=0):
    ctx = eval_context(cfg, model, tmp / run_name, data, cache_dir=tmp / "_cache", seed=seed)
    return MembershipInference(cfg.evaluator_params["mia"]).evaluate(ctx)


class _CountingFit:
    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, cfg, data, x, y, **kw):
        self.calls.append({"n": len(x), "seed": kw["seed"], "defense": cfg.defense})
        return self.real(cfg, data, x, y, **kw)


@pytest.fixture(scope="module")
def leak(tmp_path_factory):
    """Target memorises its 80 random-labelled members; K reference models, same recipe."""
    tmp = tmp_path_factory.mktemp("mia")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny batches: a second thread only adds contention
    torch.manual_seed(0)
    cfg = make_config(dataset="digits", defense="erm", evaluators=["mia"], sets=SETS)
    data = _random_label_data()
    model, fctx = fit_recipe(cfg, data, data.x_train, data.y_train, seed=0, checkpoint_dir=None,
                                    cache_dir=None, progress=False)
    counter = _CountingFit(fit_recipe)
    mp = pytest.MonkeyPatch()
    mp.setattr(jobs_mod, "fit_recipe", counter)
    try:
        res = _evaluate(cfg, data, model, tmp)
    finally:
        mp.undo()
    with torch.no_grad():
        member_acc = float((model(data.x_train).argmax(1) == data.y_train).float().mean())
    yield {"tmp": tmp, "cfg": cfg, "data": data, "model": model, "res": res, "fit_calls": counter.calls,
           "member_accuracy": member_acc}
    torch.set_num_threads(threads)


def test_planted_leak_every_attack_well_above_half(leak):
    assert leak["member_accuracy"] >= 0.9                   # the random labels are memorised
    m = leak["res"].metrics
    for a in ALL_ATTACKS:
        auc = m[f"mia.{a}.auc"]
        assert auc["n"] == POOL and auc["n_members"] == POOL // 2
        # well above 0.5: the whole interval lies above 0.6 (measured: 0.71 .. 0.98)
        assert auc["ci_low"] > 0.6, (a, auc)
        # entropy ignores the label (the model is confident on non-members too, only wrong)
        if "entropy" not in a or "modified" in a:
            assert auc["value"] > 0.75, (a, auc)
        assert m[f"mia.{a}.balanced_accuracy"]["value"] > 0.6, a
    # the strongest attacks nearly separate members from non-members
    assert m["mia.best.auc"]["value"] > 0.95
    assert m["mia.best.auc"]["attack"] in ALL_ATTACKS
    assert m["mia.best.tpr_at_fpr.0.2"]["value"] > 0.8


def test_reference_models_use_the_run_recipe(leak):
    calls = leak["fit_calls"]
    assert len(calls) == K
    assert all(c["n"] == POOL // 2 and c["defense"] == "erm" for c in calls)   # same data size & defense
    assert len({c["seed"] for c in calls}) == K                                 # distinct training seeds
    proto = leak["res"].notes["mia"]["protocol"]
    assert proto["reference_models_trained_now"] == list(range(K))
    assert proto["reference_models_reused"] == []
    assert proto["in_models_per_example"] == {"min": K // 2, "max": K // 2, "mean": K / 2}
    assert proto["n_members"] == proto["n_nonmembers"] == POOL // 2
    assert proto["population"]["size"] == 500
    assert proto["query_augmentations"] == ["identity"]        # recipe trains without augmentation
    # Song, Shokri & Mittal's *inference* attack: 20 steps of 2.5 eps / 20 from a zero start
    adv = proto["adversarial"]
    assert adv["steps"] == 20 and adv["rand_init"] is False and adv["step_size"] == pytest.approx(2.5 * adv["eps"] / 20)
    lo = proto["label_only"]
    assert lo["norm"] == "L2" and lo["max_radius"] == pytest.approx(8.0) and lo["models"] == "target only"
    assert lo["counts"]["target"]["misclassified"] > 0    # random labels: the non-members are mostly wrong
    t = leak["res"].timings
    assert t["reference_training"] > 0 and t["signals"] > 0 and t["scoring"] > 0
    assert proto["reference_training_seconds_total"] > 0
    # cache layout: <cache>/refmodels/<recipe hash>/<i>.safetensors, no leftover checkpoints
    d = leak["tmp"] / "_cache" / "refmodels" / proto["reference_recipe_hash"]
    # (dot-files are the executor's job locks)
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [f"{i}.safetensors"
                                                                                for i in range(K)]
    meta = XR.read_reference_meta(d / "0.safetensors")
    assert meta["index"] == 0 and meta["n_train"] == POOL // 2 and meta["recipe_hash"] == d.name


def test_scores_file_recomputes_every_metric_with_sklearn(leak):
    res = leak["res"]
    with np.load(leak["tmp"] / "run" / "mia_scores.npz") as z:
        assert not any(a.dtype == object for a in z.values())            # no pickle needed
        member = z["member"]
        np.testing.assert_array_equal(member, leak["data"].member_mask)
        np.testing.assert_array_equal(z["pool_idx"], leak["data"].pool_idx)
        assert list(z["attacks"]) == ALL_ATTACKS
        assert z["in_mask"].shape == (K, POOL)
        for a in z["attacks"]:
            s = z[f"score.{a}"]
            ok = ~np.isnan(s)
            assert res.metrics[f"mia.{a}.auc"]["value"] == pytest.approx(
                roc_auc_score(member[ok], s[ok]), abs=1e-12)
            fpr, tpr, _ = roc_curve(member[ok], s[ok], drop_intermediate=False)
            got = res.metrics[f"mia.{a}.tpr_at_fpr.0.2"]
            i = np.where(fpr <= 0.2)[0][-1]
            assert got["value"] == tpr[i] and got["fpr"] == fpr[i]
            assert got["ci_low"] <= got["value"] <= got["ci_high"]
            r = res.notes["mia"]["roc"][a]
            assert len(r["fpr"]) == len(r["tpr"]) <= 200 and r["fpr"][-1] == 1.0


def test_unsupported_fpr_is_na_not_zero(leak):
    m = leak["res"].metrics
    for a in ALL_ATTACKS:
        e = m[f"mia.{a}.tpr_at_fpr.0.01"]                  # 0.01 < 10 / 80 non-members
        assert e["value"] is None and "not supported" in e["reason"] and e["n_nonmembers"] == POOL // 2
    best = m["mia.best.tpr_at_fpr.0.01"]
    assert best["value"] is None and best["attack"] is None and "not supported" in best["reason"]
    json.dumps(m, allow_nan=False)                          # the record stays strict JSON


def test_null_case_auc_interval_contains_half(leak, tmp_path):
    """A target trained on 80 examples outside the pool: members and non-members both unseen."""
    cfg, data = leak["cfg"], leak["data"]
    outside = np.setdiff1d(np.arange(len(data.dataset.x_train)), data.pool_idx)[:POOL // 2]
    x = torch.from_numpy(data.dataset.x_train[outside])
    y = torch.from_numpy(data.dataset.y_train[outside])
    model, _ = fit_recipe(cfg, data, x, y, seed=0, checkpoint_dir=None, cache_dir=None, progress=False)
    res = _evaluate(cfg, data, model, leak["tmp"], run_name="null")
    assert res.notes["mia"]["protocol"]["reference_models_trained_now"] == []      # cache reused
    for a in ALL_ATTACKS:
        auc = res.metrics[f"mia.{a}.auc"]
        assert auc["ci_low"] <= 0.5 <= auc["ci_high"], (a, auc)


def test_second_run_of_the_same_recipe_trains_nothing(leak, monkeypatch):
    cfg, data, tmp = leak["cfg"], leak["data"], leak["tmp"]
    d = tmp / "_cache"
    files = sorted(p for p in d.rglob("*.safetensors"))
    before = {p: os.stat(p).st_mtime_ns for p in files}

    def no_training(*a, **kw):
        raise AssertionError("fit_recipe called: a cached reference model was retrained")

    monkeypatch.setattr(jobs_mod, "fit_recipe", no_training)
    res = _evaluate(cfg, data, leak["model"], tmp, run_name="again")
    proto = res.notes["mia"]["protocol"]
    assert proto["reference_models_trained_now"] == [] and proto["reference_models_reused"] == list(range(K))
    assert proto["signals_computed"] == []                  # target and reference signals all cached
    assert res.timings["reference_training"] < 1.0
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    for a in ALL_ATTACKS:                                   # same signals -> same numbers
        assert res.metrics[f"mia.{a}.auc"] == leak["res"].metrics[f"mia.{a}.auc"]
    # another run of the same recipe with a different target seed reuses the same references
    cfg2 = make_config(dataset="digits", defense="erm", evaluators=["mia"], sets=SETS, seed=1)
    assert XR.reference_recipe_hash(cfg2, data) == proto["reference_recipe_hash"]
    # ... while a change of recipe does not
    cfg3 = make_config(dataset="digits", defense="erm", evaluators=["mia"], sets={**SETS, "epochs": 29})
    assert XR.reference_recipe_hash(cfg3, data) != proto["reference_recipe_hash"]


def test_train_reference_is_a_pure_cached_function(leak, monkeypatch):
    cfg, data, tmp = leak["cfg"], leak["data"], leak["tmp"]
    monkeypatch.setattr(jobs_mod, "fit_recipe", lambda *a, **k: pytest.fail("retrained"))
    p = run_job(XR.reference_job(cfg, data, 1, tmp / "_cache"))
    assert p.name == "1.safetensors" and p.parent.name == XR.reference_recipe_hash(cfg, data)
    m = XR.load_reference(cfg, data, p)
    assert not m.training


def test_without_reference_models_only_reference_free_attacks(leak):
    cfg = make_config(dataset="digits", defense="erm", evaluators=["mia"],
                      sets={**SETS, "mia.reference_models": 0, "mia.adversarial": False})
    res = _evaluate(cfg, leak["data"], leak["model"], leak["tmp"], run_name="k0")
    attacks = {k.split(".")[1] for k in res.metrics if k.endswith(".auc")}
    assert attacks == set(THRESHOLD) | {"label_only", "best", "primary"}
    assert res.metrics["mia.primary.auc"]["value"] is None and "reference_models=0" in res.metrics[
        "mia.primary.auc"]["reason"]
    assert not any(k.startswith("mia.pooled.") for k in res.metrics)
    assert res.metrics["mia.audit.epsilon_lb"]["value"] is None
    assert any("reference_models=0" in w for w in res.warnings)
    # same target, same signals: the global threshold attacks agree with the full evaluation
    for a in THRESHOLD:
        assert res.metrics[f"mia.{a}.auc"] == leak["res"].metrics[f"mia.{a}.auc"]


# --------------------------------------------------------------------------------------------
# reference subsets
# --------------------------------------------------------------------------------------------
def test_reference_subsets_are_paired_halves():
    m = R.reference_in_mask(100, 50, 8, seed=3)
    assert m.shape == (8, 100) and (m.sum(axis=1) == 50).all()
    assert (m.sum(axis=0) == 4).all()                       # every example IN for exactly K/2
    assert (m[0::2] ^ m[1::2]).all()                        # pairs are complements
    np.testing.assert_array_equal(m[5], R.reference_subset(100, 50, 5, seed=3))   # pure in the index
    assert not np.array_equal(m, R.reference_in_mask(100, 50, 8, seed=4))
    odd = R.reference_in_mask(101, 50, 4)                  # odd pool: one example OUT of both per pair
    assert (odd.sum(axis=1) == 50).all() and ((odd[0] | odd[1]).sum() == 100)
    big = R.reference_in_mask(10, 7, 2)                    # 2M > P: the draws overlap by 2M - P
    assert (big.sum(axis=1) == 7).all() and (big[0] & big[1]).sum() == 4
    assert R.reference_train_seed(0) != R.reference_train_seed(1)
    with pytest.raises(ValueError):
        R.reference_subset(10, 10, 0)


def test_bad_parameters_are_usage_errors():
    for sets in ({"mia.fprs": "0.01,2"}, {"mia.fprs": "0"}, {"mia.reference_models": -1},
                 {"mia.lira_center": "mode"}, {"mia.augmentations": "sometimes"}, {"mia.rmia_a": 1.5}):
        with pytest.raises(UsageError):
            make_config(dataset="digits", evaluators=["mia"], sets=sets)


# --------------------------------------------------------------------------------------------
# the evaluator's scoring against direct transcriptions of the papers (synthetic signals)
# --------------------------------------------------------------------------------------------
def _two_class_logits(s):
    """Logits [0, s] with label 1: phi = s exactly and p_y = sigmoid(s)."""
    return np.stack([np.zeros_like(s), s], axis=-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attack_scores_match_paper_formulas_on_gaussian_signals(seed):
    rng = np.random.default_rng(seed)
    k, n, a, z = 6, 40, 3, 25
    member = rng.random(n) < 0.5
    in_mask = np.argsort(rng.random((k, n)), axis=0) < k // 2
    offset = rng.normal(0, 2, n)
    phi_ref = offset[None, :, None] + 1.5 * in_mask[:, :, None] + rng.normal(0, 1, (k, n, a))
    phi_tgt = offset[:, None] + 1.5 * member[:, None] + rng.normal(0, 1, (n, a))
    pop_ref = rng.normal(0, 2, (k, z, a))
    pop_tgt = rng.normal(0, 2, (z, a))
    labels, pop_labels = np.ones(n, dtype=np.int64), np.ones(z, dtype=np.int64)
    temp, gamma, a_off = 1.7, 1.3, 0.4
    tgt = model_features(_two_class_logits(phi_tgt), labels, _two_class_logits(pop_tgt), pop_labels,
                         temperature=temp)
    refs = stack_features([model_features(_two_class_logits(phi_ref[i]), labels,
                                          _two_class_logits(pop_ref[i]), pop_labels, temperature=temp)
                           for i in range(k)])
    sc, extra = attack_scores(labels, tgt, refs, in_mask, num_classes=2, rmia_a=a_off, rmia_gamma=gamma,
                              rmia_continuous=False)
    cont, _ = attack_scores(labels, tgt, refs, in_mask, num_classes=2, rmia_a=a_off, rmia_gamma=gamma)

    sig = lambda v: 1.0 / (1.0 + np.exp(-v / temp))
    lo_on, lo_off, lo_on_fix, lo_off_fix, r_on, r_off = (np.zeros(n) for _ in range(6))
    phi_ref32 = phi_ref                                      # refs are kept in float64 (version 2)
    dev_in = np.concatenate([phi_ref32[in_mask[:, j], j] - phi_ref32[in_mask[:, j], j].mean(0) for j in range(n)])
    dev_out = np.concatenate([phi_ref32[~in_mask[:, j], j] - phi_ref32[~in_mask[:, j], j].mean(0) for j in range(n)])
    s_in_fix, s_out_fix = np.sqrt(np.mean(dev_in ** 2)), np.sqrt(np.mean(dev_out ** 2))
    p_ref32 = sig(phi_ref)
    p_pop32 = sig(pop_ref)
    for j in range(n):
        ins, outs = phi_ref32[in_mask[:, j], j], phi_ref32[~in_mask[:, j], j]      # (k_in, a), (k_out, a)
        mu_in, mu_out = np.median(ins, 0), np.median(outs, 0)
        # LiRA (Carlini et al. 2022): Gaussian likelihood ratio, averaged over augmentations
        lo_on[j] = np.mean(stats.norm.logpdf(phi_tgt[j], mu_in, ins.std(0))
                           - stats.norm.logpdf(phi_tgt[j], mu_out, outs.std(0)))
        lo_on_fix[j] = np.mean(stats.norm.logpdf(phi_tgt[j], mu_in, s_in_fix)
                               - stats.norm.logpdf(phi_tgt[j], mu_out, s_out_fix))
        lo_off[j] = np.mean((phi_tgt[j] - mu_out) / outs.std(0))   # one-sided, ranked by z
        lo_off_fix[j] = np.mean((phi_tgt[j] - mu_out) / s_out_fix)
        # RMIA (Zarifzadeh et al. 2024): fraction of z with LR(x, z) >= gamma, per augmentation
        for q in range(a):
            px_on = p_ref32[:, j, q].mean()
            px_off = 0.5 * ((1 + a_off) * p_ref32[~in_mask[:, j], j, q].mean() + 1 - a_off)
            cnt_on = cnt_off = 0
            for w in range(z):
                pz_on = p_pop32[:, w, q].mean()
                pz_off = 0.5 * ((1 + a_off) * pz_on + 1 - a_off)
                lr_on = (sig(phi_tgt[j, q]) / px_on) / (sig(pop_tgt[w, q]) / pz_on)
                lr_off = (sig(phi_tgt[j, q]) / px_off) / (sig(pop_tgt[w, q]) / pz_off)
                cnt_on += lr_on >= gamma
                cnt_off += lr_off >= gamma
            r_on[j] += cnt_on / z / a
            r_off[j] += cnt_off / z / a
    np.testing.assert_allclose(sc["lira_online"], lo_on, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sc["lira_online_fixed"], lo_on_fix, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sc["lira_offline"], lo_off, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sc["lira_offline_fixed"], lo_off_fix, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sc["rmia_online"], r_on, atol=1.0 / z + 1e-12)
    np.testing.assert_allclose(sc["rmia_offline"], r_off, atol=1.0 / z + 1e-12)
    assert np.mean(np.abs(sc["rmia_online"] - r_on) > 1e-12) < 0.05   # rounding ties at LR == gamma only
    for name in ("rmia_online", "rmia_offline"):              # the continuous score keeps the counts' order
        assert np.all(cont[name] >= sc[name] - 1e-12) and np.all(cont[name] < sc[name] + 1.0 / z + 1e-12)

    # class thresholds (Song & Mittal 2021): brute force on the reference models' IN/OUT scores
    ref_conf = sig(phi_ref[:, :, 0] * temp)                 # confidence at temperature 1
    tin, tout = ref_conf[in_mask], ref_conf[~in_mask]
    cands = np.concatenate([tin, tout])
    acc = [0.5 * (np.mean(tin >= c) + np.mean(tout < c)) for c in cands]
    tau = cands[int(np.argmax(acc))]
    assert extra["confidence_class"]["thresholds"][1] == pytest.approx(tau, rel=1e-12)
    np.testing.assert_allclose(sc["confidence_class"], sig(phi_tgt[:, 0] * temp) - tau, rtol=1e-10)


def test_summarize_attacks_drops_nan_and_reports_na():
    member = np.array([True, False] * 20)
    scores = {"good": np.linspace(0, 1, 40), "partly": np.where(np.arange(40) < 4, np.nan, np.arange(40.0)),
              "none": np.full(40, np.nan)}
    metrics, best, roc, dropped = summarize_attacks(scores, member, (0.5, 0.01))
    assert dropped == {"good": 0, "partly": 4, "none": 40}
    assert metrics["mia.partly.auc"]["n"] == 36
    assert metrics["mia.none.auc"]["value"] is None and "reason" in metrics["mia.none.auc"]
    assert metrics["mia.none.tpr_at_fpr.0.5"]["value"] is None
    assert "none" not in roc
    assert best["mia.best.auc"]["attack"] in ("good", "partly")
    assert best["mia.best.tpr_at_fpr.0.01"]["value"] is None


# --------------------------------------------------------------------------------------------
# through the CLI and the runner
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_record_mia_and_reuse_reference_models(tmp_path):
    from cfbench.cli import main
    from cfbench.store import read_record

    args = ["run", "--defense", "erm", "--dataset", "digits", "--out", str(tmp_path), "--quiet",
            "--evaluators", "clean,mia", "--set", "epochs=2", "--set", "data.pool_size=300",
            "--set", "mia.reference_models=2", "--set", "mia.adversarial=false"]
    assert main(args) == 0
    assert main(args + ["--seed", "1"]) == 0                 # another target seed, same recipe
    recs = sorted((read_record(p) for p in tmp_path.iterdir() if p.name.startswith("digits")),
                  key=lambda r: r["config"]["seed"])
    first, second = (r["notes"]["mia"]["protocol"] for r in recs)
    assert first["reference_models_trained_now"] == [0, 1] and second["reference_models_reused"] == [0, 1]
    assert second["reference_models_trained_now"] == []
    for rec in recs:
        assert rec["status"] == "ok"
        t = rec["timings"]
        assert {"eval.mia", "eval.mia.reference_training", "eval.mia.signals", "eval.mia.scoring"} <= set(t)
        assert rec["metrics"]["mia.best.auc"]["attack"] is not None
        assert rec["metrics"]["mia.loss.tpr_at_fpr.0.01"]["value"] is None          # 150 non-members
        assert (tmp_path / rec["run_id"] / "mia_scores.npz").exists()
    assert recs[1]["timings"]["eval.mia.reference_training"] < recs[0]["timings"]["eval.mia.reference_training"]


# --------------------------------------------------------------------------------------------
# pooled metrics, primary attack, audit, flags (version 2)
# --------------------------------------------------------------------------------------------
def test_pooled_metrics_recompute_with_sklearn_from_the_scores_file(leak):
    res = leak["res"]
    m = res.metrics
    with np.load(leak["tmp"] / "run" / "mia_scores.npz") as z:
        in_pool = z["in_pool"]
        assert in_pool.shape == (K + 1, POOL)
        np.testing.assert_array_equal(in_pool[0], leak["data"].member_mask)          # the target's members
        np.testing.assert_array_equal(in_pool[1:], z["in_mask"])                      # the references' subsets
        pooled = list(z["pooled_attacks"])
        assert "rmia_online" in pooled and "lira_online_fixed" in pooled
        for a in pooled:
            s = z[f"pooled.{a}"]
            assert s.shape == (K + 1, POOL)
            # row 0 is the single-target score
            np.testing.assert_array_equal(s[0], z[f"score.{a}"])
            ok = ~np.isnan(s.ravel())
            lab = in_pool.ravel()[ok]
            e = m[f"mia.pooled.{a}.auc"]
            assert e["value"] == pytest.approx(roc_auc_score(lab, s.ravel()[ok]), abs=1e-12)
            assert e["n_models"] == K + 1 and e["n"] == ok.sum()
            per = [roc_auc_score(in_pool[j][~np.isnan(s[j])], s[j][~np.isnan(s[j])]) for j in range(K + 1)]
            assert e["per_model"]["mean"] == pytest.approx(np.mean(per), abs=1e-12)
            assert e["per_model"]["min"] == pytest.approx(min(per)) and e["per_model"]["max"] == pytest.approx(max(per))
            fpr, tpr, _ = roc_curve(lab, s.ravel()[ok], drop_intermediate=False)
            assert m[f"mia.pooled.{a}.tpr_at_fpr.0.2"]["value"] == tpr[np.where(fpr <= 0.2)[0][-1]]
    notes = res.notes["mia"]["pooled"]
    assert notes["references"]["0"] == list(range(1, K + 1))                        # the target: all K
    assert notes["references"]["1"] == [0, 3, 4] and notes["references"]["2"] == [0, 3, 4]   # partner left out


def test_primary_attack_reported_at_supportable_fprs(leak):
    m = leak["res"].metrics
    n_out = m["mia.pooled.rmia_online.auc"]["n_nonmembers"]
    assert n_out == (K + 1) * POOL // 2
    assert m["mia.primary.auc"]["attack"] == "rmia_online" and m["mia.primary.auc"]["scope"] == "pooled"
    assert m["mia.primary.auc"]["value"] == m["mia.pooled.rmia_online.auc"]["value"]
    assert m["mia.primary.tpr_at_fpr.0.2"]["value"] == m["mia.pooled.rmia_online.tpr_at_fpr.0.2"]["value"]
    # 0.01 < 10 / 400 pooled non-member trials: n/a with the reason, never 0
    assert m["mia.primary.tpr_at_fpr.0.01"]["value"] is None and "not supported" in m["mia.primary.tpr_at_fpr.0.01"]["reason"]
    low = m["mia.primary.lowest_fpr"]
    assert low["value"] == 10 / n_out
    t = m["mia.primary.tpr_at_lowest_fpr"]
    assert t["fpr_target"] == 10 / n_out and t["fpr"] <= 10 / n_out and t["ci_low"] <= t["value"] <= t["ci_high"]
    assert m["mia.primary.advantage"]["value"] > 0.5                # the memorising target leaks
    # strongest-of-many stays, labelled selection-biased
    for key in ("mia.best.auc", "mia.pooled.best.auc", "mia.best.tpr_at_fpr.0.2"):
        assert m[key]["optimistic"] is True and m[key]["selection_biased"] is True, key


def test_confidence_is_not_a_second_attack_and_few_model_lira_is_flagged(leak):
    res = leak["res"]
    m = res.metrics
    assert m["mia.confidence.auc"]["same_ranking_as"] == "loss"
    assert m["mia.robust_confidence.auc"]["same_ranking_as"] == "robust_loss"
    assert m["mia.lira_online.auc"]["excluded_from_best"].startswith("per-example variance from 2")
    n_cand = m["mia.best.auc"]["n_candidates"]
    assert n_cand == len(ALL_ATTACKS) - 4                      # confidence x2, per-example LiRA x2 left out
    for key in [k for k in m if k.startswith("mia.best.")]:
        assert m[key]["attack"] not in ("confidence", "robust_confidence", "lira_online", "lira_offline"), key
    assert any("per-example-variance LiRA" in w for w in res.warnings)


def test_audit_lower_bound_positive_on_a_memorising_model(leak):
    m = leak["res"].metrics
    lb, lb_max = m["mia.audit.epsilon_lb"], m["mia.audit.epsilon_lb_max"]
    # random labels memorised: the pooled primary attack proves a clearly positive epsilon
    assert lb["value"] > 0.5 and lb["optimistic"] is False
    assert lb_max["value"] > 0.5 and lb_max["optimistic"] is True
    assert lb["delta"] == pytest.approx(1 / (10 * POOL // 2)) and lb["accountant_epsilon"] is None
    assert lb["n_members"] + lb["selection"]["n_members"] == (K + 1) * POOL // 2
