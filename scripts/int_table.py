"""Markdown tables of the Int evidence (docs/int.md) from the run records of a folder.

    .venv/bin/python scripts/int_table.py [runs-evidence-int] [digits | fashion-mnist]

One row per defense (int-at variants by name): clean and AutoAttack accuracy (training eps),
robust accuracy under PGD-200 across the ``interpretation`` evaluator's eps grid,
interpretation robustness (Kendall tau / top-k overlap under the top-k AAI attack and under
PGD, over unchanged predictions and over all images) and membership leakage (the ``mia``
evaluator: the primary pooled attack, RMIA online, AUC and TPR at 1% FPR; the target-only loss
and robust-loss threshold AUCs).  Values in percent where they are rates; [low, high] = 95%
intervals as recorded (Clopper-Pearson, t, Hanley-McNeil).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def val(m, key, pct=True, ci=False, nd=1):
    x = m.get(key)
    if isinstance(x, dict):
        v, lo, hi = x.get("value"), x.get("ci_low"), x.get("ci_high")
    else:
        v, lo, hi = x, None, None
    if v is None:
        return "n/a"
    f = 100 if pct else 1
    s = f"{v * f:.{nd}f}"
    if ci and lo is not None and hi is not None:
        s += f" [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"
    return s


def label(rec):
    d = rec["config"]["defense"]
    if d["name"] == "int-at":
        return d["params"]["variant"]
    return d["name"]


def main(argv):
    root = Path(argv[1] if len(argv) > 1 else "runs-evidence-int")
    dataset = argv[2] if len(argv) > 2 else "digits"
    recs = []
    for p in sorted(root.glob("*/record.json")):
        r = json.loads(p.read_text())
        if r.get("status") == "ok" and r["config"]["dataset"]["name"] == dataset:
            recs.append(r)
    order = {"int": 0, "int2": 1, "pgd-at": 2, "trades": 3, "erm": 4}
    recs.sort(key=lambda r: order.get(label(r), 9))
    if not recs:
        print(f"no finished {dataset} runs in {root}")
        return 1
    c = recs[0]["config"]
    print(f"{dataset}, model {c['model']['name']}, {c['threat']['norm']} eps = {c['threat']['eps']} "
          f"(training and AutoAttack), runs: {', '.join(r['run_id'] for r in recs)}\n")
    grid = sorted({float(k.rsplit("robust_accuracy.", 1)[1]) for r in recs for k in r["metrics"]
                   if k.startswith("interpretation.robust_accuracy.")})
    print("| defense | clean | AutoAttack | " + " | ".join(f"PGD-200 {e:g}" for e in grid) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in grid) + " |")
    for r in recs:
        m = r["metrics"]
        cells = [val(m, f"interpretation.robust_accuracy.{e:.6g}") for e in grid]
        print(f"| {label(r)} | {val(m, 'clean.accuracy', ci=True)} | {val(m, 'robust.autoattack.accuracy', ci=True)} | "
              + " | ".join(cells) + " |")
    print()
    print("| defense | AAI unchanged | AAI tau | AAI top-k | AAI tau (all) | AAI top-k (all) | "
          "PGD unchanged | PGD tau | PGD top-k | PGD tau (all) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recs:
        m = r["metrics"]
        a, e = "interpretation.aai.", "interpretation.evasion."
        print(f"| {label(r)} | {val(m, a + 'unchanged')} | {val(m, a + 'kendall_tau', False, True, 3)} | "
              f"{val(m, a + 'topk_overlap', False, False, 3)} | {val(m, a + 'kendall_tau_all', False, True, 3)} | "
              f"{val(m, a + 'topk_overlap_all', False, False, 3)} | {val(m, e + 'unchanged')} | "
              f"{val(m, e + 'kendall_tau', False, True, 3)} | {val(m, e + 'topk_overlap', False, False, 3)} | "
              f"{val(m, e + 'kendall_tau_all', False, True, 3)} |")
    print()
    print("| defense | train acc | gap | MIA primary AUC (pooled RMIA online) | TPR @ 1% FPR | loss AUC (target) | "
          "robust-loss AUC (target) | best AUC (target, selection-biased) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in recs:
        m = r["metrics"]
        best = m.get("mia.best.auc") or {}
        print(f"| {label(r)} | {val(m, 'clean.train_accuracy')} | {val(m, 'clean.generalization_gap')} | "
              f"{val(m, 'mia.primary.auc', ci=True)} | {val(m, 'mia.primary.tpr_at_fpr.0.01', ci=True)} | "
              f"{val(m, 'mia.loss.auc', ci=True)} | {val(m, 'mia.robust_loss.auc', ci=True)} | "
              f"{val(m, 'mia.best.auc')} ({best.get('attack')}) |")
    print()
    print("| defense | train s | eval s | interpretation eval s |")
    print("| --- | --- | --- | --- |")
    for r in recs:
        t = r.get("timings", {})
        print(f"| {label(r)} | {t.get('train', 0):.0f} | {t.get('total', 0) - t.get('train', 0):.0f} | "
              f"{t.get('eval.interpretation', 0):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
