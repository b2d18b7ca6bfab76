"""Re-measure a stored AutoAttack number with one direct ``pyautoattack`` call (VALIDATION.md).

For each run directory: rebuild the test split from the record's config, load the saved model
(``cfbench.load_model``), run ``pyautoattack.AutoAttack(..., version="standard",
seed=<run seed>).run_standard_evaluation`` once on the same first ``autoattack.n_examples``
test images, and compare the number of robust examples with the record's
``robust.autoattack.accuracy``.  Independent of cfbench's AutoAttack evaluator (which drives
the package one attack at a time and keeps its own resumable state); only the data loading and
the model file are shared.

    .venv/bin/python scripts/validate_autoattack.py leaderboards/runs/digits-pgd-at-*/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from pyautoattack import AutoAttack

    from cfbench import load_model
    from cfbench.data.splits import make_split
    from cfbench.registry import get

    bad = 0
    for run in args.runs:
        rec = json.loads((run / "record.json").read_text())
        cfg = rec["config"]
        aa = cfg["evaluators"].get("autoattack")
        if aa is None:
            print(f"{run}: no autoattack evaluator in this run; skipped")
            continue
        n, version = aa["params"]["n_examples"], aa["params"]["version"]
        d = cfg["data"]
        ds = get("dataset", cfg["dataset"]["name"])().load(cfg.get("data_dir"))
        split = make_split(ds, d["pool_size"], d["member_fraction"], d["split_seed"], d["test_size"])
        x, y = split.x_test[:n].contiguous(), split.y_test[:n].contiguous()
        model = load_model(run).eval()
        adv, _ = AutoAttack(model, norm=cfg["threat"]["norm"], eps=cfg["threat"]["eps"], version=version,
                            device="cpu", seed=cfg["seed"]).run_standard_evaluation(x, y, batch_size=250)
        with torch.no_grad():
            direct = int((model(adv).argmax(1) == y).sum())
        stored = rec["metrics"]["robust.autoattack.accuracy"]
        k = round(stored["value"] * stored["n"])
        same = k == direct and stored["n"] == len(y)
        bad += not same
        print(f"{run.name}: stored {k}/{stored['n']} = {stored['value']:.4f}; direct pyautoattack "
              f"{direct}/{len(y)} = {direct / len(y):.4f}  -> {'identical' if same else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
