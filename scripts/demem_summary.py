"""Tables of the DeMem evidence (docs/demem.md, issue 19) from the run records of a folder.

    .venv/bin/python scripts/demem_summary.py RUNS_DIR [DATASET] [--gaps]

Runs: finished pgd-at and demem (version 2) runs of one dataset (other defenses in the folder,
e.g. cf-at, are skipped), grouped by recipe (model + defense + DeMem's settings), several seeds
each. DATASET may be left out when the folder holds one dataset; a folder with several (the
reference leaderboards' ``leaderboards/reference-runs``) needs it -- recipes of different
datasets or models are never pooled.

1. Per recipe, mean +- sample std over seeds (from the records): clean and AutoAttack
   accuracy, the ``mia`` evaluator's **pooled primary attack** (RMIA online over the target +
   its K reference models): AUC, TPR at 1% and 0.5% FPR and at the lowest supportable FPR
   (10 / N_out); DeMem's penalty activity (fraction of the penalised set's sample-updates in
   which the penalty was active, after warm-up) and realised mass (sum of beta_i max(0, b_i - l_i)
   over the updates, per training sample).
2. **Seed-pooled** (scripts/mia_split.py:seed_pool): the seeds' target rows + the K shared
   reference rows as one pool, with 95% intervals.
3. **Where DeMem acts**: single-target RMIA-online scores of the seeds' targets, members split
   into the high-risk set S (DeMem's frozen set of the same seed: the controls share it; for
   pgd-at, the set DeMem froze in its run of the same seed -- its warm-up is PGD-AT bit for bit)
   and the other members, each against all non-members.
4. ``--gaps``: clean and robust (PGD-20) train-test gaps of every target (scripts/at_gaps.py).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mia_split as MS  # noqa: E402

FPRS = (0.05, 0.01, 0.005)
DEFENSES = ("pgd-at", "demem")


def variant(rec, models=frozenset()) -> str:
    """Recipe name; prefixed with the model when the runs use more than one."""
    d = rec["config"]["defense"]
    name = d["name"]
    if d["name"] == "demem":
        p = d["params"]
        lv = p["level"] if isinstance(p["level"], str) else f"{p['level']:g}"
        name = f"demem (select={p['select']}, risk={p['risk']}, level={lv})"
    return f"{rec['config']['model']['name']} / {name}" if len(models) > 1 else name


value, fmt = MS.value, MS.fmt_mean_sd


def groups_of(root: Path, dataset: str | None = None):
    """Recipe -> [(record, run folder)] of the finished pgd-at / demem runs with MIA scores.
    ValueError (naming the datasets found) when ``dataset`` is None and the folder mixes several."""
    found = [(rec, run) for run, rec in MS.finished_records(root)
             if rec["config"]["defense"]["name"] in DEFENSES and (run / "mia_scores.npz").exists()]
    datasets = sorted({MS.dataset_of(r) for r, _ in found})
    if dataset is None and len(datasets) > 1:
        raise ValueError(f"{root} holds pgd-at/demem runs of several datasets ({', '.join(datasets)}); "
                         "name one: demem_summary.py RUNS_DIR DATASET")
    found = [(r, d) for r, d in found if dataset is None or MS.dataset_of(r) == dataset]
    models = frozenset(r["config"]["model"]["name"] for r, _ in found)
    groups = defaultdict(list)
    for rec, d in found:
        groups[variant(rec, models)].append((rec, d))
    for runs in groups.values():
        runs.sort(key=lambda t: t[0]["config"]["seed"])
    return groups


def main(root: Path, gaps: bool = False, dataset: str | None = None) -> int:
    try:
        groups = groups_of(root, dataset)
    except ValueError as exc:
        print(f"demem_summary: {exc}", file=sys.stderr)
        return 2
    if not groups:
        print(f"demem_summary: no finished pgd-at / demem runs with MIA scores"
              f"{' of ' + dataset if dataset else ''} in {root}", file=sys.stderr)
        return 2
    print("| recipe | seeds | clean acc. % | AutoAttack acc. % | pooled AUC | TPR@1% | TPR@0.5% | TPR@lowest FPR "
          "(FPR) | activity % | mass | set % |")
    print("|" + "---|" * 11)
    for name, runs in sorted(groups.items()):
        ms = [r["metrics"] for r, _ in runs]
        low = [value(m, "mia.primary.lowest_fpr") for m in ms]
        cells = [name, ",".join(str(r["config"]["seed"]) for r, _ in runs),
                 fmt([value(m, "clean.accuracy") for m in ms]), fmt([value(m, "robust.autoattack.accuracy") for m in ms]),
                 fmt([value(m, "mia.primary.auc") for m in ms], 1, 3),
                 fmt([value(m, "mia.primary.tpr_at_fpr.0.01") for m in ms], 100, 2),
                 fmt([value(m, "mia.primary.tpr_at_fpr.0.005") for m in ms], 100, 2),
                 fmt([value(m, "mia.primary.tpr_at_lowest_fpr") for m in ms], 100, 2)
                 + f" ({100 * np.mean([x for x in low if x]):.2f}%)" if any(low) else "n/a"]
        if runs[0][0]["config"]["defense"]["name"] == "demem":
            cells += [fmt([value(m, "demem.penalty_activity") for m in ms]),
                      fmt([value(m, "demem.penalty_mass") for m in ms], 1, 3),
                      fmt([value(m, "demem.penalty_set_fraction") for m in ms])]
        else:
            cells += ["—", "—", "—"]
        print("| " + " | ".join(cells) + " |")

    print("\nSeed-pooled (the seeds' targets + the K shared reference models, RMIA online; 95% intervals):\n")
    print("| recipe | models | N_in / N_out | AUC | TPR@1% | TPR@0.5% | lowest FPR | TPR@lowest |")
    print("|" + "---|" * 8)
    for name, runs in sorted(groups.items()):
        s, inp, owners = MS.seed_pool([d for _, d in runs])
        out = MS.pooled_metrics(s, inp, FPRS)
        print(f"| {name} | {len(owners)} | {out['n_in']} / {out['n_out']} | {MS.fmt_auc(out['auc'])} | "
              f"{MS.fmt_tpr(out['tpr_at_fpr']['0.01'])} | {MS.fmt_tpr(out['tpr_at_fpr']['0.005'])} | "
              f"{100 * out['lowest_fpr']['value']:.2f}% | {MS.fmt_tpr(out['tpr_at_lowest_fpr'])} |")

    # 3. the high-risk set of each seed (from a demem high-risk run), applied to every recipe
    sets = {}
    for name, runs in groups.items():
        for rec, _ in runs:
            note = rec["notes"].get("defense", {}).get("demem")
            if note and note.get("high_risk_pool_positions") is not None \
                    and rec["config"]["defense"]["params"]["select"] == "high-risk" \
                    and rec["config"]["defense"]["params"]["risk"] == "loss":
                sets[rec["config"]["seed"]] = np.asarray(note["high_risk_pool_positions"])
    if sets:
        print("\nWhere the penalty acts: single-target RMIA online of the seeds' targets (concatenated), members "
              "in DeMem's frozen high-risk set S (risk=loss, same seed) vs the other members, each against all "
              "non-members:\n")
        print("| recipe | S members / other / non-members | AUC S | AUC other | TPR@5% S | TPR@5% other | "
              "TPR@1% S | TPR@1% other |")
        print("|" + "---|" * 8)
        for name, runs in sorted(groups.items()):
            sc, mem, ins = [], [], []
            for rec, d in runs:
                seed = rec["config"]["seed"]
                if seed not in sets:
                    continue
                _, z = MS.load(d)
                m = z["member"].astype(bool)
                s_mask = np.zeros_like(m)
                s_mask[sets[seed]] = True
                sc.append(z["score.rmia_online"])
                mem.append(m)
                ins.append(s_mask)
            if not sc:
                continue
            sc, mem, ins = np.concatenate(sc), np.concatenate(mem), np.concatenate(ins)
            a = MS.split_metrics(sc, mem, ins, FPRS)
            b = MS.split_metrics(sc, mem, mem & ~ins, FPRS)
            print(f"| {name} | {a['n_in']} / {b['n_in']} / {a['n_out']} | {MS.fmt_auc(a['auc'])} | "
                  f"{MS.fmt_auc(b['auc'])} | {MS.fmt_tpr(a['tpr_at_fpr']['0.05'])} | "
                  f"{MS.fmt_tpr(b['tpr_at_fpr']['0.05'])} | {MS.fmt_tpr(a['tpr_at_fpr']['0.01'])} | "
                  f"{MS.fmt_tpr(b['tpr_at_fpr']['0.01'])} |")

    print("\nPenalty activity per epoch (after warm-up; mean over seeds, %), every 5th epoch:\n")
    for name, runs in sorted(groups.items()):
        rows = [r["notes"]["defense"]["demem"]["epochs"] for r, _ in runs
                if "demem" in r["notes"].get("defense", {})]
        if not rows:
            continue
        n = min(len(r) for r in rows)
        acts = [np.mean([r[e]["activity"] for r in rows]) if rows[0][e]["activity"] is not None else None
                for e in range(n)]
        print(f"- {name}: " + ", ".join(f"e{e}: {100 * a:.0f}" for e, a in enumerate(acts)
                                          if a is not None and e % 5 == 0))

    if gaps:
        import at_gaps

        print("\nTrain-test gaps (PGD-20), mean ± std over seeds:\n")
        print("| recipe | train acc. % | test acc. % | robust train % | robust test % | robust gap |")
        print("|" + "---|" * 6)
        for name, runs in sorted(groups.items()):
            g = [at_gaps.gaps(d) for _, d in runs]
            print(f"| {name} | {fmt([x['train_acc'] for x in g])} | {fmt([x['test_acc'] for x in g])} | "
                  f"{fmt([x['robust_train_acc'] for x in g])} | {fmt([x['robust_test_acc'] for x in g])} | "
                  f"{fmt([x['robust_gap'] for x in g])} |")
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(Path(args[0]) if args else Path("runs-evidence-19"), gaps="--gaps" in sys.argv,
                  dataset=args[1] if len(args) > 1 else None))
