"""Markdown tables of the Int evidence (docs/int.md) from the run records of a folder.

    .venv/bin/python scripts/int_table.py [runs-evidence-int] [digits | fashion-mnist]

One row per defense (int-at variants by name): clean and AutoAttack accuracy (training eps),
robust accuracy under PGD-200 across the ``interpretation`` evaluator's eps grid,
interpretation robustness (Kendall tau / top-k overlap under the top-k AAI attack and under
PGD, over unchanged predictions and over all images) and membership leakage (the ``mia``
evaluator: the primary pooled attack, RMIA online, AUC and TPR at 1% FPR; the target-only loss
and robust-loss threshold AUCs).  Values in percent where they are rates.

Intervals: with one seed per defense, ``[low, high]`` is the run's own 95% interval as
recorded (Clopper-Pearson for rates, Student-t over images for tau / overlap, the MIA
evaluator's for AUC / TPR).  With several seeds a cell is the **mean over seeds** and
``[low, high]`` a two-sided 95% Student-t interval over the seeds (n = number of seeds;
it measures seed-to-seed variation, the test images being the same in every run), followed
by the seed count.  One section per training eps.  Then a per-seed table of robust accuracy and of the difference Int - PGD-AT
at every radius (same seed, same 200 test images).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ORDER = {"int": 0, "int2": 1, "int-one": 2, "int-adv": 3, "pgd-at": 4, "trades": 5, "erm": 6}


def raw(m, key):
    x = m.get(key)
    if isinstance(x, dict):
        return x.get("value"), x.get("ci_low"), x.get("ci_high")
    return x, None, None


def seed_interval(values):
    from scipy import stats

    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None, None, 0
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, None, None, 1
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    half = stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v))
    return mean, mean - half, mean + half, len(v)


def cell(runs, key, pct=True, ci=True, nd=1):
    """One defense's cell: the run's value [its interval] for one seed, else the seed mean [t-interval] (n)."""
    f = 100 if pct else 1
    if len(runs) == 1:
        v, lo, hi = raw(runs[0]["metrics"], key)
        if v is None:
            return "n/a"
        s = f"{v * f:.{nd}f}"
        if ci and lo is not None and hi is not None:
            s += f" [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"
        return s
    mean, lo, hi, n = seed_interval([raw(r["metrics"], key)[0] for r in runs])
    if mean is None:
        return "n/a"
    s = f"{mean * f:.{nd}f}"
    if ci and lo is not None:
        s += f" [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"
    if n != len(runs):
        s += f" (n={n})"
    return s


def label(rec):
    d = rec["config"]["defense"]
    if d["name"] == "int-at":
        return d["params"]["variant"]
    return d["name"]


def load(root: Path, dataset: str):
    """{training eps: {defense label: [records by seed]}} of the finished runs of ``dataset``."""
    by_eps = defaultdict(lambda: defaultdict(list))
    for p in sorted(root.glob("*/record.json")):
        r = json.loads(p.read_text())
        if r.get("status") == "ok" and r["config"]["dataset"]["name"] == dataset:
            by_eps[float(r["config"]["threat"]["eps"])][label(r)].append(r)
    out = {}
    for eps in sorted(by_eps, reverse=True):
        groups = by_eps[eps]
        for runs in groups.values():
            runs.sort(key=lambda r: r["config"]["seed"])
        out[eps] = dict(sorted(groups.items(), key=lambda kv: ORDER.get(kv[0], 9)))
    return out


def main(argv):
    root = Path(argv[1] if len(argv) > 1 else "runs-evidence-int")
    dataset = argv[2] if len(argv) > 2 else "digits"
    sections = load(root, dataset)
    if not sections:
        print(f"no finished {dataset} runs in {root}")
        return 1
    for eps, groups in sections.items():
        print(f"## trained at eps {eps:g}\n")
        section(groups, dataset)
        print()
    return 0


def section(groups, dataset):
    first = next(iter(groups.values()))[0]["config"]
    seeds = {d: [r["config"]["seed"] for r in runs] for d, runs in groups.items()}
    print(f"{dataset}, model {first['model']['name']}, {first['threat']['norm']} eps = {first['threat']['eps']} "
          f"(training and AutoAttack); seeds per defense: "
          + ", ".join(f"{d} {s}" for d, s in seeds.items()) + "\n")
    multi = any(len(r) > 1 for r in groups.values())
    if multi:
        print("(cells: mean over seeds [95% t-interval over seeds])\n")
    allruns = [r for runs in groups.values() for r in runs]
    grid = sorted({float(k.rsplit("robust_accuracy.", 1)[1]) for r in allruns for k in r["metrics"]
                   if k.startswith("interpretation.robust_accuracy.")})

    print("| defense | clean | AutoAttack | " + " | ".join(f"PGD-200 {e:g}" for e in grid) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in grid) + " |")
    for d, runs in groups.items():
        cells = [cell(runs, f"interpretation.robust_accuracy.{e:.6g}") for e in grid]
        print(f"| {d} | {cell(runs, 'clean.accuracy')} | {cell(runs, 'robust.autoattack.accuracy')} | "
              + " | ".join(cells) + " |")
    print()

    a, e = "interpretation.aai.", "interpretation.evasion."
    print("| defense | AAI unchanged | AAI tau | AAI top-k | AAI tau (all) | AAI top-k (all) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for d, runs in groups.items():
        print(f"| {d} | {cell(runs, a + 'unchanged', ci=False)} | {cell(runs, a + 'kendall_tau', False, nd=3)} | "
              f"{cell(runs, a + 'topk_overlap', False, nd=3)} | {cell(runs, a + 'kendall_tau_all', False, nd=3)} | "
              f"{cell(runs, a + 'topk_overlap_all', False, nd=3)} |")
    print()
    print("| defense | PGD unchanged | PGD tau | PGD top-k | PGD tau (all) | PGD top-k (all) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for d, runs in groups.items():
        print(f"| {d} | {cell(runs, e + 'unchanged', ci=False)} | {cell(runs, e + 'kendall_tau', False, nd=3)} | "
              f"{cell(runs, e + 'topk_overlap', False, nd=3)} | {cell(runs, e + 'kendall_tau_all', False, nd=3)} | "
              f"{cell(runs, e + 'topk_overlap_all', False, nd=3)} |")
    print()

    print("| defense | train acc | gap | MIA AUC (pooled RMIA online) | TPR @ 1% FPR (pooled) | loss AUC (target) | "
          "robust-loss AUC (target) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d, runs in groups.items():
        print(f"| {d} | {cell(runs, 'clean.train_accuracy', ci=False)} | "
              f"{cell(runs, 'clean.generalization_gap', ci=False)} | {cell(runs, 'mia.primary.auc')} | "
              f"{cell(runs, 'mia.primary.tpr_at_fpr.0.01')} | {cell(runs, 'mia.loss.auc')} | "
              f"{cell(runs, 'mia.robust_loss.auc')} |")
    print()

    print("Per seed: PGD-200 robust accuracy (%) and, for int / int2, the difference to PGD-AT of the same seed "
          "(points).\n")
    print("| defense | seed | clean | AutoAttack | " + " | ".join(f"{e:g}" for e in grid) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in grid) + " |")
    pgd_at = {r["config"]["seed"]: r["metrics"] for r in groups.get("pgd-at", [])}

    def v(m, key):
        x = raw(m, key)[0]
        return None if x is None else 100 * x

    paired = defaultdict(list)           # (defense, column) -> per-seed differences to pgd-at
    for d, runs in groups.items():
        for r in runs:
            m = r["metrics"]
            vals = [v(m, f"interpretation.robust_accuracy.{x:.6g}") for x in grid]
            print(f"| {d} | {r['config']['seed']} | {v(m, 'clean.accuracy'):.1f} | "
                  f"{v(m, 'robust.autoattack.accuracy'):.1f} | "
                  + " | ".join("n/a" if x is None else f"{x:.1f}" for x in vals) + " |")
            ref = pgd_at.get(r["config"]["seed"])
            if d in ("int", "int2") and ref is not None:
                diffs = []
                paired[(d, "clean")].append(v(m, "clean.accuracy") - v(ref, "clean.accuracy"))
                paired[(d, "aa")].append(v(m, "robust.autoattack.accuracy") - v(ref, "robust.autoattack.accuracy"))
                for x, mine in zip(grid, vals):
                    theirs = v(ref, f"interpretation.robust_accuracy.{x:.6g}")
                    diffs.append("n/a" if mine is None or theirs is None else f"{mine - theirs:+.1f}")
                    if mine is not None and theirs is not None:
                        paired[(d, x)].append(mine - theirs)
                print(f"| {d} - pgd-at | {r['config']['seed']} | "
                      f"{v(m, 'clean.accuracy') - v(ref, 'clean.accuracy'):+.1f} | "
                      f"{v(m, 'robust.autoattack.accuracy') - v(ref, 'robust.autoattack.accuracy'):+.1f} | "
                      + " | ".join(diffs) + " |")
    for d in ("int", "int2"):
        k = len(paired.get((d, "clean"), []))
        if k > 1:
            def fmt(col):
                mean, lo, hi, _ = seed_interval(paired.get((d, col), []))
                return "n/a" if mean is None else f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            print(f"| {d} - pgd-at, mean of {k} seeds [t-interval] | | {fmt('clean')} | {fmt('aa')} | "
                  + " | ".join(fmt(x) for x in grid) + " |")
    print()

    print("| defense | seeds | train s (mean) | evaluation s (mean; MIA includes its reference training) | "
          "interpretation s | autoattack s | mia s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d, runs in groups.items():
        def mean_t(key):
            return sum(r.get("timings", {}).get(key, 0) for r in runs) / len(runs)
        print(f"| {d} | {len(runs)} | {mean_t('train'):.0f} | {mean_t('total') - mean_t('train'):.0f} | "
              f"{mean_t('eval.interpretation'):.0f} | {mean_t('eval.autoattack'):.0f} | {mean_t('eval.mia'):.0f} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
