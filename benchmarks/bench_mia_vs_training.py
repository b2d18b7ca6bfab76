"""Membership-inference scoring at CIFAR-10 scale vs training ONE reference model, same process.

Requirement (issue 3): scoring LiRA and RMIA over 100,000 examples and 64 reference models
takes a small fraction of the time of training one reference model.

Run either way:

    .venv/bin/pytest benchmarks/bench_mia_vs_training.py -m slow -s  # asserts the ratio
    .venv/bin/python benchmarks/bench_mia_vs_training.py [--recipe digits|fashion-mnist]

Scoring side (synthetic signals, generated once and not timed; same shapes as the evaluator
holds them since evaluator version 2: phi and log p_y float64 (K, N, A), threshold scores
float64 (K, N)):
K = 64 reference models, N = 100,000 candidates, A = 2 query augmentations, Z = 10,000
population points, 10 classes.  Timed:

* ``lira_rmia``: the six reference-model attacks exactly as the evaluator computes them
  (LiRA online / online-fixed / offline / offline-fixed, RMIA online / offline in float64 log
  space with the continuous tie-break, the latter once per augmentation);
* ``scoring``: the evaluator's whole scoring stage, :func:`attack_scores` (adds the four
  class-threshold fits on a 500,000-signal shadow subset and the threshold-free attacks) plus
  :func:`summarize_attacks` (AUC, balanced accuracy, TPR at 1%, 0.1%, 0.01% FPR with
  Clopper-Pearson intervals, down-sampled ROC) for all 17 attacks.

Training side: the training job of reference model 0 (:func:`cfbench.execution.reference.reference_job`,
run by :func:`cfbench.execution.jobs.run_job`) for the
default ``digits`` PGD-AT recipe (cnn8, 30 epochs, 648 examples, PGD-10) -- the cheapest
recipe cfbench has, so the ratio is a conservative one -- or with ``--recipe fashion-mnist``
the Fashion-MNIST PGD-AT recipe of the validation run (cnn28, 10 epochs, 2,000 examples).

Both wall-clock and CPU (process) seconds are reported: on a shared machine the wall-clock
ratio depends on what else runs; the CPU-time ratio does not (use ``--threads 1`` so that
CPU time is not inflated by thread spinning).  The test asserts the CPU-time ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

K, N, A, Z, C = 64, 100_000, 2, 10_000, 10
RECIPES = {
    "digits": dict(dataset="digits", defense="pgd-at", sets={}),
    "fashion-mnist": dict(dataset="fashion-mnist", defense="pgd-at",
                          sets={"data.pool_size": 4000, "epochs": 10, "defense.steps": 8, "defense.step_size": 0.02}),
}


def synthetic_signals(seed: int = 0):
    rng = np.random.default_rng(seed)
    in_mask = np.argsort(rng.random((K, N), dtype=np.float32), axis=0) < K // 2
    member = rng.random(N) < 0.5
    labels = rng.integers(0, C, N)
    offset = rng.normal(0, 3, N).astype(np.float32)
    phi = rng.standard_normal((K, N, A), dtype=np.float32)
    phi += offset[None, :, None]
    phi += in_mask[:, :, None]
    phi = phi.astype(np.float64)
    refs = {"phi": phi, "logp": -np.logaddexp(0.0, -phi), "logp_pop": np.log(rng.beta(4, 2, (K, Z, A)))}
    for name in ("loss", "confidence", "entropy", "modified_entropy"):
        refs[name] = rng.standard_normal((K, N)) + in_mask
    tphi = offset[:, None] + member[:, None] + rng.standard_normal((N, A))
    target = {"phi": tphi, "logp": -np.logaddexp(0.0, -tphi), "logp_pop": np.log(rng.beta(4, 2, (Z, A)))}
    for name in ("loss", "confidence", "entropy", "modified_entropy"):
        target[name] = rng.standard_normal(N) + member
    return labels, member, in_mask, target, refs


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def time_lira_rmia(target, refs, in_mask) -> tuple[float, float]:
    from cfbench.mia import scores as S

    t0 = _clock()
    S.lira_online(target["phi"], refs["phi"], in_mask, False)
    S.lira_online(target["phi"], refs["phi"], in_mask, "global")
    S.lira_offline(target["phi"], refs["phi"], in_mask, False)
    S.lira_offline(target["phi"], refs["phi"], in_mask, "global")
    for online in (True, False):
        np.mean([S.rmia_scores(target["logp"][:, a], refs["logp"][:, :, a], in_mask, target["logp_pop"][:, a],
                               refs["logp_pop"][:, :, a], online=online, log_inputs=True, continuous=True)
                 for a in range(A)], axis=0)
    return _since(t0)


def time_scoring(labels, member, target, refs, in_mask) -> tuple[float, float]:
    from cfbench.evaluators.mia import MIAParams, attack_scores, summarize_attacks

    p = MIAParams()
    t0 = _clock()
    scores, _ = attack_scores(labels, target, refs, in_mask, adv_logits=None, num_classes=C,
                              class_shadow_max=p.class_shadow_max)
    summarize_attacks(scores, member, p.fprs)
    return _since(t0)


def time_one_reference(recipe: str = "digits") -> tuple[tuple[float, float], dict]:
    from cfbench.config import make_config
    from cfbench.execution.jobs import run_job
    from cfbench.execution.reference import reference_job
    from cfbench.training.recipe import load_data

    r = RECIPES[recipe]
    cfg = make_config(dataset=r["dataset"], defense=r["defense"], evaluators=["mia"], sets=r["sets"])
    data = load_data(cfg)
    with tempfile.TemporaryDirectory() as d:
        t0 = _clock()
        run_job(reference_job(cfg, data, 0, Path(d)))
        seconds = _since(t0)
    return seconds, {"recipe": f"{r['dataset']} {r['defense']} {cfg.model}", "epochs": cfg.train.epochs,
                     "n_train": int(data.member_mask.sum())}


def run(recipe: str = "digits") -> dict:
    import torch

    labels, member, in_mask, target, refs = synthetic_signals()
    t_lr = min(time_lira_rmia(target, refs, in_mask) for _ in range(2))
    t_sc = min(time_scoring(labels, member, target, refs, in_mask) for _ in range(2))
    t_tr, info = time_one_reference(recipe)
    return {"K": K, "N": N, "A": A, "Z": Z, "torch_threads": torch.get_num_threads(),
            "lira_rmia_seconds": t_lr[0], "scoring_seconds": t_sc[0], "train_one_reference_seconds": t_tr[0],
            "lira_rmia_cpu": t_lr[1], "scoring_cpu": t_sc[1], "train_one_reference_cpu": t_tr[1],
            "ratio_lira_rmia": t_lr[0] / t_tr[0], "ratio_scoring": t_sc[0] / t_tr[0],
            "ratio_lira_rmia_cpu": t_lr[1] / t_tr[1], "ratio_scoring_cpu": t_sc[1] / t_tr[1], **info}


def _print(res: dict) -> None:
    print(f"\nK={res['K']} reference models, N={res['N']:,} examples, A={res['A']} queries, "
          f"Z={res['Z']:,} population; torch threads {res['torch_threads']}")
    print(f"{'':54s} {'wall s':>8s} {'CPU s':>8s}")
    print(f"{'LiRA (4 variants) + RMIA (2)':54s} {res['lira_rmia_seconds']:8.2f} {res['lira_rmia_cpu']:8.2f}")
    print(f"{'whole scoring stage (17 attacks + metrics)':54s} {res['scoring_seconds']:8.2f} {res['scoring_cpu']:8.2f}")
    print(f"{'train ONE reference model':54s} {res['train_one_reference_seconds']:8.2f} "
          f"{res['train_one_reference_cpu']:8.2f}")
    print(f"  ({res['recipe']}, {res['epochs']} epochs, {res['n_train']} examples)")
    for label, key in (("ratio LiRA+RMIA / one reference model", "ratio_lira_rmia"),
                       ("ratio whole scoring / one reference model", "ratio_scoring")):
        print(f"{label:54s} {res[key]:8.3f} {res[key + '_cpu']:8.3f}")


@pytest.mark.slow
def test_scoring_is_a_small_fraction_of_one_reference_training():
    res = run("digits")
    _print(res)
    assert res["ratio_lira_rmia_cpu"] < 0.5
    assert res["ratio_scoring_cpu"] < 1.0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="digits")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    _print(run(args.recipe))
