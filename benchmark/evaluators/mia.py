"""Membership inference: threshold, robustness-based, LiRA and RMIA attacks on one shared
pool of reference models and one cache of per-example signals.

Protocol
--------
The run's pool (``data.pool_size`` examples of the training split, seeded) is split into the
target's members (``member_fraction``) and non-members; the target trains on the members
only.  ``K = reference_models`` reference models are trained **with the run's recipe**
(``cfbench.runner.fit_recipe``: same defense, hyper-parameters, model, epochs, batch size,
and as many training examples as the target) on seeded subsets of the same pool, paired so
that every example is IN for about half of them (:mod:`cfbench.mia.reference`).  They are
cached by (recipe hash, index) under ``<out>/_cache/refmodels/`` and shared by every attack
and by every later run of the same recipe (any target seed).  Each model's logits on the
pool (under query augmentations), on the RMIA population and -- for the target -- on PGD
inputs are computed once and cached (:mod:`cfbench.mia.signals`).  Every attack scores the
whole pool; members are the positives.

Query augmentations (``augmentations``): ``auto`` (default) queries the identity plus the
dataset family's shifts / mirrors exactly when the recipe trains with augmentation
(``train.augment``), as Carlini et al. query with the training augmentations; a model
trained without them gives shifted queries little membership signal (measured on digits,
ERM on 60 examples, 8 reference models, offline fixed-variance LiRA from one query: AUC 0.70
on the identity, 0.54-0.59 on each 1-pixel shift), and averaging over them dilutes the
identity's.  ``on`` / ``off`` force the choice.

The **population** for RMIA is the first ``population_size`` examples of the run's test
split (default: all of it): points from the data distribution that neither the target nor
any reference model trained on, as RMIA requires.  (They are also the points the clean and
robust accuracies are measured on; membership inference never uses their labels for
anything but computing ``p(z | theta)``.)

Attacks (``score``: higher = member; ``p = softmax(f(x))``, ``y`` the true label)
---------------------------------------------------------------------------------
* ``loss``, ``confidence``, ``entropy``, ``modified_entropy`` (Song & Mittal 2021): the
  target's ``-CE = log p_y``, ``p_y``, ``-H(p)``, ``-Mentr(p, y)`` on the original input.
  Threshold-free: the ROC sweeps one global threshold.
* ``<score>_class``: Song & Mittal's class-dependent thresholds ``tau_y``, fitted (best
  balanced accuracy per class) on **shadow data = the reference models' own IN/OUT
  signals** (every reference model's score on its training examples vs on the rest of the
  pool), never on the target's membership; score ``s(x) - tau_y``.  The accuracy of the
  fixed rule ``s(x) >= tau_y`` (non-optimistic, as in their paper) is in the notes.
* ``robust_<score>`` (Song, Shokri & Mittal 2019): loss, confidence and modified entropy
  (their attack thresholds the confidence; the label-free entropy has no fixed direction on
  adversarial inputs and is left out) on the target's outputs for PGD(x) -- untargeted PGD
  on the true label inside the run's threat model, ``adv_steps`` steps of ``adv_step_size``
  (default ``eps / 5``: their Fashion-MNIST setting is eps = 0.1, 8 steps of 0.02), random
  start, last iterate, model in eval mode; only the target is attacked.  Their paper reports the
  best-threshold accuracy on the evaluated data itself: that is ``balanced_accuracy`` here
  (optimistic, flagged so in the record).
* ``lira_online`` / ``lira_online_fixed`` (Carlini et al. 2022): with
  ``phi = log p_y - log sum_{y' != y} p_y'`` per query augmentation,
  ``mean_a [log N(phi_a; mu_in, sigma_in^2) - log N(phi_a; mu_out, sigma_out^2)]``, IN/OUT
  Gaussians fitted per example over the reference models that did / did not train on it;
  ``mu`` = median (reference code; the paper says mean), sigma per example or one pooled
  within-example sigma (``lira_fixed_variance``: ``global`` = separate pooled sigma_in,
  sigma_out; ``shared`` = one for both, ranking-equivalent to the reference code's
  ``fix_variance``).  Examples with fewer than 2 IN or 2 OUT models (per-example variance)
  or 1 (fixed) are dropped and counted.
* ``lira_offline`` / ``lira_offline_fixed``: only the OUT models of each example.  The paper's
  one-sided test ``mean_a log Phi((phi_a - mu_out) / sigma_out)`` by default; the reference
  code's two-sided ``-mean_a log N(phi_a; mu_out, sigma_out^2)`` with
  ``lira_offline_two_sided=true``.
* ``rmia_online`` / ``rmia_offline`` (Zarifzadeh, Liu & Shokri 2024):
  ``LR(x, z) = [p(x|theta) / p(x)] / [p(z|theta) / p(z)]`` with ``p(.|theta)`` the target's
  probability of the true label at temperature ``rmia_temperature``;
  ``Score(x) = |{z : LR(x, z) >= gamma}| / Z``.  Online ``p(x)`` = mean over all K reference
  models (half IN, half OUT for x); offline ``p(x) = 1/2 ((1 + a) p_OUT(x) + (1 - a))``.
  With query augmentations the score is the **mean over augmentations** of the
  per-augmentation scores (a soft vote): the research code takes a majority vote over
  augmentations for every (x, z) pair, which needs the N x Z x A comparison matrix; ML
  Privacy Meter's ``run_rmia`` uses a single query.  ``gamma = 1`` and ``a = 0.3`` as ML
  Privacy Meter (the research code: temperature 2, gamma 2); ``a`` is not tuned.

Metrics (per attack ``A``; all in the run's record)
---------------------------------------------------
``mia.A.auc`` (Hanley-McNeil interval), ``mia.A.balanced_accuracy`` (best threshold,
optimistic), ``mia.A.tpr_at_fpr.<f>`` for each ``f`` in ``fprs`` (Clopper-Pearson interval
on the TPR; ``value: null`` with a ``reason`` when ``f < 10 / N_out``), and ``mia.best.*``:
the strongest attack at each operating point (itself a selection-biased maximum).
``notes['mia']`` holds the protocol, the down-sampled ROC of every attack and the per-attack
formula; ``<run>/mia_scores.npz`` holds every attack's per-example scores with the labels, so
that every metric can be recomputed without cfbench.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import UsageError
from ..mia import metrics as M
from ..mia import scores as S
from ..params import param
from ..store.io import save_npz_atomic
from .base import EvalContext, EvalResult, Evaluator

SCORES_FILE = "mia_scores.npz"

#: the four threshold-attack scores of Song & Mittal (2021), all from logits
THRESHOLD_SCORES = {
    "loss": S.loss_score,
    "confidence": S.confidence_score,
    "entropy": S.entropy_score,
    "modified_entropy": S.modified_entropy_score,
}

#: scores used on PGD inputs: the label-free entropy is left out, since on adversarial inputs it
#: has no fixed direction (a member can be fooled more *or* less confidently than a
#: non-member; on a memorising model it ranks members *below* non-members)
ROBUST_SCORES = ("loss", "confidence", "modified_entropy")

FORMULAS = {
    "loss": "log p_y (= -CE) of the target on x",
    "confidence": "p_y of the target on x",
    "entropy": "-H(p) = sum_i p_i log p_i of the target on x",
    "modified_entropy": "-Mentr = (1-p_y) log p_y + sum_{i!=y} p_i log(1-p_i) of the target on x",
    "class": "s(x) - tau_y, tau_y fitted per class on the reference models' IN/OUT signals",
    "robust": "the same score on the target's output for PGD(x) (true label, run's threat model)",
    "lira_online": "mean_a [log N(phi_a; mu_in, s_in) - log N(phi_a; mu_out, s_out)], per-example sigmas",
    "lira_online_fixed": "as lira_online with pooled sigmas",
    "lira_offline": "mean_a log Phi((phi_a - mu_out)/s_out) (one-sided) or -mean_a log N(phi_a; mu_out, s_out) "
                    "(two-sided), per-example sigma",
    "lira_offline_fixed": "as lira_offline with a pooled sigma_out",
    "rmia_online": "mean_a |{z: [p_a(x|T)/p_a(x)] / [p_a(z|T)/p_a(z)] >= gamma}| / Z, p(x) = mean over all refs",
    "rmia_offline": "as rmia_online with p(x) = ((1+a) p_OUT(x) + (1-a)) / 2",
}


@dataclass(frozen=True)
class MIAParams:
    reference_models: int = param(
        8, "K reference models trained with the run's recipe on paired random subsets of the pool "
           "(0 = only the attacks that need none)", ge=0)
    reference_seed: int = param(0, "seed of the reference models' subsets and training seeds")
    augmentations: Literal["auto", "on", "off"] = param(
        "auto", "query augmentations (identity + 1-px shifts; + mirrors for flip-shift data): on, off, or auto = "
                "on exactly when the recipe trains with augmentation (train.augment)")
    adversarial: bool = param(True, "robustness-based attacks on PGD inputs (Song, Shokri & Mittal 2019)")
    adv_steps: int = param(8, "PGD steps of the robustness-based attacks (Song et al.: 8)", ge=1)
    adv_step_size: float | None = param(
        None, "PGD step size of the robustness-based attacks (default eps/5: Song et al.'s 0.02 at eps 0.1)", gt=0)
    adv_rand_init: bool = param(True, "random start of that PGD (Song et al.: yes)")
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


# --------------------------------------------------------------------------------------------
# pure scoring (numpy only): signals -> per-example scores of every attack
# --------------------------------------------------------------------------------------------
def model_features(pool_logits: np.ndarray, labels: np.ndarray, pop_logits: np.ndarray | None = None,
                   pop_labels: np.ndarray | None = None, *, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """What the attacks need from one model's logits.

    ``pool_logits`` (P, A, C), ``pop_logits`` (Z, A, C).  Returns ``phi`` (P, A) (LiRA),
    ``p`` (P, A) and ``p_pop`` (Z, A) (RMIA: probability of the true label at
    ``temperature``), and the four threshold scores on the identity query (P,) in float64.
    """
    logits = np.asarray(pool_logits, dtype=np.float64)
    y = np.asarray(labels)
    out: dict[str, np.ndarray] = {"phi": S.lira_phi(logits, y[:, None])}
    out["p"] = S.confidence_score(logits / temperature, y[:, None], from_logits=True)
    if pop_logits is not None:
        out["p_pop"] = S.confidence_score(np.asarray(pop_logits, dtype=np.float64) / temperature,
                                          np.asarray(pop_labels)[:, None], from_logits=True)
    for name, fn in THRESHOLD_SCORES.items():
        out[name] = fn(logits[:, 0], y, from_logits=True)
    return out


def stack_features(per_model: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack reference models' features along a new first axis (LiRA/RMIA arrays in float32)."""
    out = {}
    for key in per_model[0]:
        arr = np.stack([f[key] for f in per_model])
        out[key] = arr.astype(np.float32) if key in ("phi", "p", "p_pop") else arr
    return out


def attack_scores(labels: np.ndarray, target: dict[str, np.ndarray], refs: dict[str, np.ndarray] | None,
                  in_mask: np.ndarray | None, *, adv_logits: np.ndarray | None = None,
                  num_classes: int | None = None, lira_fixed_variance: str = "global",
                  lira_center: str = "median", lira_offline_two_sided: bool = False,
                  rmia_a: float = 0.3, rmia_gamma: float = 1.0, class_shadow_max: int | None = None,
                  class_shadow_seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-example scores (P,) of every attack, higher = member; NaN where undefined.

    ``target``: :func:`model_features` of the target (with ``p_pop``); ``refs``:
    :func:`stack_features` of the K reference models (None or K = 0: only the attacks that
    need no reference model); ``in_mask`` (K, P); ``adv_logits`` (P, C) the target on
    PGD inputs (None: no robustness-based attacks).  The class thresholds are fitted on every
    (reference model, pool example) signal -- IN where the model trained on the example --
    or on a seeded random subset of ``class_shadow_max`` of them when there are more.
    Returns ``(scores, extra)``; ``extra`` holds the fitted class thresholds.
    """
    y = np.asarray(labels)
    scores: dict[str, np.ndarray] = {}
    extra: dict[str, Any] = {}
    for name in THRESHOLD_SCORES:
        scores[name] = np.asarray(target[name], dtype=np.float64)
    have_refs = refs is not None and in_mask is not None and in_mask.shape[0] > 0
    if have_refs:
        c = int(num_classes if num_classes is not None else y.max() + 1)
        flat_in = in_mask.ravel()
        flat_y = np.broadcast_to(y, in_mask.shape).ravel()
        sel = None
        if class_shadow_max is not None and in_mask.size > class_shadow_max:
            rng = np.random.default_rng([0x534841, class_shadow_seed])
            sel = np.sort(rng.choice(in_mask.size, class_shadow_max, replace=False))
            flat_in, flat_y = flat_in[sel], flat_y[sel]
        for name in THRESHOLD_SCORES:
            r = refs[name].ravel()
            if sel is not None:
                r = r[sel]
            tau = S.fit_class_thresholds(r[flat_in], flat_y[flat_in], r[~flat_in], flat_y[~flat_in], c)
            scores[f"{name}_class"] = S.class_threshold_score(target[name], y, tau)
            extra[f"{name}_class"] = {"thresholds": tau.tolist(), "shadow_in": int(flat_in.sum()),
                                      "shadow_out": int((~flat_in).sum())}
    if adv_logits is not None:
        adv = np.asarray(adv_logits, dtype=np.float64)
        for name in ROBUST_SCORES:
            scores[f"robust_{name}"] = THRESHOLD_SCORES[name](adv, y, from_logits=True)
    if have_refs:
        phi_t, phi_r = target["phi"], refs["phi"]
        scores["lira_online"] = S.lira_online(phi_t, phi_r, in_mask, False, center=lira_center)
        scores["lira_online_fixed"] = S.lira_online(phi_t, phi_r, in_mask, lira_fixed_variance,
                                                    center=lira_center)
        scores["lira_offline"] = S.lira_offline(phi_t, phi_r, in_mask, False, center=lira_center,
                                                two_sided=lira_offline_two_sided)
        scores["lira_offline_fixed"] = S.lira_offline(phi_t, phi_r, in_mask, lira_fixed_variance,
                                                      center=lira_center, two_sided=lira_offline_two_sided)
        n_aug = target["p"].shape[1]
        for online in (True, False):
            per_aug = [S.rmia_scores(target["p"][:, a], refs["p"][:, :, a], in_mask, target["p_pop"][:, a],
                                     refs["p_pop"][:, :, a], gamma=rmia_gamma, a=rmia_a, online=online)
                       for a in range(n_aug)]
            scores["rmia_online" if online else "rmia_offline"] = np.mean(per_aug, axis=0)
    return scores, extra


def _na_entry(reason: str, **kw) -> dict[str, Any]:
    return {"value": None, "ci_low": None, "ci_high": None, "reason": reason, **kw}


def summarize_attacks(scores: dict[str, np.ndarray], member: np.ndarray, fprs, *, confidence: float = 0.95,
                      n_points: int = 200) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, int]]:
    """Metrics of every attack: ``(metrics, best, roc, dropped)``.

    NaN scores (examples an attack cannot score) are dropped and counted; an attack left
    without members or non-members is n/a.  ``metrics`` is flat (``mia.<attack>.*``).
    """
    member = np.asarray(member, dtype=bool)
    metrics: dict[str, Any] = {}
    roc: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    summaries: dict[str, Any] = {}
    fkeys = [str(f) for f in fprs]
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        valid = ~np.isnan(s)
        dropped[name] = int((~valid).sum())
        lab = member[valid]
        n_in, n_out = int(lab.sum()), int((~lab).sum())
        if n_in == 0 or n_out == 0:
            reason = (f"no example could be scored by {name} with both members and non-members left "
                      f"({dropped[name]} of {s.size} dropped: too few IN/OUT reference models per example)")
            metrics[f"mia.{name}.auc"] = _na_entry(reason, n=0)
            metrics[f"mia.{name}.balanced_accuracy"] = _na_entry(reason, n=0)
            for k in fkeys:
                metrics[f"mia.{name}.tpr_at_fpr.{k}"] = _na_entry(reason, n=0)
            continue
        summ = M.summarize(s[valid], lab, fprs, confidence=confidence, n_points=n_points)
        summaries[name] = summ
        n = n_in + n_out
        metrics[f"mia.{name}.auc"] = {**summ["auc"], "n": n, "n_members": n_in, "n_nonmembers": n_out}
        metrics[f"mia.{name}.balanced_accuracy"] = {**summ["balanced_accuracy"], "ci_low": None, "ci_high": None,
                                                    "n": n}
        for k in fkeys:
            metrics[f"mia.{name}.tpr_at_fpr.{k}"] = summ["tpr_at_fpr"][k]
        roc[name] = summ["roc"]
    best_raw = M.best_of(summaries)
    best: dict[str, Any] = {}

    def entry(metric_key: str, pick: dict[str, Any]) -> dict[str, Any]:
        name = pick["attack"]
        if name is None:
            reasons = [metrics[f"mia.{a}.{metric_key}"].get("reason") for a in scores
                       if metrics.get(f"mia.{a}.{metric_key}", {}).get("reason")]
            return _na_entry(reasons[0] if reasons else "no attack has a value", attack=None)
        src = metrics[f"mia.{name}.{metric_key}"]
        return {"value": src["value"], "ci_low": src.get("ci_low"), "ci_high": src.get("ci_high"),
                "n": src.get("n"), "attack": name}

    best["mia.best.auc"] = entry("auc", best_raw["auc"])
    best["mia.best.balanced_accuracy"] = entry("balanced_accuracy", best_raw["balanced_accuracy"])
    for k in fkeys:
        pick = best_raw["tpr_at_fpr"].get(k, {"attack": None, "value": None})
        best[f"mia.best.tpr_at_fpr.{k}"] = entry(f"tpr_at_fpr.{k}", pick)
    metrics.update(best)
    return metrics, best, roc, dropped


def save_scores(path: Path, scores: dict[str, np.ndarray], member: np.ndarray, **arrays: np.ndarray) -> None:
    """Atomically write ``score.<attack>`` arrays, ``member`` and extra arrays to an ``.npz``."""
    save_npz_atomic(path, {"member": np.asarray(member, dtype=bool), "attacks": np.array(list(scores), dtype=str),
                           **{f"score.{k}": np.asarray(v, dtype=np.float64) for k, v in scores.items()},
                           **arrays})


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------
class MembershipInference(Evaluator):
    """Threshold, robustness-based, LiRA and RMIA attacks sharing reference models and signals."""

    name = "mia"
    contract_params = {"reference_models": 2, "adv_steps": 2, "population_size": 64}
    description = ("membership inference: loss/confidence/entropy/m-entropy thresholds (global, class), "
                   "robustness-based (PGD), LiRA online/offline, RMIA online/offline; TPR at low FPR")
    version = 1
    Params = MIAParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        import torch

        # training and rebuilding reference models reseed torch's global RNG: restore it, so
        # that evaluators after this one see the same random state as without it
        state = torch.get_rng_state()
        try:
            return self._evaluate(ctx)
        finally:
            torch.set_rng_state(state)

    def _evaluate(self, ctx: EvalContext) -> EvalResult:
        from ..execution import reference as XR
        from ..execution.jobs import subset_sha
        from ..mia import signals as C
        from ..mia import reference as R

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

        # 1. reference models ------------------------------------------------------------
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
        signals_reused, signals_computed = [], []
        target_key = {"model": "target", "weights": C.weights_sha256(ctx.model), **data_key}
        tpath = C.signal_path(ctx.cache_dir, target_key)
        need = ("pool", "population") if k else ("pool",)        # the population serves RMIA only
        arrays = C.load_signals(tpath, need)
        if arrays is None:
            arrays = {"pool": C.query_logits(ctx.model, x_pool, augs, ctx.device, p.batch_size)}
            if k:
                arrays["population"] = C.query_logits(ctx.model, x_pop, augs, ctx.device, p.batch_size)
            C.save_signals(tpath, arrays, {"model": "target", **target_key})
            signals_computed.append("target")
        else:
            signals_reused.append("target")
        adv_logits = None
        eps = ctx.threat.eps
        adv_step = p.adv_step_size if p.adv_step_size is not None else eps / 5
        if p.adversarial:
            adv_key = {"model": "target-adv", "weights": target_key["weights"], "dataset": dataset_sha,
                       "pool": data_key["pool"], "norm": ctx.threat.norm, "eps": eps, "steps": p.adv_steps,
                       "step_size": adv_step, "rand_init": p.adv_rand_init, "seed": ctx.seed}
            apath = C.signal_path(ctx.cache_dir, adv_key)
            adv = C.load_signals(apath, ("pool_adv",))
            if adv is None:
                adv = {"pool_adv": C.adversarial_logits(
                    ctx.model, x_pool, y_pool_t, norm=ctx.threat.norm, eps=eps, steps=p.adv_steps,
                    step_size=adv_step, rand_init=p.adv_rand_init, seed=ctx.seed, device=ctx.device,
                    batch_size=p.batch_size)}
                C.save_signals(apath, adv, adv_key)
                signals_computed.append("target-adv")
            else:
                signals_reused.append("target-adv")
            adv_logits = adv["pool_adv"]
        target = model_features(arrays["pool"], y_pool, arrays.get("population"), y_pop,
                                temperature=p.rmia_temperature)
        ref_feats = []
        for i in range(k):
            key = {"model": "reference", "recipe": recipe_hash, "index": i, **data_key}
            spath = C.signal_path(ctx.cache_dir, key)
            ra = C.load_signals(spath, ("pool", "population"))
            if ra is None:
                model = XR.load_reference(cfg, data, ref_paths[i], ctx.device)
                ra = {"pool": C.query_logits(model, x_pool, augs, ctx.device, p.batch_size),
                      "population": C.query_logits(model, x_pop, augs, ctx.device, p.batch_size)}
                C.save_signals(spath, ra, key)
                signals_computed.append(f"reference {i}")
                del model
            else:
                signals_reused.append(f"reference {i}")
            ref_feats.append(model_features(ra["pool"], y_pool, ra["population"], y_pop,
                                            temperature=p.rmia_temperature))
        refs = stack_features(ref_feats) if ref_feats else None
        del ref_feats
        t_sig = time.perf_counter() - t0

        # 3. scoring ----------------------------------------------------------------------
        t0 = time.perf_counter()
        scores, extra = attack_scores(
            y_pool, target, refs, in_mask if k else None, adv_logits=adv_logits, num_classes=num_classes,
            lira_fixed_variance=p.lira_fixed_variance, lira_center=p.lira_center,
            lira_offline_two_sided=p.lira_offline_two_sided, rmia_a=p.rmia_a, rmia_gamma=p.rmia_gamma,
            class_shadow_max=p.class_shadow_max, class_shadow_seed=p.reference_seed)
        metrics, best, roc, dropped = summarize_attacks(scores, member, p.fprs, confidence=p.confidence,
                                                        n_points=p.roc_points)
        for name, info in extra.items():
            s = scores[name]
            tpr = float(np.mean(s[member] >= 0))
            tnr = float(np.mean(s[~member] < 0))
            info["fixed_threshold_balanced_accuracy"] = 0.5 * (tpr + tnr)
            info["fixed_threshold_tpr"], info["fixed_threshold_fpr"] = tpr, 1.0 - tnr
        t_score = time.perf_counter() - t0
        res.metrics.update(metrics)

        scores_path = ctx.run_dir / SCORES_FILE
        save_scores(scores_path, scores, member, pool_idx=np.asarray(data.pool_idx, dtype=np.int64),
                    label=y_pool.astype(np.int64), in_mask=in_mask,
                    population_idx=np.asarray(data.test_idx[:n_pop], dtype=np.int64))
        ctx.shared["mia_scores"] = scores_path

        # 4. notes, warnings, timings -----------------------------------------------------
        in_counts = in_mask.sum(axis=0) if k else np.zeros(n_pool, dtype=int)
        for name, n in dropped.items():
            if n:
                res.warnings.append(f"mia: {name} could not score {n} of {n_pool} pool examples (too few IN/OUT "
                                    "reference models); they are left out of its metrics")
        if k == 0:
            res.warnings.append("mia: reference_models=0: class-threshold, LiRA and RMIA attacks were skipped")
        elif k < 4:
            res.warnings.append(f"mia: only {k} reference models; per-example LiRA needs >= 2 IN and >= 2 OUT "
                                "models per example (use reference_models >= 4, ideally more)")
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
            "adversarial": ({"attack": "PGD (untargeted, true label, last iterate)", "norm": ctx.threat.norm,
                             "eps": eps, "steps": p.adv_steps, "step_size": adv_step,
                             "rand_init": p.adv_rand_init, "seed": ctx.seed, "models": "target only"}
                            if p.adversarial else None),
            "lira": {"center": p.lira_center, "fixed_variance": p.lira_fixed_variance,
                     "offline_test": "two-sided (reference code)" if p.lira_offline_two_sided
                     else "one-sided (paper)", "statistic": "phi = log p_y - log sum_{y'!=y} p_y'"},
            "rmia": {"a": p.rmia_a, "gamma": p.rmia_gamma, "temperature": p.rmia_temperature,
                     "augmentations": "mean of per-augmentation scores", "a_tuned": False},
            "signals_computed": signals_computed, "signals_reused": signals_reused,
            "fprs": list(p.fprs), "confidence": p.confidence,
            "min_false_positives": M.MIN_FALSE_POSITIVES,
            "dropped": dropped,
            "scores_file": SCORES_FILE,
            "balanced_accuracy": "best threshold on the evaluated data (optimistic)",
            "best": "maximum over attacks at each operating point (selection-biased)",
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
            attacks[name] = {"formula": formula, "dropped": dropped[name], **extra.get(name, {})}
        res.notes["mia"] = {"protocol": protocol, "roc": roc, "attacks": attacks}
        res.timings.update({"reference_training": t_ref, "signals": t_sig, "scoring": t_score})
        return res
