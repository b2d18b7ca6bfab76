"""Training jobs as batched ensembles: which jobs train together (:func:`plan`) and how a
group trains (:func:`run_group`), with the locks and cache of :func:`~.jobs.run_job`.

``train_mode``
    ``serial``  -- every job one at a time (the defense's own ``fit``);
    ``batched`` -- jobs of one batchable recipe and training-set size train as one stacked
    network (:mod:`cfbench.training.ensemble`), a lone one too (M = 1);
    ``auto``    -- ``batched`` for two or more such jobs, one at a time otherwise (and for
    every recipe :func:`cfbench.training.ensemble.batch_problem` refuses).

A pool executor with ``W`` workers splits a group of ``K`` jobs into ``min(W, K // 2)``
groups (one per worker, at least two members each).  A member's weights do not depend on
how many others share its group when there are at least two (tested), so the result is the
same in-process and in a pool of any size; a group of one (``batched`` only) runs the plain
convolution kernels and can differ in the last bits.  A batched member is the *same cache
entry* as the one-at-a-time model of its job (see :mod:`cfbench.training.ensemble` for the
tolerance); the file's metadata says ``train_mode`` and ``batch_members``.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..hashing import canonical_hash
from ..store.io import file_lock, lock_path
from ..training.checkpoint import CKPT_NAME
from ..training.ensemble import (TRAIN_MODES, Diverged, Member, batch_problem, group_checkpoint_matches,
                                 train_stacked)
from .jobs import TrainingJob, _remove_dir, _train, model_file_problem, save_model


def check_train_mode(mode: str) -> str:
    if mode not in TRAIN_MODES:
        raise UsageError(f"unknown train mode {mode!r}. Valid choices: {', '.join(TRAIN_MODES)}.")
    return mode


def _key(job: TrainingJob) -> tuple:
    return (canonical_hash(job.cfg.canonical()), id(job.data), int(np.asarray(job.subset).sum()), job.kind,
            str(job.cache_dir))


def plan(jobs: Sequence[TrainingJob], mode: str = "auto", workers: int = 1) -> list[tuple[list[TrainingJob], bool]]:
    """Units of work, in the jobs' order: ``(jobs, batched)``; ``batched`` units train together."""
    check_train_mode(mode)
    if mode == "serial":
        return [([j], False) for j in jobs]
    sets: dict[tuple, list[TrainingJob]] = {}
    ok: dict[tuple, bool] = {}
    for j in jobs:
        k = _key(j)
        sets.setdefault(k, []).append(j)
        if k not in ok:
            ok[k] = batch_problem(j.cfg) is None
    units: list[tuple[list[TrainingJob], bool]] = []
    for k, members in sets.items():
        if not ok[k] or (mode == "auto" and len(members) < 2):
            units.extend(([j], False) for j in members)
            continue
        parts = max(1, min(int(workers), len(members) // 2))
        units.extend(([members[i] for i in chunk], True) for chunk in np.array_split(np.arange(len(members)), parts))
    return units


def run_group(jobs: Sequence[TrainingJob], *, progress: bool = False) -> list[tuple[Path, str]]:
    """Train the jobs of one batched unit (one recipe, equal-size subsets); per job its model path
    and how it was obtained: ``cached``, ``batched`` or ``serial`` (a member resuming a checkpoint of
    an interrupted one-at-a-time training, or every member after a non-finite loss, which then
    raises for exactly the member that diverges).  Every member's lock is held while training
    (taken in path order, so two groups never deadlock); a member another process finished
    meanwhile is not trained again."""
    how: dict[Path, str] = {}
    todo = [j for j in jobs if model_file_problem(j.path, j) is not None]
    for j in jobs:
        if not any(j is t for t in todo):
            _remove_dir(Path(j.path).with_suffix(".ckpt"))
            how[Path(j.path)] = "cached"
    with contextlib.ExitStack() as stack:
        for j in sorted(todo, key=lambda j: str(j.path)):
            stack.enter_context(file_lock(lock_path(j.path)))
        batch, alone = [], []
        for j in todo:
            path = Path(j.path)
            problem = model_file_problem(path, j)
            if problem is None:                       # trained by a process we waited for
                how[path] = "cached"
                continue
            if problem != "missing":
                warnings.warn(f"cached model {path} {problem}: removed, training it again", stacklevel=2)
                path.unlink(missing_ok=True)
                _remove_dir(path.with_suffix(".ckpt"))
            (alone if path.with_suffix(".ckpt").is_dir() else batch).append(j)
        if batch:
            try:
                _train_batched(batch, progress)
                how.update({Path(j.path): "batched" for j in batch})
            except Diverged:
                alone.extend(batch)
        for j in alone:
            path = Path(j.path)
            _train(j, path, path.with_suffix(".ckpt"), progress)
            how[path] = "serial"
    return [(Path(j.path), how[Path(j.path)]) for j in jobs]


def _train_batched(jobs: Sequence[TrainingJob], progress: bool) -> None:
    first = jobs[0]
    members = []
    for j in jobs:
        mask = torch.from_numpy(np.asarray(j.subset, dtype=bool))
        members.append(Member(j.data.x_pool[mask], j.data.y_pool[mask], seed=int(j.seed),
                              pool_positions=np.flatnonzero(j.subset), desc=j.desc))
    if progress:
        from ..progress import log_line

        log_line(f"{first.cfg.defense}: training {len(jobs)} models as one batched ensemble "
                 f"({', '.join(j.desc for j in jobs)})")
    ckpt_dir = group_checkpoint_dir(jobs)
    # the members' model files (content-addressed: their identity), relative to the folder the
    # checkpoint is in, so that `cfbench doctor` finds them from anywhere
    ids = [os.path.relpath(j.path, ckpt_dir.parent) for j in jobs]
    ckpt = ckpt_dir / CKPT_NAME
    if ckpt.exists() and not group_checkpoint_matches(ckpt, ids):
        _remove_dir(ckpt_dir)                           # damaged, or not this group's: start over
    t0 = time.perf_counter()
    try:
        trained = train_stacked(first.cfg, first.data, members, checkpoint=ckpt, member_ids=ids)
    except Diverged:
        _remove_dir(ckpt_dir)
        raise
    seconds = (time.perf_counter() - t0) / len(jobs)
    for j, (model, fctx) in zip(jobs, trained):
        save_model(j, Path(j.path), model, fctx, seconds, train_mode="batched", batch_members=len(jobs))
    _remove_dir(ckpt_dir)


def group_checkpoint_dir(jobs: Sequence[TrainingJob]) -> Path:
    """Where a batched group keeps its per-epoch checkpoint: beside its first member's model,
    named by the hash of its members' model paths (the same group after a restart finds it)."""
    return Path(jobs[0].path).parent / f"group-{canonical_hash([str(j.path) for j in jobs])[:16]}.ckpt"
