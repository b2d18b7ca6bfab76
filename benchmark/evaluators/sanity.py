"""Sanity checks of a robustness evaluation: named flags that gradient masking cannot hide.

After Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry & Kurakin,
"On evaluating adversarial robustness" (arXiv 1902.06705, 2019), section 5 ("Analysis
checks") and AutoAttack's own ``checks.py`` (Croce & Hein 2020).  Each check that fails
becomes a **named flag** in the run record (``record["flags"]``, one entry per name)::

    {"name": "pgd_autoattack_gap", "evaluators": ["autoattack"],
     "message": "PGD 94.0% vs AutoAttack 51.5% on the same 200 examples ...",
     "evidence": {...numbers the rule was applied to...}}

and every check that ran, flagged or not, is listed with its evidence in the evaluator's
notes (``notes["robust.<evaluator>"]["sanity"]``).  The run summary, the run report and every
leaderboard format show the flags; a flagged leaderboard row is marked and kept off the
Pareto front unless ``cfbench leaderboard --include-flagged`` (docs/robustness.md).

The checks (name: rule; the reason it catches masking):

``pgd_autoattack_gap``
    PGD's robust accuracy exceeds AutoAttack's **on the same examples** by more than
    ``max_pgd_gap`` (default 5 points) beyond its sampling interval: the lower end of the
    exact paired 95% interval of the difference (:func:`paired_difference`) is above
    ``max_pgd_gap``.  A sound defense loses a few points from PGD-20 to AutoAttack (Croce &
    Hein 2020 report 0.5-3 points for Madry et al. and TRADES); a masked one loses tens.
``eps_sweep``
    robust accuracy does not fall as eps grows (Carlini et al. 5.4: "increasing the distortion
    bound should increase attack success"): PGD at ``SWEEP_FACTORS`` x eps on the same
    examples; flagged when the accuracy at a larger eps exceeds that at a smaller one beyond
    the paired interval, or when at the largest eps more than ``SWEEP_MAX_RATIO`` of the
    examples robust at the run's eps are still robust (a sound model falls to ~0 at 4 eps).
``gradient_free_beats_whitebox``
    a gradient-free attack (AutoAttack's Square; SPSA or Square in the ``attacks`` zoo) breaks
    examples that every white-box attack before it missed, more than ``max_gain`` of the
    evaluated examples (lower end of the Clopper-Pearson interval of that fraction above it --
    AutoAttack's own quantity, the drop in robust accuracy Square causes; Carlini et al. 5.2:
    "black-box attacks should not beat white-box ones").  This replaces AutoAttack's
    own ``check_square_sr``, whose fixed 0.2% margin is less than one example at n = 200.
``vanishing_gradients``
    the input gradient of the cross-entropy is (numerically) zero -- L1 norm at most
    ``ZERO_GRAD_TOL`` -- for more than ``ZERO_GRAD_FRACTION`` of the correctly classified
    examples (Carlini et al. 5.3; AutoAttack's ``check_zero_gradients``).  Saturated softmax
    (scaled logits) and non-differentiable input transforms (rounding) give exact zeros.
``randomized_forward``
    two forward passes of the same batch in eval mode differ (AutoAttack's
    ``check_randomized``).  Then EOT is required, and used: the PGD evaluator averages the
    gradient over ``eot_samples`` draws per step (Athalye et al. 2018), AutoAttack switches
    from version ``standard`` to ``rand`` (APGD-CE and APGD-DLR with 20 EOT iterations), the
    zoo's EOT-PGD is part of its list.  The flag stays: a randomised defense needs a careful,
    adaptive evaluation beyond this harness.
``autoattack.<check>``
    any other warning of AutoAttack's own checks (probability output instead of logits,
    dynamic forward, too many target classes), one flag per kind.

The thresholds are module constants or evaluator parameters; changing one changes the
results of the evaluators that use it, so their ``version`` moves with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..mia.metrics import clopper_pearson
from ..store.record import autoattack_flag_name

#: the named checks and what each flag means (docs/robustness.md; shown by reports)
CHECKS: dict[str, str] = {
    "pgd_autoattack_gap": "PGD's robust accuracy exceeds AutoAttack's on the same examples beyond the tolerance and "
                          "its sampling interval",
    "eps_sweep": "robust accuracy does not fall as the radius grows",
    "gradient_free_beats_whitebox": "a gradient-free attack breaks examples every white-box attack missed",
    "vanishing_gradients": "the input gradient is zero for many correctly classified examples",
    "randomized_forward": "two forward passes of the same input differ (EOT required and used)",
    "autoattack.probability_output": "AutoAttack: the model seems to output probabilities, not logits",
    "autoattack.dynamic": "AutoAttack: the forward pass computes gradients (dynamic defense)",
    "autoattack.n_classes": "AutoAttack: too many target classes for the number of classes",
    "autoattack.other": "AutoAttack: another warning of its checks",
}

CONFIDENCE = 0.95
#: examples the model-level checks use (the first of the test split, as AutoAttack's)
SANITY_N = 200
#: an input gradient with L1 norm at most this is "zero" (float32 underflow of a saturated softmax)
ZERO_GRAD_TOL = 1e-20
#: more than this fraction of correctly classified examples with zero gradient is flagged
ZERO_GRAD_FRACTION = 0.10
#: the eps sweep: multiples of the run's eps (capped at the largest useful radius)
SWEEP_FACTORS = (0.5, 1.0, 2.0, 4.0)
#: at the largest sweep radius, more than this fraction of the examples robust at eps still robust is flagged
SWEEP_MAX_RATIO = 0.5
#: ... when at least this many examples are robust at the run's eps (fewer say nothing)
SWEEP_MIN_ROBUST = 10


# ------------------------------------------------------------------------------ flags
def flag(name: str, evaluator: str, message: str, evidence: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One flag as it is stored in ``record["flags"]``."""
    if name not in CHECKS:
        raise ValueError(f"unknown sanity flag {name!r}; valid choices: {', '.join(CHECKS)}")
    return {"name": name, "evaluators": [evaluator], "message": message, "evidence": dict(evidence or {})}


def merge_flags(flags: list[dict[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``flags`` with ``new`` added, one entry per name: a flag raised again by another
    evaluator adds that evaluator (and its message, if different) to the first entry."""
    by_name = {f["name"]: f for f in flags}
    for f in new:
        old = by_name.get(f["name"])
        if old is None:
            entry = {"name": f["name"], "evaluators": list(f.get("evaluators") or []),
                     "message": f.get("message", ""), "evidence": dict(f.get("evidence") or {})}
            flags.append(entry)
            by_name[f["name"]] = entry
            continue
        for ev in f.get("evaluators") or []:
            if ev not in old["evaluators"]:
                old["evaluators"].append(ev)
                if f.get("message") and f["message"] != old["message"]:
                    old.setdefault("also", []).append({"evaluator": ev, "message": f["message"],
                                                       "evidence": dict(f.get("evidence") or {})})
    return flags


def flag_names(record: Mapping[str, Any]) -> list[str]:
    """The names of a record's flags, sorted (``[]`` for none)."""
    return sorted({f.get("name") for f in (record.get("flags") or []) if isinstance(f, Mapping) and f.get("name")})


def autoattack_flag(message: str, evaluator: str = "autoattack") -> dict[str, Any] | None:
    """The named flag of one of pyautoattack's check warnings (None for the Square check,
    which :func:`check_gradient_free` replaces with an interval-based rule)."""
    name = autoattack_flag_name(message)
    if name is None:
        return None
    return flag(name, evaluator, f"AutoAttack: {message}", {"source": "pyautoattack.checks"})


# --------------------------------------------------------------------------- statistics
def paired_difference(a: torch.Tensor, b: torch.Tensor, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """mean(a) - mean(b) for paired 0/1 outcomes on the same examples, with an exact interval.

    With n10 = #(a and not b), n01 = #(b and not a) and m = n10 + n01 discordant pairs, the
    difference is (n10 - n01) / n = m (2 pi - 1) / n with pi = n10 / m.  Conditional on m,
    n10 ~ Binomial(m, pi) (the exact McNemar setting); the Clopper-Pearson interval of pi
    maps to the interval of the difference.  No discordant pair: difference 0, interval [0, 0]
    (the two attacks agree on every example).
    """
    a, b = a.bool().flatten(), b.bool().flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = int(a.numel())
    n10 = int((a & ~b).sum())
    n01 = int((b & ~a).sum())
    m = n10 + n01
    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0, "n10": 0, "n01": 0}
    if m == 0:
        return {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": n, "n10": 0, "n01": 0}
    lo, hi = clopper_pearson(n10, m, confidence)
    return {"value": (n10 - n01) / n, "ci_low": float(m * (2 * lo - 1) / n), "ci_high": float(m * (2 * hi - 1) / n),
            "n": n, "n10": n10, "n01": n01}


def rate_lower_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """Lower end of the Clopper-Pearson interval of k / n (0 when n = 0)."""
    return 0.0 if n == 0 else float(clopper_pearson(int(k), int(n), confidence)[0])


# ------------------------------------------------------------------------------ checks
def check_gap(pgd_robust: torch.Tensor, aa_robust: torch.Tensor, max_gap: float, evaluator: str = "autoattack",
              pgd_label: str = "PGD") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``pgd_autoattack_gap``: (evidence, flag or None) from per-example robustness under PGD
    and AutoAttack on the same examples."""
    d = paired_difference(pgd_robust, aa_robust)
    n = d["n"]
    ev = {"n": n, "pgd_accuracy": float(pgd_robust.float().mean()) if n else None,
          "autoattack_accuracy": float(aa_robust.float().mean()) if n else None, "gap": d, "max_gap": max_gap,
          "pgd": pgd_label}
    ev["flagged"] = bool(n and d["ci_low"] > max_gap)
    fl = None
    if ev["flagged"]:
        fl = flag("pgd_autoattack_gap", evaluator,
                  f"{pgd_label} robust accuracy {100 * ev['pgd_accuracy']:.1f}% vs AutoAttack "
                  f"{100 * ev['autoattack_accuracy']:.1f}% on the same {n} examples: gap "
                  f"{100 * d['value']:.1f} points [{100 * d['ci_low']:.1f}, {100 * d['ci_high']:.1f}], beyond the "
                  f"{100 * max_gap:g}-point tolerance -- PGD is misled (gradient masking?)", ev)
    return ev, fl


def check_gradient_free(n_broken_only_free: int, n_robust_before: int, n: int, max_gain: float, *,
                        attack: str, evaluator: str, whitebox: Sequence[str]) -> tuple[dict[str, Any],
                                                                                      dict[str, Any] | None]:
    """``gradient_free_beats_whitebox``: ``n_broken_only_free`` of the ``n`` examples were broken
    by the gradient-free ``attack`` and by none of the ``whitebox`` attacks (``n_robust_before``
    were robust against all of those)."""
    lo = rate_lower_bound(n_broken_only_free, n)
    ev = {"attack": attack, "whitebox": list(whitebox), "broken_only_by_gradient_free": int(n_broken_only_free),
          "robust_against_whitebox": int(n_robust_before), "n": int(n),
          "gain": n_broken_only_free / n if n else None, "gain_ci_low": lo, "max_gain": max_gain}
    ev["flagged"] = bool(n and lo > max_gain)
    fl = None
    if ev["flagged"]:
        fl = flag("gradient_free_beats_whitebox", evaluator,
                  f"gradient-free {attack} broke {n_broken_only_free} of the {n_robust_before} examples that "
                  f"{', '.join(whitebox)} left robust ({100 * n_broken_only_free / n:.1f}% of {n}; lower 95% bound "
                  f"{100 * lo:.1f}% > {100 * max_gain:g}%) -- the gradients mislead the white-box attacks", ev)
    return ev, fl


def check_sweep(points: Sequence[tuple[float, torch.Tensor]], eps: float, evaluator: str,
                labels: torch.Tensor | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``eps_sweep`` from per-example robustness at increasing radii ``points = [(eps_i, robust_i)]``
    (sorted by eps, on the same examples; the run's ``eps`` among them).  With ``labels``, the
    examples still robust at the largest radius are not flagged when they all share one label:
    a model that answers one class everywhere is robust by construction (a degenerate model,
    not a masked one; the clean-accuracy warning speaks for it)."""
    pts = sorted(points, key=lambda p: p[0])
    acc = [{"eps": float(e), "accuracy": float(r.float().mean()), "robust": int(r.sum())} for e, r in pts]
    ev: dict[str, Any] = {"points": acc, "n": int(pts[0][1].numel()) if pts else 0, "max_ratio": SWEEP_MAX_RATIO,
                          "min_robust": SWEEP_MIN_ROBUST}
    problems = []
    for (e0, r0), (e1, r1) in itertools.pairwise(pts):
        d = paired_difference(r1, r0)
        if d["n"] and d["ci_low"] > 0:
            problems.append(f"robust accuracy rises from {100 * float(r0.float().mean()):.1f}% at eps={e0:.4g} to "
                            f"{100 * float(r1.float().mean()):.1f}% at eps={e1:.4g} (beyond its interval)")
    at_eps = next((r for e, r in pts if abs(e - eps) <= 1e-12 * max(1.0, eps)), None)
    e_max, r_max = pts[-1] if pts else (None, None)
    if at_eps is not None and r_max is not None and e_max > eps:
        k = int(at_eps.sum())
        kept = int((r_max & at_eps).sum())
        ev["kept_at_max"] = {"eps": float(e_max), "robust_at_eps": k, "still_robust": kept,
                             "ratio": kept / k if k else None}
        one_class = None
        if labels is not None and kept:
            classes = labels[r_max & at_eps].unique()
            one_class = int(classes[0]) if len(classes) == 1 else None
            ev["kept_at_max"]["one_class"] = one_class
        if k >= SWEEP_MIN_ROBUST and kept > SWEEP_MAX_RATIO * k and one_class is None:
            problems.append(f"{kept} of the {k} examples robust at eps={eps:.4g} are still robust at "
                            f"eps={e_max:.4g} ({100 * kept / k:.0f}% > {100 * SWEEP_MAX_RATIO:.0f}%)")
    ev["flagged"] = bool(problems)
    ev["problems"] = problems
    fl = None
    if problems:
        curve = ", ".join(f"{p['eps']:.4g}: {100 * p['accuracy']:.1f}%" for p in acc)
        fl = flag("eps_sweep", evaluator, "robust accuracy does not fall as eps grows (" + "; ".join(problems)
                  + f"; PGD accuracy by eps: {curve})", ev)
    return ev, fl


def check_gradients(norms: torch.Tensor, evaluator: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``vanishing_gradients`` from the L1 norms of the input gradients of correctly classified examples."""
    n = int(norms.numel())
    zero = int((norms <= ZERO_GRAD_TOL).sum()) if n else 0
    finite = norms[torch.isfinite(norms)]
    ev = {"n": n, "zero": zero, "fraction_zero": zero / n if n else None, "tolerance": ZERO_GRAD_TOL,
          "max_fraction": ZERO_GRAD_FRACTION,
          "median_l1_norm": float(finite.median()) if finite.numel() else None,
          "non_finite": int(n - finite.numel())}
    ev["flagged"] = bool(n and (zero / n > ZERO_GRAD_FRACTION or finite.numel() < n))
    fl = None
    if ev["flagged"]:
        fl = flag("vanishing_gradients", evaluator,
                  f"the input gradient of the cross-entropy is zero (L1 norm <= {ZERO_GRAD_TOL:g}) for {zero} of "
                  f"{n} correctly classified examples ({100 * zero / n:.0f}% > {100 * ZERO_GRAD_FRACTION:.0f}%)"
                  + (f" and non-finite for {ev['non_finite']}" if ev["non_finite"] else "")
                  + " -- gradient-based attacks cannot move from there", ev)
    return ev, fl


# ------------------------------------------------------------------------ model probes
@torch.no_grad()
def forward_randomness(model: torch.nn.Module, x: torch.Tensor, device) -> dict[str, Any]:
    """Two eval-mode forward passes of the same batch: the largest absolute logit difference
    and the number of predictions that changed."""
    model.eval()
    xb = x.to(device)
    a, b = model(xb).float(), model(xb).float()
    diff = (a - b).abs()
    return {"max_abs_diff": float(diff.max()) if diff.numel() else 0.0,
            "changed_predictions": int((a.argmax(1) != b.argmax(1)).sum()), "n": len(x),
            "randomized": bool(diff.numel() and (diff.max() > 0 or not torch.isfinite(diff).all()))}


def input_gradient_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device,
                         batch_size: int = 256) -> torch.Tensor:
    """Per-example L1 norm of d CE(f(x), y) / dx (summed loss, eval mode), on CPU."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).clone().requires_grad_(True)
        yb = y[i:i + batch_size].to(device)
        loss = F.cross_entropy(model(xb), yb, reduction="sum")
        (g,) = torch.autograd.grad(loss, xb)
        out.append(g.detach().flatten(1).abs().sum(1).double().cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def sweep_radii(eps: float, norm: str, dim: int, factors: Sequence[float] = SWEEP_FACTORS) -> list[float]:
    """The sweep's radii: ``factors`` x eps, capped at the radius that reaches every image
    (Linf 1; L2 sqrt(dim)), duplicates removed."""
    cap = 1.0 if norm == "Linf" else float(dim) ** 0.5
    out: list[float] = []
    for f in factors:
        e = min(float(f) * eps, cap)
        if e > 0 and all(abs(e - o) > 1e-12 for o in out):
            out.append(e)
    if all(abs(e - eps) > 1e-12 for e in out):
        out.append(eps)
    return sorted(out)
