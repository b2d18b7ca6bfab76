"""Seed summaries of a reference leaderboard's runs (issue 22, VALIDATION.md) from their records.

    .venv/bin/python scripts/reference_summary.py RUNS_DIR DATASET [--baseline pgd-at]

Runs: every finished run (``record.json`` with status ok) of DATASET in RUNS_DIR, grouped by
recipe -- model, defense and the defense settings that differ between runs (e.g. DP-SGD's
``target_epsilon``) -- with several seeds each.

1. Per recipe, mean +- sample std over seeds: clean and AutoAttack accuracy, and the ``mia``
   evaluator's **pooled primary attack** (RMIA online, the target + its K reference models as
   one pool): AUC, TPR at 1% and 0.1% FPR.
2. **Seed-pooled** primary attack (scripts/mia_split.py:seed_pool: each seed's target row and
   the K shared reference rows as one pool of (seeds + K) x pool trials) with 95% intervals.
   This is the figure VALIDATION.md quotes for "3 seeds": one estimate from every trial of the
   recipe, not the mean of per-seed estimates.
3. **Paired by seed** against the baseline recipe of the same model (default pgd-at): the
   mean difference over the seeds both have and a 95% t interval (scipy, n - 1 degrees of
   freedom; "n/a" with fewer than 2 pairs).
4. Song, Shokri & Mittal's threshold attacks on the target alone: best-threshold balanced
   accuracy (their metric: the threshold chosen on the evaluated data itself, optimistic) of
   the benign-input loss attack and the adversarial-input robust-loss attack, their AUCs and
   the label-only AUC (mean +- std over seeds), and the adversarial-input accuracy paired by
   seed against ERM of the same model (their comparison: natural vs adversarially trained).
5. Where the runs have them: the interpretation evaluator's AAI Kendall tau and robust
   accuracy at each radius, and the inversion evaluator's members' MSE of the prediction-only
   network (d), the best explanation's ExpMI network (g) and the counterfactual's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mia_split as MS  # noqa: E402

FPRS = (0.01, 0.001)


value, ms = MS.value, MS.fmt_mean_sd


def _fmt(k, v) -> str:
    return f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"


def recipe_of(rec, varying: dict) -> str:
    """``model / defense (defense settings that vary) [training settings that vary]``: only the
    settings that differ between the runs of one defense on one model name the recipe."""
    c = rec["config"]
    d = c["defense"]
    dk, tk = varying.get((c["model"]["name"], d["name"]), ((), ()))
    name = d["name"]
    if dk:
        name += " (" + ", ".join(_fmt(k, d["params"][k]) for k in sorted(dk)) + ")"
    if tk:
        name += " [" + ", ".join(_fmt(k, c["train"].get(k)) for k in sorted(tk)) + "]"
    return f"{c['model']['name']} / {name}"


def load_runs(root: Path, dataset: str):
    runs = MS.finished_records(root, dataset)
    # which defense and training settings vary within a defense on one model (they name the recipe)
    seen = defaultdict(lambda: (defaultdict(set), defaultdict(set)))
    for _, rec in runs:
        d = rec["config"]["defense"]
        ps, ts = seen[rec["config"]["model"]["name"], d["name"]]
        for k, v in d["params"].items():
            ps[k].add(json.dumps(v, sort_keys=True))
        for k, v in rec["config"].get("train", {}).items():
            ts[k].add(json.dumps(v, sort_keys=True))
    varying = {name: ({k for k, vs in ps.items() if len(vs) > 1}, {k for k, vs in ts.items() if len(vs) > 1})
               for name, (ps, ts) in seen.items()}
    groups = defaultdict(dict)
    for run, rec in runs:
        groups[recipe_of(rec, varying)][seed_of(rec)] = (run, rec)
    return groups


def seed_of(rec) -> int:
    return rec["config"].get("seed", 0)


def paired(a: dict, b: dict, key: str, k=100.0, nd=1) -> str:
    common = sorted(set(a) & set(b))
    d = [value(a[s][1]["metrics"], key) - value(b[s][1]["metrics"], key) for s in common
         if value(a[s][1]["metrics"], key) is not None and value(b[s][1]["metrics"], key) is not None]
    if len(d) < 2:
        return f"{k * d[0]:+.{nd}f} (1 pair)" if d else "n/a"
    d = np.asarray(d)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{k * d.mean():+.{nd}f} [{k * (d.mean() - half):+.{nd}f}, {k * (d.mean() + half):+.{nd}f}] ({len(d)} pairs)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("dataset")
    ap.add_argument("--baseline", default="pgd-at")
    args = ap.parse_args(argv)
    groups = load_runs(args.runs, args.dataset)
    if not groups:
        print(f"no finished {args.dataset} runs in {args.runs}", file=sys.stderr)
        return 2
    print(f"## {args.dataset}: {sum(len(g) for g in groups.values())} finished runs in {args.runs}\n")
    print("| recipe | seeds | clean % | AutoAttack % | pooled RMIA AUC | TPR @ 1% FPR % | TPR @ 0.1% FPR % |"
          " seed-pooled AUC | seed-pooled TPR @ 1% | seed-pooled TPR @ 0.1% |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, g in sorted(groups.items()):
        ms_ = [g[s][1]["metrics"] for s in sorted(g)]
        row = [name, ",".join(str(s) for s in sorted(g)),
               ms([value(m, "clean.accuracy") for m in ms_]),
               ms([value(m, "robust.autoattack.accuracy") for m in ms_]),
               ms([value(m, "mia.primary.auc") for m in ms_], 1, 3),
               ms([value(m, "mia.primary.tpr_at_fpr.0.01") for m in ms_], 100, 2),
               ms([value(m, "mia.primary.tpr_at_fpr.0.001") for m in ms_], 100, 2)]
        try:
            scores, in_pool, _ = MS.seed_pool([g[s][0] for s in sorted(g)])
            pm = MS.pooled_metrics(scores, in_pool, FPRS)
            row += [MS.fmt_auc(pm["auc"])] + [MS.fmt_tpr(pm["tpr_at_fpr"][f"{f:g}"]) for f in FPRS]
        except (OSError, KeyError, ValueError) as e:
            row += [f"n/a ({type(e).__name__})"] * 3
        print("| " + " | ".join(row) + " |")

    print(f"\n## paired by seed: recipe − {args.baseline} of the same model (mean, 95% t interval)\n")
    print("| recipe | clean (points) | AutoAttack (points) | pooled RMIA AUC | TPR @ 1% FPR (points) |"
          " TPR @ 0.1% FPR (points) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, g in sorted(groups.items()):
        model = name.split(" / ")[0]
        base = groups.get(f"{model} / {args.baseline}")
        if base is None or base is g:
            continue
        print(f"| {name} | {paired(g, base, 'clean.accuracy')} | {paired(g, base, 'robust.autoattack.accuracy')} | "
              f"{paired(g, base, 'mia.primary.auc', 1, 3)} | {paired(g, base, 'mia.primary.tpr_at_fpr.0.01', 100, 2)} | "
              f"{paired(g, base, 'mia.primary.tpr_at_fpr.0.001', 100, 2)} |")

    song = [(n, g) for n, g in sorted(groups.items())
            if any("mia.robust_loss.balanced_accuracy" in r["metrics"] for _, r in g.values())]
    if song:
        print("\n## threshold attacks on the target (Song et al.'s metric; mean ± std over seeds)\n")
        print("| recipe | benign loss acc. % | adversarial robust-loss acc. % | loss AUC | robust-loss AUC |"
              " label-only AUC | adversarial acc. − erm (points) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, g in song:
            mm = [g[s][1]["metrics"] for s in sorted(g)]
            base = groups.get(f"{name.split(' / ')[0]} / erm")
            diff = "—" if base is None or base is g else paired(g, base, "mia.robust_loss.balanced_accuracy")
            print(f"| {name} | {ms([value(m, 'mia.loss.balanced_accuracy') for m in mm])} | "
                  f"{ms([value(m, 'mia.robust_loss.balanced_accuracy') for m in mm])} | "
                  f"{ms([value(m, 'mia.loss.auc') for m in mm], 1, 3)} | "
                  f"{ms([value(m, 'mia.robust_loss.auc') for m in mm], 1, 3)} | "
                  f"{ms([value(m, 'mia.label_only.auc') for m in mm], 1, 3)} | {diff} |")

    interp = [(n, g) for n, g in sorted(groups.items())
              if any("interpretation.aai.kendall_tau" in r["metrics"] for _, r in g.values())]
    if interp:
        radii = sorted({k.rsplit("robust_accuracy.", 1)[1] for _, g in interp for _, r in g.values()
                        for k in r["metrics"] if k.startswith("interpretation.robust_accuracy.")}, key=float)
        print("\n## interpretation (mean ± std over seeds)\n")
        print("| recipe | AAI Kendall τ | " + " | ".join(f"PGD acc. @ ε={e} %" for e in radii) + " |")
        print("| --- | ---: | " + " | ".join("---:" for _ in radii) + " |")
        for name, g in interp:
            mm = [g[s][1]["metrics"] for s in sorted(g)]
            cells = [ms([value(m, "interpretation.aai.kendall_tau") for m in mm], 1, 3)]
            cells += [ms([value(m, f"interpretation.robust_accuracy.{e}") for m in mm]) for e in radii]
            print(f"| {name} | " + " | ".join(cells) + " |")

    inv = [(n, g) for n, g in sorted(groups.items())
           if any("inversion.prediction.members.mse" in r["metrics"] for _, r in g.values())]
    if inv:
        print("\n## inversion: members' MSE (mean ± std over seeds)\n")
        print("| recipe | (d) prediction only | best explanation (g) | counterfactual (g) | attention transfer |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, g in inv:
            mm = [g[s][1]["metrics"] for s in sorted(g)]
            best = []
            for m in mm:
                cands = {k.split(".")[1]: value(m, k) for k in m
                         if k.endswith(".expmi.members.mse") and ".counterfactual." not in k}
                best.append(min(cands.items(), key=lambda kv: kv[1]) if cands else None)
            names = sorted({b[0] for b in best if b})
            cells = [ms([value(m, "inversion.prediction.members.mse") for m in mm], 1, 4),
                     f"{'/'.join(names)} {ms([b[1] for b in best if b], 1, 4)}",
                     ms([value(m, "inversion.counterfactual.expmi.members.mse") for m in mm], 1, 4),
                     ms([value(m, "inversion.attention_transfer.members.mse") for m in mm], 1, 4)]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
