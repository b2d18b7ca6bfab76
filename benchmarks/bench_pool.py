"""Training a pool of models: one after another in one process vs the local process pool.

A pool of 8 cnn8 PGD-AT reference models on digits (each on M = 648 members, PGD-10,
``EPOCHS`` epochs): wall time of

* ``serial``  -- :func:`cfbench.execution.local.run_jobs` (in-process, one after another, one thread);
* ``pool``    -- ``LocalExecutor(workers=cores)`` (spawned workers, one torch thread each);
* ``threads`` -- serial, but with torch's default intra-op threads (one per core): the "just
  use more threads" alternative.

Sides alternate per round (serial, pool, threads, serial, ...) and each round trains into a
fresh cache, so no side reuses another's models; the ratios of medians go into
``extra_info`` and are printed.  Run: ``.venv/bin/pytest benchmarks/bench_pool.py --benchmark-only -s``
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
from cfbench.execution.local import LocalExecutor, default_workers, run_jobs
from cfbench.testing.tiny import tiny_config, tiny_data

K = 8
EPOCHS = 3
ROUNDS = 2


def _jobs(root: Path):
    cfg = tiny_config("pgd-at", sets={"data.pool_size": None, "model.width": 32, "epochs": EPOCHS,
                                      "data.test_size": 100, "train.batch_size": 128})
    data = tiny_data(cfg)
    return XR.reference_jobs(cfg, data, K, root)


def _serial(root: Path, threads: int = 1) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_jobs(_jobs(root))
    finally:
        torch.set_num_threads(before)


def _pool(root: Path) -> None:
    with LocalExecutor(workers=default_workers()) as ex:
        ex.run(_jobs(root))


@pytest.mark.benchmark(group="pool")
def test_pool_vs_serial(benchmark):
    sides = {"serial": lambda r: _serial(r, 1), "pool": _pool,
             "threads": lambda r: _serial(r, default_workers())}
    times: dict[str, list[float]] = {k: [] for k in sides}

    def one_round():
        for name, fn in sides.items():
            root = Path(tempfile.mkdtemp(prefix=f"cfbench-bench-{name}-"))
            t0 = time.perf_counter()
            fn(root)
            times[name].append(time.perf_counter() - t0)
            shutil.rmtree(root, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"pool/serial": med["pool"] / med["serial"], "threads/serial": med["threads"] / med["serial"]}
    benchmark.extra_info.update({"median_seconds": med, "ratios": ratios, "models": K, "epochs": EPOCHS,
                                 "cores": default_workers()})
    print(f"\n{K} cnn8 PGD-AT models, {EPOCHS} epochs: medians {med}; ratios {ratios}")
