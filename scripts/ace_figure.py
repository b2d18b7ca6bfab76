"""The counterfactual example images of a ``counterfactual`` run as one PNG (docs/ace.md): rows
original / ACE pre-explanation / ACE refined / proto-cf / plain PGD, each captioned with the
target model's prediction (green: the target class t reached).

    .venv/bin/python scripts/ace_figure.py RUN_DIR OUT.png
"""

from __future__ import annotations

import io
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cfbench.store.examples import load_examples  # noqa: E402
from cfbench.store.io import atomic_write_bytes  # noqa: E402
from cfbench.store.models import load_model  # noqa: E402


def main() -> None:
    run, out = sys.argv[1], sys.argv[2]
    ex = load_examples(run)
    model = load_model(run)
    ace = ex["counterfactual-ace"]
    t = ace["y"]
    rows = [("original", ace["clean"]), ("ACE pre-expl.", ace.get("pre")), ("ACE refined", ace["adv"]),
            ("proto-cf", ex.get("counterfactual-proto-cf", {}).get("adv")),
            ("plain PGD", ex.get("counterfactual-pgd", {}).get("adv"))]
    rows = [(n, a) for n, a in rows if a is not None]
    k = len(t)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k, 1.25 * len(rows)))
    for i, (name, imgs) in enumerate(rows):
        with torch.no_grad():
            pred = model(torch.from_numpy(np.asarray(imgs, dtype=np.float32))).argmax(1).numpy()
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(imgs[j, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            hit = i > 0 and pred[j] == t[j]
            ax.set_title(f"→{pred[j]}" + (f" (t={t[j]})" if i == 0 else ""), fontsize=7,
                         color="green" if hit else "black")
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out, buf.getvalue())
    print(out)


if __name__ == "__main__":
    main()
