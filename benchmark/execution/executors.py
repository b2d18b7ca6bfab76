"""Choosing an executor by name: ``local`` (:mod:`.local`) or ``ray`` (:mod:`.ray_executor`)."""

from __future__ import annotations

from ..errors import UsageError
from .local import EXECUTORS, LocalExecutor, default_workers


def make_executor(name: str = "local", *, workers: int | None = None, address: str | None = None,
                  progress: bool = False, threads: int | None = 1, on_job=None, log=None,
                  train_mode: str | None = None):
    """The executor called ``name`` (``local`` or ``ray``) for a run's declared jobs.

    ``train_mode`` (local executor): ``serial`` (default; the environment variable
    ``CFBENCH_TRAIN_MODE`` replaces the default), ``batched`` or ``auto`` -- whether jobs of
    one small-model recipe train as batched ensembles (:mod:`cfbench.execution.batched`).
    Serial is the default because its models are bit-identical whichever executor (in-process,
    pool, Ray) trains them, while a batched member equals its serial twin only within the
    tolerance of :mod:`cfbench.training.ensemble` (summation order), and on this 2-core CPU
    batching won little (``benchmarks/bench_pool.py``, README "Performance").
    The Ray executor trains one job per task."""
    import os

    from .batched import check_train_mode

    train_mode = check_train_mode(train_mode or os.environ.get("CFBENCH_TRAIN_MODE") or "serial")
    if name not in EXECUTORS:
        raise UsageError(f"unknown executor {name!r}. Valid choices: {', '.join(EXECUTORS)}.")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers} is not valid: give a number >= 1.")
    if name == "ray":
        from .ray_executor import RayExecutor  # Ray is optional: imported only when asked for

        return RayExecutor(address=address, workers=workers, progress=progress, threads=threads, on_job=on_job,
                           log=log)
    if address is not None:
        raise UsageError("--address applies to --executor ray only.")
    return LocalExecutor(workers=workers or default_workers(), progress=progress, threads=threads, on_job=on_job,
                         log=log, train_mode=train_mode)
