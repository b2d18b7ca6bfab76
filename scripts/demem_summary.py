"""Tables of the DeMem evidence (docs/demem.md) from the run records of a folder.

    .venv/bin/python scripts/demem_summary.py [RUNS_DIR]   (default: runs-demem)

Per variant (defense + the settings that differ) and seed: clean accuracy, AutoAttack
accuracy, and for LiRA (online, per-example variance) and RMIA (online): AUC and TPR at 5%,
2%, 1% and 0.1% FPR.  Printed as mean +- std over seeds (per-seed rates a seed's non-member
count cannot support are n/a and left out), then **pooled over the seeds**: the three targets'
per-example scores (``mia_scores.npz``; same pool, same reference models) concatenated, with
Hanley-McNeil (AUC) and Clopper-Pearson (TPR) 95% intervals from cfbench.mia.metrics.
The split seed is fixed, so the seeds' targets score the *same* 1,297 pool examples: the
pooled intervals treat the three scores of an example as independent and are too narrow, and
the pooled TPR at 1% FPR rests on 3 x 649 correlated non-member scores.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cfbench.mia import metrics as M

FPRS = (0.05, 0.02, 0.01, 0.001)
ATTACKS = ("lira_online", "rmia_online")
DEFENSES = ("pgd-at", "dp-at", "demem")     # other runs sharing the folder (e.g. cf-at) are skipped


def variant(rec) -> str:
    d = rec["config"]["defense"]
    if d["name"] == "demem":
        p = d["params"]
        flood = "batch low-risk mean" if p["flood"] is None else f"{p['flood']:.3g}"
        return f"demem (select={p['select']}, risk={p['risk']}, flood={flood})"
    if d["name"] == "dp-at":
        return f"dp-at (target_epsilon={d['params']['target_epsilon']})"
    return d["name"]


def value(m, key):
    v = m.get(key)
    return v.get("value") if isinstance(v, dict) else v


def fmt(xs, pct=True):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    k = 100 if pct else 1
    nd = 1 if pct else 3
    return f"{k * np.mean(xs):.{nd}f} ± {k * np.std(xs, ddof=1) if len(xs) > 1 else 0:.{nd}f}"


def main(root: Path) -> None:
    groups = defaultdict(list)
    datasets = set()
    for f in sorted(root.glob("*/record.json")):
        rec = json.loads(f.read_text())
        if rec.get("status") == "ok" and rec["config"]["defense"]["name"] in DEFENSES:
            groups[variant(rec)].append((rec, f.parent))
            datasets.add(rec["config"]["dataset"]["name"])
    # one AutoAttack protocol: a folder shared with another study (e.g. the cf-at sweep) may hold a
    # second run of the same recipe and seed that differs only in autoattack.n_examples
    def aa_n(rec):
        return rec["config"]["evaluators"].get("autoattack", {}).get("params", {}).get("n_examples")

    ns = [aa_n(r) for runs in groups.values() for r, _ in runs if r["config"]["defense"]["name"] == "demem"]
    if ns:
        keep = max(set(ns), key=ns.count)
        groups = defaultdict(list, {k: [(r, d) for r, d in v if aa_n(r) == keep] for k, v in groups.items()})
    if len(datasets) > 1:
        raise SystemExit(f"{root} holds runs of several datasets ({sorted(datasets)}); give one folder per dataset")
    # per-run TPR columns: every FPR that at least one run can support
    all_ms = [r["metrics"] for runs in groups.values() for r, _ in runs]
    run_fprs = [f for f in FPRS if any(value(m, f"mia.{a}.tpr_at_fpr.{f}") is not None
                                       for m in all_ms for a in ATTACKS)]
    print("| variant | seeds | clean acc. % | AutoAttack acc. % | "
          + " | ".join(f"{a} AUC | " + " | ".join(f"{a} TPR@{100 * f:g}%" for f in run_fprs) for a in ATTACKS)
          + " | best-attack AUC | high-risk / penalised % |")
    print("|" + "---|" * (6 + (1 + len(run_fprs)) * len(ATTACKS)))
    for name, runs in sorted(groups.items()):
        ms = [r["metrics"] for r, _ in runs]
        cells = [name, ",".join(str(r["config"]["seed"]) for r, _ in runs),
                 fmt([value(m, "clean.accuracy") for m in ms]), fmt([value(m, "robust.autoattack.accuracy") for m in ms])]
        for a in ATTACKS:
            cells.append(fmt([value(m, f"mia.{a}.auc") for m in ms], pct=False))
            for f in run_fprs:
                cells.append(fmt([value(m, f"mia.{a}.tpr_at_fpr.{f}") for m in ms]))
        cells.append(fmt([value(m, "mia.best.auc") for m in ms], pct=False))
        dm = [(value(m, "demem.high_risk_fraction"), value(m, "demem.penalised_fraction")) for m in ms]
        cells.append("—" if dm[0][0] is None else f"{fmt([a for a, _ in dm])} / {fmt([b for _, b in dm])}")
        print("| " + " | ".join(cells) + " |")

    print("\nPooled over seeds (scores of the seeds' targets concatenated; 95% intervals):\n")
    print("| variant | N_in / N_out | " + " | ".join(
        f"{a} AUC | " + " | ".join(f"{a} TPR@{100 * f:g}%" for f in FPRS) for a in ATTACKS) + " |")
    print("|" + "---|" * (2 + (1 + len(FPRS)) * len(ATTACKS)))
    for name, runs in sorted(groups.items()):
        cells = [name]
        for i, a in enumerate(ATTACKS):
            s, y = [], []
            for _, d in runs:
                z = np.load(d / "mia_scores.npz")
                keep = np.isfinite(z[f"score.{a}"])
                s.append(z[f"score.{a}"][keep])
                y.append(z["member"][keep])
            summ = M.summarize(np.concatenate(s), np.concatenate(y), FPRS)
            if i == 0:
                cells.append(f"{summ['n_members']} / {summ['n_nonmembers']}")
            au = summ["auc"]
            cells.append(f"{au['value']:.3f} [{au['ci_low']:.3f}, {au['ci_high']:.3f}]")
            for f in FPRS:
                t = summ["tpr_at_fpr"][str(f)]
                cells.append("n/a" if t["value"] is None else
                             f"{100 * t['value']:.1f} [{100 * t['ci_low']:.1f}, {100 * t['ci_high']:.1f}]")
        print("| " + " | ".join(cells) + " |")
    subset_table(root, groups)


def atypical_members(root: Path, groups, frac: float = 0.1) -> np.ndarray | None:
    """Pool positions of the top ``frac`` of members by their mean clean CE under the PGD-AT
    recipe's reference models that did not train on them (cached by the pgd-at runs): a fixed,
    defense-independent definition of the atypical (high-risk) members.  None when the folder
    has no pgd-at run or its reference models are not in the cache (nothing is trained here)."""
    import torch

    from cfbench import runner
    from cfbench.config import make_config
    from cfbench.mia import reference as R
    from cfbench_baselines.demem import reference_out_loss

    torch.set_num_threads(1)
    if "pgd-at" not in groups:
        return None
    c = groups["pgd-at"][0][0]["config"]
    mia = c["evaluators"]["mia"]["params"]
    sets = {**{f"train.{k}": v for k, v in c["train"].items()}, **{f"data.{k}": v for k, v in c["data"].items()},
            **{f"defense.{k}": v for k, v in c["defense"]["params"].items()},
            **{f"model.{k}": v for k, v in c["model"]["params"].items()},
            "threat.norm": c["threat"]["norm"], "threat.eps": c["threat"]["eps"],
            **{f"mia.{k}": v for k, v in mia.items()}}
    cfg = make_config(dataset=c["dataset"]["name"], defense="pgd-at", model=c["model"]["name"],
                      evaluators=["mia"], sets=sets)
    data = runner.load_data(cfg)
    k, seed = mia["reference_models"], mia["reference_seed"]
    recipe = R.reference_recipe_hash(cfg, data, seed)
    if not all(R.reference_path(root / "_cache", recipe, i).exists() for i in range(k)):
        return None
    members = np.flatnonzero(data.member_mask)
    out, _ = reference_out_loss(cfg, data, members, k=k, seed=seed, cache_dir=root / "_cache", device="cpu")
    n = int(round(frac * len(members)))
    return members[np.argsort(-out.numpy(), kind="stable")[:n]]


def subset_table(root: Path, groups) -> None:
    atyp = atypical_members(root, groups)
    if atyp is None:
        print("\n(no atypical-member table: no pgd-at run with cached reference models in this folder)")
        return
    print(f"\nMembers flagged at the threshold of 5% FPR (per seed, mean ± std over seeds): the {len(atyp)} "
          "atypical members (top 10% by the PGD-AT reference models' OUT loss) vs the other members:\n")
    print("| variant | " + " | ".join(f"{a} atypical % | {a} other %" for a in ATTACKS) + " |")
    print("|" + "---|" * (1 + 2 * len(ATTACKS)))
    for name, runs in sorted(groups.items()):
        cells = [name]
        for a in ATTACKS:
            at, ot = [], []
            for _, d in runs:
                z = np.load(d / "mia_scores.npz")
                sc, mem = z[f"score.{a}"], z["member"]
                thr = np.quantile(sc[~mem & np.isfinite(sc)], 0.95)
                flag = sc > thr
                is_at = np.zeros_like(mem)
                is_at[atyp] = True
                at.append(flag[is_at].mean())
                ot.append(flag[mem & ~is_at].mean())
            cells += [fmt(at), fmt(ot)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "runs-demem")
