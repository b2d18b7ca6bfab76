"""A sweep of 8 small digits runs: serial (one worker) vs a 2-worker Ray instance the sweep
starts itself vs a running 2-CPU Ray cluster (``--address``) vs the 2-worker local pool, side by
side in one run (fresh output folders per side and round, so
nothing is reused).  Ratios of medians in ``extra_info``.  A run trains for digits' default 30
epochs on a 400-image pool (a few seconds each): with shorter runs the executors' own start-up
(Ray's head, the pool's spawned workers) is most of what is measured (README "Performance" gives
the ratios at 4, 15 and 30 epochs).

Run: ``.venv/bin/pytest benchmarks/bench_sweep.py --benchmark-only -s``
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
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


@contextlib.contextmanager
def _ray_head(cpus: int):
    """A Ray head on loopback with ``cpus`` CPUs (as ``ray start --head`` on a user's machine),
    stopped afterwards; yields its address."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--num-cpus={cpus}",
                           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
                           f"--temp-dir=/tmp/ray-bench-{os.getpid()}"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert head.returncode == 0, head.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.benchmark(group="sweep")
def test_ray_sweep_vs_serial(benchmark, tmp_path):
    """Four sides a round: serial (one worker, in-process), a local Ray instance started by the
    sweep (``--executor ray --workers 2``, as one CLI call: its start-up is measured, and the
    instance is shut down after every sweep), a sweep on an already running 2-CPU Ray cluster
    (``--address``: only the per-sweep worker processes start inside the measurement), and the
    2-worker local pool."""
    ray = pytest.importorskip("ray")
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID, encoding="utf-8")
    with _ray_head(2) as address:
        sides = {"serial": {"executor": "local", "workers": 1}, "ray-2": {"executor": "ray", "workers": 2},
                 "ray-2-cluster": {"executor": "ray", "address": address},
                 "local-2": {"executor": "local", "workers": 2}}
        times: dict[str, list[float]] = {k: [] for k in sides}

        def one_round():
            for name, kw in sides.items():
                out = Path(tempfile.mkdtemp(prefix=f"cfbench-sweep-{name}-"))
                t0 = time.perf_counter()
                rows = sweep(grid, out=out, log=lambda *a: None, **kw)
                if kw["executor"] == "ray":
                    ray.shutdown()      # the next Ray side starts (or connects) as a fresh CLI call would
                times[name].append(time.perf_counter() - t0)
                assert all(r["status"] == "ok" for _, r in rows)
                shutil.rmtree(out, ignore_errors=True)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = {f"serial/{k}": med["serial"] / med[k] for k in med if k != "serial"}
    benchmark.extra_info.update({"median_seconds": med, "speedup": speedup})
    print(f"\n8 runs: medians {med}; speed-ups {speedup}")
