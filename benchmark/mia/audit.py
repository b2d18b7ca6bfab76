"""Empirical differential-privacy audit: a lower bound on epsilon from a membership attack
(Jagielski, Ullman & Oprea, NeurIPS 2020; Nasr, Song, Thakurta, Papernot & Carlini, S&P 2021).

If a training algorithm is (eps, delta)-DP, then for *any* test that decides from the trained
model whether one example was in the training set -- here: the attack's rule
``score >= t`` -- the true- and false-positive rates obey

    TPR <= e^eps FPR + delta      and      1 - FPR <= e^eps (1 - TPR) + delta

(the second is the first for the complementary test).  So any measured operating point
gives ``eps >= log((TPR - delta) / FPR)`` and ``eps >= log((1 - FPR - delta) / (1 - TPR))``.
With finite trials the rates are estimates: the bound uses the Clopper-Pearson interval ends
that make it smallest, ``TPR_lo`` and ``FPR_hi`` (the ends of the two-sided interval at
``confidence``; each is a one-sided bound at ``(1 + confidence) / 2``, so by the union bound
both hold at once with probability >= ``confidence``):

    eps_lb(t) = max( log((TPR_lo - delta) / FPR_hi),  log((1 - FPR_hi - delta) / (1 - TPR_lo)) )

and ``eps_lb = max(0, eps_lb(t))`` at the chosen threshold (0: the attack proves nothing).

Two ways to choose ``t``, both recorded:

* :func:`epsilon_lower_bound_max` -- the maximum of ``eps_lb(t)`` over **every** threshold
  of the ROC, as Jagielski et al. and Nasr et al. report it.  Each ``eps_lb(t)`` holds at the
  stated confidence, but their maximum over many thresholds is selection-biased (the
  intervals are not simultaneous): **optimistic**.
* :func:`epsilon_lower_bound` -- the threshold (and direction) is chosen on a seeded half of
  the trials (stratified by membership) as the maximiser of ``eps_lb(t)`` there, and the
  bound is evaluated on the *other* half at that one threshold: a lower bound that holds at
  the stated confidence (under the assumption below).  It costs half the trials; it is the
  number cfbench reports as ``mia.audit.epsilon_lb``.

Assumption (stated, not hidden): the Clopper-Pearson intervals treat every (model, example)
trial as an independent Bernoulli draw.  Trials of one model are not independent (one
training run decides them all; Steinke, Nasr & Jagielski 2023 give the exact one-run
analysis), so the result is a statistical estimate of a lower bound, not a certificate.  The
DP inequalities themselves do hold for the pooled rates: the attack's score for a trial is a
post-processing of the attacked model with reference models whose training is independent of
that model's membership of the example (the evaluator leaves out the complementary partner
of a paired reference model for exactly this reason).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .metrics import _check, _roc_counts, clopper_pearson

__all__ = ["epsilon_bounds", "epsilon_lower_bound", "epsilon_lower_bound_max"]


def epsilon_bounds(k_tp, n_in: int, k_fp, n_out: int, delta: float, confidence: float = 0.95
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two directions of ``eps_lb`` at operating points with ``k_tp`` of ``n_in`` members and
    ``k_fp`` of ``n_out`` non-members flagged: ``(eps_pos, eps_neg, tpr_lo, fpr_hi)`` arrays,
    ``-inf`` where a numerator is <= 0."""
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    k_tp, k_fp = np.atleast_1d(np.asarray(k_tp)), np.atleast_1d(np.asarray(k_fp))
    tpr_lo, _ = clopper_pearson(k_tp, np.full_like(k_tp, n_in), confidence)
    _, fpr_hi = clopper_pearson(k_fp, np.full_like(k_fp, n_out), confidence)
    tpr_lo, fpr_hi = np.atleast_1d(tpr_lo), np.atleast_1d(fpr_hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        num_pos = tpr_lo - delta
        eps_pos = np.where(num_pos > 0, np.log(num_pos) - np.log(fpr_hi), -np.inf)
        num_neg = 1.0 - fpr_hi - delta
        den_neg = 1.0 - tpr_lo
        eps_neg = np.where((num_neg > 0) & (den_neg > 0), np.log(num_neg) - np.log(den_neg), -np.inf)
    return eps_pos, eps_neg, tpr_lo, fpr_hi


def _vertices(s: np.ndarray, y: np.ndarray):
    """ROC vertices ``(k_fp, k_tp, thresholds)`` with the (0, 0) point first."""
    fps, tps, thr = _roc_counts(s, y)
    return np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, thr.astype(np.float64, copy=False)]


def _result(value: float, *, threshold, direction, k_tp, n_in, k_fp, n_out, tpr_lo, fpr_hi, delta,
            confidence, **extra) -> dict[str, Any]:
    t = float(threshold) if threshold is not None and math.isfinite(threshold) else None
    return {"value": max(0.0, float(value)) if math.isfinite(value) else 0.0,
            "threshold": t, "direction": direction,
            "tpr": k_tp / n_in, "fpr": k_fp / n_out, "tpr_low": float(tpr_lo), "fpr_high": float(fpr_hi),
            "k_tp": int(k_tp), "k_fp": int(k_fp), "n_members": int(n_in), "n_nonmembers": int(n_out),
            "delta": float(delta), "confidence": float(confidence), **extra}


def _best(k_fp, k_tp, n_in, n_out, delta, confidence):
    eps_pos, eps_neg, tpr_lo, fpr_hi = epsilon_bounds(k_tp, n_in, k_fp, n_out, delta, confidence)
    ip, ineg = int(np.argmax(eps_pos)), int(np.argmax(eps_neg))
    if eps_pos[ip] >= eps_neg[ineg]:
        return ip, "TPR <= e^eps FPR + delta", float(eps_pos[ip]), tpr_lo, fpr_hi
    return ineg, "1 - FPR <= e^eps (1 - TPR) + delta", float(eps_neg[ineg]), tpr_lo, fpr_hi


def epsilon_lower_bound_max(scores, labels, delta: float, confidence: float = 0.95) -> dict[str, Any]:
    """``max_t eps_lb(t)`` over every ROC threshold of the rule ``score >= t`` (optimistic).

    Returns ``{value (>= 0), threshold, direction, tpr, fpr, tpr_low, fpr_high, k_tp, k_fp,
    n_members, n_nonmembers, delta, confidence, optimistic: True, method}``.
    """
    s, y = _check(scores, labels)
    n_in = int(y.sum())
    n_out = y.size - n_in
    k_fp, k_tp, thr = _vertices(s, y)
    i, direction, value, tpr_lo, fpr_hi = _best(k_fp, k_tp, n_in, n_out, delta, confidence)
    return _result(value, threshold=thr[i], direction=direction, k_tp=k_tp[i], n_in=n_in, k_fp=k_fp[i],
                   n_out=n_out, tpr_lo=tpr_lo[i], fpr_hi=fpr_hi[i], delta=delta, confidence=confidence,
                   optimistic=True, method="maximum over all thresholds (Jagielski et al. 2020; selection-biased)")


def epsilon_lower_bound(scores, labels, delta: float, confidence: float = 0.95, *, seed: int = 0
                        ) -> dict[str, Any]:
    """``eps_lb`` at a threshold chosen on a held-out half of the trials (see the module docstring).

    The trials are split by a permutation drawn from ``seed``, separately for members and
    non-members (each half gets ``floor`` / ``ceil`` of each); the threshold and direction that
    maximise ``eps_lb`` on the selection half are evaluated on the evaluation half.  Returns the
    fields of :func:`epsilon_lower_bound_max` (counts of the evaluation half) plus
    ``selection`` (the selection half's own bound, threshold, sizes) and ``optimistic: False``.
    """
    s, y = _check(scores, labels)
    rng = np.random.default_rng([0x415544, int(seed)])
    sel = np.zeros(y.size, dtype=bool)
    for cls in (True, False):
        idx = np.flatnonzero(y == cls)
        pick = rng.permutation(idx)[: idx.size // 2]
        sel[pick] = True
    ev = ~sel
    if y[sel].all() or not y[sel].any() or y[ev].all() or not y[ev].any():
        raise ValueError("epsilon_lower_bound needs at least 2 members and 2 non-members")
    ss, ys = s[sel], y[sel]
    n_in_s, n_out_s = int(ys.sum()), int((~ys).sum())
    k_fp, k_tp, thr = _vertices(ss, ys)
    i, direction, sel_value, _, _ = _best(k_fp, k_tp, n_in_s, n_out_s, delta, confidence)
    t = thr[i]
    se, ye = s[ev], y[ev]
    n_in, n_out = int(ye.sum()), int((~ye).sum())
    flagged = se >= t
    kt, kf = int((flagged & ye).sum()), int((flagged & ~ye).sum())
    eps_pos, eps_neg, tpr_lo, fpr_hi = epsilon_bounds(kt, n_in, kf, n_out, delta, confidence)
    value = float(eps_pos[0] if direction.startswith("TPR") else eps_neg[0])
    return _result(value, threshold=t, direction=direction, k_tp=kt, n_in=n_in, k_fp=kf, n_out=n_out,
                   tpr_lo=tpr_lo[0], fpr_hi=fpr_hi[0], delta=delta, confidence=confidence, optimistic=False,
                   method="threshold chosen on a seeded half of the trials, bound evaluated on the other half",
                   selection={"value": max(0.0, sel_value) if math.isfinite(sel_value) else 0.0,
                              "n_members": n_in_s, "n_nonmembers": n_out_s, "seed": int(seed)})
