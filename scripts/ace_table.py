"""Markdown tables of the ACE evidence (docs/ace.md) from the run records of a folder.

    .venv/bin/python scripts/ace_table.py [runs-evidence-ace]

1. counterfactual quality (the ``counterfactual`` evaluator) per target (erm, pgd-at) and
   generator (ace, its pre-explanation, proto-cf, plain PGD), with intervals;
2. the paired differences against plain PGD and against the pre-explanation;
3. cf-at with ACE vs proto-cf counterfactuals: clean, AutoAttack, membership inference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GENS = [("ace", "ACE (refined)"), ("ace.pre", "ACE pre-explanation"), ("proto-cf", "proto-cf"), ("pgd", "plain PGD")]


def val(x):
    return x.get("value") if isinstance(x, dict) else x


def iv(m, key, scale=1.0, nd=2):
    x = m.get(key)
    if x is None or val(x) is None:
        return "n/a"
    if isinstance(x, dict) and x.get("ci_low") is not None:
        return f"{scale * x['value']:.{nd}f} [{scale * x['ci_low']:.{nd}f}, {scale * x['ci_high']:.{nd}f}]"
    return f"{scale * val(x):.{nd}f}"


def records(root: Path):
    out = []
    for f in sorted(root.glob("*/record.json")):
        r = json.loads(f.read_text())
        if r.get("status") == "ok":
            out.append(r)
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs-evidence-ace")
    recs = records(root)
    cf = [r for r in recs if "counterfactual.n" in r["metrics"]]
    for r in cf:
        m = r["metrics"]
        print(f"**{r['config']['defense']['name']}** target (`{r['run_id']}`; clean accuracy "
              f"{iv(m, 'clean.accuracy', 100, 1)} %; n = {m['counterfactual.n']} explained test images; "
              f"feature classifier accuracy on them {iv(m, 'counterfactual.feature_classifier.accuracy', 100, 1)} %; "
              f"FD floor (real vs real) {m['counterfactual.reference.fd']:.2f}; ACE mask fraction "
              f"{iv(m, 'counterfactual.ace.mask_fraction', 100, 1)} %)")
        print()
        print("| generator | flip rate % | L1 | L2 | Linf | sparsity % | FD | COUT | s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for g, name in GENS:
            ns = f"counterfactual.{g}."
            if ns + "flip_rate" not in m:
                continue
            secs = m.get(ns + "seconds")
            print(f"| {name} | {iv(m, ns + 'flip_rate', 100, 1)} | {iv(m, ns + 'l1')} | {iv(m, ns + 'l2')} | "
                  f"{iv(m, ns + 'linf', 1, 3)} | {iv(m, ns + 'sparsity', 100, 1)} | {iv(m, ns + 'fd')} | "
                  f"{iv(m, ns + 'cout', 1, 3)} | {'' if secs is None else f'{secs:.0f}'} |")
        print()
        print("| paired difference (same instances) | L1 | L2 | Linf | sparsity % |")
        print("| --- | --- | --- | --- | --- |")
        for a, b, name in (("ace", "pgd", "ACE − plain PGD"), ("ace.pre", "pgd", "ACE pre-explanation − plain PGD"),
                           ("proto-cf", "pgd", "proto-cf − plain PGD"), ("ace", "ace_pre", "ACE − its pre-explanation")):
            ns = f"counterfactual.{a}."
            if ns + f"l1_minus_{b}" not in m:
                continue
            print(f"| {name} | {iv(m, ns + f'l1_minus_{b}')} | {iv(m, ns + f'l2_minus_{b}')} | "
                  f"{iv(m, ns + f'linf_minus_{b}', 1, 3)} | {iv(m, ns + f'sparsity_minus_{b}', 100, 1)} |")
        print()
    cfat = [r for r in recs if r["config"]["defense"]["name"] == "cf-at"]
    if not cfat:
        return
    fprs = sorted({k.rsplit(".", 2)[0][len("mia.primary.tpr_at_fpr."):] if False else k.split("tpr_at_fpr.")[1]
                   for r in cfat for k in r["metrics"] if k.startswith("mia.primary.tpr_at_fpr.")}, key=float,
                  reverse=True)
    print("| cf-at generator | clean acc. % | AutoAttack acc. % | primary MIA AUC % | primary advantage % | "
          + " | ".join(f"primary TPR@{100 * float(f):g}% FPR %" for f in fprs)
          + " | loss-attack AUC % | best-attack AUC % (selection-biased) | CF flip rate % | replaced % | "
          "CF L1 to x_nn | stage-1 s | run id |")
    print("| --- " * (12 + len(fprs)) + "|")
    for r in sorted(cfat, key=lambda r: (r["config"]["defense"]["params"].get("generator", ""),
                                         -r["config"]["defense"]["params"]["p"])):
        m = r["metrics"]
        d = r["config"]["defense"]["params"]
        g = f"{d.get('generator', 'proto-cf')} p={d['p']:g}"
        best = m.get("mia.best.auc", {})
        print(f"| {g} | {iv(m, 'clean.accuracy', 100, 1)} | {iv(m, 'robust.autoattack.accuracy', 100, 1)} | "
              f"{iv(m, 'mia.primary.auc', 100, 1)} | {iv(m, 'mia.primary.advantage', 100, 1)} | "
              + " | ".join(iv(m, f"mia.primary.tpr_at_fpr.{f}", 100, 1) for f in fprs)
              + f" | {iv(m, 'mia.loss.auc', 100, 1)} | {iv(m, 'mia.best.auc', 100, 1)} ({best.get('attack', '')}) | "
              f"{iv(m, 'cf.flip_rate', 100, 1)} | {iv(m, 'cf.replaced_fraction', 100, 1)} | {iv(m, 'cf.l1')} | "
              f"{iv(m, 'cf.generation_seconds', 1, 0)} | `{r['run_id']}` |")


if __name__ == "__main__":
    main()
