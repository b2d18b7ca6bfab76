"""Membership-inference metrics: pure functions over numpy arrays (no torch, no I/O).

Conventions used throughout:

* ``scores``: one real number per example, **higher = more likely a member**.
* ``labels``: membership ground truth, ``1``/``True`` = member (in the target's training set),
  ``0``/``False`` = non-member.  ``N_in`` members, ``N_out`` non-members.
* The attack flags an example as a member when ``score >= threshold``.

Every rate that is reported comes with its sample size so that a reader can judge it, and a
rate the data cannot support (TPR at an FPR below ``10 / N_out``) is reported as n/a
(``value=None`` with a ``reason``), never as a number (REFERENCES.md, "Metrics").

Rate dictionaries follow the evaluator convention of ``cfbench.evaluators.base.proportion``:
``{"value", "ci_low", "ci_high", "n", ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "mean_interval",
    "MIN_FALSE_POSITIVES",
    "advantage",
    "auc",
    "auc_hanley_mcneil",
    "balanced_accuracy",
    "best_of",
    "clopper_pearson",
    "downsample_roc",
    "lowest_supported_fpr",
    "roc",
    "same_ranking",
    "summarize",
    "tpr_at_fpr",
]

#: A false-positive rate is "supported" only if at least this many non-members may be
#: false positives at that rate: ``fpr_target >= MIN_FALSE_POSITIVES / N_out``.
MIN_FALSE_POSITIVES = 10


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------
def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten ``scores`` (finite or +-inf reals) and ``labels`` (0/1)."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if np.isnan(s).any():
        raise ValueError(
            f"{int(np.isnan(s).sum())} scores are NaN (e.g. LiRA examples without IN/OUT "
            "reference models); drop them (and count them) before computing metrics")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0/1 (1 = member) or boolean")
        y = y.astype(bool)
    n_in = int(y.sum())
    n_out = y.size - n_in
    if n_in == 0 or n_out == 0:
        raise ValueError(f"need both members and non-members, got {n_in} and {n_out}")
    return s, y


# --------------------------------------------------------------------------------------------
# ROC
# --------------------------------------------------------------------------------------------
def _roc_counts(s: np.ndarray, y: np.ndarray):
    """Cumulative (false positives, true positives, thresholds) at each distinct score.

    Identical to sklearn's ``_binary_clf_curve`` without sample weights: a stable descending
    sort, then one ROC vertex per distinct score value (ties move FP and TP together).
    """
    order = np.argsort(s, kind="mergesort")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    # index of the last element of each block of equal scores (``!=`` rather than sklearn's
    # ``np.diff`` so that tied infinite scores stay one block; sklearn rejects infinities)
    distinct = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    last = np.r_[distinct, s_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last]
    fps = 1 + last - tps
    return fps, tps, s_sorted[last]


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of a "higher score = member" attack.

    Returns ``(fpr, tpr, thresholds)`` exactly as ``sklearn.metrics.roc_curve(labels, scores,
    drop_intermediate=False)`` (sklearn >= 1.3): ``thresholds`` are the distinct scores in
    decreasing order preceded by ``+inf``; the point ``i`` is the operating point of the rule
    ``score >= thresholds[i]``, so ``fpr[i] = #{non-members with score >= t_i} / N_out`` and
    ``tpr[i] = #{members with score >= t_i} / N_in``.  The curve starts at (0, 0) and ends at
    (1, 1).  Tied scores form a single vertex (FP and TP jump together), so the trapezoid
    area under this curve counts a tied member/non-member pair as 1/2, like the
    Mann-Whitney U statistic.

    Vectorised: one O(n log n) stable sort and a cumulative sum.
    """
    s, y = _check(scores, labels)
    fps, tps, thr = _roc_counts(s, y)
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thresholds = np.r_[np.inf, thr.astype(np.float64, copy=False)]
    return fps / fps[-1], tps / tps[-1], thresholds


def auc(scores, labels) -> float:
    """Area under the ROC curve, by the trapezoid rule over :func:`roc`.

    Equals ``sklearn.metrics.roc_auc_score(labels, scores)`` including ties, i.e. the
    probability that a random member scores above a random non-member, ties counting 1/2.
    """
    fpr, tpr, _ = roc(scores, labels)
    return float(np.trapezoid(tpr, fpr))


def auc_hanley_mcneil(auc_value: float, n_members: int, n_nonmembers: int,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Normal-approximation interval for an AUC with the Hanley & McNeil (1982) standard error.

    ``SE^2 = [A(1-A) + (n_1 - 1)(Q_1 - A^2) + (n_2 - 1)(Q_2 - A^2)] / (n_1 n_2)`` with
    ``Q_1 = A / (2 - A)``, ``Q_2 = 2A^2 / (1 + A)``, ``n_1`` members (positives), ``n_2``
    non-members; interval ``A +- z_{(1+c)/2} SE`` clipped to [0, 1].  Bootstrap-free and
    cheap; the ``Q`` terms assume exponentially distributed scores (Hanley & McNeil's
    approximation) and ignore ties, so treat the interval as indicative, not exact.
    """
    a = float(auc_value)
    n1, n2 = int(n_members), int(n_nonmembers)
    q1 = a / (2.0 - a)
    q2 = 2.0 * a * a / (1.0 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    se = math.sqrt(max(var, 0.0))
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    return {
        "value": a,
        "ci_low": max(0.0, a - z * se),
        "ci_high": min(1.0, a + z * se),
        "se": se,
        "confidence": confidence,
        "method": "hanley-mcneil-1982",
    }


def balanced_accuracy(scores, labels) -> float:
    """Best-threshold balanced accuracy ``max_t 1/2 (TPR(t) + TNR(t))`` over the ROC vertices.

    This is the "attack accuracy" of Song et al. (and ``plot.py``'s ``acc`` in the LiRA
    reference code) on balanced member/non-member sets.  It is **optimistic**: the
    threshold is chosen on the very data the accuracy is measured on, so it upper-bounds what
    an attacker who must fix the threshold beforehand achieves (use
    :func:`cfbench.mia.scores.fit_class_thresholds` on shadow data for an honest one).
    Always >= 0.5 (the trivial thresholds are included).
    """
    fpr, tpr, _ = roc(scores, labels)
    return float(np.max(0.5 * (tpr + 1.0 - fpr)))


def advantage(scores, labels) -> float:
    """Membership advantage ``max_t (TPR(t) - FPR(t))`` (Yeom et al. 2018) over the ROC vertices.

    Equals ``2 * balanced_accuracy - 1`` and, like it, is **optimistic** (the threshold is
    chosen on the evaluated data).  Always >= 0 (the trivial thresholds are included).
    """
    fpr, tpr, _ = roc(scores, labels)
    return float(np.max(tpr - fpr))


def lowest_supported_fpr(n_nonmembers: int, min_false_positives: int = MIN_FALSE_POSITIVES) -> float | None:
    """The lowest false-positive rate the support rule allows: ``min_false_positives / N_out``.

    ``None`` when even FPR = 1 is unsupported (fewer than ``min_false_positives`` non-members).
    """
    n = int(n_nonmembers)
    if n < min_false_positives or n <= 0:
        return None
    return min_false_positives / n


def same_ranking(a, b) -> bool:
    """True when two score vectors order the examples identically (ties included).

    Two such attacks have the same ROC curve, hence identical AUC, balanced accuracy and TPR
    at every FPR: they are one attack, not two (e.g. the loss ``log p_y`` and the confidence
    ``p_y`` of one query).  NaN positions must coincide; the finite scores must have equal
    dense ranks.
    """
    from scipy.stats import rankdata

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        return False
    nx, ny = np.isnan(x), np.isnan(y)
    if not np.array_equal(nx, ny):
        return False
    ok = ~nx
    if not ok.any():
        return True
    return bool(np.array_equal(rankdata(x[ok], method="dense"), rankdata(y[ok], method="dense")))


# --------------------------------------------------------------------------------------------
# intervals and operating points
# --------------------------------------------------------------------------------------------
def clopper_pearson(k, n, confidence: float = 0.95):
    """Exact (Clopper-Pearson) two-sided interval for a binomial proportion ``k / n``.

    ``low = Beta^{-1}(alpha/2; k, n-k+1)``, ``high = Beta^{-1}(1-alpha/2; k+1, n-k)`` with
    ``alpha = 1 - confidence``; ``low = 0`` when ``k = 0`` and ``high = 1`` when ``k = n``.
    Equals ``scipy.stats.binomtest(k, n).proportion_ci(confidence, method="exact")``.
    ``k`` and ``n`` may be integers (returns two floats) or arrays (returns two arrays).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k_arr = np.asarray(k)
    n_arr = np.asarray(n)
    if np.any(n_arr <= 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    kf = k_arr.astype(np.float64)
    nf = n_arr.astype(np.float64)
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k_arr == 0, 0.0,
                       stats.beta.ppf(alpha / 2, np.maximum(kf, 1e-300), nf - kf + 1))
        high = np.where(k_arr == n_arr, 1.0,
                        stats.beta.ppf(1 - alpha / 2, kf + 1, np.maximum(nf - kf, 1e-300)))
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _na(reason: str, fpr_target: float, n_in: int, n_out: int, confidence: float) -> dict:
    return {"value": None, "ci_low": None, "ci_high": None, "n": n_in, "k": None,
            "fpr": None, "threshold": None, "fpr_target": fpr_target,
            "n_nonmembers": n_out, "confidence": confidence, "reason": reason}


def _tpr_at_fpr_from_counts(fps, tps, thr, n_in, n_out, fpr_target, confidence,
                            min_false_positives):
    """:func:`tpr_at_fpr` on precomputed ROC counts (with the (0, 0) point first)."""
    fpr_target = float(fpr_target)
    if not 0.0 < fpr_target <= 1.0:
        raise ValueError(f"fpr_target must be in (0, 1], got {fpr_target}")
    if fpr_target < min_false_positives / n_out:
        return _na(f"FPR {fpr_target:g} is below {min_false_positives}/N_out = "
                   f"{min_false_positives / n_out:.3g} (N_out = {n_out} non-members): "
                   "not supported by the data", fpr_target, n_in, n_out, confidence)
    fpr = fps / n_out
    # fpr is non-decreasing and fpr[0] == 0, so the last vertex with fpr <= target exists
    # and has the largest TPR among them.
    i = int(np.searchsorted(fpr, fpr_target, side="right")) - 1
    k = int(tps[i])
    lo, hi = clopper_pearson(k, n_in, confidence)
    t = float(thr[i])
    return {"value": k / n_in, "ci_low": lo, "ci_high": hi, "n": n_in, "k": k,
            "fpr": float(fpr[i]), "threshold": t if math.isfinite(t) else None,
            "fpr_target": fpr_target, "n_nonmembers": n_out, "confidence": confidence}


def tpr_at_fpr(scores, labels, fpr_target: float, confidence: float = 0.95, *,
               min_false_positives: int = MIN_FALSE_POSITIVES) -> dict[str, Any]:
    """True-positive rate at a fixed false-positive rate, with an exact interval.

    **Support rule** (REFERENCES.md): with ``N_out`` non-members an FPR below ``10 / N_out``
    is not supported, so the rate is reported only if ``fpr_target >= 10 / N_out`` (i.e. at
    least 10 non-members may be false positives); otherwise the result is n/a:
    ``{"value": None, "reason": "...", "n": N_in, "n_nonmembers": N_out, ...}``.

    **Value**: the largest TPR among the ROC vertices with ``FPR <= fpr_target`` (the
    attack may not exceed the FPR budget).  Carlini et al.'s ``plot.py`` reads
    ``tpr[np.where(fpr < .001)[0][-1]]`` with a *strict* ``<``; we use ``<=`` so that an
    operating point exactly at the budget counts.  No interpolation between vertices
    (a randomised threshold could do slightly better on tied blocks; we do not credit it).

    **Interval**: Clopper-Pearson on ``k / N_in`` where ``k`` is the number of members with
    ``score >= threshold``.  The interval reflects the sampling of members only; the FPR is
    itself estimated from ``N_out`` non-members (which is what the support rule guards).

    Returns ``{"value", "ci_low", "ci_high", "n" (= N_in), "k", "fpr" (achieved FPR),
    "threshold" (rule ``score >= threshold``; ``None`` when no example is flagged),
    "fpr_target", "n_nonmembers", "confidence"}`` (+ ``"reason"`` when n/a).
    """
    s, y = _check(scores, labels)
    n_in = int(y.sum())
    n_out = y.size - n_in
    fps, tps, thr = _roc_counts(s, y)
    return _tpr_at_fpr_from_counts(np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, thr],
                                   n_in, n_out, fpr_target, confidence, min_false_positives)


# --------------------------------------------------------------------------------------------
# plotting and summaries
# --------------------------------------------------------------------------------------------
def _round(x: np.ndarray, digits: int) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in x]


def downsample_roc(fpr, tpr, n_points: int = 200, *, n_nonmembers: int | None = None,
                   digits: int = 6) -> tuple[list[float], list[float]]:
    """At most ``n_points`` ROC vertices, log-spaced in FPR, for small log-log plots.

    A grid of ``n_points`` FPR values log-spaced from ``f_min`` to 1 is laid out, with
    ``f_min = 1 / n_nonmembers`` if given, else the smallest non-zero FPR of the curve.  For
    each grid value ``g`` the ROC vertex with the largest TPR among those with ``FPR <= g``
    is kept (TPR read as a step function of FPR, as :func:`tpr_at_fpr` does); duplicates are
    merged.  Vertices with FPR = 0 cannot be drawn on a log axis and are dropped; the first
    vertex with non-zero FPR and the end point (1, 1) are always kept.  The kept points are
    actual vertices of the input curve (never interpolated values), rounded to ``digits``
    significant digits so they stay small in JSON.  Inputs must be non-decreasing, as
    returned by :func:`roc`.  Returns ``(fpr_list, tpr_list)`` of Python floats.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.shape != tpr.shape or fpr.ndim != 1 or fpr.size == 0:
        raise ValueError("fpr and tpr must be 1-D arrays of equal, non-zero length")
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    positive = fpr[fpr > 0]
    if positive.size == 0:
        return [], []
    f_min = 1.0 / n_nonmembers if n_nonmembers else float(positive[0])
    f_max = float(fpr[-1])
    grid = np.geomspace(min(f_min, f_max), f_max, n_points)
    grid[-1] = f_max
    idx = np.searchsorted(fpr, grid, side="right") - 1
    first_pos = int(np.searchsorted(fpr, 0.0, side="right"))
    # last vertex at the first non-zero FPR (the largest TPR there)
    first_keep = int(np.searchsorted(fpr, fpr[first_pos], side="right")) - 1
    idx = np.unique(np.r_[first_keep, idx[idx >= 0], fpr.size - 1])
    idx = idx[fpr[idx] > 0]
    return _round(fpr[idx], digits), _round(tpr[idx], digits)


def summarize(scores, labels, fprs: Sequence[float] = (0.01, 0.001, 0.0001), *,
              confidence: float = 0.95, n_points: int = 200,
              min_false_positives: int = MIN_FALSE_POSITIVES) -> dict[str, Any]:
    """All metrics of one attack, JSON-ready.

    Returns::

        {
          "auc": {"value", "ci_low", "ci_high", "se", "confidence", "method"},   # Hanley-McNeil
          "balanced_accuracy": {"value", "threshold", "optimistic": True},
          "advantage": {"value", "threshold", "optimistic": True},           # max TPR - FPR
          "tpr_at_fpr": {str(f): tpr_at_fpr(...) for f in fprs},   # n/a entries have value None
          "lowest_fpr": {"value": min_false_positives / N_out or None, "n_nonmembers", "rule"},
          "tpr_at_lowest_fpr": tpr_at_fpr(lowest_fpr) (n/a if None),
          "roc": {"fpr": [...], "tpr": [...]},                       # downsample_roc
          "n_members": N_in, "n_nonmembers": N_out,
        }

    The AUC interval uses the Hanley & McNeil (1982) standard error (see
    :func:`auc_hanley_mcneil`); no bootstrap.  The balanced accuracy is the optimistic
    best-threshold value (see :func:`balanced_accuracy`); its ``threshold`` is the rule
    ``score >= threshold`` achieving it (``None`` if that is "flag nobody").
    """
    s, y = _check(scores, labels)
    n_in = int(y.sum())
    n_out = y.size - n_in
    fps, tps, thr = _roc_counts(s, y)
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thr = np.r_[np.inf, thr.astype(np.float64, copy=False)]
    fpr = fps / n_out
    tpr = tps / n_in
    auc_value = float(np.trapezoid(tpr, fpr))
    bal = 0.5 * (tpr + 1.0 - fpr)
    ib = int(np.argmax(bal))
    t_bal = float(thr[ib])
    adv = tpr - fpr
    ia = int(np.argmax(adv))
    t_adv = float(thr[ia])
    roc_f, roc_t = downsample_roc(fpr, tpr, n_points, n_nonmembers=n_out)
    low = lowest_supported_fpr(n_out, min_false_positives)
    rule = f"FPR >= {min_false_positives} / N_out (at least {min_false_positives} non-members may be false positives)"
    return {
        "auc": auc_hanley_mcneil(auc_value, n_in, n_out, confidence),
        "balanced_accuracy": {"value": float(bal[ib]),
                              "threshold": t_bal if math.isfinite(t_bal) else None,
                              "optimistic": True},
        "advantage": {"value": float(adv[ia]), "threshold": t_adv if math.isfinite(t_adv) else None,
                      "optimistic": True},
        "tpr_at_fpr": {str(f): _tpr_at_fpr_from_counts(fps, tps, thr, n_in, n_out, f,
                                                       confidence, min_false_positives)
                       for f in fprs},
        "lowest_fpr": {"value": low, "n_nonmembers": n_out, "rule": rule},
        "tpr_at_lowest_fpr": (_tpr_at_fpr_from_counts(fps, tps, thr, n_in, n_out, low, confidence,
                                                      min_false_positives) if low is not None else
                              _na(f"fewer than {min_false_positives} non-members ({n_out}): no FPR is supported",
                                  None, n_in, n_out, confidence)),
        "roc": {"fpr": roc_f, "tpr": roc_t},
        "n_members": n_in,
        "n_nonmembers": n_out,
    }


def _value(entry) -> float | None:
    """The number inside a metric entry (a dict with "value", or a bare number); None if n/a."""
    v = entry.get("value") if isinstance(entry, Mapping) else entry
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def best_of(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The strongest attack at each operating point.

    ``summaries`` maps attack name -> :func:`summarize` output.  For ``"auc"``,
    ``"balanced_accuracy"`` and every key of ``"tpr_at_fpr"`` the attack with the largest
    value is reported as ``{"attack": name, "value": v}``; n/a (``None``) and NaN values are
    ignored, and if no attack has a value the entry is ``{"attack": None, "value": None}``.
    Ties go to the attack that comes first in ``summaries``.  Metric entries may be dicts
    with a ``"value"`` key or bare numbers.

    Note: the maximum over several attacks evaluated on the same data is itself an
    optimistic (selection-biased) estimate of the strongest attack.

    Returns ``{"auc": {...}, "balanced_accuracy": {...}, "tpr_at_fpr": {key: {...}}}``.
    """
    def pick(get) -> dict[str, Any]:
        best_name, best_val = None, None
        for name, summ in summaries.items():
            try:
                v = _value(get(summ))
            except (KeyError, TypeError):
                v = None
            if v is not None and (best_val is None or v > best_val):
                best_name, best_val = name, v
        return {"attack": best_name, "value": best_val}

    keys: list[str] = []
    for summ in summaries.values():
        for k in summ.get("tpr_at_fpr", {}):
            if k not in keys:
                keys.append(k)
    return {
        "auc": pick(lambda s: s["auc"]),
        "balanced_accuracy": pick(lambda s: s["balanced_accuracy"]),
        "tpr_at_fpr": {k: pick(lambda s, k=k: s["tpr_at_fpr"][k]) for k in keys},
    }


def mean_interval(values, confidence: float = 0.95, *, drop_nonfinite: bool = True) -> dict[str, Any]:
    """Mean of ``values`` with a two-sided Student-t interval: ``{value, ci_low, ci_high, n}``
    (``ci_*`` None below 2 values).  Non-finite values are dropped (``drop_nonfinite``), or kept,
    in which case their mean is reported without an interval (an infinite PSNR stays visible)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if drop_nonfinite:
        v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(v.mean())
    if n < 2 or not np.isfinite(v).all():
        return {"value": mean, "ci_low": None, "ci_high": None, "n": n}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return {"value": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """A rate ``k / n`` with its exact Clopper-Pearson interval (``value`` None when ``n = 0``)."""
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    lo, hi = clopper_pearson(int(k), int(n), confidence)
    return {"value": k / n, "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}
