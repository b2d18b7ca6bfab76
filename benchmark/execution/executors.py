"""Choosing an executor by name: ``local`` (:mod:`.local`) or ``ray`` (:mod:`.ray_executor`)."""

from __future__ import annotations

from ..errors import UsageError
from .local import EXECUTORS, LocalExecutor, default_workers


def make_executor(name: str = "local", *, workers: int | None = None, address: str | None = None,
                  progress: bool = False, threads: int | None = 1, on_job=None, log=None):
    """The executor called ``name`` (``local`` or ``ray``) for a run's declared jobs."""
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
                         log=log)
