"""Training jobs: a model trained with a run's recipe on a subset of its population pool.

A :class:`TrainingJob` is plain data -- the resolved recipe (``RunConfig``), the run's data,
a boolean subset of the pool, a torch seed and the content-addressed path of the result --
and :func:`run_job` is a pure function of it: the same job always trains the same model,
a finished job (its file exists) is never recomputed, and an interrupted one resumes from
its per-epoch checkpoint next to the target path.  Evaluators and defenses *declare* jobs;
an executor (:mod:`cfbench.execution.local`) runs them; nothing below calls the runner.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..store.io import save_tensors_atomic
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


def run_job(job: TrainingJob, *, progress: bool = False) -> Path:
    """Train ``job`` unless its model file exists; return the file's path."""
    path = Path(job.path)
    if path.exists():
        return path
    mask = torch.from_numpy(np.asarray(job.subset, dtype=bool))
    x, y = job.data.x_pool[mask], job.data.y_pool[mask]
    ckpt = path.with_suffix(".ckpt")
    t0 = time.perf_counter()
    model, fctx = fit_recipe(job.cfg, job.data, x, y, seed=job.seed, checkpoint_dir=ckpt,
                             cache_dir=job.cache_dir,
                             progress=progress, desc=job.desc, pool_positions=np.flatnonzero(job.subset),
                             run_jobs=lambda jobs: [run_job(j, progress=progress) for j in jobs])
    seconds = time.perf_counter() - t0
    from ..models import unwrap

    meta = {"kind": job.kind, **job.meta, "train_seed": int(job.seed),
            "subset_sha256": subset_sha(np.flatnonzero(job.subset)), "n_train": int(job.subset.sum()),
            "train_seconds": seconds, **model_meta(job.cfg, job.data, fctx),
            "final_loss": (fctx.history[-1].get("loss") if fctx.history else None)}
    save_tensors_atomic(path, unwrap(model).state_dict(), meta)
    shutil.rmtree(ckpt, ignore_errors=True)
    return path
