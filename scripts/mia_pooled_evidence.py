"""Evidence for docs/mia.md: the pooled primary attack on digits (K = 16) from stored runs.

    .venv/bin/python scripts/mia_pooled_evidence.py runs-evidence-mia [--figure docs/mia_pooled_roc.png]

Reads every finished record under the folder whose membership evaluator is version >= 2,
prints the Markdown tables of docs/mia.md (primary attack pooled TPR at 1% / 0.1% FPR with
Clopper-Pearson intervals, the spread across the pool's models, AUC, the DP audit beside the
accountant's epsilon, every pooled attack), and draws the log-log ROC of the primary attack's
pooled trials from each run's ``mia_scores.npz`` (recomputed with scikit-learn, independently
of cfbench's own ROC code).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def pct(e, digits=2):
    if not isinstance(e, dict) or e.get("value") is None:
        return "n/a"
    s = f"{100 * e['value']:.{digits}f}"
    if e.get("ci_low") is not None:
        s += f" [{100 * e['ci_low']:.{digits}f}, {100 * e['ci_high']:.{digits}f}]"
    return s


def num(e, digits=3):
    if not isinstance(e, dict) or e.get("value") is None:
        return "n/a"
    s = f"{e['value']:.{digits}f}"
    if e.get("ci_low") is not None:
        s += f" [{e['ci_low']:.{digits}f}, {e['ci_high']:.{digits}f}]"
    return s


def label(rec):
    d = rec["config"]["defense"]
    extra = d["params"].get("target_epsilon")
    return d["name"] + (f" (target ε = {extra:g})" if extra is not None else "")


def load(folder: Path):
    recs = []
    for p in sorted(folder.glob("*/record.json")):
        r = json.loads(p.read_text())
        ev = (r.get("config", {}).get("evaluators") or {}).get("mia") or {}
        if r.get("status") == "ok" and (ev.get("version") or 0) >= 2:
            r["_dir"] = p.parent
            recs.append(r)
    order = {"erm": 0, "pgd-at": 1, "trades": 2, "dp-sgd": 3}
    return sorted(recs, key=lambda r: (order.get(r["config"]["defense"]["name"], 9),
                                       r["config"]["defense"]["params"].get("target_epsilon") or 0))


def tables(recs) -> str:
    out = [("| defense | clean acc. % | primary | pooled trials (non-members) | TPR @ 1% FPR % | TPR @ 0.1% FPR % | "
            "lowest FPR: TPR % | AUC | per-model AUC (min–max) | single-target AUC |"),
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in recs:
        m = r["metrics"]
        a = m["mia.primary.auc"]
        low = m["mia.primary.lowest_fpr"]
        pm = a.get("per_model") or {}
        out.append(f"| {label(r)} | {100 * m['clean.accuracy']['value']:.1f} | {a['attack']} | "
                   f"{a['n']:,} ({a['n_nonmembers']:,}) | {pct(m['mia.primary.tpr_at_fpr.0.01'])} | "
                   f"{pct(m['mia.primary.tpr_at_fpr.0.001'])} | "
                   f"{100 * low['value']:.3f}%: {pct(m['mia.primary.tpr_at_lowest_fpr'])} | {num(a)} | "
                   f"{pm.get('min', float('nan')):.3f}–{pm.get('max', float('nan')):.3f} | "
                   f"{num(m['mia.' + a['attack'] + '.auc'])} |")
    out += ["", ("| defense | accountant ε (δ) | audit ε lower bound (held-out threshold) | audit ε, max over "
                 "thresholds (optimistic) | direction of the bound |"), "| --- | ---: | ---: | ---: | --- |"]
    for r in recs:
        m = r["metrics"]
        lb, lm = m["mia.audit.epsilon_lb"], m["mia.audit.epsilon_lb_max"]
        acc = m.get("dp.epsilon")
        acc_s = f"{acc:.3g} ({m['dp.delta']:.2g})" if acc is not None else f"— (audit δ = {lb['delta']:.2g})"
        out.append(f"| {label(r)} | {acc_s} | {lb['value']:.3f} | {lm['value']:.3f} | {lb['direction']} |")
    attacks = recs[0]["notes"]["mia"]["pooled"]["attacks"]
    out += ["", "| pooled attack | " + " | ".join(f"{label(r)} AUC / TPR@1% / TPR@0.1%" for r in recs) + " |",
            "| --- |" + " ---: |" * len(recs)]
    for at in attacks:
        cells = []
        for r in recs:
            m = r["metrics"]
            auc = m.get(f"mia.pooled.{at}.auc")
            if auc is None:
                cells.append("—")
                continue
            cells.append(f"{auc['value']:.3f} / {pct(m[f'mia.pooled.{at}.tpr_at_fpr.0.01'], 2).split(' ')[0]} / "
                         f"{pct(m[f'mia.pooled.{at}.tpr_at_fpr.0.001'], 2).split(' ')[0]}")
        flag = recs[0]["metrics"][f"mia.pooled.{at}.auc"]
        note = (" (= loss)" if flag.get("same_ranking_as") == "loss" else
                " (= robust_loss)" if flag.get("same_ranking_as") == "robust_loss" else
                " ⚑" if flag.get("excluded_from_best") else "")
        out.append(f"| {at}{note} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def figure(recs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=150)
    lowest = 1.0
    for r in recs:
        prim = r["metrics"]["mia.primary.auc"]["attack"]
        with np.load(r["_dir"] / "mia_scores.npz") as z:
            s, lab = z[f"pooled.{prim}"].ravel(), z["in_pool"].ravel()
        ok = ~np.isnan(s)
        fpr, tpr, _ = roc_curve(lab[ok], s[ok])
        n_out = int((~lab[ok]).sum())
        lowest = min(lowest, 10 / n_out)
        keep = fpr > 0
        auc = r["metrics"]["mia.primary.auc"]["value"]
        ax.plot(fpr[keep], tpr[keep], lw=1.4, label=f"{label(r)} (AUC {auc:.3f})")
    grid = np.geomspace(1e-4, 1, 50)
    ax.plot(grid, grid, "k:", lw=0.8, label="chance")
    ax.axvspan(1e-4, lowest, color="0.9", zorder=0)
    ax.axvline(0.01, color="0.6", lw=0.6)
    ax.axvline(0.001, color="0.6", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"{prim}, pooled over 17 models (digits, K = 16)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.text(1.1e-4, 0.5, "unsupported\n(< 10 / N_out)", fontsize=6, color="0.4")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--figure", type=Path, default=Path("docs/mia_pooled_roc.png"))
    args = ap.parse_args()
    recs = load(args.runs)
    if not recs:
        raise SystemExit(f"no finished mia v2 records under {args.runs}")
    print(tables(recs))
    figure([r for r in recs if r["config"]["defense"]["name"] != "dp-sgd"] or recs, args.figure)


if __name__ == "__main__":
    main()
