"""Training jobs: a model trained with a run's recipe on a subset of its population pool.

A :class:`TrainingJob` is plain data -- the resolved recipe (``RunConfig``), the run's data,
a boolean subset of the pool, a torch seed and the content-addressed path of the result --
and :func:`run_job` is a pure function of it: the same job always trains the same model,
a finished job (its file exists) is never recomputed, and an interrupted one resumes from
its per-epoch checkpoint next to the target path.  A lock file next to it makes two
processes that need the same model train it once; a truncated cached file is trained
again.  Evaluators and defenses *declare* jobs; an executor (:mod:`cfbench.execution.local`) runs them; nothing below calls the runner.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..store.io import file_lock, lock_path, read_tensor_meta, save_tensors_atomic
from ..training.recipe import fit_recipe, model_meta

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..data.splits import RunData


def subset_sha(positions: np.ndarray) -> str:
    """16 hex digits of the sha256 of int64 positions (identifies a subset of the pool)."""
    return hashlib.sha256(np.ascontiguousarray(positions, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainingJob:
    cfg: RunConfig                 # the recipe (defense, hyper-parameters, model, training budget)
    data: RunData                  # the run's data; the job trains on ``subset`` of its pool
    subset: np.ndarray             # boolean mask over the pool
    seed: int                      # torch seed of the training
    path: Path                     # where the model is written (content-addressed by the declarer)
    cache_dir: Path | None = None  # the shared cache the recipe may use (e.g. cf-at's generated sets)
    kind: str = "model"            # e.g. "cfbench-mia-reference"
    desc: str = "train"
    meta: dict[str, Any] = field(default_factory=dict)  # extra metadata stored with the weights

    def describe(self) -> dict[str, Any]:
        """What a record says about the job."""
        return {"kind": self.kind, "path": str(self.path), "seed": int(self.seed),
                "subset_sha256": subset_sha(np.flatnonzero(self.subset)), "n_train": int(self.subset.sum()),
                **{k: v for k, v in self.meta.items() if isinstance(v, (int, float, str, bool))}}


def model_file_problem(path: str | Path, job: TrainingJob | None = None) -> str | None:
    """Why the model file at ``path`` cannot be used as ``job``'s result (None if it can): missing,
    truncated or otherwise unreadable (safetensors checks that the header covers the whole file),
    no cfbench metadata, or metadata of another job (kind or training subset)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        meta = read_tensor_meta(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt cache entry
        return f"unreadable ({type(e).__name__}: {e})"
    if not isinstance(meta, dict) or "kind" not in meta:
        return "has no cfbench metadata"
    if job is not None:
        if meta.get("kind") != job.kind:
            return f"holds a {meta.get('kind')!r} model, not a {job.kind!r} one"
        sha = subset_sha(np.flatnonzero(job.subset))
        if meta.get("subset_sha256", sha) != sha:
            return "was trained on another subset"
    return None


def run_job(job: TrainingJob, *, progress: bool = False) -> Path:
    """Train ``job`` unless its model file exists and is usable; return the file's path
    (:func:`run_job_reporting` also says whether this call trained it)."""
    return run_job_reporting(job, progress=progress)[0]


def run_job_reporting(job: TrainingJob, *, progress: bool = False) -> tuple[Path, bool]:
    """:func:`run_job`, returning ``(path, trained)``: ``trained`` is True when this call
    trained the model (the file was missing, or unusable and removed), False when a usable
    file was there or another process trained it while this one waited -- what an executor
    records as the job's mode ("in-process" or "cached").

    Two processes that need the same model never both train it: training holds an exclusive
    ``flock`` on ``.<name>.lock`` next to the model file, and whoever gets the lock looks for
    the file again first (the other process waits, then finds it).  A cached file that is
    truncated or unreadable (:func:`model_file_problem`) is removed with its checkpoints and
    trained again -- never trusted, never a failure of every later run.  The checkpoints of a
    finished model are removed (a kill between the model's rename and that cleanup leaves
    them; they are never resumed, because a usable model file is never trained again)."""
    path = Path(job.path)
    ckpt = path.with_suffix(".ckpt")
    if model_file_problem(path, job) is None:
        _remove_dir(ckpt)
        return path, False

    def waiting() -> None:
        if progress:
            print(f"waiting for another process training {path} ...", file=sys.stderr)

    with file_lock(lock_path(path), on_wait=waiting):
        problem = model_file_problem(path, job)
        if problem is None:  # trained by the process we waited for
            _remove_dir(ckpt)
            return path, False
        if problem != "missing":
            warnings.warn(f"cached model {path} {problem}: removed, training it again", stacklevel=2)
            path.unlink(missing_ok=True)
            _remove_dir(ckpt)  # its checkpoints belong to the file that is gone: start afresh
        _train(job, path, ckpt, progress)
    return path, True


def _remove_dir(d: Path) -> None:
    if d.is_dir() and not d.is_symlink():
        shutil.rmtree(d, ignore_errors=True)


def _train(job: TrainingJob, path: Path, ckpt: Path, progress: bool) -> None:
    mask = torch.from_numpy(np.asarray(job.subset, dtype=bool))
    x, y = job.data.x_pool[mask], job.data.y_pool[mask]
    t0 = time.perf_counter()
    model, fctx = fit_recipe(job.cfg, job.data, x, y, seed=job.seed, checkpoint_dir=ckpt,
                             cache_dir=job.cache_dir,
                             progress=progress, desc=job.desc, pool_positions=np.flatnonzero(job.subset),
                             run_jobs=lambda jobs: [run_job(j, progress=progress) for j in jobs])
    save_model(job, path, model, fctx, time.perf_counter() - t0)
    _remove_dir(ckpt)


def save_model(job: TrainingJob, path: Path, model, fctx, seconds: float, **extra: Any) -> None:
    """Write ``job``'s trained model atomically with its metadata (``extra``: e.g. the batched
    ensemble's ``train_mode`` and ``batch_members``)."""
    from ..models import unwrap

    meta = {"kind": job.kind, **job.meta, "train_seed": int(job.seed),
            "subset_sha256": subset_sha(np.flatnonzero(job.subset)), "n_train": int(job.subset.sum()),
            "train_seconds": seconds, **model_meta(job.cfg, job.data, fctx),
            "final_loss": (fctx.history[-1].get("loss") if fctx.history else None),
            # what the process that trained it ran under (``--deterministic`` reaches pool and Ray workers)
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()), **extra}
    save_tensors_atomic(path, unwrap(model).state_dict(), meta)
