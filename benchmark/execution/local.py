"""The local executor: runs declared training jobs in this process or in a process pool.

Jobs are pure functions of their value (:func:`cfbench.execution.jobs.run_job`): the order
and the process do not change any result, and a finished job (its file exists) is skipped.

``LocalExecutor(workers=N)``
    ``workers <= 1`` runs every job in this process when it is needed.  ``workers > 1``
    starts a pool of ``N`` *spawned* worker processes (one torch thread each unless
    ``threads`` says otherwise: the small models of this benchmark train fastest that way,
    and N processes of one thread use N cores without contending).  :meth:`submit` starts
    jobs in the background -- the runner submits the jobs its evaluators declare *before* it
    trains the target, so reference models train on the other cores while the target
    trains and while AutoAttack runs -- and :meth:`run` waits for the ones it needs (jobs
    already submitted are not started twice).

``train_mode`` (``serial`` by default, also from :func:`~.executors.make_executor`,
i.e. ``cfbench run``): with ``auto`` or ``batched``, jobs of one small-model recipe train as
batched ensembles (:mod:`cfbench.execution.batched`): in this process as one group, in a
pool as one group per worker; :attr:`modes` then says ``batched`` / ``worker-batched``.

A worker receives the job without its arrays (:class:`RemoteJob`): it reloads the run's
data from the recipe (``load_data(cfg)``, cached per worker) and checks the data's sha256
against the parent's; a job whose data were changed in memory (a test that flips labels)
cannot be reproduced from its recipe and is run in this process instead.  Plugin files
loaded with ``--plugin`` are loaded in every worker too.  Two processes that need the same
model never both train it (the file lock in :func:`~cfbench.execution.jobs.run_job`); a job
whose lock another process holds is started last (pool) or deferred (in-process), so the free
jobs train first.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store.io import is_locked, lock_path
from .jobs import TrainingJob, run_job, run_job_reporting

EXECUTORS = ("local", "ray")


def default_workers() -> int:
    """The machine's cores (what ``os.sched_getaffinity`` allows this process)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class DataMismatch(RuntimeError):
    """A worker's data, reloaded from the recipe, differ from the parent's (changed in memory)."""


@dataclass(frozen=True)
class RemoteJob:
    """A :class:`TrainingJob` without its arrays: what crosses a process boundary."""

    cfg: Any
    subset: np.ndarray
    seed: int
    path: Path
    cache_dir: Path | None
    kind: str
    desc: str
    meta: dict[str, Any] = field(default_factory=dict)
    data_sha256: str = ""

    @classmethod
    def of(cls, job: TrainingJob, data_sha256: str) -> RemoteJob:
        return cls(cfg=job.cfg, subset=np.asarray(job.subset, dtype=bool), seed=job.seed, path=Path(job.path),
                   cache_dir=job.cache_dir, kind=job.kind, desc=job.desc, meta=dict(job.meta),
                   data_sha256=data_sha256)


# -- worker side -------------------------------------------------------------------------

_WORKER_DATA: dict[str, Any] = {}


def _init_worker(plugin_files: Sequence[str], threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..registry import load_plugin_file

    for path in plugin_files:
        load_plugin_file(path)


def _data_for(cfg) -> Any:
    from ..hashing import canonical_hash
    from ..params import to_dict
    from ..training.recipe import load_data

    key = canonical_hash({"dataset": cfg.dataset, "data": to_dict(cfg.data), "dir": cfg.data_dir})
    if key not in _WORKER_DATA:
        data = load_data(cfg)
        _WORKER_DATA[key] = (data, data.dataset.fingerprint())
    return _WORKER_DATA[key]


def _rebuild(job: RemoteJob) -> TrainingJob:
    data, sha = _data_for(job.cfg)
    if job.data_sha256 and sha != job.data_sha256:
        raise DataMismatch(f"the data of job {job.desc!r}, reloaded from its recipe, differ from the caller's "
                           "(changed in memory?)")
    return TrainingJob(cfg=job.cfg, data=data, subset=job.subset, seed=job.seed, path=job.path,
                       cache_dir=job.cache_dir, kind=job.kind, desc=job.desc, meta=job.meta)


def _job_determinism(cfg) -> None:
    """Give this worker the run's ``--deterministic`` setting, both ways (a worker process is
    shared by jobs of possibly different runs -- Ray's are)."""
    from ..config import apply_determinism

    apply_determinism(bool(getattr(cfg, "deterministic", False)), reset=True)


def run_remote(job: RemoteJob) -> str:
    """Worker entry point (also Ray's task body): rebuild the job with data reloaded from its
    recipe, check them against the parent's sha256, apply the run's ``--deterministic``, run
    it; returns the model path."""
    _job_determinism(job.cfg)
    return str(run_job(_rebuild(job), progress=False))


def run_remote_group(jobs: Sequence[RemoteJob]) -> list[tuple[str, str]]:
    """Worker entry point of a batched unit (:func:`cfbench.execution.batched.run_group`)."""
    from .batched import run_group

    if jobs:
        _job_determinism(jobs[0].cfg)
    return [(str(p), how) for p, how in run_group([_rebuild(j) for j in jobs], progress=False)]


# -- parent side -------------------------------------------------------------------------

class LocalExecutor:
    """Runs declared jobs in this process (``workers <= 1``) or a pool of spawned processes;
    ``on_job(job)`` is called once for each distinct job (the runner records them)."""

    name = "local"

    def __init__(self, *, workers: int = 1, progress: bool = False, threads: int | None = 1,
                 on_job: Callable[[TrainingJob], None] | None = None, log: Callable[..., None] | None = None,
                 train_mode: str = "serial"):
        from .batched import check_train_mode

        self.workers = int(workers)
        #: ``serial``, ``batched`` or ``auto`` (:mod:`cfbench.execution.batched`)
        self.train_mode = check_train_mode(train_mode)
        self.progress = progress
        self.threads = threads
        self.on_job = on_job
        self.log = log
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Path, Future] = {}
        self._seen: set[Path] = set()
        self._sha: dict[int, str] = {}
        #: how each job was run: {path: "cached" | "in-process" | "worker" | "batched" | "worker-batched"}
        self.modes: dict[str, str] = {}
        self._group_results: dict[Path, tuple[Path, str]] = {}

    # -- helpers
    def _declare(self, job: TrainingJob) -> bool:
        path = Path(job.path)
        if path in self._seen:
            return False
        self._seen.add(path)
        if self.on_job is not None:
            self.on_job(job)
        return True

    def _data_sha(self, job: TrainingJob) -> str:
        key = id(job.data)
        if key not in self._sha:
            self._sha[key] = job.data.dataset.fingerprint()
        return self._sha[key]

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            from ..registry import plugin_files

            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(tuple(plugin_files()), self.threads))
        return self._pool

    # -- API
    def submit(self, jobs: Sequence[TrainingJob]) -> None:
        """Start ``jobs`` in the background (pool only; a no-op in-process)."""
        fresh = []
        for job in jobs:
            self._declare(job)
            path = Path(job.path)
            if self.workers <= 1 or path in self._futures or path.exists() or any(job.path == j.path for j in fresh):
                continue
            fresh.append(job)
        from .batched import plan

        # Jobs another process is training right now (lock held) go to the back of the queue and
        # never into a batched group: a worker would otherwise sit blocked on the lock while
        # free jobs wait behind it (a second seed of a recipe sharing the reference pool).
        busy = [j for j in fresh if is_locked(lock_path(j.path))]
        free = [j for j in fresh if not any(j is b for b in busy)]
        units = plan(free, self.train_mode, self.workers) + [([j], False) for j in busy]
        for unit, batched in units:
            if batched:
                fut = self._ensure_pool().submit(run_remote_group, [RemoteJob.of(j, self._data_sha(j)) for j in unit])
            else:
                fut = self._ensure_pool().submit(run_remote, RemoteJob.of(unit[0], self._data_sha(unit[0])))
            for j in unit:
                self._futures[Path(j.path)] = fut

    def run(self, jobs: Sequence[TrainingJob]) -> list[Path]:
        """Run (or wait for) every job; their model paths in order.

        A job that another process is training right now (its lock is held: e.g. a second run
        of the same recipe in a sweep, which shares the reference pool) is deferred, not waited
        for: this process trains the free jobs first and only then waits for the busy ones (and
        finds their files).  Two runs of one recipe thus split its pool instead of one waiting
        while the other trains it all.  Order never changes a result (jobs are pure)."""
        self.submit(jobs)
        from .batched import plan, run_group

        local = [j for j in jobs if Path(j.path) not in self._futures and not Path(j.path).exists()
                 and not is_locked(lock_path(j.path))]            # busy elsewhere: deferred below
        groups = {Path(j.path): unit for unit, batched in plan(local, self.train_mode, 1) if batched for j in unit}
        out: list[Path] = []
        deferred: list[tuple[int, TrainingJob]] = []
        for job in jobs:
            self._declare(job)
            path = Path(job.path)
            fut = self._futures.get(path)
            if fut is not None:
                try:
                    res = fut.result()
                    if isinstance(res, list):                   # a batched unit: [(path, how), ...]
                        got = dict(res)[str(path)]
                        out.append(path)
                        self.modes[str(path)] = "worker-batched" if got == "batched" else f"worker-{got}"
                    else:
                        out.append(Path(res))
                        self.modes[str(path)] = "worker"
                    if self.progress:
                        from ..progress import log_line

                        log_line(f"{job.desc}: ready (trained in a worker process)")
                    continue
                except DataMismatch:
                    pass  # reproducible only from the caller's in-memory data: run it here
            if path in groups and path not in self._group_results:
                for p, how in run_group(groups[path], progress=self.progress):
                    self._group_results[p] = (p, {"batched": "batched", "serial": "in-process"}.get(how, how))
            if path in self._group_results and path in groups:
                p, how = self._group_results[path]
                out.append(p)
                self.modes[str(path)] = how
                continue
            if not path.exists() and is_locked(lock_path(path)):
                deferred.append((len(out), job))             # another process trains it: later
                out.append(path)
                continue
            out.append(self._run_here(job))
        while deferred:                                      # free ones first, then wait for the first busy one
            k = next((k for k, (_, j) in enumerate(deferred)
                      if Path(j.path).exists() or not is_locked(lock_path(j.path))), 0)
            i, job = deferred.pop(k)
            out[i] = self._run_here(job)
        return out

    def _run_here(self, job: TrainingJob) -> Path:
        got, trained = run_job_reporting(job, progress=self.progress)
        self.modes[str(job.path)] = "in-process" if trained else "cached"
        return got

    __call__ = run

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_jobs(jobs: Sequence[TrainingJob], *, progress: bool = False) -> list[Path]:
    """Run ``jobs`` serially in this process (what a direct, run-less use needs)."""
    return LocalExecutor(progress=progress).run(jobs)
