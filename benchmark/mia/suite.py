"""The membership-inference suite as pure numpy: model outputs -> every attack's scores ->
metrics, for one target (single-target) and for a pool of models attacked in turn (pooled).

The evaluator (:mod:`cfbench.evaluators.mia`) runs the models and caches their signals; this
module only turns those signals into numbers, so every step can be checked against a direct
transcription.

**Pooled multi-target evaluation** (Carlini et al. 2022, Sec. IV; Zarifzadeh et al. 2024).
The target and its ``K`` reference models form one pool of ``M = K + 1`` models, all trained
with the run's recipe on subsets of the same data pool.  Every pool model is attacked in turn,
with the *other* pool models as its reference models, and the ROC is computed over all
``M x P`` (model, example) trials; an example is a positive for model ``m`` exactly when ``m``
trained on it.  Who trained on what is known for every pool model: the target's training set
is the run's member mask (``RunData.member_mask``, a seeded half of the pool drawn by the data
split), reference model ``i``'s is row ``i`` of the reference in-mask
(:func:`cfbench.mia.reference.reference_in_mask`).  The target's subset is *not* one of the
paired permutation subsets, so it has no partner.

**The partner rule.**  Reference models come in pairs ``(2j, 2j + 1)`` cut from one
permutation: with ``M = P / 2`` members their training sets are complementary, so the
partner's membership of every example is the exact negation of the attacked model's.  Used
as a reference, the partner would make the number of IN references of an example depend on
the answer (``(K - 2) / 2 + [target has x] + [partner has x]``): RMIA-online's ``p(x)``, the
mean over the references, would rise for non-members and fall for members, an artefact that
inflates the attack (and would break the DP audit's independence argument).  When reference
model ``i`` is attacked its partner ``i ^ 1`` is therefore left out of its references; the
target is attacked with all ``K``.  Each reference model is attacked with ``K - 1``
references, ``(K - 2) / 2 + [target has x]`` of them IN for ``x``.

The target's own single-target numbers are row 0 of the pool: the same scores as attacking
the target alone with its K reference models.

**Spread across targets**: the pooled entry of every metric carries the mean, standard
deviation, minimum and maximum of the same metric computed on each pool model alone (n/a for
a rate one model's non-members cannot support).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..store.io import save_npz_atomic
from . import metrics as M
from . import scores as S

__all__ = [
    "FORMULAS",
    "LIRA_PER_EXAMPLE_MIN_MODELS",
    "ROBUST_SCORES",
    "SAME_RANKING",
    "THRESHOLD_SCORES",
    "attack_scores",
    "model_features",
    "pool_attack_scores",
    "pool_partners",
    "pooled_summary",
    "save_scores",
    "stack_features",
    "summarize_attacks",
]

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

#: per-example-variance LiRA is flagged (warning, left out of "best") when an example has fewer
#: IN or OUT reference models than this: Carlini et al. (2022, Fig. 6 / Sec. VI-B) find the
#: per-example variance overtakes the fixed one only from ~64 shadow models (32 per side); with
#: 2 per side cfbench version 1 produced |scores| up to 9e5
LIRA_PER_EXAMPLE_MIN_MODELS = 32

#: attacks that are monotone transforms of another by construction (``p_y = exp(log p_y)``):
#: the same ranking up to floating-point saturation of ``p_y`` at 1.0, so one attack, not two
SAME_RANKING = {"confidence": "loss", "robust_confidence": "robust_loss"}

FORMULAS = {
    "loss": "log p_y (= -CE) of the target on x",
    "confidence": "p_y of the target on x",
    "entropy": "-H(p) = sum_i p_i log p_i of the target on x",
    "modified_entropy": "-Mentr = (1-p_y) log p_y + sum_{i!=y} p_i log(1-p_i) of the target on x",
    "class": "s(x) - tau_y, tau_y fitted per class on the reference models' IN/OUT signals",
    "robust": "the same score on the target's output for PGD(x) (true label, zero start, 20 steps of 2.5 eps/20)",
    "label_only": "distance to the decision boundary: smallest PGD radius that flips the predicted label "
                  "(bisection), 0 if misclassified",
    "lira_online": "mean_a [log N(phi_a; mu_in, s_in) - log N(phi_a; mu_out, s_out)], per-example sigmas",
    "lira_online_fixed": "as lira_online with pooled sigmas",
    "lira_offline": "mean_a (phi_a - mu_out)/s_out (one-sided) or -mean_a log N(phi_a; mu_out, s_out) "
                    "(two-sided), per-example sigma",
    "lira_offline_fixed": "as lira_offline with a pooled sigma_out",
    "rmia_online": "mean_a (#{z: LR_a(x, z) >= gamma} + g_a) / Z, p(x) = mean over all refs, g = continuous tie-break",
    "rmia_offline": "as rmia_online with p(x) = ((1+a) p_OUT(x) + (1-a)) / 2",
}


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
def model_features(pool_logits: np.ndarray, labels: np.ndarray, pop_logits: np.ndarray | None = None,
                   pop_labels: np.ndarray | None = None, *, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """What the attacks need from one model's logits, all float64.

    ``pool_logits`` (P, A, C), ``pop_logits`` (Z, A, C).  Returns ``phi`` (P, A) (LiRA),
    ``logp`` (P, A) and ``logp_pop`` (Z, A) (RMIA: ``log p_y`` at ``temperature`` from a
    float64 log-softmax -- never rounded to ``log 1 = 0``, which in float32 probabilities
    happened to 10% of a run's reference values), and the four threshold scores on the
    identity query (P,).
    """
    logits = np.asarray(pool_logits, dtype=np.float64)
    y = np.asarray(labels)
    out: dict[str, np.ndarray] = {"phi": S.lira_phi(logits, y[:, None])}
    out["logp"] = S.loss_score(logits / temperature, y[:, None], from_logits=True)
    if pop_logits is not None:
        out["logp_pop"] = S.loss_score(np.asarray(pop_logits, dtype=np.float64) / temperature,
                                       np.asarray(pop_labels)[:, None], from_logits=True)
    for name, fn in THRESHOLD_SCORES.items():
        out[name] = fn(logits[:, 0], y, from_logits=True)
    return out


def stack_features(per_model: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack models' features along a new first axis (float64 throughout)."""
    return {key: np.stack([np.asarray(f[key], dtype=np.float64) for f in per_model]) for key in per_model[0]}


# --------------------------------------------------------------------------------------------
# one target
# --------------------------------------------------------------------------------------------
def attack_scores(labels: np.ndarray, target: Mapping[str, np.ndarray], refs: Mapping[str, np.ndarray] | None,
                  in_mask: np.ndarray | None, *, adv_logits: np.ndarray | None = None,
                  boundary: np.ndarray | None = None, num_classes: int | None = None,
                  lira_fixed_variance: str = "global", lira_center: str = "median",
                  lira_offline_two_sided: bool = False, rmia_a: float = 0.3, rmia_gamma: float = 1.0,
                  rmia_continuous: bool = True, class_shadow_max: int | None = None,
                  class_shadow_seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-example scores (P,) of every attack on one target, higher = member; NaN where undefined.

    ``target``: :func:`model_features` of the target (with ``logp_pop``); ``refs``:
    :func:`stack_features` of its reference models (None or none: only the attacks that need
    no reference model); ``in_mask`` (K, P); ``adv_logits`` (P, C) the target on PGD inputs
    (None: no robustness-based attacks); ``boundary`` (P,) its label-only boundary distances
    (None: no label-only attack).  The class thresholds are fitted on every (reference model,
    pool example) signal -- IN where the model trained on the example -- or on a seeded random
    subset of ``class_shadow_max`` of them when there are more.  Returns ``(scores, extra)``;
    ``extra`` holds the fitted class thresholds.
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
            if flat_in.any() and (~flat_in).any():
                tau = S.fit_class_thresholds(r[flat_in], flat_y[flat_in], r[~flat_in], flat_y[~flat_in], c)
                scores[f"{name}_class"] = S.class_threshold_score(target[name], y, tau)
                extra[f"{name}_class"] = {"thresholds": tau.tolist(), "shadow_in": int(flat_in.sum()),
                                          "shadow_out": int((~flat_in).sum())}
            else:
                scores[f"{name}_class"] = np.full(y.shape, np.nan)
    if adv_logits is not None:
        adv = np.asarray(adv_logits, dtype=np.float64)
        for name in ROBUST_SCORES:
            scores[f"robust_{name}"] = THRESHOLD_SCORES[name](adv, y, from_logits=True)
    if boundary is not None:
        scores["label_only"] = np.asarray(boundary, dtype=np.float64)
    if have_refs:
        phi_t, phi_r = target["phi"], refs["phi"]
        scores["lira_online"] = S.lira_online(phi_t, phi_r, in_mask, False, center=lira_center)
        scores["lira_online_fixed"] = S.lira_online(phi_t, phi_r, in_mask, lira_fixed_variance,
                                                    center=lira_center)
        scores["lira_offline"] = S.lira_offline(phi_t, phi_r, in_mask, False, center=lira_center,
                                                two_sided=lira_offline_two_sided)
        scores["lira_offline_fixed"] = S.lira_offline(phi_t, phi_r, in_mask, lira_fixed_variance,
                                                      center=lira_center, two_sided=lira_offline_two_sided)
        n_aug = target["logp"].shape[1]
        for online in (True, False):
            per_aug = [S.rmia_scores(target["logp"][:, a], refs["logp"][:, :, a], in_mask,
                                     target["logp_pop"][:, a], refs["logp_pop"][:, :, a], gamma=rmia_gamma,
                                     a=rmia_a, online=online, log_inputs=True, continuous=rmia_continuous)
                       for a in range(n_aug)]
            scores["rmia_online" if online else "rmia_offline"] = np.mean(per_aug, axis=0)
    return scores, extra


# --------------------------------------------------------------------------------------------
# metrics of many attacks
# --------------------------------------------------------------------------------------------
def _na_entry(reason: str, **kw) -> dict[str, Any]:
    return {"value": None, "ci_low": None, "ci_high": None, "reason": reason, **kw}


def summarize_attacks(scores: Mapping[str, np.ndarray], member: np.ndarray, fprs, *, confidence: float = 0.95,
                      n_points: int = 200, prefix: str = "mia", exclude: Mapping[str, str] | None = None,
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, int]]:
    """Metrics of every attack: ``(metrics, best, roc, dropped)``.

    ``scores[a]`` and ``member`` may have any (equal) shape -- (P,) for one target, (M, P) for a
    pool -- and are flattened.  NaN scores (trials an attack cannot score) are dropped and
    counted; an attack left without members or non-members is n/a.  ``metrics`` is flat
    (``<prefix>.<attack>.{auc, balanced_accuracy, advantage, tpr_at_fpr.<f>}``).

    **One attack, not two**: an attack that is a monotone transform of another by construction
    (:data:`SAME_RANKING`: the confidence ``p_y = exp(log p_y)`` of the loss, on clean and on
    PGD inputs; they differ only where ``p_y`` saturates at 1.0 in floating point, which
    merely coarsens the loss's ranking) or whose scores order the trials exactly as an
    earlier one (:func:`cfbench.mia.metrics.same_ranking`) keeps its metrics (record
    compatibility), marked
    ``same_ranking_as: <earlier>``, and is not a candidate of ``best``.  Attacks in
    ``exclude`` (name -> reason; e.g. per-example LiRA with too few models) are not candidates
    either and carry ``excluded_from_best: reason``.

    ``best`` (``<prefix>.best.*``): the strongest candidate at each operating point -- a
    maximum over attacks evaluated on the same trials, hence **selection-biased** upwards
    (labelled ``optimistic: true, selection_biased: true``, with ``n_candidates``).
    """
    member = np.asarray(member, dtype=bool).ravel()
    exclude = dict(exclude or {})
    metrics: dict[str, Any] = {}
    roc: dict[str, Any] = {}
    dropped: dict[str, int] = {}
    summaries: dict[str, Any] = {}
    flat = {name: np.asarray(s, dtype=np.float64).ravel() for name, s in scores.items()}
    same_as: dict[str, str] = {a: b for a, b in SAME_RANKING.items() if a in flat and b in flat}
    for name, s in flat.items():
        if name in same_as:
            continue
        for earlier in flat:
            if earlier == name:
                break
            if earlier not in same_as and M.same_ranking(flat[earlier], s):
                same_as[name] = earlier
                break
    fkeys = [str(f) for f in fprs]
    for name, s in flat.items():
        valid = ~np.isnan(s)
        dropped[name] = int((~valid).sum())
        lab = member[valid]
        n_in, n_out = int(lab.sum()), int((~lab).sum())
        mark: dict[str, Any] = {}
        if name in same_as:
            mark["same_ranking_as"] = same_as[name]
        if name in exclude:
            mark["excluded_from_best"] = exclude[name]
        if n_in == 0 or n_out == 0:
            reason = (f"no trial could be scored by {name} with both members and non-members left "
                      f"({dropped[name]} of {s.size} dropped: too few IN/OUT reference models per example)")
            for key in ("auc", "balanced_accuracy", "advantage", *(f"tpr_at_fpr.{k}" for k in fkeys)):
                metrics[f"{prefix}.{name}.{key}"] = _na_entry(reason, n=0, **mark)
            continue
        summ = M.summarize(s[valid], lab, fprs, confidence=confidence, n_points=n_points)
        summaries[name] = summ
        n = n_in + n_out
        metrics[f"{prefix}.{name}.auc"] = {**summ["auc"], "n": n, "n_members": n_in, "n_nonmembers": n_out, **mark}
        metrics[f"{prefix}.{name}.balanced_accuracy"] = {**summ["balanced_accuracy"], "ci_low": None,
                                                         "ci_high": None, "n": n}
        metrics[f"{prefix}.{name}.advantage"] = {**summ["advantage"], "ci_low": None, "ci_high": None, "n": n}
        for k in fkeys:
            metrics[f"{prefix}.{name}.tpr_at_fpr.{k}"] = summ["tpr_at_fpr"][k]
        roc[name] = summ["roc"]
    candidates = {a: v for a, v in summaries.items() if a not in same_as and a not in exclude}
    best_raw = M.best_of(candidates)
    best: dict[str, Any] = {}
    label = {"optimistic": True, "selection_biased": True, "n_candidates": len(candidates)}

    def entry(metric_key: str, pick: dict[str, Any]) -> dict[str, Any]:
        name = pick["attack"]
        if name is None:
            reasons = [metrics[f"{prefix}.{a}.{metric_key}"].get("reason") for a in scores
                       if metrics.get(f"{prefix}.{a}.{metric_key}", {}).get("reason")]
            return _na_entry(reasons[0] if reasons else "no attack has a value", attack=None, **label)
        src = metrics[f"{prefix}.{name}.{metric_key}"]
        return {"value": src["value"], "ci_low": src.get("ci_low"), "ci_high": src.get("ci_high"),
                "n": src.get("n"), "attack": name, **label}

    best[f"{prefix}.best.auc"] = entry("auc", best_raw["auc"])
    best[f"{prefix}.best.balanced_accuracy"] = entry("balanced_accuracy", best_raw["balanced_accuracy"])
    adv_pick = {"attack": None, "value": None}
    for a, summ in candidates.items():
        v = summ["advantage"]["value"]
        if adv_pick["value"] is None or v > adv_pick["value"]:
            adv_pick = {"attack": a, "value": v}
    best[f"{prefix}.best.advantage"] = entry("advantage", adv_pick)
    for k in fkeys:
        pick = best_raw["tpr_at_fpr"].get(k, {"attack": None, "value": None})
        best[f"{prefix}.best.tpr_at_fpr.{k}"] = entry(f"tpr_at_fpr.{k}", pick)
    metrics.update(best)
    return metrics, best, roc, dropped


# --------------------------------------------------------------------------------------------
# the pool
# --------------------------------------------------------------------------------------------
def pool_partners(k: int) -> list[int | None]:
    """Pool index of each pool model's complementary partner (None: none).

    Pool model 0 is the target (no partner); pool model ``i + 1`` is reference model ``i``,
    whose partner is reference model ``i ^ 1`` (pool index ``(i ^ 1) + 1``) when it exists.
    """
    out: list[int | None] = [None]
    for i in range(k):
        j = i ^ 1
        out.append(j + 1 if j < k else None)
    return out


def pool_attack_scores(labels: np.ndarray, feats: Sequence[Mapping[str, np.ndarray]], in_pool: np.ndarray, *,
                       adv_logits: Sequence[np.ndarray | None] | None = None,
                       boundary: Sequence[np.ndarray | None] | None = None,
                       partners: Sequence[int | None] | None = None,
                       **kw: Any) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], list[list[int]]]:
    """Scores of every attack on every pool model, each attacked with the others as references.

    ``feats[m]``: :func:`model_features` of pool model ``m`` (0 = the target);
    ``in_pool`` (M, P) bool: row ``m`` = which pool examples model ``m`` trained on;
    ``adv_logits[m]`` / ``boundary[m]``: that model's PGD logits / boundary distances, or None
    (an attack some pool model lacks is scored on row 0 only, the other rows NaN);
    ``partners``: :func:`pool_partners` (default from ``M - 1`` reference models), left out of
    each model's references (see the module docstring); ``kw``: :func:`attack_scores` settings.

    Returns ``(scores, extras, references)``: ``scores[a]`` (M, P) with row 0 exactly
    :func:`attack_scores` of the target against all reference models; ``extras[m]`` the class
    thresholds of model ``m``; ``references[m]`` the pool indices used as its references.
    """
    in_pool = np.asarray(in_pool, dtype=bool)
    m_models, n = in_pool.shape
    if len(feats) != m_models:
        raise ValueError(f"{len(feats)} feature sets for {m_models} pool models")
    partners = list(partners) if partners is not None else pool_partners(m_models - 1)
    adv_logits = list(adv_logits) if adv_logits is not None else [None] * m_models
    boundary = list(boundary) if boundary is not None else [None] * m_models
    rows: list[dict[str, np.ndarray]] = []
    extras, references = [], []
    for m in range(m_models):
        others = [j for j in range(m_models) if j != m and j != partners[m]]
        refs = stack_features([feats[j] for j in others]) if others else None
        sc, extra = attack_scores(labels, feats[m], refs, in_pool[others] if others else None,
                                  adv_logits=adv_logits[m], boundary=boundary[m], **kw)
        rows.append(sc)
        extras.append(extra)
        references.append(others)
    names = list(rows[0])
    out = {}
    for a in names:
        out[a] = np.stack([r.get(a, np.full(n, np.nan)) for r in rows])
    return out, extras, references


def _spread(values: list[float | None]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n_models": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n_models": int(v.size)}


def pooled_summary(scores: Mapping[str, np.ndarray], in_pool: np.ndarray, fprs, *, confidence: float = 0.95,
                   n_points: int = 200, prefix: str = "mia.pooled", exclude: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Pooled metrics over all (model, example) trials, with the spread across pool models.

    Only attacks that scored every pool model (no row all-NaN) are pooled.  Returns
    ``(metrics, roc, per_model)``: ``metrics`` as :func:`summarize_attacks` with ``prefix``
    (each ``auc``, ``advantage`` and ``tpr_at_fpr`` entry gains ``per_model``: the spread of
    the same metric over the pool models alone, and ``n_models``); ``per_model[a]`` the
    per-model values (for the notes).
    """
    in_pool = np.asarray(in_pool, dtype=bool)
    pooled = {a: s for a, s in scores.items() if not np.isnan(s).all(axis=1).any()}
    metrics, _, roc, _ = summarize_attacks(pooled, in_pool, fprs, confidence=confidence, n_points=n_points,
                                           prefix=prefix, exclude=exclude)
    fkeys = [str(f) for f in fprs]
    per_model: dict[str, Any] = {}
    for a, s in pooled.items():
        vals: dict[str, list[float | None]] = {"auc": [], "advantage": [], **{f"tpr_at_fpr.{k}": [] for k in fkeys}}
        for m in range(s.shape[0]):
            ok = ~np.isnan(s[m])
            lab = in_pool[m][ok]
            if not lab.any() or lab.all():
                for key in vals:
                    vals[key].append(None)
                continue
            summ = M.summarize(s[m][ok], lab, fprs, confidence=confidence, n_points=2)
            vals["auc"].append(summ["auc"]["value"])
            vals["advantage"].append(summ["advantage"]["value"])
            for k in fkeys:
                vals[f"tpr_at_fpr.{k}"].append(summ["tpr_at_fpr"][k]["value"])
        per_model[a] = vals
        for key, v in vals.items():
            e = metrics.get(f"{prefix}.{a}.{key}")
            if isinstance(e, dict):
                e["per_model"] = _spread(v)
                e["n_models"] = int(s.shape[0])
    return metrics, roc, per_model


def save_scores(path: Path, scores: Mapping[str, np.ndarray], member: np.ndarray, **arrays: np.ndarray) -> None:
    """Atomically write ``score.<attack>`` arrays, ``member`` and extra arrays to an ``.npz``."""
    save_npz_atomic(path, {"member": np.asarray(member, dtype=bool), "attacks": np.array(list(scores), dtype=str),
                           **{f"score.{k}": np.asarray(v, dtype=np.float64) for k, v in scores.items()},
                           **arrays})
