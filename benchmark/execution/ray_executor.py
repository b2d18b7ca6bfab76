"""The Ray executor: declared training jobs (and, in :mod:`cfbench.sweep`, whole runs) as
Ray tasks -- an existing engine, no home-made scheduler.

Each job is a ``ray.remote`` task with a resource request (``num_cpus=1``, ``num_gpus=1``
for a CUDA recipe) and ``max_retries`` so a worker lost mid-job is retried by Ray; a job is a
pure function of its value and writes its model atomically under a file lock, so a retried
or duplicated task never leaves a half-written or doubly trained model.  ``address`` joins an
existing cluster (``ray start --head`` on one machine, ``ray start --address=HEAD:PORT`` on
the others; every node needs cfbench installed, the datasets at the same paths, and the
store folder on a shared filesystem); without it a local Ray instance is started with
``workers`` CPUs.  Results are identical to the local executor's (tested).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .jobs import TrainingJob
from .local import RemoteJob, run_remote

MAX_RETRIES = 3
_READY: set[tuple[str, ...]] = set()


def _task(job: RemoteJob, plugin_files: tuple[str, ...], threads: int | None) -> str:
    """Ray task body: set up the worker process once (threads, plugin files), run the job."""
    from .local import _init_worker

    key = (str(threads), *plugin_files)
    if key not in _READY:
        _init_worker(plugin_files, threads)
        _READY.add(key)
    return run_remote(job)


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast (UsageError) when a Ray address does not answer, instead of Ray's long retries."""
    if address == "auto":
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--address {address!r} is not HOST:PORT, ray://HOST:PORT or auto.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UsageError(f"the Ray cluster at --address {address!r} is unreachable ({e}). Start one with "
                         "`ray start --head --port=PORT` or give the head node's HOST:PORT.") from e


def init_ray(address: str | None, workers: int | None):
    try:
        import ray
    except ImportError as e:
        raise UsageError("--executor ray needs Ray: pip install 'cfbench[ray]' (or `pip install ray`).") from e
    if address is not None:
        check_address(address)
    if ray.is_initialized():
        # a caller in this process (a notebook, a benchmark) already connected Ray: reuse that
        # connection, unless it points at another cluster than the one asked for -- silently
        # running on the wrong cluster would be worse than an error
        # (a ray:// client address names the client server, not the GCS: not comparable)
        if address is not None and address != "auto" and not address.startswith("ray://"):
            current = str(ray.get_runtime_context().gcs_address)
            if current != address:
                raise UsageError(f"Ray is already initialised in this process and connected to {current!r}, "
                                 f"not to --address {address!r}. Call ray.shutdown() first, or leave out "
                                 "--address to use the running connection.")
    else:
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if address is None:
            kwargs["num_cpus"] = workers
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
    return ray


class RayExecutor:
    """Same interface as :class:`~cfbench.execution.local.LocalExecutor` (``submit``, ``run``)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, workers: int | None = None, progress: bool = False,
                 threads: int | None = 1, on_job: Callable[[TrainingJob], None] | None = None,
                 log: Callable[..., None] | None = None):
        from ..registry import plugin_files

        self.ray = init_ray(address, workers)
        self.on_job = on_job
        self.threads = threads
        self._plugins = tuple(plugin_files())
        self._refs: dict[Path, Any] = {}
        self._seen: set[Path] = set()
        self.modes: dict[str, str] = {}

    def _declare(self, job: TrainingJob) -> None:
        path = Path(job.path)
        if path not in self._seen:
            self._seen.add(path)
            if self.on_job is not None:
                self.on_job(job)

    def submit(self, jobs: Sequence[TrainingJob]) -> None:
        task = self.ray.remote(_task)
        for job in jobs:
            self._declare(job)
            path = Path(job.path)
            if path in self._refs or path.exists():
                continue
            gpus = 1 if str(job.cfg.device).startswith("cuda") else 0
            self._refs[path] = task.options(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES).remote(
                RemoteJob.of(job, job.data.dataset.fingerprint()), self._plugins, self.threads)

    def run(self, jobs: Sequence[TrainingJob]) -> list[Path]:
        from .jobs import run_job_reporting
        from .local import DataMismatch

        self.submit(jobs)
        out = []
        for job in jobs:
            path = Path(job.path)
            ref = self._refs.get(path)
            if ref is not None:
                try:
                    out.append(Path(self.ray.get(ref)))
                    self.modes[str(path)] = "ray"
                    continue
                except Exception as e:  # noqa: BLE001 - Ray wraps the task's exception
                    if not isinstance(getattr(e, "cause", None), DataMismatch) and "DataMismatch" not in str(e):
                        raise
            got, trained = run_job_reporting(job)
            out.append(got)
            self.modes[str(path)] = "in-process" if trained else "cached"
        return out

    __call__ = run

    def close(self) -> None:
        pass

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
