"""Harness overhead, measured side by side in one run (ratios, not absolute seconds).

* one PGD-AT epoch through cfbench's shared loop vs a bare hand-written PGD-AT loop on the
  same model, data, batch order and PGD steps (target: ratio <= 1.10);
* AutoAttack through cfbench's evaluator vs a direct ``pyautoattack`` call on the same model
  and examples (target: ratio <= 1.05).

The two sides alternate (A B A B ...) so that load from other processes hits both alike;
the ratio of medians goes into the benchmark's ``extra_info`` and is printed.

Run: ``.venv/bin/pytest benchmarks/bench_harness.py --benchmark-only -s``
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cfbench.attacks.base import ThreatModel
from cfbench.config import TrainParams
from cfbench.data.specs import Digits
from cfbench.data.splits import make_split
from cfbench.defenses import FitContext
from cfbench.models import build_model
from cfbench.training import lr_at
from cfbench_baselines.pgd_at import PGDAT, PGDATParams

EPS, STEPS = 0.1, 10
ROUNDS = 5


@pytest.fixture(scope="module")
def data():
    return make_split(Digits().load(), None, 0.5, 0)


def _model(ds):
    torch.manual_seed(0)
    return build_model("cnn8", (1, 8, 8), 10, ds.mean, ds.std, {})


def _cfbench_epoch(d):
    model = _model(d.dataset)
    ctx = FitContext(threat=ThreatModel("Linf", EPS), train=TrainParams(epochs=1, batch_size=64, lr=0.05),
                     device=torch.device("cpu"), seed=0, num_classes=10, augmentation="shift", progress=False)
    PGDAT(PGDATParams(steps=STEPS)).fit(model, d.x_train, d.y_train, ctx)


def _bare_epoch(d):
    """What a researcher would write by hand: Madry PGD-AT, same batches, same PGD."""
    model = _model(d.dataset)
    x, y = d.x_train, d.y_train
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0 * 100_003 + 0)
    batches = torch.randperm(len(x), generator=g).split(64)
    alpha = 2.5 * EPS / STEPS
    for i, idx in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(0.05, "cosine", i, len(batches))
        xb, yb = x[idx], y[idx]
        model.eval()
        delta = (torch.rand_like(xb) * 2 - 1) * EPS
        delta = (xb + delta).clamp(0, 1) - xb
        for _ in range(STEPS):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(xb + delta), yb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            delta = ((xb + (delta + alpha * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1) - xb).detach()
        model.train()
        loss = F.cross_entropy(model(xb + delta), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _side_by_side(benchmark, ours, bare, rounds):
    t_ours, t_bare = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t0)
    ratio = statistics.median(t_ours) / statistics.median(t_bare)
    benchmark.extra_info.update(ratio=ratio, cfbench_median_s=statistics.median(t_ours),
                                bare_median_s=statistics.median(t_bare), rounds=rounds)
    benchmark.pedantic(ours, rounds=1, iterations=1)
    return ratio


def test_pgd_at_epoch_vs_bare_loop(benchmark, data):
    ratio = _side_by_side(benchmark, lambda: _cfbench_epoch(data), lambda: _bare_epoch(data), ROUNDS)
    print(f"\nPGD-AT epoch: cfbench / bare loop = {ratio:.3f}")
    assert ratio <= 1.10


def test_autoattack_vs_direct_pyautoattack(benchmark, data, tmp_path):
    from pyautoattack import AutoAttack

    from cfbench.config import make_config
    from cfbench.evaluators.base import EvalContext
    from cfbench.evaluators.robust import AutoAttackParams, AutoAttackRobustness

    model = _model(data.dataset)
    ctx = FitContext(threat=ThreatModel("Linf", EPS), train=TrainParams(epochs=3, batch_size=64, lr=0.05),
                     device=torch.device("cpu"), seed=0, num_classes=10, augmentation="shift", progress=False)
    PGDAT(PGDATParams(steps=3)).fit(model, data.x_train, data.y_train, ctx)
    n = 50
    x, y = data.x_test[:n], data.y_test[:n]

    def ours():
        ectx = EvalContext(model=model, config=make_config(), data=data, threat=ThreatModel("Linf", EPS),
                           device=torch.device("cpu"), run_dir=Path(tmp_path), cache_dir=Path(tmp_path), seed=0,
                           progress=False)
        AutoAttackRobustness(AutoAttackParams(n_examples=n)).evaluate(ectx)

    def direct():
        AutoAttack(model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=0).run_standard_evaluation(
            x, y, batch_size=250)

    ratio = _side_by_side(benchmark, ours, direct, 4)
    print(f"\nAutoAttack: cfbench / direct pyautoattack = {ratio:.3f}")
    assert ratio <= 1.05
