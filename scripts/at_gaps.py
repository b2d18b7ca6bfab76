"""Does (adversarial) training memorise in this protocol?  Train-test gaps of finished runs.

    .venv/bin/python scripts/at_gaps.py RUN_DIR [RUN_DIR ...]  [--steps 20] [--max-test N] [--json OUT.json]

For each run folder (``record.json`` + ``model.safetensors`` + ``splits.npz``): the clean
accuracy on the members (the training set) and on the test split, and the **robust** accuracy
under PGD (``--steps`` iterations of 2.5 eps / steps, random start, the run's threat model;
robust = correct clean *and* after the attack) on the members and on the test split, and the
mean clean cross-entropy on members and non-members (the loss gap that loss-based membership
inference reads).  The robust train-test gap is the signature of robust overfitting
(Rice et al. 2020) and of the memorisation Song, Shokri & Mittal (2019) measured for PGD-AT.
``--max-test N`` evaluates the first N images of the run's test split only (Fashion-MNIST's
10,000 test images under PGD-20 are ~20 min of one shared core per model).  The rows are
printed as a Markdown table, one row as soon as its run is measured; ``--json`` also writes them (through cfbench's
atomic writer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cfbench.attacks.base import ThreatModel
from cfbench.attacks.pgd import PGDAttack, PGDParams
from cfbench.registry import get
from cfbench.store.io import write_json
from cfbench.store.models import load_model


def _data(rec: dict, run: Path):
    ds_name = rec["config"]["dataset"]["name"]
    spec = get("dataset", ds_name)()
    ds = spec.load(rec.get("config", {}).get("data_dir"))
    s = np.load(run / "splits.npz")
    pool, member, test = s["pool_idx"], s["member_mask"].astype(bool), s["test_idx"]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return (t(ds.x_train[pool[member]]), t(ds.y_train[pool[member]]), t(ds.x_train[pool[~member]]),
            t(ds.y_train[pool[~member]]), t(ds.x_test[test]), t(ds.y_test[test]))


@torch.no_grad()
def _clean(model, x, y):
    logits = torch.cat([model(x[i:i + 512]) for i in range(0, len(x), 512)])
    return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def _robust(model, x, y, threat, steps, seed=0):
    torch.manual_seed(seed)
    att = PGDAttack(PGDParams(steps=steps))
    ok = []
    for i in range(0, len(x), 256):
        xb, yb = x[i:i + 256], y[i:i + 256]
        xa = att.perturb(model, xb, yb, threat)
        with torch.no_grad():
            ok.append((model(xb).argmax(1) == yb) & (model(xa).argmax(1) == yb))
    return float(torch.cat(ok).float().mean())


def gaps(run: Path, steps: int = 20, max_test: int | None = None) -> dict:
    rec = json.loads((run / "record.json").read_text())
    torch.set_num_threads(1)
    model = load_model(run)
    xm, ym, xn, yn, xt, yt = _data(rec, run)
    if max_test is not None:
        xt, yt = xt[:max_test], yt[:max_test]
    th = rec["config"]["threat"]
    threat = ThreatModel(th["norm"], float(th["eps"]))
    tr_acc, tr_loss = _clean(model, xm, ym)
    nm_acc, nm_loss = _clean(model, xn, yn)
    te_acc, _ = _clean(model, xt, yt)
    rtr, rte = _robust(model, xm, ym, threat, steps), _robust(model, xt, yt, threat, steps)
    cfg = rec["config"]
    return {"run": run.name, "defense": cfg["defense"]["name"], "epochs": cfg["train"]["epochs"],
            "eps": th["eps"], "members": len(ym), "train_acc": tr_acc, "test_acc": te_acc,
            "gap": tr_acc - te_acc, "robust_train_acc": rtr, "robust_test_acc": rte, "robust_gap": rtr - rte,
            "member_loss": tr_loss, "nonmember_loss": nm_loss, "nonmember_acc": nm_acc, "pgd_steps": steps,
            "test_images": len(yt),
            "loss_attack_auc": (rec["metrics"].get("mia.loss.auc") or {}).get("value")
            if isinstance(rec["metrics"].get("mia.loss.auc"), dict) else rec["metrics"].get("mia.loss.auc")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-test", type=int, default=None, help="first N test images only (default: all)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    print("| run | defense | epochs | eps | train acc. % | test acc. % | gap | robust train % | robust test % "
          "| robust gap | member / non-member CE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for run in a.runs:
        r = gaps(run, a.steps, a.max_test)
        rows.append(r)
        print(f"| `{r['run']}` | {r['defense']} | {r['epochs']} | {r['eps']} | {100 * r['train_acc']:.1f} | "
              f"{100 * r['test_acc']:.1f} | {100 * r['gap']:.1f} | {100 * r['robust_train_acc']:.1f} | "
              f"{100 * r['robust_test_acc']:.1f} | {100 * r['robust_gap']:.1f} | "
              f"{r['member_loss']:.3f} / {r['nonmember_loss']:.3f} |", flush=True)
    if a.json:
        write_json(a.json, rows)


if __name__ == "__main__":
    main()
