"""Membership inference: threshold, robustness-based, label-only, LiRA and RMIA attacks on one
shared pool of reference models and one cache of per-example signals; pooled multi-target
metrics, one primary attack, and an empirical DP audit.

Protocol
--------
The run's pool (``data.pool_size`` examples of the training split, seeded) is split into the
target's members (``member_fraction``) and non-members; the target trains on the members
only.  ``K = reference_models`` reference models are trained **with the run's recipe** (the
same defense, hyper-parameters, model, epochs, batch size, and as many training examples as
the target) on seeded subsets of the same pool, paired so that every example is IN for about
half of them (:mod:`cfbench.mia.reference`).  They are declared as training jobs
(:func:`cfbench.execution.reference.reference_jobs`, also through :meth:`declare_jobs` so
that a pool executor can start them before the target trains) and run by ``ctx.run_jobs``;
they are cached by (recipe hash, index) and shared by every attack and every later run of the
same recipe (any target seed).  Each model's logits on the pool (under query augmentations)
and on the RMIA population, and -- for the target, or for every pool model with
``pooled_adversarial`` -- its logits on PGD inputs and its boundary distances, are computed
once and cached (:mod:`cfbench.mia.signals`).

**Single-target** numbers (``mia.<attack>.*``): the run's own model is attacked with the K
reference models; its members are the positives.  **Pooled** numbers
(``mia.pooled.<attack>.*``, Carlini et al. 2022; Zarifzadeh et al. 2024): the target and the
K reference models form one pool; every pool model is attacked in turn with the others as its
references (leaving out a reference model's complementary partner, see
:mod:`cfbench.mia.suite`), and the ROC is computed over all ``(K + 1) x P`` (model, example)
trials -- with K = 16 on digits about 11,000 non-member trials, enough for TPR at 0.1% FPR.
IN/OUT is known for every pool model: the target's training set is the run's member mask
(not one of the paired permutation subsets), reference model ``i``'s is row ``i`` of the
reference in-mask.  Every pooled entry carries the spread of the same metric over the pool
models (``per_model``: mean, std, min, max).

**Primary attack** (``mia.primary.*``): ``primary`` = ``rmia_online`` by default, fixed by the
protocol before any number is seen, reported pooled at every FPR in ``fprs`` that the
non-member trials support, plus the lowest supportable FPR itself.  Why RMIA online: it is
designed for, and strongest with, few reference models (Zarifzadeh et al. 2024, Fig. 1/3;
cfbench's Fashion-MNIST K = 4 run: the highest AUC of its 17 attacks) -- cfbench's regime
(K = 4 on digits, 8 elsewhere); it is defined for every example with any K >= 1 (LiRA's
per-example Gaussians need IN and OUT models on both sides, and its per-example variance
needs many); online it has no tuned coefficient (``a`` is offline only); and its population
normalisation makes scores of different pool models comparable, which pooling needs.
``mia.best.*`` / ``mia.pooled.best.*`` stay: the maximum over attacks, labelled
``optimistic`` and ``selection_biased``.

**Support rule**: a TPR at FPR ``f`` is reported only when ``f >= 10 / N_out`` (at least 10
non-member trials may be false positives); otherwise it is n/a with the reason, never 0.  The
lowest supportable FPR is ``10 / N_out`` (``mia.primary.lowest_fpr``).

**DP audit** (``mia.audit.*``, Jagielski et al. 2020; Nasr et al. 2021;
:mod:`cfbench.mia.audit`): an epsilon lower bound from the primary attack's pooled trials,
at the run's delta (``dp.delta`` of a DP defense; else ``audit_delta``, default
``1 / (10 N)`` with ``N`` the target's training-set size, DP-SGD's default), beside the
accountant's epsilon (``dp.epsilon``).

Query augmentations (``augmentations``): ``auto`` (default) queries the identity plus the
dataset family's shifts / mirrors exactly when the recipe trains with augmentation
(``train.augment``), as Carlini et al. query with the training augmentations; ``on`` /
``off`` force the choice.  The **population** for RMIA is the first ``population_size``
examples of the run's test split (default: all of it): points that neither the target nor
any reference model trained on, as RMIA requires.

Attacks (``score``: higher = member; ``p = softmax(f(x))``, ``y`` the true label)
---------------------------------------------------------------------------------
* ``loss``, ``confidence``, ``entropy``, ``modified_entropy`` (Song & Mittal 2021): the
  target's ``log p_y``, ``p_y``, ``-H(p)``, ``-Mentr(p, y)`` on the original input.  The
  confidence is ``exp`` of the loss, the same ranking: it is marked ``same_ranking_as: loss``
  and is not a candidate of ``best`` (one attack, not two).
* ``<score>_class``: Song & Mittal's class-dependent thresholds ``tau_y``, fitted on shadow
  data = the reference models' own IN/OUT signals, never on the target's membership.
* ``robust_<score>`` (Song, Shokri & Mittal 2019): the scores on the target's outputs for
  PGD(x) with their *inference* attack's setting -- ``adv_steps`` = 20 steps of
  ``2.5 eps / 20``, **zero start** (their ``output_utils.py``: the random start is commented
  out), untargeted on the true label, the run's threat model, last iterate, eval mode.
  (cfbench version 1 used 8 steps of eps/5 from a random start: their *training* attack.)
* ``label_only`` (Choquette-Choo et al. 2021): the distance to the decision boundary, the
  smallest L2 radius at which PGD flips the predicted label (bisection;
  :mod:`cfbench.mia.label_only`), 0 for a misclassified point.
* ``lira_*`` (Carlini et al. 2022): online (IN and OUT Gaussians) and offline (OUT only, the
  paper's one-sided test ranked by ``z = (phi - mu_out) / sigma_out`` -- version 1's
  ``log Phi(z)`` rounded to 0 above z ~ 38), per-example or pooled (``*_fixed``) variance.
  Per-example variance with fewer than 32 IN or OUT models per example is flagged: a warning,
  ``excluded_from_best`` in its metrics.
* ``rmia_online`` / ``rmia_offline`` (Zarifzadeh, Liu & Shokri 2024):
  ``LR(x, z) = [p(x|theta) / p(x)] / [p(z|theta) / p(z)]``, ``p(.|theta)`` the probability
  of the true label at temperature ``rmia_temperature`` = 1 (computed in float64 log space);
  online ``p(x)`` = mean over the references, offline ``p(x) = ((1 + a) p_OUT(x) + 1 - a) / 2``
  with ``a = rmia_a = 0.3`` (ML Privacy Meter's default, not tuned); ``gamma = rmia_gamma = 1``
  (ML Privacy Meter; the research code uses temperature 2 and gamma 2); population ``Z`` = the
  test split (500 on digits).  The score is the paper's ``#{z : LR >= gamma} / Z`` made
  continuous (``rmia_continuous``): ties are broken by the position of the ratio between its
  neighbouring population ratios (:func:`cfbench.mia.scores.rmia_scores`); with query
  augmentations, the mean over augmentations.

Metrics (all in the run's record)
---------------------------------
``mia.A.{auc, balanced_accuracy, advantage, tpr_at_fpr.<f>}`` (single target),
``mia.pooled.A.*`` (pooled, with ``per_model`` spread), ``mia.best.*`` and
``mia.pooled.best.*`` (selection-biased maxima), ``mia.primary.{auc, advantage,
tpr_at_fpr.<f>, lowest_fpr, tpr_at_lowest_fpr}``, ``mia.audit.{epsilon_lb,
epsilon_lb_max}``.  ``notes['mia']`` holds the protocol, down-sampled ROCs (single and
pooled), per-attack formulas and flags, and the per-model spread; ``<run>/mia_scores.npz``
holds every score (single: ``score.<A>`` (P,); pooled: ``pooled.<A>`` (K + 1, P) with
``in_pool`` (K + 1, P)), so every metric can be recomputed without cfbench.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import UsageError
from ..mia import audit as AU
from ..mia import metrics as M
from ..mia.suite import (  # noqa: F401 - part of this module's API (tests, plugins)
    FORMULAS,
    LIRA_PER_EXAMPLE_MIN_MODELS,
    ROBUST_SCORES,
    THRESHOLD_SCORES,
    attack_scores,
    model_features,
    pool_attack_scores,
    pool_partners,
    pooled_summary,
    save_scores,
    stack_features,
    summarize_attacks,
)
from ..params import param
from .base import EvalContext, EvalResult, Evaluator

SCORES_FILE = "mia_scores.npz"

#: every attack name the suite can produce (the valid choices of ``primary``)
ATTACKS = (tuple(THRESHOLD_SCORES) + tuple(f"{a}_class" for a in THRESHOLD_SCORES)
           + tuple(f"robust_{a}" for a in ROBUST_SCORES) + ("label_only",)
           + ("lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "rmia_online",
              "rmia_offline"))
#: the per-example-variance LiRA variants (flagged with few models per side)
PER_EXAMPLE_LIRA = ("lira_online", "lira_offline")


@dataclass(frozen=True)
class MIAParams:
    reference_models: int = param(
        8, "K reference models trained with the run's recipe on paired random subsets of the pool "
           "(0 = only the attacks that need none)", ge=0)
    reference_seed: int = param(0, "seed of the reference models' subsets and training seeds")
    primary: str = param("rmia_online", "the primary attack, reported pooled at every supportable FPR "
                                        "(fixed by the protocol)")
    pooled: bool = param(True, "pooled multi-target evaluation over the target and its reference models")
    pooled_adversarial: bool = param(
        False, "also compute PGD logits and boundary distances of every reference model, so that the "
               "robustness-based and label-only attacks are pooled too (costs PGD on the pool per model)")
    augmentations: Literal["auto", "on", "off"] = param(
        "auto", "query augmentations (identity + 1-px shifts; + mirrors for flip-shift data): on, off, or auto = "
                "on exactly when the recipe trains with augmentation (train.augment)")
    adversarial: bool = param(True, "robustness-based attacks on PGD inputs (Song, Shokri & Mittal 2019)")
    adv_steps: int = param(20, "PGD steps of the robustness-based attacks (Song et al.'s inference attack: 20)",
                           ge=1)
    adv_step_size: float | None = param(
        None, "PGD step size of the robustness-based attacks (default 2.5 * eps / adv_steps, Song et al.)", gt=0)
    adv_rand_init: bool = param(False, "random start of that PGD (Song et al.'s inference attack: no)")
    label_only: bool = param(True, "label-only boundary-distance attack (Choquette-Choo et al. 2021)")
    label_only_norm: Literal["L2", "Linf"] = param("L2", "norm of the boundary distance (the paper: L2)")
    label_only_max_radius: float | None = param(
        None, "upper end of the radius search (default: the input box's diameter, sqrt(d) for L2, 1 for Linf)",
        gt=0)
    label_only_search_steps: int = param(12, "bisection steps of the radius search", ge=1)
    label_only_pgd_steps: int = param(10, "PGD steps of each radius probe (zero start, 2.5 r / steps)", ge=1)
    population_size: int | None = param(
        None, "RMIA population: the first Z examples of the run's test split (default: all)", ge=1)
    lira_fixed_variance: Literal["global", "shared"] = param(
        "global", "pooled sigma of the *_fixed LiRA variants: separate for IN/OUT (global) or one for both (shared)")
    lira_center: Literal["median", "mean"] = param("median", "LiRA Gaussian location (reference code: median)")
    lira_offline_two_sided: bool = param(
        False, "offline LiRA: two-sided density test (reference code) instead of the paper's one-sided test")
    rmia_a: float = param(0.3, "RMIA offline coefficient a in p(x) = ((1+a) p_OUT(x) + 1 - a) / 2", ge=0, le=1)
    rmia_gamma: float = param(1.0, "RMIA threshold gamma on the pairwise likelihood ratio", gt=0)
    rmia_temperature: float = param(1.0, "softmax temperature of RMIA's p(x|theta)", gt=0)
    rmia_continuous: bool = param(True, "break RMIA's ties by the ratio's position between population ratios")
    audit: bool = param(True, "empirical DP audit: epsilon lower bound from the primary attack's pooled trials")
    audit_delta: float | None = param(
        None, "delta of the audit when the defense records none (default 1/(10 N), N = training-set size)",
        gt=0, lt=1)
    audit_seed: int = param(0, "seed of the audit's threshold-selection / evaluation split")
    fprs: tuple[float, ...] = param((0.01, 0.001, 0.0001), "false-positive rates for TPR@FPR")
    confidence: float = param(0.95, "confidence level of the intervals", gt=0, lt=1)
    roc_points: int = param(200, "points of the down-sampled ROC curves in the record", ge=2)
    class_shadow_max: int | None = param(
        500_000, "at most this many (reference model, example) signals fit the class thresholds; a seeded "
                 "random subset beyond it (None: all)", ge=2)
    batch_size: int = param(512, "batch size of the signal computation", ge=1)

    def validate(self) -> None:
        if not self.fprs:
            raise UsageError("mia.fprs: give at least one false-positive rate, e.g. 0.01,0.001.")
        for f in self.fprs:
            if not 0 < f <= 1:
                raise UsageError(f"mia.fprs: {f!r} is out of range; every rate must be in (0, 1].")
        if self.primary not in ATTACKS:
            from ..errors import suggest

            raise UsageError(f"mia.primary: unknown attack {self.primary!r}{suggest(self.primary, ATTACKS)}. "
                             f"Valid choices: {', '.join(ATTACKS)}.")


def _na(reason: str, **kw) -> dict[str, Any]:
    return {"value": None, "ci_low": None, "ci_high": None, "reason": reason, **kw}


def primary_metrics(pooled: dict[str, Any], attack: str, fprs, *, reason: str | None = None,
                    trials: tuple[np.ndarray, np.ndarray] | None = None, confidence: float = 0.95,
                    n_models: int = 0) -> dict[str, Any]:
    """``mia.primary.*`` from the pooled metrics of ``attack`` (n/a with ``reason`` if absent)."""
    tag = {"attack": attack, "scope": "pooled", "n_models": n_models}
    keys = ["auc", "advantage", *(f"tpr_at_fpr.{f}" for f in fprs), "lowest_fpr", "tpr_at_lowest_fpr"]
    if reason is not None or trials is None:
        return {f"mia.primary.{k}": _na(reason or f"{attack} has no pooled trials", **tag) for k in keys}
    s, lab = trials
    summ = M.summarize(s, lab, fprs, confidence=confidence, n_points=2)
    out = {}
    for k in ("auc", "advantage", *(f"tpr_at_fpr.{f}" for f in fprs)):
        src = pooled.get(f"mia.pooled.{attack}.{k}")
        out[f"mia.primary.{k}"] = {**(src or _na("missing")), **tag}
    low = summ["lowest_fpr"]
    out["mia.primary.lowest_fpr"] = {"value": low["value"], "n_nonmembers": low["n_nonmembers"],
                                     "rule": low["rule"], **tag}
    out["mia.primary.tpr_at_lowest_fpr"] = {**summ["tpr_at_lowest_fpr"], **tag}
    return out


class MembershipInference(Evaluator):
    """Threshold, robustness-based, label-only, LiRA and RMIA attacks, pooled over the target and
    its reference models, with one primary attack and a DP audit."""

    name = "mia"
    contract_params = {"reference_models": 2, "adv_steps": 2, "population_size": 64, "label_only_search_steps": 2,
                       "label_only_pgd_steps": 2}
    description = ("membership inference: loss/entropy/m-entropy thresholds (global, class), robustness-based "
                   "(PGD), label-only (boundary distance), LiRA online/offline, RMIA online/offline; pooled "
                   "over the target and its reference models; primary attack (RMIA online) at every "
                   "supportable FPR; DP epsilon audit")
    version = 2
    Params = MIAParams

    def declare_jobs(self, cfg, data, cache_dir: Path) -> list[Any]:
        from ..execution import reference as XR

        k = self.params.reference_models
        return XR.reference_jobs(cfg, data, k, cache_dir, seed=self.params.reference_seed) if k else []

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        # training and rebuilding reference models reseed torch's global RNG: restore it, so
        # that evaluators after this one see the same random state as without it
        state = torch.get_rng_state()
        try:
            return self._evaluate(ctx)
        finally:
            torch.set_rng_state(state)

    # ----------------------------------------------------------------------------- signals
    def _signals(self, ctx, key: dict[str, Any], need: tuple[str, ...], compute, computed: list, reused: list,
                 label: str) -> dict[str, np.ndarray]:
        from ..mia import signals as C

        path = C.signal_path(ctx.cache_dir, key)
        arrays = C.load_signals(path, need)
        if arrays is None:
            arrays = compute()
            C.save_signals(path, arrays, key)
            computed.append(label)
        else:
            reused.append(label)
        return arrays

    def _evaluate(self, ctx: EvalContext) -> EvalResult:
        from ..execution import reference as XR
        from ..execution.jobs import subset_sha
        from ..mia import label_only as LO
        from ..mia import reference as R
        from ..mia import signals as C

        p: MIAParams = self.params
        cfg, data = ctx.config, ctx.data
        res = EvalResult()
        use_augs = p.augmentations == "on" or (p.augmentations == "auto" and cfg.train.augment)
        augs = C.augmentations(cfg.dataset_info["augmentation"], use_augs)
        member = np.asarray(data.member_mask, dtype=bool)
        n_pool = member.size
        x_pool, y_pool_t = data.x_pool, data.y_pool
        y_pool = y_pool_t.numpy()
        n_test = len(data.test_idx)
        n_pop = min(p.population_size or n_test, n_test)
        if p.population_size and p.population_size > n_test:
            res.warnings.append(f"mia: population_size={p.population_size} but the run's test split has "
                                f"{n_test} examples; using {n_test}")
        x_pop, y_pop = data.x_test[:n_pop], data.y_test[:n_pop].numpy()
        k = p.reference_models
        num_classes = data.dataset.num_classes

        dataset_sha = data.dataset.fingerprint()[:16]
        data_key = {"dataset": dataset_sha, "pool": subset_sha(data.pool_idx),
                    "population": subset_sha(data.test_idx[:n_pop]), "augmentations": list(augs)}

        # 1. reference models: declared jobs, run by the run's executor ---------------------
        jobs = XR.reference_jobs(cfg, data, k, ctx.cache_dir, seed=p.reference_seed) if k else []
        recipe_hash = jobs[0].meta["recipe_hash"] if jobs else None
        reused = [i for i, j in enumerate(jobs) if j.path.exists()]
        trained_now = [i for i, j in enumerate(jobs) if not j.path.exists()]
        t0 = time.perf_counter()
        ref_paths = ctx.run_jobs(jobs) if jobs else []
        t_ref = time.perf_counter() - t0
        in_mask = R.reference_in_mask(n_pool, int(member.sum()), k, p.reference_seed)
        ref_metas = [XR.read_reference_meta(path) for path in ref_paths]

        # 2. signals ----------------------------------------------------------------------
        t0 = time.perf_counter()
        computed, reused_sig = [], []
        eps = ctx.threat.eps
        adv_step = p.adv_step_size if p.adv_step_size is not None else 2.5 * eps / p.adv_steps
        adv_settings = {"norm": ctx.threat.norm, "eps": eps, "steps": p.adv_steps, "step_size": adv_step,
                        "rand_init": p.adv_rand_init}
        lo_radius = (p.label_only_max_radius if p.label_only_max_radius is not None
                     else LO.default_max_radius(tuple(x_pool.shape[1:]), p.label_only_norm))
        lo_settings = {"norm": p.label_only_norm, "max_radius": lo_radius, "search_steps": p.label_only_search_steps,
                       "pgd_steps": p.label_only_pgd_steps}
        lo_counts: dict[str, dict[str, int]] = {}

        def logits_of(model):
            def compute():
                out = {"pool": C.query_logits(model, x_pool, augs, ctx.device, p.batch_size)}
                if k:
                    out["population"] = C.query_logits(model, x_pop, augs, ctx.device, p.batch_size)
                return out
            return compute

        def adv_of(model, seed):
            return lambda: {"pool_adv": C.adversarial_logits(
                model, x_pool, y_pool_t, norm=ctx.threat.norm, eps=eps, steps=p.adv_steps, step_size=adv_step,
                rand_init=p.adv_rand_init, seed=seed, device=ctx.device, batch_size=p.batch_size)}

        def boundary_of(model):
            def compute():
                d, counts = LO.boundary_distance(model, x_pool, y_pool_t, norm=p.label_only_norm,
                                                 max_radius=lo_radius, search_steps=p.label_only_search_steps,
                                                 pgd_steps=p.label_only_pgd_steps, device=ctx.device,
                                                 batch_size=p.batch_size)
                return {"boundary": d, "counts": np.array([counts["misclassified"], counts["not_flipped"]])}
            return compute

        target_key = {"model": "target", "weights": C.weights_sha256(ctx.model), **data_key}
        need = ("pool", "population") if k else ("pool",)        # the population serves RMIA only
        arrays = self._signals(ctx, target_key, need, logits_of(ctx.model), computed, reused_sig, "target")
        adv_target = None
        if p.adversarial:
            adv_key = {"model": "target-adv", "weights": target_key["weights"], "dataset": dataset_sha,
                       "pool": data_key["pool"], **adv_settings, "seed": ctx.seed}
            adv_target = self._signals(ctx, adv_key, ("pool_adv",), adv_of(ctx.model, ctx.seed), computed,
                                       reused_sig, "target-adv")["pool_adv"]
        bnd_target = None
        if p.label_only:
            b_key = {"model": "target-boundary", "weights": target_key["weights"], "dataset": dataset_sha,
                     "pool": data_key["pool"], **lo_settings}
            b = self._signals(ctx, b_key, ("boundary", "counts"), boundary_of(ctx.model), computed,
                              reused_sig, "target-boundary")
            bnd_target = b["boundary"]
            lo_counts["target"] = {"misclassified": int(b["counts"][0]), "not_flipped": int(b["counts"][1])}
        feats = [model_features(arrays["pool"], y_pool, arrays.get("population"), y_pop,
                                temperature=p.rmia_temperature)]
        advs, bnds = [adv_target], [bnd_target]
        for i in range(k):
            key = {"model": "reference", "recipe": recipe_hash, "index": i, **data_key}
            holder: dict[str, Any] = {}

            def load(i=i, holder=holder):
                if "m" not in holder:
                    holder["m"] = XR.load_reference(cfg, data, ref_paths[i], ctx.device)
                return holder["m"]

            ra = self._signals(ctx, key, ("pool", "population"), lambda: logits_of(load())(), computed,
                               reused_sig, f"reference {i}")
            feats.append(model_features(ra["pool"], y_pool, ra["population"], y_pop, temperature=p.rmia_temperature))
            adv_i = bnd_i = None
            if p.pooled and p.pooled_adversarial:
                if p.adversarial:
                    akey = {"model": "reference-adv", "recipe": recipe_hash, "index": i, "dataset": dataset_sha,
                            "pool": data_key["pool"], **adv_settings, "seed": ctx.seed}
                    adv_i = self._signals(ctx, akey, ("pool_adv",), lambda: adv_of(load(), ctx.seed)(), computed,
                                          reused_sig, f"reference {i} adv")["pool_adv"]
                if p.label_only:
                    bkey = {"model": "reference-boundary", "recipe": recipe_hash, "index": i,
                            "dataset": dataset_sha, "pool": data_key["pool"], **lo_settings}
                    b = self._signals(ctx, bkey, ("boundary", "counts"), lambda: boundary_of(load())(), computed,
                                      reused_sig, f"reference {i} boundary")
                    bnd_i = b["boundary"]
                    lo_counts[f"reference {i}"] = {"misclassified": int(b["counts"][0]),
                                                   "not_flipped": int(b["counts"][1])}
            advs.append(adv_i)
            bnds.append(bnd_i)
            holder.clear()
        t_sig = time.perf_counter() - t0

        # 3. scoring ----------------------------------------------------------------------
        t0 = time.perf_counter()
        settings = {"num_classes": num_classes, "lira_fixed_variance": p.lira_fixed_variance,
                    "lira_center": p.lira_center, "lira_offline_two_sided": p.lira_offline_two_sided,
                    "rmia_a": p.rmia_a, "rmia_gamma": p.rmia_gamma, "rmia_continuous": p.rmia_continuous,
                    "class_shadow_max": p.class_shadow_max, "class_shadow_seed": p.reference_seed}
        in_pool = np.concatenate([member[None], in_mask]) if k else member[None]
        use_pool = p.pooled and k >= 1
        references: list[list[int]] = []
        if use_pool:
            pool_scores, extras, references = pool_attack_scores(y_pool, feats, in_pool, adv_logits=advs,
                                                                 boundary=bnds, **settings)
            scores = {a: s[0] for a, s in pool_scores.items()}
            extra = extras[0]
        else:
            pool_scores = {}
            scores, extra = attack_scores(y_pool, feats[0], stack_features(feats[1:]) if k else None,
                                          in_mask if k else None, adv_logits=adv_target, boundary=bnd_target,
                                          **settings)

        # per-example LiRA with few models per side: flagged, not a candidate of "best"
        in_counts = in_mask.sum(axis=0) if k else np.zeros(n_pool, dtype=int)
        side_target = int(min(in_counts.min(), (k - in_counts).min())) if k else 0
        side_pool = side_target
        if use_pool:
            for m, others in enumerate(references):
                if others:
                    c_in = in_pool[others].sum(axis=0)
                    side_pool = min(side_pool, int(min(c_in.min(), (len(others) - c_in).min())))
        exclude_t, exclude_p = {}, {}
        for name in PER_EXAMPLE_LIRA:
            if name in scores and side_target < LIRA_PER_EXAMPLE_MIN_MODELS:
                exclude_t[name] = (f"per-example variance from {side_target} IN/OUT reference models per example "
                                   f"(< {LIRA_PER_EXAMPLE_MIN_MODELS}): unreliable")
            if name in pool_scores and side_pool < LIRA_PER_EXAMPLE_MIN_MODELS:
                exclude_p[name] = (f"per-example variance from as few as {side_pool} IN/OUT reference models per "
                                   f"example (< {LIRA_PER_EXAMPLE_MIN_MODELS}): unreliable")
        metrics, _best, roc, dropped = summarize_attacks(scores, member, p.fprs, confidence=p.confidence,
                                                        n_points=p.roc_points, exclude=exclude_t)
        for name, info in extra.items():
            s = scores[name]
            tpr = float(np.mean(s[member] >= 0))
            tnr = float(np.mean(s[~member] < 0))
            info["fixed_threshold_balanced_accuracy"] = 0.5 * (tpr + tnr)
            info["fixed_threshold_tpr"], info["fixed_threshold_fpr"] = tpr, 1.0 - tnr
        res.metrics.update(metrics)

        pooled_notes: dict[str, Any] | None = None
        trials = None
        if use_pool:
            pmetrics, proc, per_model = pooled_summary(pool_scores, in_pool, p.fprs, confidence=p.confidence,
                                                       n_points=p.roc_points, exclude=exclude_p)
            res.metrics.update(pmetrics)
            pooled_attacks = sorted(proc, key=list(pool_scores).index)
            if p.primary in pool_scores and p.primary in proc:
                s = pool_scores[p.primary].ravel()
                ok = ~np.isnan(s)
                trials = (s[ok], in_pool.ravel()[ok])
            res.metrics.update(primary_metrics(
                pmetrics, p.primary, p.fprs, trials=trials, confidence=p.confidence, n_models=k + 1,
                reason=None if trials is not None else
                f"{p.primary} was not scored on every pool model (pooled_adversarial=false or too few references)"))
            pooled_notes = {"models": k + 1, "trials": int(in_pool.size), "member_trials": int(in_pool.sum()),
                            "nonmember_trials": int((~in_pool).sum()), "attacks": pooled_attacks,
                            "references": {str(m): r for m, r in enumerate(references)},
                            "partner_rule": "a reference model's complementary partner (i ^ 1) is left out of its "
                                            "references; the target uses all K",
                            "in_out": "target: the run's member mask; reference model i: row i of the reference "
                                      "in-mask (paired permutation subsets)",
                            "min_in_out_references_per_example": side_pool,
                            "per_model": per_model, "roc": proc}
        else:
            reason = ("reference_models=0: no pool" if k == 0 else "pooled=false")
            res.metrics.update(primary_metrics({}, p.primary, p.fprs, reason=f"no pooled evaluation ({reason})"))

        # 4. DP audit -------------------------------------------------------------------------
        audit_notes = None
        if p.audit:
            dm = ctx.defense_metrics or {}
            accountant = dm.get("dp.epsilon")
            if dm.get("dp.delta") is not None:
                delta, delta_source = float(dm["dp.delta"]), "dp.delta (the defense's)"
            elif p.audit_delta is not None:
                delta, delta_source = float(p.audit_delta), "mia.audit_delta"
            else:
                delta, delta_source = 1.0 / (10 * int(member.sum())), "1 / (10 N), N = training-set size"
            tag = {"attack": p.primary, "scope": "pooled", "delta_source": delta_source,
                   "accountant_epsilon": (float(accountant) if accountant is not None
                                          and math.isfinite(float(accountant)) else None)}
            if trials is not None and trials[1].sum() >= 4 and (~trials[1]).sum() >= 4:
                lb = AU.epsilon_lower_bound(trials[0], trials[1], delta, p.confidence, seed=p.audit_seed)
                lb_max = AU.epsilon_lower_bound_max(trials[0], trials[1], delta, p.confidence)
                res.metrics["mia.audit.epsilon_lb"] = {**lb, "ci_low": None, "ci_high": None, **tag}
                res.metrics["mia.audit.epsilon_lb_max"] = {**lb_max, "ci_low": None, "ci_high": None, **tag}
                acc = tag["accountant_epsilon"]
                if acc is not None and lb["value"] > acc:
                    res.warnings.append(f"mia: the audit's epsilon lower bound {lb['value']:.3g} exceeds the "
                                        f"accountant's epsilon {acc:.3g}: the DP guarantee is violated or "
                                        "the audit's independence assumption fails; check the defense")
            else:
                why = "no pooled trials of the primary attack (reference_models=0, pooled=false or not scored)"
                res.metrics["mia.audit.epsilon_lb"] = _na(why, **tag)
                res.metrics["mia.audit.epsilon_lb_max"] = _na(why, **tag)
            audit_notes = {"delta": delta, "delta_source": delta_source, "confidence": p.confidence,
                           "seed": p.audit_seed, "attack": p.primary,
                           "method": "Clopper-Pearson TPR_lo, FPR_hi; eps >= log((TPR_lo - delta) / FPR_hi) and "
                                     "log((1 - FPR_hi - delta) / (1 - TPR_lo)); epsilon_lb: threshold chosen on a "
                                     "seeded half, evaluated on the other; epsilon_lb_max: max over all thresholds "
                                     "(optimistic)"}
        t_score = time.perf_counter() - t0

        scores_path = ctx.run_dir / SCORES_FILE
        extra_arrays: dict[str, np.ndarray] = {}
        if use_pool:
            extra_arrays["in_pool"] = in_pool
            extra_arrays["pooled_attacks"] = np.array(pooled_notes["attacks"], dtype=str)
            for a in pooled_notes["attacks"]:
                extra_arrays[f"pooled.{a}"] = pool_scores[a]
        save_scores(scores_path, scores, member, pool_idx=np.asarray(data.pool_idx, dtype=np.int64),
                    label=y_pool.astype(np.int64), in_mask=in_mask,
                    population_idx=np.asarray(data.test_idx[:n_pop], dtype=np.int64), **extra_arrays)
        ctx.shared["mia_scores"] = scores_path

        # 5. notes, warnings, timings -----------------------------------------------------
        for name, n in dropped.items():
            if n:
                res.warnings.append(f"mia: {name} could not score {n} of {n_pool} pool examples (too few IN/OUT "
                                    "reference models); they are left out of its metrics")
        if k == 0:
            res.warnings.append("mia: reference_models=0: class-threshold, LiRA and RMIA attacks, the pooled "
                                "evaluation, the primary attack and the DP audit were skipped")
        elif k < 4:
            res.warnings.append(f"mia: only {k} reference models; per-example LiRA needs >= 2 IN and >= 2 OUT "
                                "models per example (use reference_models >= 4, ideally more)")
        flagged = sorted(set(exclude_t) | set(exclude_p))
        if flagged:
            res.warnings.append(
                f"mia: per-example-variance LiRA ({', '.join(flagged)}) has as few as {min(side_target, side_pool)} "
                f"IN/OUT reference models per example (< {LIRA_PER_EXAMPLE_MIN_MODELS}; Carlini et al. recommend "
                "the fixed variance below ~64 models): unreliable, left out of mia.best")
        total_ref_cost = float(sum(m.get("train_seconds") or 0.0 for m in ref_metas))
        protocol = {
            "pool_size": n_pool, "n_members": int(member.sum()), "n_nonmembers": int((~member).sum()),
            "member_fraction": cfg.data.member_fraction, "pool_sha256": data_key["pool"],
            "dataset_sha256": dataset_sha,
            "reference_models": k, "reference_seed": p.reference_seed,
            "reference_scheme": ("paired permutation subsets: model 2j trains on the first M, model 2j+1 on the "
                                 "last M examples of a seeded permutation of the pool (complementary halves "
                                 "when M = P/2); same recipe as the target via fit_recipe"),
            "reference_recipe_hash": recipe_hash,
            "reference_cache": (str(XR.reference_dir(ctx.cache_dir, recipe_hash)) if k else None),
            "reference_models_trained_now": trained_now, "reference_models_reused": reused,
            "reference_training_seconds_now": t_ref,
            "reference_training_seconds_total": total_ref_cost,
            "in_models_per_example": ({"min": int(in_counts.min()), "max": int(in_counts.max()),
                                       "mean": float(in_counts.mean())} if k else None),
            "population": {"source": "test split (first Z examples of the run's test split; unseen by the "
                                     "target and by every reference model)", "size": n_pop},
            "query_augmentations": list(augs),
            "primary": p.primary,
            "pooled": pooled_notes is not None,
            "adversarial": ({"attack": "PGD (untargeted, true label, last iterate; Song, Shokri & Mittal's "
                                       "inference setting)", **adv_settings, "seed": ctx.seed,
                             "models": "every pool model" if p.pooled_adversarial and use_pool else "target only"}
                            if p.adversarial else None),
            "label_only": ({"attack": "boundary distance (bisection over the PGD radius; Choquette-Choo et al.)",
                            **lo_settings, "step": "2.5 r / pgd_steps, zero start, margin objective",
                            "models": "every pool model" if p.pooled_adversarial and use_pool else "target only",
                            "counts": lo_counts} if p.label_only else None),
            "lira": {"center": p.lira_center, "fixed_variance": p.lira_fixed_variance,
                     "offline_test": "two-sided (reference code)" if p.lira_offline_two_sided
                     else "one-sided (paper), ranked by z", "statistic": "phi = log p_y - log sum_{y'!=y} p_y'",
                     "per_example_min_models_per_side": LIRA_PER_EXAMPLE_MIN_MODELS},
            "rmia": {"a": p.rmia_a, "gamma": p.rmia_gamma, "temperature": p.rmia_temperature,
                     "population_size": n_pop, "continuous": p.rmia_continuous,
                     "augmentations": "mean of per-augmentation scores", "a_tuned": False,
                     "precision": "float64 log-probabilities"},
            "signals_computed": computed, "signals_reused": reused_sig,
            "fprs": list(p.fprs), "confidence": p.confidence,
            "min_false_positives": M.MIN_FALSE_POSITIVES,
            "support_rule": f"TPR at FPR f is reported only if f >= {M.MIN_FALSE_POSITIVES} / N_out",
            "dropped": dropped,
            "scores_file": SCORES_FILE,
            "balanced_accuracy": "best threshold on the evaluated data (optimistic)",
            "best": "maximum over attacks at each operating point (selection-biased, optimistic)",
        }
        attacks = {}
        for name in scores:
            base = name.removeprefix("robust_").removesuffix("_class")
            if name.endswith("_class"):
                formula = f"{FORMULAS[base]}; {FORMULAS['class']}"
            elif name.startswith("robust_"):
                formula = f"{FORMULAS[base]}; {FORMULAS['robust']}"
            else:
                formula = FORMULAS[name]
            info = {"formula": formula, "dropped": dropped[name], **extra.get(name, {})}
            same = (res.metrics.get(f"mia.{name}.auc") or {}).get("same_ranking_as")
            if same:
                info["same_ranking_as"] = same
            if name in exclude_t or name in exclude_p:
                info["excluded_from_best"] = exclude_t.get(name) or exclude_p.get(name)
            attacks[name] = info
        res.notes["mia"] = {"protocol": protocol, "roc": roc, "attacks": attacks}
        if pooled_notes is not None:
            res.notes["mia"]["pooled"] = pooled_notes
        if audit_notes is not None:
            res.notes["mia"]["audit"] = audit_notes
        res.timings.update({"reference_training": t_ref, "signals": t_sig, "scoring": t_score})
        return res
