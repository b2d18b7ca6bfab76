"""Markdown tables of the inversion evidence (docs/inversion.md) from the run records of a folder.

    .venv/bin/python scripts/inversion_table.py [runs-evidence-inversion] [digits | fashion-mnist]

Sections:

1. the targets: defense, clean test accuracy, train (member) accuracy, generalisation gap;
2. for every target, one row per inversion network (``prediction`` = (d), ``<explanation>.<arch>``,
   ``attention_transfer``): members' MSE [95% t interval], test MSE, members' SSIM, the evaluation
   classifier's accuracy on the members' reconstructions, the gain over (d) (paired interval;
   > 0 = the explanation leaks beyond the prediction), the member / held-out non-member gap of the
   MSE (Welch interval; > 0 = members are reconstructed better) and the AUC of -MSE as a membership
   score (Hanley-McNeil interval), and the network's best / last epoch (was it still improving?);
3. ExpMI (g) across targets: members' MSE (gain over that target's (d)).

Only finished runs (record.json with status "ok") of the dataset are read.  Runs of **one target**
are joined into one column: the same config apart from the evaluators (defense, model, training,
data, seed) and the same inversion settings apart from which explanations / architectures /
attention transfer they ran -- a sweep may split one target's networks over several runs so that
each fits in a session (scripts/sweeps/inversion_fmnist.toml).  The target weights
(`model.safetensors`) of joined runs must be identical (they are: CPU training is deterministic);
runs whose weights differ are kept apart with a warning.  A different inversion setting (e.g.
`width`) is a different column, labelled with the setting.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mia_split as MS  # noqa: E402

#: inversion settings that only choose which networks a run trains (runs differing in them join)
SELECTION = ("explanations", "architectures", "attention_transfer", "n_examples")

DEFENSE_ORDER = ["erm", "pgd-at", "dp-sgd", "cf-at"]
EXPL_ORDER = ["cam", "saliency", "input_x_gradient", "integrated_gradients", "gradcam",
              "counterfactual", "counterfactual_delta"]
ARCH_ORDER = ["flatten", "unet", "expmi"]
ARCH_LABEL = {"flatten": "(e) flatten", "unet": "(f) unet", "expmi": "(g) expmi"}


def load(folder: Path, dataset: str):
    runs = [r for _, r in MS.finished_records(folder, dataset)
            if any(k.startswith("inversion.") for k in r.get("metrics", {}))]
    key = lambda r: (DEFENSE_ORDER.index(defense(r)) if defense(r) in DEFENSE_ORDER else 99, r["run_id"])
    return join(sorted(runs, key=key), folder)


def _weights_digest(folder: Path, run_id: str) -> str | None:
    path = folder / run_id / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    t = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(t):
        h.update(k.encode())
        h.update(t[k].tobytes())
    return h.hexdigest()


def _target_key(r) -> tuple[str, str]:
    """(the run's config without evaluators, its inversion settings without the selection)."""
    c = {k: v for k, v in r["config"].items() if k not in ("evaluators", "device", "data_dir", "deterministic")}
    inv = dict(r["config"]["evaluators"]["inversion"]["params"])
    for k in SELECTION:
        inv.pop(k, None)
    return json.dumps(c, sort_keys=True), json.dumps(inv, sort_keys=True)


def join(runs, folder: Path):
    """One record per target and inversion setting: metrics and network notes of its runs merged."""
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(_target_key(r) + (_weights_digest(folder, r["run_id"]),), []).append(r)
    keys = {k[:2] for k in groups}
    for k2 in keys:
        digests = [k[2] for k in groups if k[:2] == k2]
        if len(digests) > 1:
            print(f"warning: runs of one recipe have different target weights; kept apart: "
                  f"{[r['run_id'] for k, g in groups.items() if k[:2] == k2 for r in g]}", file=sys.stderr)
    widths = {}
    for k in groups:
        widths.setdefault(k[0], set()).add(k[1])
    out = []
    for k, g in groups.items():
        r = json.loads(json.dumps(g[0]))
        r["run_ids"] = [x["run_id"] for x in g]
        nets = r.setdefault("notes", {}).setdefault("inversion", {}).setdefault("networks", {})
        for x in g[1:]:
            r["metrics"].update({m: v for m, v in x["metrics"].items() if m.startswith("inversion.")})
            nets.update(x.get("notes", {}).get("inversion", {}).get("networks", {}))
        inv = json.loads(k[1])
        r["label"] = defense(r) if len(widths[k[0]]) == 1 else f"{defense(r)} (inversion width {inv.get('width')})"
        out.append(r)
    return out


def defense(r):
    d = r["config"].get("defense")
    return d.get("name") if isinstance(d, dict) else d


def val(m, key):
    x = m.get(key)
    if isinstance(x, dict):
        return x.get("value"), x.get("ci_low"), x.get("ci_high")
    return x, None, None


def fmt(m, key, nd=4, ci=True, pct=False):
    v, lo, hi = val(m, key)
    if v is None:
        return "n/a"
    f = 100 if pct else 1
    s = f"{v * f:.{nd}f}"
    if ci and lo is not None and hi is not None:
        s += f" [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"
    return s


def names(m):
    out = set()
    for k in m:
        if not k.startswith("inversion.") or not k.endswith(".members.mse"):
            continue
        out.add(k[len("inversion."):-len(".members.mse")])

    def order(n):
        if n == "prediction":
            return (0, 0, 0)
        if n == "attention_transfer":
            return (2, 0, 0)
        e, _, a = n.rpartition(".")
        return (1, EXPL_ORDER.index(e) if e in EXPL_ORDER else 99, ARCH_ORDER.index(a) if a in ARCH_ORDER else 99)
    return sorted(out, key=order)


def label(n):
    if n == "prediction":
        return "(d) prediction only"
    if n == "attention_transfer":
        return "attention transfer (ExpMI on predicted CAM)"
    e, _, a = n.rpartition(".")
    return f"{e.replace('_', ' ')} {ARCH_LABEL.get(a, a)}"


def epochs(r, n):
    net = r.get("notes", {}).get("inversion", {}).get("networks", {})
    node = net.get(n) or net.get(f"{n}.expmi") or {}
    if not isinstance(node, dict) or "epochs" not in node:
        return "n/a"
    return f"{node.get('best_epoch')}/{node.get('epochs')}"


def main(argv):
    folder = Path(argv[1] if len(argv) > 1 else "runs-evidence-inversion")
    dataset = argv[2] if len(argv) > 2 else "digits"
    runs = load(folder, dataset)
    if not runs:
        print(f"no finished inversion runs of {dataset} in {folder}", file=sys.stderr)
        return 1
    print(f"## Targets ({dataset})\n")
    print("| defense | run | clean test acc. | train (member) acc. | gap |")
    print("|---|---|---|---|---|")
    for r in runs:
        m = r["metrics"]
        tr, te = val(m, "clean.train_accuracy")[0], val(m, "clean.accuracy")[0]
        g = f"{(tr - te) * 100:+.1f}" if tr is not None and te is not None else "n/a"
        print(f"| {r['label']} | {', '.join(r['run_ids'])} | {fmt(m, 'clean.accuracy', 1, pct=True)} | "
              f"{fmt(m, 'clean.train_accuracy', 1, pct=True)} | {g} |")
    for r in runs:
        m = r["metrics"]
        print(f"\n## {r['label']}: every inversion network\n")
        print("| network | members MSE | test MSE | members SSIM | eval-clf acc. (members) | gain vs (d) | "
              "gap MSE | gap AUC | best/last epoch |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in names(m):
            p = f"inversion.{n}"
            gain = "—" if n == "prediction" else fmt(m, f"{p}.gain.mse")
            print(f"| {label(n)} | {fmt(m, p + '.members.mse')} | {fmt(m, p + '.test.mse', ci=False)} | "
                  f"{fmt(m, p + '.members.ssim', 3, ci=False)} | {fmt(m, p + '.members.accuracy', 3, ci=False)} | "
                  f"{gain} | {fmt(m, p + '.gap.mse')} | {fmt(m, p + '.gap.auc', 3)} | {epochs(r, n)} |")
    print("\n## ExpMI (g) across targets: members MSE (gain over the target's own (d))\n")
    print("| explanation | " + " | ".join(r["label"] for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    rows = ["prediction"] + [f"{e}.expmi" for e in EXPL_ORDER] + ["attention_transfer"]
    for n in rows:
        cells = []
        for r in runs:
            m = r["metrics"]
            v = val(m, f"inversion.{n}.members.mse")[0]
            if v is None:
                cells.append("n/a")
                continue
            gn = val(m, f"inversion.{n}.gain.mse")[0]
            cells.append(f"{v:.4f}" + (f" ({gn:+.4f})" if gn is not None else ""))
        if all(c == "n/a" for c in cells):
            continue
        print(f"| {label(n)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
