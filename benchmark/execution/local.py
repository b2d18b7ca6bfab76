"""The local executor: runs declared training jobs in this process.

Jobs are pure functions of their value (:func:`cfbench.execution.jobs.run_job`), so the
order does not change any result and a finished job is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .jobs import TrainingJob, run_job


class LocalExecutor:
    """Runs jobs one after another in this process; ``on_job(job)`` is called for each
    declared job (the runner records them)."""

    def __init__(self, *, progress: bool = False, on_job: Callable[[TrainingJob], None] | None = None):
        self.progress = progress
        self.on_job = on_job

    def run(self, jobs: Sequence[TrainingJob]) -> list[Path]:
        out = []
        for job in jobs:
            if self.on_job is not None:
                self.on_job(job)
            out.append(run_job(job, progress=self.progress))
        return out

    __call__ = run


def run_jobs(jobs: Sequence[TrainingJob], *, progress: bool = False) -> list[Path]:
    """Run ``jobs`` serially in this process (what a direct, run-less use needs)."""
    return LocalExecutor(progress=progress).run(jobs)
