"""Membership-inference attack scores: pure, vectorised numpy (no torch, no I/O).

Every score is oriented **higher = more likely a member**, so that all of them go through
the same ROC machinery (:mod:`cfbench.mia.metrics`).  The stateful parts (running models,
training reference models, choosing which points are members) belong to the evaluators;
this module only turns model outputs into numbers.

Three families:

* **Threshold attacks** (Song & Mittal 2021, code ``inspire-group/membership-inference-
  evaluation``): :func:`loss_score`, :func:`confidence_score`, :func:`entropy_score`,
  :func:`modified_entropy_score`, with class-dependent thresholds fitted on shadow data by
  :func:`fit_class_thresholds` and applied by :func:`class_threshold_score`.
* **LiRA** (Carlini et al. 2022, code ``tensorflow/privacy`` ``research/mi_lira_2021``):
  :func:`lira_phi`, :func:`lira_online`, :func:`lira_offline`.
* **RMIA** (Zarifzadeh, Liu & Shokri 2024): :func:`rmia_scores`.

Model outputs are ``(..., C)`` arrays of probabilities, or of logits when
``from_logits=True``; class labels are integer arrays broadcastable to ``outputs.shape[:-1]``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import special

__all__ = [
    "best_threshold",
    "class_threshold_score",
    "confidence_score",
    "entropy_score",
    "fit_class_thresholds",
    "lira_offline",
    "lira_online",
    "lira_phi",
    "log_softmax",
    "loss_score",
    "modified_entropy_score",
    "rmia_scores",
    "softmax",
]

#: Clipping constant of the reference modified-entropy code (an exact 0 inside a log
#: becomes 1e-30).
MENTR_EPS = 1e-30
#: Floor for probabilities inside logs when scores are computed from probabilities
#: (the LiRA reference code adds 1e-45).  Logit inputs never need it.
PROB_FLOOR = 1e-45
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# softmax and label handling
# --------------------------------------------------------------------------------------------
def log_softmax(logits, axis: int = -1) -> np.ndarray:
    """``z - logsumexp(z)`` along ``axis``, stable for any finite logits."""
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    shifted = z - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, axis: int = -1) -> np.ndarray:
    """``exp(z - max z) / sum exp(z - max z)`` along ``axis`` (no overflow)."""
    z = np.asarray(logits)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _prepare(outputs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Float outputs ``(..., C)`` and integer labels broadcast to ``outputs.shape[:-1] + (1,)``."""
    out = np.asarray(outputs)
    if out.ndim < 1 or out.shape[-1] < 2:
        raise ValueError(f"outputs must have shape (..., C) with C >= 2, got {out.shape}")
    if not np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float64)
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    try:
        y = np.broadcast_to(y, out.shape[:-1])
    except ValueError:
        raise ValueError(
            f"labels of shape {y.shape} do not broadcast to outputs.shape[:-1] = "
            f"{out.shape[:-1]} (for outputs (K, N, A, C) pass labels[:, None])") from None
    if y.size and (y.min() < 0 or y.max() >= out.shape[-1]):
        raise ValueError(f"labels must lie in [0, {out.shape[-1]}), got [{y.min()}, {y.max()}]")
    return out, y[..., None].astype(np.intp)


def _take(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, y, axis=-1)[..., 0]


def _onehot(shape, y: np.ndarray) -> np.ndarray:
    return np.arange(shape[-1]) == y


def _log_probs(outputs, labels, from_logits: bool):
    """(log p, p, labels) with logs computed stably from logits, or floored at PROB_FLOOR."""
    out, y = _prepare(outputs, labels)
    if from_logits:
        logp = log_softmax(out)
        return logp, np.exp(logp), y
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(out, PROB_FLOOR)), out, y


# --------------------------------------------------------------------------------------------
# threshold-attack signals (Song & Mittal 2021)
# --------------------------------------------------------------------------------------------
def loss_score(outputs, labels, *, from_logits: bool = False) -> np.ndarray:
    """Negative cross-entropy ``-CE = log p_y``.

    From logits ``log p_y = z_y - logsumexp(z)`` (exact and finite); from probabilities
    ``log max(p_y, 1e-45)`` (finite even when ``p_y`` underflowed to 0).
    """
    logp, _, y = _log_probs(outputs, labels, from_logits)
    return _take(logp, y)


def confidence_score(outputs, labels, *, from_logits: bool = False) -> np.ndarray:
    """Confidence in the true class, ``p_y``."""
    out, y = _prepare(outputs, labels)
    p = softmax(out) if from_logits else out
    return _take(p, y)


def entropy_score(outputs, labels=None, *, from_logits: bool = False) -> np.ndarray:
    """Negative prediction entropy ``-H(p) = sum_i p_i log p_i`` (label-free).

    Terms with ``p_i = 0`` contribute 0 (``0 log 0 = 0``, as the reference ``_entr_comp``
    skips them).  ``labels`` is accepted for a uniform signature and ignored.
    """
    out = np.asarray(outputs)
    if not np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float64)
    if from_logits:
        logp = log_softmax(out)
        p = np.exp(logp)
    else:
        p = out
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.sum(p * logp, axis=-1)


def modified_entropy_score(outputs, labels, *, from_logits: bool = False) -> np.ndarray:
    """Negative modified entropy ``-Mentr`` (Song & Mittal 2021).

    ``Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``.

    Clipping as in the reference ``_m_entr_comp``: an argument of a log that is exactly 0
    (``p_y == 0``, or ``p_i == 1`` for ``i != y``) is replaced by ``1e-30``; nothing else is
    clipped.  With ``from_logits=True`` the logs are computed stably (``log p`` from
    log-softmax, ``log(1 - p_i) = log(-expm1(log p_i))``) and the same 1e-30 floor applies
    only where ``1 - p_i`` underflows to 0.
    """
    out, y = _prepare(outputs, labels)
    onehot = _onehot(out.shape, y)
    if from_logits:
        logp = log_softmax(out)
        p = np.exp(logp)
        with np.errstate(divide="ignore"):
            log1m = np.log(-np.expm1(logp))
        log1m = np.where(np.isneginf(log1m), math.log(MENTR_EPS), log1m)
    else:
        p = out
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(np.where(p == 0, MENTR_EPS, p))
            q = 1.0 - p
            log1m = np.log(np.where(q == 0, MENTR_EPS, q))
    # label term: -(1 - p_y) log p_y ; other terms: -p_i log(1 - p_i)
    terms = np.where(onehot, (1.0 - p) * logp, p * log1m)
    return np.sum(terms, axis=-1)          # = -Mentr


# --------------------------------------------------------------------------------------------
# thresholds fitted on shadow data
# --------------------------------------------------------------------------------------------
def best_threshold(in_values, out_values) -> float:
    """Threshold maximising ``1/2 (TPR + TNR)`` of the rule ``value >= threshold``.

    Vectorised transcription of the reference ``_thre_setting(tr_values, te_values)``::

        for value in concatenate((tr_values, te_values)):
            tr_ratio = mean(tr_values >= value); te_ratio = mean(te_values < value)
            acc = 0.5 * (tr_ratio + te_ratio)
            if acc > max_acc: thre, max_acc = value, acc

    Candidates are the observed values (in that concatenation order) and ties between
    candidates with the same accuracy go to the first one in that order, exactly as the
    reference's strict ``>``.  Counts use two sorts and ``searchsorted`` (O(n log n)
    instead of the reference's O(n^2)).  Both inputs must be non-empty and NaN-free.
    """
    tr = np.asarray(in_values).ravel()
    te = np.asarray(out_values).ravel()
    if tr.size == 0 or te.size == 0:
        raise ValueError("best_threshold needs at least one IN and one OUT value")
    if np.isnan(tr).any() or np.isnan(te).any():
        raise ValueError("best_threshold: values must not be NaN")
    cand = np.concatenate((tr, te))
    tr_ge = tr.size - np.searchsorted(np.sort(tr), cand, side="left")   # #(tr >= v)
    te_lt = np.searchsorted(np.sort(te), cand, side="left")             # #(te <  v)
    acc = 0.5 * (tr_ge / (tr.size + 0.0) + te_lt / (te.size + 0.0))
    i = int(np.argmax(acc))                                             # first maximiser
    return float(cand[i]) if acc[i] > 0 else 0.0


def fit_class_thresholds(shadow_in_scores, shadow_in_labels, shadow_out_scores,
                         shadow_out_labels, num_classes: int) -> np.ndarray:
    """Class-dependent thresholds ``tau_c`` (Song & Mittal 2021) fitted on shadow data.

    For every class ``c``, ``tau_c = best_threshold(in[labels_in == c], out[labels_out ==
    c])``: the observed score maximising the class's balanced accuracy ``1/2 (TPR + TNR)``
    of ``score >= tau_c`` on the shadow model's members (``in``) and non-members (``out``),
    as the reference ``_mem_inf_thre`` does.  A class without shadow members or without
    shadow non-members falls back to the global threshold ``best_threshold(in, out)`` over
    all classes (the reference code would divide by zero and keep its initial 0).

    Returns a float64 array of shape ``(num_classes,)``.
    """
    s_in = np.asarray(shadow_in_scores).ravel()
    s_out = np.asarray(shadow_out_scores).ravel()
    y_in = np.asarray(shadow_in_labels).ravel()
    y_out = np.asarray(shadow_out_labels).ravel()
    if s_in.shape != y_in.shape or s_out.shape != y_out.shape:
        raise ValueError("shadow scores and labels must have the same length")
    for lab in (y_in, y_out):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"shadow labels must lie in [0, {num_classes})")
    global_t = best_threshold(s_in, s_out)
    # group by class with one stable sort per side instead of a boolean mask per class
    oi = np.argsort(y_in, kind="stable")
    oo = np.argsort(y_out, kind="stable")
    bi = np.searchsorted(y_in[oi], np.arange(num_classes + 1), side="left")
    bo = np.searchsorted(y_out[oo], np.arange(num_classes + 1), side="left")
    thresholds = np.full(num_classes, global_t, dtype=np.float64)
    for c in range(num_classes):
        a = s_in[oi[bi[c]:bi[c + 1]]]
        b = s_out[oo[bo[c]:bo[c + 1]]]
        if a.size and b.size:
            thresholds[c] = best_threshold(a, b)
    return thresholds


def class_threshold_score(scores, labels, thresholds) -> np.ndarray:
    """``score - tau_y``: the class-threshold attack as a "higher = member" score.

    The attack's hard decision (member iff ``score >= tau_y``) is ``result >= 0``; since
    IEEE subtraction is exact in sign (``a - b >= 0`` iff ``a >= b``) the two agree exactly.
    Passing the result to :mod:`cfbench.mia.metrics` gives ROC/AUC of the class-calibrated
    score (one global threshold swept over the calibrated scores).
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    return s - t[np.asarray(labels)]


# --------------------------------------------------------------------------------------------
# LiRA (Carlini et al. 2022)
# --------------------------------------------------------------------------------------------
def lira_phi(outputs, labels, *, from_logits: bool = True) -> np.ndarray:
    """LiRA's statistic ``phi = log p_y - log sum_{y' != y} p_{y'}`` (logit of ``p_y``).

    ``outputs`` has shape ``(..., C)`` (e.g. ``(K models, N examples, A augmentations, C)``),
    ``labels`` broadcasts to ``outputs.shape[:-1]`` (for that example: ``labels[:, None]``).

    From logits (default) ``phi = z_y - logsumexp_{j != y} z_j``, computed by shifting with
    the max over the *other* classes so that the sum is >= 1: exact, finite and free of the
    1 - p_y cancellation.  From probabilities, as the reference ``score.py``:
    ``log(p_y + 1e-45) - log(sum_{j != y} p_j + 1e-45)`` (the other classes are summed, not
    ``1 - p_y``); probabilities saturated to exactly 1 therefore cap phi at about 103.
    The result is float64 for float64 input and keeps float32 for float32 logits.
    """
    out, y = _prepare(outputs, labels)
    onehot = _onehot(out.shape, y)
    if from_logits:
        z_y = _take(out, y)
        others = np.where(onehot, -np.inf, out)
        m = np.max(others, axis=-1, keepdims=True)
        lse = m[..., 0] + np.log(np.sum(np.exp(others - m), axis=-1))
        return z_y - lse
    p_y = _take(out, y)
    p_rest = np.sum(np.where(onehot, 0.0, out), axis=-1)
    return np.log(p_y + PROB_FLOOR) - np.log(p_rest + PROB_FLOOR)


def _as_kna(ref_phi, target_phi, in_mask):
    """Validate shapes; return target (N, A), ref (K, N, A), in_mask (K, N) bool or None."""
    t = np.asarray(target_phi)
    r = np.asarray(ref_phi)
    if t.ndim == 1:
        t = t[:, None]
    if r.ndim == 2:
        r = r[:, :, None]
    if t.ndim != 2 or r.ndim != 3 or r.shape[1:] != t.shape:
        raise ValueError(f"need target_phi (N, A) and ref_phi (K, N, A); got {t.shape}, "
                         f"{r.shape}")
    if not np.issubdtype(r.dtype, np.floating):
        r = r.astype(np.float64)
    m = None
    if in_mask is not None:
        m = np.asarray(in_mask)
        if m.dtype != bool:
            raise ValueError(f"in_mask must be boolean, got dtype {m.dtype}")
        if m.shape != r.shape[:2]:
            raise ValueError(f"in_mask must have shape (K, N) = {r.shape[:2]}, got {m.shape}")
    return t, r, m


def _masked_stats(r: np.ndarray, mask: np.ndarray, center: str):
    """Per-(example, augmentation) location, std (ddof=0), sum of squares and count.

    ``r``: (K, N, A) signals; ``mask``: (K, N) models to use for each example.
    Location is the median (reference code) or the mean; the std is always about the mean
    (``np.std``), as in the reference code.  Heavy reductions run in ``r``'s dtype
    (float32 stays float32); the (N, A) results are float64.  Entries with count 0 are NaN.
    """
    k = mask.sum(axis=0)                                           # (N,)
    w = mask[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        s1 = np.sum(r, axis=0, where=w, dtype=np.float64)          # (N, A)
        mean = s1 / k[:, None]
        dev = r - mean.astype(r.dtype)[None]
        np.multiply(dev, dev, out=dev)
        ss = np.sum(dev, axis=0, where=w, dtype=np.float64)        # (N, A)
        del dev
        std = np.sqrt(ss / k[:, None])
    if center == "mean":
        loc = mean
    elif center == "median":
        # masked median: NaN-fill the excluded models, sort along the model axis (NaN sort
        # last), take the middle one/two of the k valid values; same as np.median on the
        # valid values.
        x = np.empty(r.shape[1:] + r.shape[:1], dtype=r.dtype)     # (N, A, K) contiguous
        np.copyto(x, r.transpose(1, 2, 0))
        np.copyto(x, np.nan, where=~mask.T[:, None, :])
        x.sort(axis=-1)
        lo = np.maximum(k - 1, 0) // 2
        hi = k // 2
        hi = np.minimum(hi, r.shape[0] - 1)
        a = np.take_along_axis(x, lo[:, None, None], axis=-1)[..., 0].astype(np.float64)
        b = np.take_along_axis(x, hi[:, None, None], axis=-1)[..., 0].astype(np.float64)
        loc = (a + b) / 2.0
        loc[k == 0] = np.nan
    else:
        raise ValueError(f"center must be 'median' or 'mean', got {center!r}")
    return loc, std, ss, k


def _norm_logpdf(x, mu, sigma):
    z = (x - mu) / sigma
    return -0.5 * z * z - np.log(sigma) - _HALF_LOG_2PI


def _variance_mode(fix_variance) -> str:
    if fix_variance is False or fix_variance == "per-example":
        return "per-example"
    if fix_variance is True or fix_variance == "global":
        return "global"
    if fix_variance == "shared":
        return "shared"
    raise ValueError(f"fix_variance must be False, True, 'per-example', 'global' or 'shared', "
                     f"got {fix_variance!r}")


def _pooled_std(ss: np.ndarray, k: np.ndarray) -> float:
    total = float(np.sum(np.nan_to_num(ss))) if ss.size else 0.0
    count = float(np.sum(k)) * ss.shape[1] if ss.ndim == 2 else 0.0
    return math.sqrt(total / count) if count > 0 else float("nan")


def lira_online(target_phi, ref_phi, in_mask, fix_variance: bool | str = False, *,
                center: Literal["median", "mean"] = "median", min_models: int | None = None,
                eps: float = 1e-30) -> np.ndarray:
    """Online LiRA score ``mean_a [log N(phi_a; mu_in, sigma_in) - log N(phi_a; mu_out,
    sigma_out)]``.

    Parameters
    ----------
    target_phi : (N, A) -- :func:`lira_phi` of the target model, per augmentation (``(N,)``
        is read as A = 1).
    ref_phi : (K, N, A) -- the same statistic under K reference models (``(K, N)`` -> A = 1).
        float32 is fine and halves the memory; the statistics are accumulated in float64.
    in_mask : (K, N) bool -- ``in_mask[k, n]``: reference model k was trained on example n.
    fix_variance :
        * ``False`` / ``"per-example"``: ``sigma_in``, ``sigma_out`` per (example, aug).
        * ``True`` / ``"global"``: one ``sigma_in`` and one ``sigma_out`` for all examples,
          the pooled within-example std of the IN (resp. OUT) signals (root mean square
          deviation from each (example, aug) mean).  Recommended with few reference models.
        * ``"shared"``: one pooled sigma for both IN and OUT.  Ranking-equivalent to the
          reference code, whose ``generate_ours(fix_variance=True)`` uses
          ``std_in = std_out = np.std(dat_in)`` (std of all raw IN signals, including the
          between-example spread; ``std_out`` copies ``dat_in``): with sigma_in = sigma_out
          the score is ``(mu_in - mu_out)(2 phi - mu_in - mu_out) / (2 sigma^2)``, so the
          common sigma only rescales it.
    center : ``"median"`` (default, as the reference code: ``mean_in = np.median(dat_in,
        1)``) or ``"mean"`` (the paper's text).  The std is about the mean in both cases, as
        ``np.std`` in the reference.
    min_models : minimum number of IN and of OUT reference models an example needs; below
        it the score is NaN.  Default 2 with per-example variances, 1 with fixed variance.
    eps : added to every sigma (the reference adds 1e-30).

    Returns
    -------
    (N,) float64 scores, higher = member; **NaN for examples lacking IN or OUT reference
    models** (fewer than ``min_models``).  The evaluator must drop them before computing
    metrics and report how many were dropped.

    Differences from the reference ``plot.py``: all IN/OUT models of each example are used
    (the reference truncates every example to the smallest IN/OUT count over examples so
    that it can stack a rectangular array), and the Gaussian densities are written out
    instead of ``scipy.stats.norm.logpdf`` (same values).  The 2*pi constant cancels.
    """
    t, r, m = _as_kna(ref_phi, target_phi, in_mask)
    if m is None:
        raise ValueError("lira_online needs in_mask (which reference models trained on each "
                         "example)")
    mode = _variance_mode(fix_variance)
    if min_models is None:
        min_models = 2 if mode == "per-example" else 1
    loc_in, std_in, ss_in, k_in = _masked_stats(r, m, center)
    loc_out, std_out, ss_out, k_out = _masked_stats(r, ~m, center)
    if mode == "global":
        std_in = _pooled_std(ss_in, k_in)
        std_out = _pooled_std(ss_out, k_out)
    elif mode == "shared":
        std_in = std_out = _pooled_std(np.concatenate([ss_in, ss_out]),
                                       np.concatenate([k_in, k_out]))
    x = t.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        score = (_norm_logpdf(x, loc_in, std_in + eps)
                 - _norm_logpdf(x, loc_out, std_out + eps)).mean(axis=1)
    score[(k_in < min_models) | (k_out < min_models)] = np.nan
    return score


def lira_offline(target_phi, ref_phi, in_mask=None, fix_variance: bool | str = False, *,
                 two_sided: bool = False, center: Literal["median", "mean"] = "median",
                 min_models: int | None = None, eps: float = 1e-30) -> np.ndarray:
    """Offline LiRA: test ``phi`` against the OUT Gaussian only.

    * ``two_sided=False`` (default, the paper's one-sided test): the attack measures how far
      ``phi`` lies *above* the OUT distribution.  The paper's statistic is
      ``Lambda = Pr[Z <= phi] = Phi(z)`` with ``z = (phi - mu_out) / sigma_out``, a monotone
      function of ``z``; the score is **``mean_a z_a``**, the standardised distance itself.
      (cfbench version 1 scored ``mean_a log Phi(z_a)``: ``log Phi(z)`` rounds to exactly 0.0
      once ``z`` exceeds ~38, so the most confident members tied with each other and with
      non-members at the top of the ranking, and TPR was 0 below 0.6-2.2% FPR on the demo.
      With one query ``z`` ranks exactly as ``Phi(z)`` in exact arithmetic; with several
      queries the mean of the ``z_a`` is the sufficient statistic of a Gaussian shift shared
      by the queries.)
    * ``two_sided=True`` (the reference code ``generate_ours_offline``): score
      ``-mean_a log N(phi_a; mu_out, sigma_out)``: a signal far from the OUT mean in *either*
      direction counts as a member (including examples the target fits *worse* than its
      reference models).

    ``in_mask`` (K, N), if given, marks reference models trained on the example, which are
    ignored; ``None`` means all reference models are OUT (the true offline setting).
    ``fix_variance``: ``False`` = per-example sigma_out; ``True`` / ``"global"`` /
    ``"shared"`` = one pooled within-example sigma_out (the reference's ``np.std(dat_out)``
    over raw signals differs from it only by a global factor, which leaves the ranking, and
    hence every metric, unchanged for both variants).  ``center``, ``min_models``, ``eps`` as
    in :func:`lira_online` (``min_models`` counts OUT models only).  Returns (N,) float64,
    NaN where OUT models are lacking.
    """
    t, r, m = _as_kna(ref_phi, target_phi, in_mask)
    out_mask = np.ones(r.shape[:2], dtype=bool) if m is None else ~m
    mode = _variance_mode(fix_variance)
    if min_models is None:
        min_models = 2 if mode == "per-example" else 1
    loc, std, ss, k = _masked_stats(r, out_mask, center)
    if mode != "per-example":
        std = _pooled_std(ss, k)
    x = t.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sigma = std + eps
        if two_sided:
            score = -_norm_logpdf(x, loc, sigma).mean(axis=1)
        else:
            score = ((x - loc) / sigma).mean(axis=1)
    score[k < min_models] = np.nan
    return score


# --------------------------------------------------------------------------------------------
# RMIA (Zarifzadeh, Liu & Shokri 2024)
# --------------------------------------------------------------------------------------------
def _log_mean(logv: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``log mean_k exp(logv[k])`` over axis 0 (only where ``mask``), stable; -inf for no model."""
    if mask is None:
        return special.logsumexp(logv, axis=0) - math.log(logv.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        cnt = np.log(mask.sum(axis=0).astype(np.float64))
        lse = special.logsumexp(np.where(mask, logv, -np.inf), axis=0)
        return np.where(np.isfinite(cnt), lse - cnt, np.nan)


def _log_offline_p(log_p_out: np.ndarray, a: float) -> np.ndarray:
    """``log(1/2 ((1 + a) p_OUT + (1 - a)))`` from ``log p_OUT`` (exact also for a = 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return math.log(0.5) + np.logaddexp(math.log1p(a) + log_p_out, math.log1p(-a) if a < 1 else -np.inf)


def rmia_scores(target_p, ref_p, in_mask, target_p_pop, ref_p_pop, gamma: float = 1.0,
                a: float = 0.3, online: bool = False, *, strict: bool = False, log_inputs: bool = False,
                continuous: bool = False) -> np.ndarray:
    """RMIA score: the fraction of population points ``z`` that ``x`` dominates.

    ``LR(x, z) = [p(x|theta) / p(x)] / [p(z|theta) / p(z)]`` and
    ``Score(x) = #{z : LR(x, z) >= gamma} / Z`` (``> gamma`` with ``strict=True``, as ML
    Privacy Meter's ``ratios > 1.0``).

    Parameters
    ----------
    target_p : (N,) -- target model's probability of the true label of each candidate x
        (any temperature scaling is the caller's business); its **logarithm** with
        ``log_inputs=True`` (what the evaluator passes: ``log p_y`` from a float64
        log-softmax, which neither rounds to 1 nor underflows to 0).
    ref_p : (K, N) -- the same under K reference models.
    in_mask : (K, N) bool or None -- ``in_mask[k, n]``: reference model k trained on x_n.
        Needed offline (to select OUT models); ``None`` offline means all models are OUT.
        Ignored online.
    target_p_pop : (Z,), ref_p_pop : (K, Z) -- the same for the population points z.  The
        caller chooses them: points from the data distribution that the *target* was not
        trained on (and, as assumed here, no reference model either: for z every
        reference model is OUT).  Their number bounds the discrete score's resolution (1/Z).
    gamma : threshold on the pairwise likelihood ratio (ML Privacy Meter: 1; the research
        code uses 2, with temperature 2).
    a : offline interpolation coefficient (ML Privacy Meter default 0.3; ideally tuned on a
        reference model attacked as if it were the target).
    online :
        * ``True``: ``p(x) = mean over all K reference models`` (IN and OUT).  With the
          paper's paired design (x is IN for exactly half of the models) this is
          ``1/2 (p_IN(x) + p_OUT(x))``; with random inclusion it is the plain average.
          ``p(z)`` = mean over all K (all OUT for z).
        * ``False``: ``p(x) = 1/2 ((1 + a) p_OUT(x) + (1 - a))``, ``p_OUT(x)`` the mean over
          the reference models OUT for x, and likewise for z (mean over all K), as ML
          Privacy Meter's ``run_rmia``.
    continuous :
        ``False``: the paper's score ``c / Z``, ``c = #{z : LR(x, z) >= gamma}``.
        ``True``: ``(c + g) / Z`` with ``g`` in [0, 1) the position of ``t = log(r_x / gamma)``
        between its neighbouring sorted population log-ratios ``L_(c) <= t < L_(c+1)``
        (linear in the log-ratio), and in the tails ``g = exp(t - L_(1))`` below the smallest
        and ``g = 1 - exp(L_(Z) - t)`` above the largest.  The score is then strictly
        increasing in ``r_x`` for a fixed target and keeps the discrete score's order
        (``floor(Z * score) = c``), so it only breaks the discrete score's ties: every
        candidate beyond the largest population ratio scores 1 in the discrete version
        (cfbench version 1: 50 tied examples, 14 of them non-members, on a TRADES run with
        Z = 500), while here they stay ordered by how far they exceed it.  Scores may reach
        up to ``1 + 1/Z``.

    Returns (N,) float64, higher = member; NaN for an x without any OUT reference model in
    offline mode.

    Vectorisation: ``LR(x, z) >= gamma  <=>  r_z <= r_x / gamma`` with
    ``r = p(.|theta) / p(.)`` (all positive), so the score is the empirical CDF of the
    population ratios at ``r_x / gamma``: one sort of the Z ratios plus a ``searchsorted``
    for the N candidates, O((N + Z) log Z) time and no N x Z matrix.  With probabilities the
    ratios are compared as ratios; with ``log_inputs`` as log-ratios (``log p(x)`` a
    log-mean-exp), all in float64.  A consequence worth knowing: for a fixed target model
    the score is a monotone function of ``r_x``, so the population only affects the ranking
    of one model's candidates through the discrete score's ties; across the models of a
    pool it calibrates each model's ratios.
    """
    tp = np.asarray(target_p, dtype=np.float64)
    rp = np.asarray(ref_p, dtype=np.float64)
    tz = np.asarray(target_p_pop, dtype=np.float64)
    rz = np.asarray(ref_p_pop, dtype=np.float64)
    if tp.ndim != 1 or rp.ndim != 2 or rp.shape[1] != tp.shape[0]:
        raise ValueError(f"need target_p (N,) and ref_p (K, N); got {tp.shape}, {rp.shape}")
    if tz.ndim != 1 or rz.ndim != 2 or rz.shape[1] != tz.shape[0]:
        raise ValueError(f"need target_p_pop (Z,) and ref_p_pop (K, Z); got {tz.shape}, "
                         f"{rz.shape}")
    if rz.shape[0] != rp.shape[0]:
        raise ValueError(f"ref_p and ref_p_pop have {rp.shape[0]} and {rz.shape[0]} models")
    if rp.shape[0] == 0:
        raise ValueError("need at least one reference model")
    if tz.size == 0:
        raise ValueError("need at least one population point")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a must be in [0, 1], got {a}")
    if strict and continuous:
        raise ValueError("strict=True and continuous=True cannot be combined (the continuous score breaks "
                         "the ties of the non-strict count)")
    if in_mask is not None:
        in_mask = np.asarray(in_mask)
        if in_mask.dtype != bool or in_mask.shape != rp.shape:
            raise ValueError(f"in_mask must be a boolean (K, N) = {rp.shape} array")

    if log_inputs:
        if online:
            lpx, lpz = _log_mean(rp), _log_mean(rz)
        else:
            lpx = _log_offline_p(_log_mean(rp, None if in_mask is None else ~in_mask), a)
            lpz = _log_offline_p(_log_mean(rz), a)
        with np.errstate(invalid="ignore"):
            lrx = tp - lpx
        lrz = np.sort(tz - lpz)
        t = lrx - math.log(gamma)
    else:
        if online:
            px = rp.mean(axis=0)
            pz = rz.mean(axis=0)
        else:
            if in_mask is None:
                p_out = rp.mean(axis=0)
            else:
                out = ~in_mask
                with np.errstate(invalid="ignore", divide="ignore"):
                    p_out = np.sum(rp, axis=0, where=out) / out.sum(axis=0)
            px = 0.5 * ((1.0 + a) * p_out + (1.0 - a))
            pz = 0.5 * ((1.0 + a) * rz.mean(axis=0) + (1.0 - a))
        with np.errstate(invalid="ignore", divide="ignore"):
            rx = tp / px
            rzs = np.sort(tz / pz)
            lrx, lrz = np.log(rx), np.log(rzs)
            t_ratio = rx / gamma
        t = lrx - math.log(gamma)
    nan = np.isnan(t)
    with np.errstate(invalid="ignore"):
        if log_inputs:
            counts = np.searchsorted(lrz, np.where(nan, 0.0, t), side="left" if strict else "right")
        else:
            counts = np.searchsorted(rzs, np.where(nan, 0.0, t_ratio), side="left" if strict else "right")
    score = counts.astype(np.float64)
    if continuous:
        score += _within_bracket(t, lrz, counts)
    score /= float(tz.size)
    score[nan] = np.nan
    return score


def _within_bracket(t: np.ndarray, lrz: np.ndarray, c: np.ndarray) -> np.ndarray:
    """RMIA's continuous tie-break ``g`` in [0, 1) (see :func:`rmia_scores`)."""
    z = lrz.size
    lo = lrz[np.clip(c - 1, 0, z - 1)]
    hi = lrz[np.clip(c, 0, z - 1)]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        inner = (t - lo) / (hi - lo)
        below = np.exp(t - lrz[0])
        above = -np.expm1(lrz[-1] - t)
        g = np.where(c <= 0, below, np.where(c >= z, above, inner))
    # degenerate brackets (an infinite or equal neighbour, or a log-ratio rounding outside the
    # bracket the ratios put it in): fall back to the discrete score there
    g = np.where(np.isfinite(g) & (g >= 0) & (g < 1), g, 0.0)
    return g
