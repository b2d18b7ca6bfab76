"""Membership metrics from ``<run>/mia_scores.npz``, pooled over seeds and split by member subsets.

Shared by ``scripts/demem_summary.py --issue19`` and ``scripts/cfat_table.py --split`` (the
issue-19 evidence).  Everything is recomputed from the saved scores with cfbench's own metric
functions (``cfbench.mia.metrics``: Hanley-McNeil AUC intervals, Clopper-Pearson TPR intervals,
the support rule FPR >= 10 / N_out), never inside the ``mia`` evaluator.

* :func:`seed_pool` -- one recipe's runs of several seeds as one pool: the target row of each
  seed's pooled score matrix (``pooled.<A>`` row 0: the target attacked with the K reference
  models as references) and the K reference-model rows of the *first* seed's file (the
  reference models are the same for every seed: the cache is keyed by the recipe, not the
  seed; their rows differ slightly between files only through the target used among their
  references).  Trials = (seeds + K) x pool.
* :func:`split_metrics` -- TPR at FPR and AUC of a subset of the member trials against *all*
  non-member trials (the threshold is set on the non-members only, so the subsets share it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cfbench.mia import metrics as M


def dataset_of(rec: dict):
    """The dataset name of a run record (``config.dataset`` is a name or a ``{"name": ...}`` dict)."""
    ds = rec.get("config", {}).get("dataset")
    return ds.get("name") if isinstance(ds, dict) else ds


def finished_records(folder: Path, dataset: str | None = None) -> list[tuple[Path, dict]]:
    """``(run folder, record)`` of every finished (status ok) run of ``dataset`` (None: of every
    dataset) in ``folder``, in folder order; an unreadable record is reported on stderr and skipped."""
    import sys

    runs = []
    for f in sorted(Path(folder).glob("*/record.json")):
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            print(f"skipping {f}: {exc}", file=sys.stderr)
            continue
        if r.get("status") == "ok" and (dataset is None or dataset_of(r) == dataset):
            runs.append((f.parent, r))
    return runs


def value(m, key):
    """The value of a record's metric ``key`` (a ``{"value": ...}`` entry or a bare number)."""
    v = m.get(key)
    return v.get("value") if isinstance(v, dict) else v


def fmt_mean_sd(xs, k=100, nd=1) -> str:
    """``mean ± sample std`` of ``xs`` (Nones dropped) scaled by ``k``; "n/a" if empty."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    sd = np.std(xs, ddof=1) if len(xs) > 1 else 0.0
    return f"{k * np.mean(xs):.{nd}f} ± {k * sd:.{nd}f}"


def load(run: Path):
    rec = json.loads((run / "record.json").read_text())
    return rec, np.load(run / "mia_scores.npz")


def seed_pool(runs: list[Path], attack: str = "rmia_online"):
    """``(scores, in_pool, owners)`` of the combined pool: (S + K, P) arrays; ``owners[j]`` =
    ("target", run) or ("reference", i)."""
    rows, ins, owners = [], [], []
    ref_rows = None
    for run in runs:
        _, z = load(run)
        s, inp = z[f"pooled.{attack}"], z["in_pool"].astype(bool)
        rows.append(s[0])
        ins.append(inp[0])
        owners.append(("target", run))
        if ref_rows is None:
            ref_rows = (s[1:], inp[1:])
    if ref_rows is not None:
        rows.extend(ref_rows[0])
        ins.extend(ref_rows[1])
        owners.extend(("reference", i) for i in range(len(ref_rows[0])))
    return np.stack(rows), np.stack(ins), owners


def _flat(scores, labels, keep=None):
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels, dtype=bool).ravel()
    ok = np.isfinite(s) if keep is None else (np.isfinite(s) & np.asarray(keep, dtype=bool).ravel())
    return s[ok], y[ok]


def pooled_metrics(scores, in_pool, fprs, confidence=0.95) -> dict:
    s, y = _flat(scores, in_pool)
    out = M.summarize(s, y, fprs, confidence=confidence, n_points=2)
    out["n_in"], out["n_out"] = int(y.sum()), int((~y).sum())
    return out


def split_metrics(scores, in_pool, subset, fprs, confidence=0.95) -> dict:
    """Metrics of the member trials in ``subset`` (same shape as ``in_pool``) against all
    non-member trials."""
    keep = (~np.asarray(in_pool, dtype=bool)) | np.asarray(subset, dtype=bool)
    s, y = _flat(scores, in_pool, keep)
    out = M.summarize(s, y, fprs, confidence=confidence, n_points=2)
    out["n_in"], out["n_out"] = int(y.sum()), int((~y).sum())
    return out


def fmt_tpr(entry) -> str:
    if entry is None or entry.get("value") is None:
        return "n/a"
    return f"{100 * entry['value']:.2f} [{100 * entry['ci_low']:.2f}, {100 * entry['ci_high']:.2f}]"


def fmt_auc(entry) -> str:
    if entry is None or entry.get("value") is None:
        return "n/a"
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
