"""Markdown tables of the cf-at evidence (docs/cf_at.md) from the run records of a folder.

    .venv/bin/python scripts/cfat_table.py RUNS_DIR DATASET --split   (issue 19: seeds, controls, split)
    .venv/bin/python scripts/cfat_table.py [runs-cfat] [digits | fashion-mnist]   (the earlier one-seed tables)

``--split`` (issue 19): cf-at recipes (p, control) beside erm and pgd-at, several seeds:

1. per recipe, mean +- std over seeds: clean and AutoAttack accuracy, the pooled primary
   attack (RMIA online over the target + K reference models; the ``mia`` evaluator), AUC and
   TPR at 1%, 0.5% and the lowest supportable FPR; the replaced fraction;
2. **replaced vs kept members**, seed-pooled (scripts/mia_split.py): the seeds' target rows and
   the K shared reference rows of ``pooled.rmia_online``; for each pool model its member trials
   are split into those cf-at replaced (control real-only: removed; neighbour: replaced by
   x_nn) and those it kept, each against all non-member trials.  The target's replaced pool
   positions come from its record (``notes.defense.counterfactuals.replaced``, failed searches
   excluded); a reference model's are recomputed -- its training subset
   (``cfbench.mia.reference.reference_subset``), its training seed
   (``reference_train_seed``) and ``cfbench_baselines.cf_at.chosen_indices`` -- so for the
   reference rows of cf-at proper the (rare) failed searches are counted as replaced.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mia_split as MS  # noqa: E402

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


def legacy(ROOT: Path, DATASET: str) -> None:
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


FPRS = (0.05, 0.01, 0.005)


def recipe(rec) -> str:
    d = rec["config"]["defense"]
    if d["name"] != "cf-at":
        return d["name"]
    p = d["params"]
    tag = "cf-at" if p["control"] == "none" else f"control {p['control']}"
    return f"{tag} p={p['p']:g}" + (" exclude_self" if p.get("exclude_self") else "")


def replaced_rows(rec, run: Path, owners) -> np.ndarray:
    """(rows, pool) mask of replaced member trials for the rows of a seed pool."""
    import torch

    from cfbench.mia.reference import reference_subset, reference_train_seed
    from cfbench_baselines.cf_at import chosen_indices

    torch.set_num_threads(1)
    _, z = MS.load(run)
    n_pool = len(z["member"])
    n_mem = int(z["member"].sum())
    prm = rec["config"]["defense"]["params"]
    ref_seed = rec["config"]["evaluators"]["mia"]["params"]["reference_seed"]
    out = np.zeros((len(owners), n_pool), dtype=bool)
    for j, (kind, who) in enumerate(owners):
        if kind == "target":
            r = json.loads((who / "record.json").read_text())
            out[j, r["notes"]["defense"]["counterfactuals"]["replaced"]["pool_positions"]] = True
        else:
            pos = np.flatnonzero(reference_subset(n_pool, n_mem, who, ref_seed))
            ch = chosen_indices(len(pos), prm["p"], reference_train_seed(who, ref_seed)).numpy()
            out[j, pos[ch]] = True
    return out


def split_tables(root: Path, dataset: str) -> None:
    from collections import defaultdict

    groups = defaultdict(list)
    for f in sorted(root.glob("*/record.json")):
        r = json.loads(f.read_text())
        if (r.get("status") == "ok" and r["config"]["dataset"]["name"] == dataset
                and r["config"]["defense"]["name"] in ("cf-at", "erm", "pgd-at")
                and (f.parent / "mia_scores.npz").exists()):
            groups[recipe(r)].append((r, f.parent))
    order = sorted(groups, key=lambda k: ({"erm": 0, "pgd-at": 1}.get(k, 2), k))

    def val(m, k):
        x = m.get(k)
        return x.get("value") if isinstance(x, dict) else x

    def fmt(xs, k=100, nd=1):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "n/a"
        return f"{k * np.mean(xs):.{nd}f} ± {k * (np.std(xs, ddof=1) if len(xs) > 1 else 0):.{nd}f}"

    print("| recipe | seeds | clean acc. % | AutoAttack acc. % | train acc. % | pooled AUC | TPR@1% | TPR@0.5% | "
          "TPR@lowest (FPR) | replaced % |")
    print("|" + "---|" * 10)
    for k in order:
        ms = [r["metrics"] for r, _ in groups[k]]
        low = [val(m, "mia.primary.lowest_fpr") for m in ms]
        print(f"| {k} | {','.join(str(r['config']['seed']) for r, _ in groups[k])} | "
              f"{fmt([val(m, 'clean.accuracy') for m in ms])} | {fmt([val(m, 'robust.autoattack.accuracy') for m in ms])} | "
              f"{fmt([val(m, 'clean.train_accuracy') for m in ms])} | {fmt([val(m, 'mia.primary.auc') for m in ms], 1, 3)} | "
              f"{fmt([val(m, 'mia.primary.tpr_at_fpr.0.01') for m in ms], 100, 2)} | "
              f"{fmt([val(m, 'mia.primary.tpr_at_fpr.0.005') for m in ms], 100, 2)} | "
              f"{fmt([val(m, 'mia.primary.tpr_at_lowest_fpr') for m in ms], 100, 2)} "
              f"({100 * np.mean([x for x in low if x]):.2f}%) | "
              f"{fmt([val(m, 'cf.replaced_fraction') for m in ms])} |")

    print("\nSeed-pooled RMIA online (seeds' targets + K shared reference models), members split into replaced "
          "and kept, each against all non-member trials (95% intervals):\n")
    print("| recipe | models | trials in (replaced / kept) / out | AUC all | AUC replaced | AUC kept | TPR@1% replaced "
          "| TPR@1% kept | TPR@lowest all (FPR) | TPR@lowest replaced | TPR@lowest kept |")
    print("|" + "---|" * 11)
    for k in order:
        runs = groups[k]
        s, inp, owners = MS.seed_pool([d for _, d in runs])
        allm = MS.pooled_metrics(s, inp, FPRS)
        low = allm["lowest_fpr"]["value"]
        if runs[0][0]["config"]["defense"]["name"] != "cf-at" or runs[0][0]["config"]["defense"]["params"]["p"] == 0:
            print(f"| {k} | {len(owners)} | {allm['n_in']} / {allm['n_out']} | {MS.fmt_auc(allm['auc'])} | — | — | — "
                  f"| — | {MS.fmt_tpr(allm['tpr_at_lowest_fpr'])} ({100 * low:.2f}%) | — | — |")
            continue
        rep = replaced_rows(runs[0][0], runs[0][1], owners) & inp
        a = MS.split_metrics(s, inp, rep, FPRS + (low,))
        b = MS.split_metrics(s, inp, inp & ~rep, FPRS + (low,))
        print(f"| {k} | {len(owners)} | {a['n_in']} / {b['n_in']} / {a['n_out']} | {MS.fmt_auc(allm['auc'])} | "
              f"{MS.fmt_auc(a['auc'])} | {MS.fmt_auc(b['auc'])} | {MS.fmt_tpr(a['tpr_at_fpr']['0.01'])} | "
              f"{MS.fmt_tpr(b['tpr_at_fpr']['0.01'])} | {MS.fmt_tpr(allm['tpr_at_lowest_fpr'])} ({100 * low:.2f}%) | "
              f"{MS.fmt_tpr(a['tpr_at_fpr'][str(low)])} | {MS.fmt_tpr(b['tpr_at_fpr'][str(low)])} |")

    cf = [(k, groups[k]) for k in order if k.startswith("cf-at")]
    if cf:
        print("\nCounterfactuals (cf-at runs; mean over seeds):\n")
        keys = [("cf.flip_rate", "flip rate % (generator)", 100), ("cf.target_flip_rate", "target agrees % ", 100),
                ("cf.replaced_fraction", "replaced %", 100), ("cf.x_in_prototype_fraction",
                                                               "x among its CF's prototype neighbours %", 100),
                ("cf.l2", "L2 to x_nn", 1), ("cf.l2_to_x", "L2 to x", 1), ("cf.l2_neighbour_to_x", "L2 x_nn to x", 1),
                ("cf.ae_error", "AE error of CFs", 1), ("cf.ae_error_data", "AE error of real x", 1)]
        print("| metric | " + " | ".join(k for k, _ in cf) + " |")
        print("|---|" + "---|" * len(cf))
        for key, name, mult in keys:
            print(f"| {name} | " + " | ".join(fmt([val(r["metrics"], key) for r, _ in runs], mult, 2)
                                              for _, runs in cf) + " |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = Path(args[0] if args else "runs-cfat")
    ds = args[1] if len(args) > 1 else "digits"
    if "--split" in sys.argv:
        split_tables(root, ds)
    else:
        legacy(root, ds)
