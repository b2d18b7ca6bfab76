"""The learning-rate sensitivity of the DP recipes (scripts/sweeps/dp_lr.toml, VALIDATION.md
row 2) from the run records of a folder, and the rate each recipe's selection rule picks.

    .venv/bin/python scripts/dp_lr_table.py evidence/dp-lr

Recipe = dataset, model, defense and target epsilon; one row per learning rate with the
training loss of the first and last epoch and its largest epoch mean (the history the record
keeps), the trained model's clean accuracy on its training members (computed here from
``model.safetensors`` and ``splits.npz``), test clean accuracy (95% Clopper-Pearson interval,
from the record), PGD-20 accuracy and the sanity flags.

**Selection rule**: the rate whose model has the highest clean accuracy on its training members
(marked "chosen"; a tie goes to the larger rate) -- it reads the training set only, never a
held-out or test image, so the reported test accuracy is not what chose it.  The training loss
cannot serve: DP-AT's loss is the adversarial one, and a model collapsed to uniform outputs has
ln 10 = 2.30, below a trained DP-AT model's ~2.7.  The DP guarantee does not cover the choice
(it reads the private training data; Papernot & Steinke 2022 account for it), as in most DP
benchmarks.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mia_split as MS  # noqa: E402


def train_accuracy(run: Path) -> float:
    """Clean accuracy of the run's model on its training members (at_gaps' loaders)."""
    import at_gaps

    from cfbench.store.models import load_model

    rec = json.loads((run / "record.json").read_text())
    xm, ym, *_ = at_gaps._data(rec, run)
    return at_gaps._clean(load_model(run), xm, ym)[0]


def recipe(rec) -> tuple:
    c = rec["config"]
    return MS.dataset_of(rec), c["model"]["name"], c["defense"]["name"], c["defense"]["params"].get("target_epsilon")


def fmt_ci(m, key) -> str:
    v = m.get(key)
    if not isinstance(v, dict):
        return "n/a" if v is None else f"{100 * v:.1f}"
    return f"{100 * v['value']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "evidence/dp-lr")
    groups = defaultdict(list)
    for run, rec in MS.finished_records(root):
        if rec["config"]["defense"]["name"] in ("dp-sgd", "dp-at"):
            rec["_train_acc"] = train_accuracy(run)
            groups[recipe(rec)].append(rec)
    if not groups:
        print(f"no finished dp-sgd / dp-at runs in {root}", file=sys.stderr)
        return 2
    print("| dataset / model | defense | ε (accountant) | σ | lr | loss epoch 1 | largest epoch loss | "
          "last-epoch loss | train acc. % | test clean acc. % | PGD-20 acc. % | flags | chosen |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for (ds, model, defense, eps), recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        recs.sort(key=lambda r: -r["config"]["train"]["lr"])
        last = {id(r): r["history"][-1]["loss"] if r["history"] else math.inf for r in recs}
        best = max(recs, key=lambda r: r["_train_acc"])   # recs sorted by decreasing lr: ties -> larger
        for r in recs:
            m, h = r["metrics"], r["history"]
            flags = ", ".join(f["name"] for f in r.get("flags", [])) or "none"
            print(f"| {ds} / {model} | {defense} | {eps:g} ({MS.value(m, 'dp.epsilon'):.2f}) | "
                  f"{MS.value(m, 'dp.noise_multiplier'):.2f} | {r['config']['train']['lr']:g} | "
                  f"{h[0]['loss']:.3g} | {max(e['loss'] for e in h):.4g} | {last[id(r)]:.3g} | {100 * r['_train_acc']:.1f} | "
                  f"{fmt_ci(m, 'clean.accuracy')} | {fmt_ci(m, 'robust.pgd.accuracy')} | {flags} | "
                  f"{'chosen' if r is best else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
