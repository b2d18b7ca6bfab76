"""Markdown tables of the cf-at evidence (docs/cf_at.md) from the records written by
scripts/cfat_evidence_*.sh (default folder: runs-cfat/).

    .venv/bin/python scripts/cfat_table.py [runs-cfat] [digits | fashion-mnist]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs-cfat")
DATASET = sys.argv[2] if len(sys.argv) > 2 else "digits"
ATTACKS = ["loss", "confidence", "entropy", "modified_entropy", "loss_class", "confidence_class", "entropy_class",
           "modified_entropy_class", "robust_loss", "robust_confidence", "robust_modified_entropy",
           "lira_online", "lira_online_fixed", "lira_offline", "lira_offline_fixed", "rmia_online", "rmia_offline"]


def v(m, key, pct=True, nd=1):
    x = m.get(key)
    if isinstance(x, dict):
        x = x.get("value")
    if x is None:
        return "n/a"
    return f"{100 * x:.{nd}f}" if pct else f"{x:.{nd}f}"


def ci(m, key):
    x = m.get(key)
    if not isinstance(x, dict) or x.get("value") is None:
        return "n/a"
    return f"{100 * x['value']:.1f} [{100 * x['ci_low']:.1f}, {100 * x['ci_high']:.1f}]"


def label(r):
    d = r["config"]["defense"]
    if d["name"] == "cf-at":
        return f"cf-at p={d['params']['p']:g}"
    return d["name"]


def order(r):
    d = r["config"]["defense"]
    return ({"erm": 0, "pgd-at": 1}.get(d["name"], 2), -(d["params"].get("p", 0)))


def aa_n(r):
    return r["config"]["evaluators"].get("autoattack", {}).get("params", {}).get("n_examples")


recs = []
for f in sorted(ROOT.glob("*/record.json")):
    r = json.loads(f.read_text())
    # the sweep: cf-at, erm and pgd-at of seed 0 (the folder may also hold other studies' runs)
    if (r.get("status") == "ok" and r["config"]["dataset"]["name"] == DATASET and r["config"]["seed"] == 0
            and r["config"]["defense"]["name"] in ("cf-at", "erm", "pgd-at")):
        recs.append(r)
# one protocol: the AutoAttack size of the cf-at runs
ns = [aa_n(r) for r in recs if r["config"]["defense"]["name"] == "cf-at"]
N_AA = max(set(ns), key=ns.count) if ns else None
recs = [r for r in recs if aa_n(r) == N_AA]
recs.sort(key=order)
FPRS = [f for f in ("0.05", "0.02", "0.01", "0.001")
        if any(isinstance(r["metrics"].get(f"mia.best.tpr_at_fpr.{f}"), dict)
               and r["metrics"][f"mia.best.tpr_at_fpr.{f}"].get("value") is not None for r in recs)]

print(f"| defense | clean acc. % | AutoAttack acc. % (n={N_AA}) | train acc. % | best MIA AUC % | best MIA bal. acc. % "
      "| loss-attack bal. acc. % | " + " | ".join(f"best TPR@{100 * float(f):g}% FPR" for f in FPRS)
      + " | train time s | run id |")
print("| --- | --- | --- | --- | --- | --- | --- | " + "--- | " * len(FPRS) + "--- | --- |")
for r in recs:
    m = r["metrics"]
    print(f"| {label(r)} | {ci(m, 'clean.accuracy')} | {ci(m, 'robust.autoattack.accuracy')} | "
          f"{v(m, 'clean.train_accuracy')} | {v(m, 'mia.best.auc')} ({m.get('mia.best.auc', {}).get('attack', '')}) | "
          f"{v(m, 'mia.best.balanced_accuracy')} ({m.get('mia.best.balanced_accuracy', {}).get('attack', '')}) | "
          f"{v(m, 'mia.loss.balanced_accuracy')} | "
          + " | ".join(v(m, f"mia.best.tpr_at_fpr.{f}") for f in FPRS)
          + f" | {r['timings'].get('train', 0):.0f} | `{r['run_id']}` |")

print()
print("AUC % / balanced accuracy % of every attack:")
print()
print("| attack | " + " | ".join(label(r) for r in recs) + " |")
print("| --- |" + " --- |" * len(recs))
for a in ATTACKS:
    cells = [f"{v(r['metrics'], f'mia.{a}.auc')} / {v(r['metrics'], f'mia.{a}.balanced_accuracy')}" for r in recs]
    print(f"| {a} | " + " | ".join(cells) + " |")
print()
print("TPR % at " + " / ".join(f"{100 * float(f):g}%" for f in FPRS)
      + " FPR of every attack (lower FPRs: n/a, fewer than 10 / FPR non-members):")
print()
print("| attack | " + " | ".join(label(r) for r in recs) + " |")
print("| --- |" + " --- |" * len(recs))
for a in ATTACKS:
    cells = [" / ".join(v(r["metrics"], f"mia.{a}.tpr_at_fpr.{f}") for f in FPRS) for r in recs]
    print(f"| {a} | " + " | ".join(cells) + " |")
print()
print("Counterfactual quality (cf-at runs):")
print()
cf = [r for r in recs if r["config"]["defense"]["name"] == "cf-at" and r["config"]["defense"]["params"]["p"] > 0]
keys = [("cf.flip_rate", "flip rate % (generator)", True),
        ("cf.target_flip_rate", "target agrees % (trained-on CFs)", True),
        ("cf.replaced_fraction", "replaced fraction %", True), ("cf.l1", "L1 to x_nn", False),
        ("cf.l2", "L2 to x_nn", False), ("cf.linf", "Linf to x_nn", False), ("cf.l1_to_x", "L1 to x", False),
        ("cf.l2_to_x", "L2 to x", False), ("cf.l2_neighbour_to_x", "L2 x_nn to x", False),
        ("cf.ae_error", "AE error of CFs", False), ("cf.ae_error_data", "AE error of real x", False),
        ("cf.generator.train_accuracy", "generator clf. train acc. %", True),
        ("cf.generation_seconds", "generation s", False)]
print("| metric | " + " | ".join(label(r) for r in cf) + " |")
print("| --- |" + " --- |" * len(cf))
for k, name, pct in keys:
    print(f"| {name} | " + " | ".join(v(r["metrics"], k, pct, 2 if not pct else 1) for r in cf) + " |")
