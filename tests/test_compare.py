"""cfbench compare: intervals against independent computations, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cfbench.cli import main
from cfbench.present.compare import newcombe, paired_bootstrap, tpr_at
from sklearn.metrics import roc_curve


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, example (a): 56/70 vs 48/80,
    # method 10 (hybrid score): difference 0.2000, interval 0.0524 to 0.3339
    d, lo, hi = newcombe(48, 80, 56, 70)
    assert d == pytest.approx(0.2)
    assert lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_tpr_at_fpr_equals_the_roc_curves_best_point_under_the_fpr(seed):
    rng = np.random.default_rng(seed)
    member = rng.random(800) < 0.5
    scores = rng.normal(size=800) + 0.7 * member
    fpr, tpr, _ = roc_curve(member, scores)
    for f in (0.01, 0.05, 0.2):
        assert tpr_at(scores, member, f) == pytest.approx(tpr[fpr <= f].max())


def test_paired_bootstrap_is_centred_on_the_difference_and_narrower_than_unpaired():
    rng = np.random.default_rng(0)
    a = (rng.random(500) < 0.8).astype(float)
    b = a.copy()
    flip = rng.choice(500, 25, replace=False)
    b[flip] = 1 - b[flip]                       # b differs from a on 5% of the examples
    d, lo, hi = paired_bootstrap(a, b, np.mean)
    assert d == pytest.approx(b.mean() - a.mean()) and lo <= d <= hi
    _, ulo, uhi = newcombe(int(a.sum()), 500, int(b.sum()), 500)
    assert (hi - lo) < 0.5 * (uhi - ulo)        # pairing removes the shared variance


def test_compare_command_on_two_runs(tmp_path, capsys):
    common = ["--dataset", "digits", "--evaluators", "clean,pgd,autoattack,mia", "--quiet", "--set", "epochs=2",
              "--set", "mia.reference_models=2", "--set", "data.pool_size=200", "--set", "pgd.n_examples=48",
              "--set", "pgd.steps=3", "--set", "autoattack.n_examples=24", "--out", str(tmp_path)]
    assert main(["run", "--defense", "erm", *common]) == 0
    assert main(["run", "--defense", "erm", "--seed", "1", *common]) == 0
    a, b = sorted(p.name for p in tmp_path.glob("digits-erm-*"))
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    assert main(["compare", "--runs", str(tmp_path), a, b, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "paired bootstrap over the same test examples" in text
    res = json.loads(out.read_text())
    rows = {r["metric"]: r for r in res["comparisons"][0]["rows"]}
    ra, rb = (json.loads((tmp_path / x / "record.json").read_text()) for x in (a, b))
    assert rows["clean.accuracy"]["diff"] == pytest.approx(
        rb["metrics"]["clean.accuracy"]["value"] - ra["metrics"]["clean.accuracy"]["value"])
    assert any(k.endswith(".auc") for k in rows)
    # the robust outcomes are stored per attacked example, so robust accuracy is paired too
    for metric, key, n in (("robust.pgd.accuracy", "robust.pgd.robust", 48),
                           ("robust.autoattack.accuracy", "robust.autoattack.robust", 24)):
        for x, r in ((a, ra), (b, rb)):
            flags = np.load(tmp_path / x / "per_example.npz")[key]
            assert flags.dtype == bool and flags.shape == (n,)
            assert flags.mean() == pytest.approx(r["metrics"][metric]["value"])
        assert rows[metric]["how"].startswith("paired bootstrap"), rows[metric]
        assert rows[metric]["diff"] == pytest.approx(rb["metrics"][metric]["value"] - ra["metrics"][metric]["value"])
    assert main(["compare", "--runs", str(tmp_path), a]) == 2          # one run: a usage error
    assert main(["compare", "--runs", str(tmp_path), a, "nope"]) == 2
