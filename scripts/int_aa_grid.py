"""AutoAttack (standard) beyond the training eps on the finished runs of the Int evidence (docs/int.md).

    .venv/bin/python scripts/int_aa_grid.py [runs-evidence-int] [digits] [0.25,0.3] [n_examples=200] [seeds=0] [train_eps=all] [model=all]

The ``autoattack`` evaluator attacks at the run's own (training) eps only; the paper's claim is
about larger radii, where the ``interpretation`` evaluator's grid uses the paper's PGD-200 (fixed
0.01 steps, no random start), which can overestimate robustness.  This loads each finished run's
evaluated model (``cfbench.load_model``) and runs pyautoattack's standard AutoAttack at the given
radii on the same first ``n_examples`` test images (optionally only the runs of one ``model``, e.g.
``gap-cnn`` for the Fashion-MNIST reference leaderboard's Int row), printing a markdown table (robust accuracy
%, Clopper-Pearson 95% interval) and writing ``<root>/aa_grid_<dataset>.json`` (with each run's
per-example outcomes as a 0/1 string, ``robust_flags``, for paired differences between runs on
the same images).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main(argv):
    from cfbench import load_model
    from cfbench.config import make_config
    from cfbench.evaluators.base import proportion
    from cfbench.training.recipe import load_data
    from pyautoattack import AutoAttack

    root = Path(argv[1] if len(argv) > 1 else "runs-evidence-int")
    dataset = argv[2] if len(argv) > 2 else "digits"
    radii = [float(e) for e in (argv[3] if len(argv) > 3 else "0.25,0.3").split(",")]
    n = int(argv[4]) if len(argv) > 4 else 200
    seeds = {int(s) for s in (argv[5] if len(argv) > 5 else "0").split(",")}
    train_eps = float(argv[6]) if len(argv) > 6 and argv[6] != "all" else None
    model_name = argv[7] if len(argv) > 7 and argv[7] != "all" else None
    torch.set_num_threads(1)
    data = load_data(make_config(dataset=dataset))
    x, y = data.x_test[:n], data.y_test[:n]
    out = {}
    for rec_path in sorted(root.glob("*/record.json")):
        rec = json.loads(rec_path.read_text())
        c = rec["config"]
        if rec.get("status") != "ok" or c["dataset"]["name"] != dataset or c["seed"] not in seeds:
            continue
        if train_eps is not None and abs(float(c["threat"]["eps"]) - train_eps) > 1e-9:
            continue
        if model_name is not None and c["model"]["name"] != model_name:
            continue
        d = c["defense"]
        name = d["params"]["variant"] if d["name"] == "int-at" else d["name"]
        model = load_model(rec_path.parent)
        row = {}
        for eps in radii:
            t0 = time.perf_counter()
            adv = AutoAttack(model, norm=c["threat"]["norm"], eps=eps, version="standard", device="cpu", seed=c["seed"])
            xa, _ = adv.run_standard_evaluation(x.clone(), y.clone(), batch_size=250)
            with torch.no_grad():
                flags = (model(xa).argmax(1) == y)
            robust = int(flags.sum())
            # per example (0/1, the first n test images): paired comparisons between runs later
            row[f"{eps:g}"] = {**proportion(robust, n), "seconds": time.perf_counter() - t0,
                               "robust_flags": "".join("1" if f else "0" for f in flags.tolist())}
        out[f"{name} s{c['seed']} (trained at {c['threat']['eps']:g})"] = row
        print(f"{name} s{c['seed']} eps {c['threat']['eps']:g}: " + ", ".join(f"{k}: {100 * v['value']:.1f}%" for k, v in row.items()),
              file=sys.stderr)
    (root / f"aa_grid_{dataset}{'' if train_eps is None else f'_eps{train_eps:g}'}{'' if model_name is None else f'_{model_name}'}.json").write_text(json.dumps(out, indent=1))
    print("| run | " + " | ".join(f"AutoAttack {e:g}" for e in radii) + " |")
    print("| --- | " + " | ".join("---" for _ in radii) + " |")
    for k, row in out.items():
        print(f"| {k} | " + " | ".join(f"{100 * v['value']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]"
                                       for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
