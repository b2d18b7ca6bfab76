"""``cfbench compare A B [C ...]``: differences between runs, with paired intervals.

Each argument is a run (a run folder, or a run id under ``--runs``) or a comma-separated
list of runs of one recipe over several seeds.  The first argument is the baseline; every
other is compared with it:

clean accuracy, robust accuracy (AutoAttack, else PGD)
    With one run per side: a **paired bootstrap over the same test examples**
    (``scipy.stats.bootstrap``, ``paired=True``, percentile method, 2,000 resamples, seed 0)
    of the difference of accuracies, from the per-example outcomes each run stored in
    ``per_example.npz`` (``clean.correct``, ``robust.autoattack.robust``,
    ``robust.pgd.robust``) -- the runs must share their test split (the split's sha256 is
    checked).  Runs without per-example outcomes get an unpaired interval from the two
    proportions (Newcombe's hybrid score interval), labelled so.
membership leakage
    The AUC and the TPR at the lowest FPR both runs' non-member counts support (at least
    ``MIN_NEGATIVES_PER_FPR / FPR`` non-members, the rule of :mod:`cfbench.mia.metrics` if it
    defines one) of one attack -- ``--attack``, else the protocol's primary attack when the
    record names one, else the strongest by AUC in the baseline (labelled selection-biased)
    -- from ``mia_scores.npz``; paired bootstrap over the pool's examples when both runs
    scored the same pool with the same members, otherwise unpaired (independent resamples).
several seeds per side
    The difference of the per-seed means, with a **bootstrap over seeds** (seeds paired by
    their value when both sides have the same seeds; percentile, 2,000 resamples) -- with 3
    seeds this interval is crude, and the table says how many seeds it rests on.

Every interval is a 95% interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..store import PER_EXAMPLE, RECORD, read_record

CONFIDENCE = 0.95
RESAMPLES = 2000
#: a TPR at FPR f needs at least this many false positives' worth of non-members (n_neg * f >= 10)
MIN_NEGATIVES_PER_FPR = 10
FPRS = (0.1, 0.05, 0.02, 0.01, 0.001, 0.0001)


# -- loading ------------------------------------------------------------------------------

def resolve_run(arg: str, runs: str | Path | None) -> Path:
    p = Path(arg)
    if (p / RECORD).exists():
        return p
    if runs is not None and (Path(runs) / arg / RECORD).exists():
        return Path(runs) / arg
    raise UsageError(f"{arg!r} is not a run folder" + (f" nor a run id under {str(runs)!r}" if runs else "")
                     + " (a folder with record.json; pass --runs DIR for run ids).")


def _load(run: Path) -> dict[str, Any]:
    rec = read_record(run)
    if not isinstance(rec, dict) or rec.get("status") != "ok":
        raise UsageError(f"{run} is not a finished run (status {rec.get('status') if isinstance(rec, dict) else '?'}).")
    per = {}
    if (run / PER_EXAMPLE).exists():
        with np.load(run / PER_EXAMPLE, allow_pickle=False) as z:
            per = {k: z[k] for k in z.files}
    mia = None
    if (run / "mia_scores.npz").exists():
        with np.load(run / "mia_scores.npz", allow_pickle=False) as z:
            mia = {k: z[k] for k in z.files}
    return {"path": run, "record": rec, "per": per, "mia": mia}


def _value(rec: dict, key: str) -> float | None:
    m = rec.get("metrics", {}).get(key)
    v = m.get("value") if isinstance(m, dict) else m
    return float(v) if isinstance(v, (int, float)) else None


def _test_sha(rec: dict) -> Any:
    sp = rec.get("splits") or {}
    return sp.get("test_sha256") or sp.get("test_idx_sha256") or json.dumps(sp.get("test"), sort_keys=True)


# -- statistics ---------------------------------------------------------------------------

def paired_bootstrap(a: np.ndarray, b: np.ndarray, stat) -> tuple[float, float, float]:
    """``stat(b) - stat(a)`` and its percentile interval, resampling example indices jointly."""
    from scipy import stats

    def diff(i):
        i = np.asarray(i, dtype=int)
        return stat(b[i]) - stat(a[i])

    idx = np.arange(len(a))
    res = stats.bootstrap((idx,), diff, vectorized=False, paired=False, n_resamples=RESAMPLES,
                          confidence_level=CONFIDENCE, method="percentile", random_state=0)
    return diff(idx), float(res.confidence_interval.low), float(res.confidence_interval.high)


def unpaired_bootstrap(a: np.ndarray, b: np.ndarray, stat) -> tuple[float, float, float]:
    from scipy import stats

    res = stats.bootstrap((a, b), lambda x, y: stat(y) - stat(x), vectorized=False, n_resamples=RESAMPLES,
                          confidence_level=CONFIDENCE, method="percentile", random_state=0)
    return stat(b) - stat(a), float(res.confidence_interval.low), float(res.confidence_interval.high)


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p2 - p1 with Newcombe's hybrid score interval (method 10), from two Wilson intervals."""
    from scipy import stats

    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)

    def wilson(k, n):
        p = k / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return p, c - h, c + h

    p1, l1, u1 = wilson(k1, n1)
    p2, l2, u2 = wilson(k2, n2)
    d = p2 - p1
    return d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def seed_bootstrap(a: Sequence[float], b: Sequence[float], paired: bool) -> tuple[float, float, float]:
    """Difference of means over seeds with a percentile bootstrap over seeds."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if paired:
        return paired_bootstrap(a, b, np.mean) if len(a) > 1 else (float(b[0] - a[0]), math.nan, math.nan)
    if len(a) < 2 or len(b) < 2:
        return float(b.mean() - a.mean()), math.nan, math.nan
    return unpaired_bootstrap(a, b, np.mean)


def _auc(scores: np.ndarray, member: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if member.all() or (~member).all():
        return math.nan
    return float(roc_auc_score(member, scores))


def tpr_at(scores: np.ndarray, member: np.ndarray, fpr: float) -> float:
    """TPR at the threshold whose FPR is at most ``fpr`` (ties count as positive only above it)."""
    neg = np.sort(scores[~member])[::-1]
    k = int(math.floor(fpr * len(neg)))
    thr = neg[k] if k < len(neg) else -np.inf       # strictly above the (k+1)-th largest negative
    return float(np.mean(scores[member] > thr))


def lowest_supported_fpr(n_neg: int) -> float | None:
    ok = [f for f in FPRS if n_neg * f >= MIN_NEGATIVES_PER_FPR]
    return min(ok) if ok else None


# -- comparisons --------------------------------------------------------------------------

def _pick_attack(runs: list[dict], attack: str | None) -> tuple[str | None, str]:
    if attack:
        return attack, "named with --attack"
    rec = runs[0]["record"]
    notes = (rec.get("notes") or {}).get("mia") or {}
    primary = notes.get("primary_attack") or (notes.get("protocol") or {}).get("primary_attack")
    if primary:
        return primary, "the protocol's primary attack"
    best = (rec.get("metrics") or {}).get("mia.best.auc")
    if isinstance(best, dict) and best.get("attack"):
        return best["attack"], "strongest by AUC in the baseline (selection-biased)"
    mia = runs[0]["mia"]
    if mia is not None and "attacks" in mia:
        return str(mia["attacks"][0]), "first attack in the scores file"
    return None, "no membership scores"


def compare_accuracy(A: list[dict], B: list[dict], metric: str, flag: str) -> dict[str, Any] | None:
    va = [_value(r["record"], metric) for r in A]
    vb = [_value(r["record"], metric) for r in B]
    if any(v is None for v in va + vb):
        return None
    row: dict[str, Any] = {"metric": metric, "a": float(np.mean(va)), "b": float(np.mean(vb)),
                           "seeds": (len(A), len(B))}
    if len(A) == 1 and len(B) == 1:
        fa, fb = A[0]["per"].get(flag), B[0]["per"].get(flag)
        if fa is not None and fb is not None and len(fa) == len(fb) \
                and _test_sha(A[0]["record"]) == _test_sha(B[0]["record"]):
            d, lo, hi = paired_bootstrap(fa.astype(float), fb.astype(float), np.mean)
            row.update(diff=d, lo=lo, hi=hi, n=len(fa), how="paired bootstrap over the same test examples")
        else:
            ma, mb = A[0]["record"]["metrics"][metric], B[0]["record"]["metrics"][metric]
            ka, na = round(ma["value"] * ma["n"]), ma["n"]
            kb, nb = round(mb["value"] * mb["n"]), mb["n"]
            d, lo, hi = newcombe(ka, na, kb, nb)
            row.update(diff=d, lo=lo, hi=hi, n=(na, nb), how="unpaired (Newcombe; no per-example outcomes)")
    else:
        paired = sorted(r["record"]["config"]["seed"] for r in A) == sorted(r["record"]["config"]["seed"] for r in B)
        order = lambda rs: sorted(rs, key=lambda r: r["record"]["config"]["seed"])  # noqa: E731
        d, lo, hi = seed_bootstrap([_value(r["record"], metric) for r in order(A)],
                                   [_value(r["record"], metric) for r in order(B)], paired)
        row.update(diff=d, lo=lo, hi=hi, n=(len(A), len(B)),
                   how=f"bootstrap over seeds ({'paired by seed' if paired else 'unpaired'})")
    return row


def compare_leakage(A: list[dict], B: list[dict], attack: str) -> list[dict[str, Any]]:
    rows = []
    if len(A) != 1 or len(B) != 1 or A[0]["mia"] is None or B[0]["mia"] is None:
        return rows
    ma, mb = A[0]["mia"], B[0]["mia"]
    key = f"score.{attack}"
    if key not in ma or key not in mb:
        return rows
    sa, sb = ma[key].astype(float), mb[key].astype(float)
    mem_a, mem_b = ma["member"].astype(bool), mb["member"].astype(bool)
    ok_a, ok_b = np.isfinite(sa), np.isfinite(sb)
    same_pool = ("pool_idx" in ma and "pool_idx" in mb and np.array_equal(ma["pool_idx"], mb["pool_idx"])
                 and np.array_equal(mem_a, mem_b))
    fpr = lowest_supported_fpr(min(int((~mem_a).sum()), int((~mem_b).sum())))
    stats_ = [("auc", lambda s, m: _auc(s, m), "AUC")]
    if fpr is not None:
        stats_.append((f"tpr@{fpr:g}", lambda s, m, f=fpr: tpr_at(s, m, f), f"TPR at {100 * fpr:g}% FPR"))
    for name, fn, label in stats_:
        if same_pool:
            keep = ok_a & ok_b
            pair = np.stack([sa[keep], mem_a[keep].astype(float)], 1), np.stack([sb[keep], mem_b[keep].astype(float)], 1)

            def stat(z, fn=fn):
                return fn(z[:, 0], z[:, 1].astype(bool))

            d, lo, hi = paired_bootstrap(pair[0], pair[1], stat)
            how = "paired bootstrap over the same pool examples"
            n = int(keep.sum())
        else:
            za = np.stack([sa[ok_a], mem_a[ok_a].astype(float)], 1)
            zb = np.stack([sb[ok_b], mem_b[ok_b].astype(float)], 1)
            d, lo, hi = unpaired_bootstrap(za, zb, lambda z, fn=fn: fn(z[:, 0], z[:, 1].astype(bool)))
            how = "unpaired bootstrap (different pools)"
            n = (int(ok_a.sum()), int(ok_b.sum()))
        rows.append({"metric": f"mia.{attack}.{name}", "label": f"{label} ({attack})",
                     "a": fn(sa[ok_a], mem_a[ok_a]), "b": fn(sb[ok_b], mem_b[ok_b]), "diff": d, "lo": lo, "hi": hi,
                     "n": n, "how": how, "seeds": (1, 1)})
    return rows


def compare(args: Sequence[str], *, runs: str | Path | None = None, attack: str | None = None) -> dict[str, Any]:
    if len(args) < 2:
        raise UsageError("cfbench compare needs at least two runs (or comma-separated run lists): A B [C ...].")
    groups = [[_load(resolve_run(x.strip(), runs)) for x in arg.split(",") if x.strip()] for arg in args]
    base = groups[0]
    chosen, why = _pick_attack(base, attack)
    out = {"baseline": [str(r["path"]) for r in base], "attack": chosen, "attack_choice": why,
           "confidence": CONFIDENCE, "comparisons": []}
    for other in groups[1:]:
        rows = []
        for metric, flag in (("clean.accuracy", "clean.correct"),
                             ("robust.autoattack.accuracy", "robust.autoattack.robust"),
                             ("robust.pgd.accuracy", "robust.pgd.robust")):
            r = compare_accuracy(base, other, metric, flag)
            if r is not None:
                rows.append(r)
        if chosen:
            rows += compare_leakage(base, other, chosen)
        out["comparisons"].append({"runs": [str(r["path"]) for r in other], "rows": rows})
    return out


def _f(v: Any, pct: bool) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:+.2f}" if pct else f"{v:+.4f}"


def render(result: dict[str, Any]) -> str:
    lines = [f"baseline: {', '.join(result['baseline'])}",
             f"leakage attack: {result['attack']} ({result['attack_choice']}); intervals: "
             f"{int(100 * result['confidence'])}%"]
    for comp in result["comparisons"]:
        lines.append("")
        lines.append(f"vs {', '.join(comp['runs'])}")
        head = ["metric", "baseline", "other", "other - baseline", "interval", "n", "how"]
        table = [head]
        for r in comp["rows"]:
            pct = not r["metric"].endswith(".auc")
            fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4f}")
            table.append([r.get("label", r["metric"]), fmt(r["a"]), fmt(r["b"]), _f(r["diff"], pct),
                          f"[{_f(r['lo'], pct)}, {_f(r['hi'], pct)}]", str(r["n"]), r["how"]])
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)
