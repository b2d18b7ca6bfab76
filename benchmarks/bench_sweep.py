"""A sweep of 8 small digits runs: serial (one worker) vs a 2-worker Ray instance vs the
2-worker local pool, side by side in one run (fresh output folders per side and round, so
nothing is reused).  Ratios of medians in ``extra_info``.  A run trains for digits' default 30
epochs on a 400-image pool (a few seconds each): with shorter runs the executors' own start-up
(Ray's head, the pool's spawned workers) is most of what is measured (README "Performance" gives
the ratios at 4, 15 and 30 epochs).

Run: ``.venv/bin/pytest benchmarks/bench_sweep.py --benchmark-only -s``
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest

from cfbench.sweep import sweep

GRID = """
defense = ["erm", "pgd-at"]
dataset = "digits"
seed = [0, 1, 2, 3]
evaluators = "clean,pgd"
[set]
epochs = 30
"data.pool_size" = 400
"pgd.n_examples" = 100
"""
ROUNDS = 2


@pytest.mark.benchmark(group="sweep")
def test_ray_sweep_vs_serial(benchmark, tmp_path):
    pytest.importorskip("ray")
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID, encoding="utf-8")
    sides = {"serial": {"executor": "local", "workers": 1}, "ray-2": {"executor": "ray", "workers": 2},
             "local-2": {"executor": "local", "workers": 2}}
    times: dict[str, list[float]] = {k: [] for k in sides}

    def one_round():
        for name, kw in sides.items():
            out = Path(tempfile.mkdtemp(prefix=f"cfbench-sweep-{name}-"))
            t0 = time.perf_counter()
            rows = sweep(grid, out=out, log=lambda *a: None, **kw)
            times[name].append(time.perf_counter() - t0)
            assert all(r["status"] == "ok" for _, r in rows)
            shutil.rmtree(out, ignore_errors=True)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = {"serial/ray-2": med["serial"] / med["ray-2"], "serial/local-2": med["serial"] / med["local-2"]}
    benchmark.extra_info.update({"median_seconds": med, "speedup": speedup})
    print(f"\n8 runs: medians {med}; speed-ups {speedup}")
