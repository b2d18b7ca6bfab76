"""Re-tune ACE's lambda1 for small images (docs/ace.md): ACE (its defaults otherwise) on a trained
target, for each lambda1 of a grid, on test images the counterfactual evaluator does not explain
(positions [start, start + n) of the test split's first half; the evaluator explains [0, 100)),
towards the target's runner-up class.  Prints a table and writes it as JSON.

    python scripts/ace_lambda_grid.py RUN_DIR --out runs-evidence-ace [--start 100 --n 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cfbench.attacks.ace import ACE, ACEParams
from cfbench.registry import get
from cfbench.store import read_record
from cfbench.store.io import write_json
from cfbench.store.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory of the target (a finished cfbench run)")
    ap.add_argument("--out", default="runs", help="the store whose _cache/ddpm holds the default DDPM")
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--grid", default="0,0.001,0.01,0.03,0.1")
    ap.add_argument("--json", default=None, help="where the table goes (default <run>/ace_lambda_grid.json)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rec = read_record(a.run)
    spec = get("dataset", rec["config"]["dataset"]["name"])()
    ds = spec.load()
    half = len(ds.x_test) // 2
    if a.start + a.n > half:
        raise SystemExit(f"--start {a.start} --n {a.n} leaves the first half of the test split ({half} images)")
    model = load_model(a.run)
    x = torch.from_numpy(ds.x_test[a.start:a.start + a.n])
    with torch.no_grad():
        logits = model(x)
    t = logits.topk(2, 1).indices[:, 1]
    rows = []
    for lam in (float(v) for v in a.grid.split(",")):
        t0 = time.perf_counter()
        ace = ACE(ACEParams(lambda1=lam)).fit(ds, cache_dir=Path(a.out) / "_cache",
                                              augmentation=spec.augmentation)
        res = ace.generate(model, x, t)
        d, d_pe = (res.x - x).flatten(1), (res.x_pe - x).flatten(1)
        rows.append({"lambda1": lam, "n": a.n, "flip_rate": float(res.valid.float().mean()),
                     "flip_rate_pre": float(res.valid_pe.float().mean()), "l1": float(d.abs().sum(1).mean()),
                     "l1_pre": float(d_pe.abs().sum(1).mean()), "linf": float(d.abs().amax(1).mean()),
                     "mask_fraction": float(res.mask.float().mean()), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    write_json(a.json or Path(a.run) / "ace_lambda_grid.json",
               {"run": str(a.run), "instances": [a.start, a.start + a.n], "rows": rows})
    print("| lambda1 | flip rate (refined) | flip rate (pre) | L1 refined | L1 pre | mask fraction | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['lambda1']:g} | {100 * r['flip_rate']:.1f} | {100 * r['flip_rate_pre']:.1f} | {r['l1']:.2f} | "
              f"{r['l1_pre']:.2f} | {r['mask_fraction']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
