"""Training a pool of models: one after another, a process pool, batched ensembles, both.

A pool of 8 cnn8 PGD-AT reference models on digits (each on M = 648 members, PGD-10,
batch 128, ``EPOCHS`` epochs -- shortened from the dataset's 30 so a round takes minutes;
the ratios are per training step and do not depend on the epoch count beyond the pool's
fixed start-up cost, which a shorter run overstates): wall time of

* ``serial``          -- in-process, one after another, one torch thread (``train_mode=serial``);
* ``pool``            -- ``LocalExecutor(workers=cores)``, one job per spawned worker, one thread each;
* ``batched``         -- all 8 as one stacked network in this process, one thread
  (:mod:`cfbench.training.ensemble`);
* ``batched+pool``    -- ``LocalExecutor(workers=cores, train_mode="auto")``: cores groups of
  8 / cores members, one per worker (what ``cfbench run`` does by default);
* ``batched+threads`` -- the stacked network in this process with one torch thread per core;
* ``threads``         -- serial with one torch thread per core (the "just use more threads" idea).

Sides alternate within each round and each side trains into a fresh cache, so nothing is
reused; the ratios of medians to ``serial`` go into ``extra_info`` and are printed.
Run: ``.venv/bin/python -m pytest benchmarks/bench_pool.py --benchmark-only -s``
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

from cfbench.execution import reference as XR
from cfbench.execution.local import LocalExecutor, default_workers
from cfbench.testing.tiny import tiny_config, tiny_data

K = 8
EPOCHS = 6
ROUNDS = 2


#: the ERM variant (no inner loop: a step is mostly per-call overhead, where batching wins most)
ERM_EPOCHS = 10


def _jobs(root: Path, defense: str = "pgd-at", epochs: int = EPOCHS):
    cfg = tiny_config(defense, sets={"data.pool_size": None, "model.width": 32, "epochs": epochs,
                                     "data.test_size": 100, "train.batch_size": 128})
    data = tiny_data(cfg)
    return XR.reference_jobs(cfg, data, K, root)


def _in_process(mode: str, threads: int, **kw):
    def side(root: Path) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ex = LocalExecutor(workers=1, train_mode=mode)
            paths = ex.run(_jobs(root, **kw))
            assert {ex.modes[str(p)] for p in paths} == {"batched" if mode == "batched" else "in-process"}
        finally:
            torch.set_num_threads(before)
    return side


def _pool(mode: str, **kw):
    def side(root: Path) -> None:
        with LocalExecutor(workers=default_workers(), train_mode=mode) as ex:
            paths = ex.run(_jobs(root, **kw))
            assert {ex.modes[str(p)] for p in paths} == {"worker-batched" if mode == "auto" else "worker"}
    return side


@pytest.mark.benchmark(group="pool")
def test_pool_vs_serial(benchmark):
    cores = default_workers()
    sides = {"serial": _in_process("serial", 1), "pool": _pool("serial"), "batched": _in_process("batched", 1),
             "batched+pool": _pool("auto"), "batched+threads": _in_process("batched", cores),
             "threads": _in_process("serial", cores)}
    _compare(benchmark, sides, f"{K} cnn8 PGD-AT models, {EPOCHS} epochs")


@pytest.mark.benchmark(group="pool")
def test_erm_pool_vs_serial(benchmark):
    kw = {"defense": "erm", "epochs": ERM_EPOCHS}
    sides = {"serial": _in_process("serial", 1, **kw), "pool": _pool("serial", **kw),
             "batched": _in_process("batched", 1, **kw), "batched+pool": _pool("auto", **kw)}
    _compare(benchmark, sides, f"{K} cnn8 ERM models, {ERM_EPOCHS} epochs")


def _compare(benchmark, sides, title: str) -> None:
    cores = default_workers()
    times: dict[str, list[float]] = {k: [] for k in sides}

    def one_round():
        for name, fn in sides.items():
            root = Path(tempfile.mkdtemp(prefix=f"cfbench-bench-{name.replace('+', '-')}-"))
            t0 = time.perf_counter()
            fn(root)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(root, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {f"{k}/serial": med[k] / med["serial"] for k in sides if k != "serial"}
    benchmark.extra_info.update({"median_seconds": med, "all_seconds": times, "ratios": ratios, "models": K,
                                 "title": title, "cores": cores})
    print(f"\n{title}, {cores} cores, {ROUNDS} interleaved rounds")
    for k in sides:
        print(f"  {k:16s} median {med[k]:7.1f} s  ratio {med[k] / med['serial']:.3f}  "
              f"(rounds: {', '.join(f'{t:.1f}' for t in times[k])})")


# -- how close to the core's arithmetic peak one step already is --------------------------

def _seconds(fn, repeat: int = 5) -> float:
    fn()                                              # warm-up (allocator, kernel choice)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _pgd_step(net, x, y):
    """One PGD-AT training step (PGD-10 from a random start, then the training loss's backward)."""
    from cfbench.attacks.pgd import default_step_size, pgd

    x_adv = pgd(net, x, y, eps=0.1, step_size=default_step_size(0.1, 10), steps=10)
    net.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x_adv), y).backward()


@pytest.mark.benchmark(group="pool")
def test_roofline(benchmark):
    """FLOPs of one PGD-AT step (``torch.utils.flop_counter``) over its time, one thread, against
    the same thread's single-precision matrix-product rate (a 1024 x 1024 sgemm): the fraction of
    the core's usable arithmetic a step already reaches.  If serial training reaches a fraction
    ``f`` of it, no scheme on ``c`` cores can go below ``f / c`` of the serial time without doing
    less arithmetic -- the bound behind the pool target (README "Performance")."""
    from torch.utils.flop_counter import FlopCounterMode

    from cfbench.training.ensemble import StackedNet
    from cfbench.training.recipe import build_model_for

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config("pgd-at", sets={"data.pool_size": None, "model.width": 32, "data.test_size": 100})
        data = tiny_data(cfg)
        x, y = data.x_pool[:128].clone(), data.y_pool[:128].clone()
        single = build_model_for(cfg, data, 0)
        stacked = StackedNet([build_model_for(cfg, data, s) for s in range(K)])
        xs, ys = x.repeat(K, 1, 1, 1), y.repeat(K)
        a = torch.randn(1024, 1024)
        gemm = _seconds(lambda: a @ a, repeat=20)
        peak = 2 * 1024 ** 3 / gemm
        out = {"sgemm_gflops": peak / 1e9}
        with FlopCounterMode(display=False) as fc:
            _pgd_step(single, x, y)
        serial_flops = fc.get_total_flops()
        out["step_gflop"] = serial_flops / 1e9
        for name, net, xb, yb in (("serial", single, x, y), ("batched", stacked, xs, ys)):
            # the useful arithmetic of the stacked step is K serial steps' (the flop counter's own
            # count for the grouped convolutions and batched products is ~28% higher)
            flops = serial_flops * (1 if name == "serial" else K)
            sec = _seconds(lambda: _pgd_step(net, xb, yb))
            out[f"{name}_step_seconds"] = sec
            out[f"{name}_gflops"] = flops / sec / 1e9
            out[f"{name}_fraction_of_sgemm"] = flops / sec / peak
        out["bound_2_cores"] = out["serial_fraction_of_sgemm"] / 2
        benchmark.extra_info.update(out)
        print("\n" + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
        benchmark.pedantic(_pgd_step, args=(single, x, y), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.benchmark(group="pool")
def test_compiled_step(benchmark):
    """Two kernel choices against the eager oneDNN step: ``torch.compile`` (inductor, which
    fuses the element-wise ops -- ReLU, max-pool -- that are 30 % of the step's profile, README
    "Performance") and PyTorch's native convolution (``torch.backends.mkldnn.enabled = False``).
    One cnn8 PGD-AT step, one thread, the same weights, alternating rounds; the ratios to eager
    and the one-time compile cost go into ``extra_info``.  A ratio above 1 means the choice loses."""
    from cfbench.training.recipe import build_model_for

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tiny_config("pgd-at", sets={"data.pool_size": None, "model.width": 32, "data.test_size": 100})
        data = tiny_data(cfg)
        x, y = data.x_pool[:128].clone(), data.y_pool[:128].clone()
        eager = build_model_for(cfg, data, 0)
        twin = build_model_for(cfg, data, 0)
        twin.load_state_dict(eager.state_dict())
        compiled = torch.compile(twin)
        t0 = time.perf_counter()
        _pgd_step(compiled, x, y)                     # compiles forward and backward graphs
        compile_s = time.perf_counter() - t0
        te, tc, tn = [], [], []
        for _ in range(5):
            te.append(_seconds(lambda: _pgd_step(eager, x, y), repeat=3))
            tc.append(_seconds(lambda: _pgd_step(compiled, x, y), repeat=3))
            # PyTorch's own im2col + sgemm convolution instead of oneDNN's (mkldnn off)
            torch.backends.mkldnn.enabled = False
            try:
                tn.append(_seconds(lambda: _pgd_step(eager, x, y), repeat=3))
            finally:
                torch.backends.mkldnn.enabled = True
        e = statistics.median(te)
        out = {"eager_step_seconds": e, "compiled_step_seconds": statistics.median(tc),
               "compiled_over_eager": statistics.median(tc) / e,
               "native_conv_over_eager": statistics.median(tn) / e,
               "first_compiled_step_seconds": compile_s}
        benchmark.extra_info.update(out)
        print("\n" + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
        benchmark.pedantic(_pgd_step, args=(compiled, x, y), rounds=3, iterations=1)
    finally:
        torch.set_num_threads(before)
