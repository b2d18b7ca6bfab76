"""Intervals for Song et al.'s metric in VALIDATION row 1: the best-threshold balanced accuracy
of a threshold attack, with the threshold chosen on the evaluated data itself (optimistic, as
Song, Shokri & Mittal 2019 report it), for the committed memorising-protocol runs of
evidence/memorisation-fmnist/ (ERM vs PGD-AT on the same pool, benign loss and adversarial
robust-loss scores from each run's mia_scores.npz).

Interval: scipy's BCa bootstrap, members and non-members resampled independently (stratified,
so every resample keeps the 50/50 split the metric assumes) and the threshold chosen again in
every resample -- the interval covers the selection's optimism as well as sampling noise.  The
difference PGD-AT minus ERM is paired by example (one index resample applied to both runs'
scores: the two runs share the pool, its members and its non-members, checked).

Point estimates are checked against each record's stored value.  Usage (prints a Markdown
table; nothing is written):

    .venv/bin/python scripts/song_intervals.py [evidence/memorisation-fmnist] [resamples]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import roc_curve

SCORES = {"benign (loss)": "score.loss", "adversarial (robust loss)": "score.robust_loss"}


def best_balanced_accuracy(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """max over thresholds of (TPR + TNR) / 2, higher score = member (cfbench's convention)."""
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[member_scores, nonmember_scores])
    return float(0.5 * (1.0 + np.max(tpr - fpr)))


def load(run: Path) -> tuple[dict, dict]:
    rec = json.loads((run / "record.json").read_text())
    z = np.load(run / "mia_scores.npz", allow_pickle=False)
    return rec, {k: z[k] for k in z.files}


def main(root: Path, resamples: int) -> None:
    runs = {}
    for run in sorted(p for p in root.iterdir() if (p / "mia_scores.npz").is_file()):
        rec, z = load(run)
        runs[(rec["config"]["defense"]["name"], rec["splits"]["pool_size"])] = (run, rec, z)
    print("| pool | score | ERM | PGD-AT | PGD-AT − ERM (paired) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for pool in sorted({p for _, p in runs}):
        (_, rec_e, e), (_, rec_p, p) = runs[("erm", pool)], runs[("pgd-at", pool)]
        assert np.array_equal(e["pool_idx"], p["pool_idx"]) and np.array_equal(e["member"], p["member"])
        m, n = np.flatnonzero(e["member"]), np.flatnonzero(~e["member"].astype(bool))
        for label, key in SCORES.items():
            metric = key.removeprefix("score.")
            for rec, z in ((rec_e, e), (rec_p, p)):   # the stored value is this statistic
                want = rec["metrics"][f"mia.{metric}.balanced_accuracy"]["value"]
                got = best_balanced_accuracy(z[key][m], z[key][n])
                assert abs(got - want) < 1e-9, (metric, got, want)

            def one(z):
                return lambda im, jn, axis=-1: best_balanced_accuracy(z[key][m][im], z[key][n][jn])

            def diff(im, jn, axis=-1):
                return one(p)(im, jn) - one(e)(im, jn)

            cells = []
            for stat in (one(e), one(p), diff):
                res = bootstrap((np.arange(len(m)), np.arange(len(n))), stat, vectorized=False, paired=False,
                                n_resamples=resamples, method="BCa", random_state=np.random.default_rng(0))
                lo, hi = res.confidence_interval
                cells.append(f"{100 * stat(np.arange(len(m)), np.arange(len(n))):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                             if stat is diff else
                             f"{100 * stat(np.arange(len(m)), np.arange(len(n))):.1f} [{100 * lo:.1f}, {100 * hi:.1f}]")
            print(f"| {pool:,} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "evidence/memorisation-fmnist"),
         int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
