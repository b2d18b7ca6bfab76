"""The evidence table of docs/robustness.md from the records under runs-evidence-robust/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs-evidence-robust")
ZOO = ("apgd-ce", "cw-l2", "deepfool", "fab", "eot-pgd", "spsa", "square")


def pct(m):
    return "n/a" if not isinstance(m, dict) or m.get("value") is None else f"{100 * m['value']:.1f}"


print("| run | clean | PGD-20 (500) | PGD on AA's 200 | AutoAttack (200) | gap [95% CI] | "
      + " | ".join(ZOO) + " | zoo worst case | flags |")
print("|" + "---|" * (7 + len(ZOO) + 1))
for f in sorted(runs.glob("digits-*/record.json")):
    r = json.loads(f.read_text())
    label = f"{r['config']['defense']['name']} / {r['config']['model']['name']}"
    if r["status"] != "ok":
        print(f"| {label} | run failed: {r['reason'][:80]}... |" + " |" * (6 + len(ZOO) + 1))
        continue
    m = r["metrics"]
    g = m.get("robust.autoattack.sanity.pgd_gap") or {}
    gap = (f"{100 * g['value']:.1f} [{100 * g['ci_low']:.1f}, {100 * g['ci_high']:.1f}]"
           if g.get("value") is not None else "n/a")
    flags = ", ".join(fl["name"] for fl in r.get("flags") or []) or "none"
    print(f"| {label} | {pct(m.get('clean.accuracy'))} | {pct(m.get('robust.pgd.accuracy'))} | "
          f"{pct(m.get('robust.autoattack.sanity.pgd_accuracy'))} | {pct(m.get('robust.autoattack.accuracy'))} | "
          f"{gap} | " + " | ".join(pct(m.get(f"robust.attacks.{a}.accuracy")) for a in ZOO)
          + f" | {pct(m.get('robust.attacks.worst_case.accuracy'))} | {flags} |")
