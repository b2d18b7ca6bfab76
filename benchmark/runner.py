"""One run: config -> data -> model -> defense.fit -> evaluators -> record.

A run is a pure function of its config: ``execute`` reuses a finished record with the same
config hash instead of recomputing it, resumes an interrupted training from its last
checkpoint, and records a failed run as failed (with its reason) -- a failed record is
never reused and never enters a leaderboard.  The run folder's life -- one process per run
id, ``--force`` in a staging folder swapped in only after success, recovery after a kill at
any instant -- is :mod:`cfbench.store.lifecycle`.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RunConfig, apply_determinism
from .errors import UsageError
from .evaluators.base import EvalContext
from .evaluators.sanity import merge_flags
from .execution.local import LocalExecutor
from .registry import get, registry
from .store import CACHE_DIR, EXAMPLES, MODEL, PER_EXAMPLE, RECORD, SCHEMA_VERSION, versions, write_json
from .store.io import atomic_write_text, remove_stale_temps, save_npz_atomic
from .store.lifecycle import (ERROR, clean_finished, finished_record, fresh_staging, recover, run_lock,
                              staging_dir, swap_in, trash_dir)
from .store.record import SPLITS
from .store.examples import save_examples
from .store.models import save_model
from .progress import log_line
from .training.recipe import fit_recipe, load_data, model_meta, threat_of


def component_info(kind: str, name: str) -> dict[str, Any]:
    entry = registry(kind).entry(name)
    cls = registry(kind).get(name)
    return {"name": name, "version": getattr(cls, "version", 1), **entry.provenance(),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "family": getattr(cls, "family", None), "description": getattr(cls, "description", "")}


def near_chance(metrics: dict[str, Any], num_classes: int) -> list[str]:
    """A warning when clean accuracy is within 10 points of chance (a barely trained model:
    its robustness and privacy numbers mean little)."""
    m = metrics.get("clean.accuracy")
    v = m.get("value") if isinstance(m, dict) else None
    chance = 1.0 / num_classes
    if isinstance(v, (int, float)) and v < chance + 0.10:
        return [f"clean accuracy {100 * v:.1f}% is near chance ({100 * chance:.0f}%): the model is barely trained "
                "(raise train.epochs or check lr); its robustness and privacy numbers mean little"]
    return []


def cost_plan(cfg: RunConfig, n_train: int) -> str:
    """What the run will compute, counted from its protocol (not a time guess)."""
    import math

    steps = math.ceil(n_train / cfg.train.batch_size) * cfg.train.epochs
    inner = int(getattr(cfg.defense_params, "steps", 0) or 0) if cfg.defense != "cf-at" else 0
    passes = steps * (1 + inner)
    parts = [f"target: {steps:,} training steps x {1 + inner} forward-backward passes = {passes:,}"]
    mia = cfg.evaluator_params.get("mia")
    k = int(getattr(mia, "reference_models", 0) or 0) if mia is not None else 0
    if k:
        parts.append(f"{k} reference models of the same recipe ({k * passes:,} passes; cached ones are reused)")
    aa = cfg.evaluator_params.get("autoattack")
    if aa is not None:
        parts.append(f"AutoAttack on {aa.n_examples} test images (up to ~1,900 gradient steps and 5,000 Square "
                     "queries each; robust ones only after the first attack)")
    return "plan: " + "; ".join(parts)


def check_namespace(evaluator: str, metrics: dict[str, Any], namespaces: dict[str, str],
                    taken: dict[str, Any]) -> None:
    """Every metric of ``evaluator`` must lie in its namespace and be new (a plugin can never
    overwrite another evaluator's or the defense's numbers)."""
    ns = namespaces[evaluator]
    for key in metrics:
        if not key.startswith(ns + "."):
            raise UsageError(f"evaluator {evaluator!r} returned metric {key!r} outside its namespace {ns!r}; "
                             f"its metric keys must start with {ns + '.'!r}.")
        if key in taken:
            raise UsageError(f"evaluator {evaluator!r} returned metric {key!r}, which this run already has.")


@dataclass
class RunOutcome:
    record: dict[str, Any]
    run_dir: Path
    reused: bool


def execute(cfg: RunConfig, out: str | Path = "runs", *, force: bool = False, progress: bool = True,
            log=print, executor=None) -> RunOutcome:
    """Run ``cfg`` into ``out`` (see the module docstring).  ``executor`` runs the training jobs
    the evaluators and the defense declare (:mod:`cfbench.execution.local`, ``.ray_executor``);
    default: in this process.  Jobs that evaluators declare up front (``declare_jobs``) are
    submitted before the target trains, so a pool executor trains them on the other cores
    while the target trains and while the other evaluators run."""
    out = Path(out)
    run_id = cfg.run_id()
    final_dir = out / run_id
    # one process per run id (a second identical run waits, then reuses the first one's record)
    with run_lock(out, run_id, on_wait=lambda: log(f"waiting for another cfbench process working on {run_id} ...")):
        for action in recover(out, run_id):  # what a killed process left half done
            log(f"cfbench: {action}")
        rec = None if force else finished_record(final_dir)  # an unreadable record = an unfinished run
        if rec is not None:
            clean_finished(final_dir)  # checkpoints left by a kill after the record's rename
            return RunOutcome(rec, final_dir, True)
        # --force works in a staging folder: a finished run is replaced only by a finished run
        run_dir = fresh_staging(out, run_id) if force else final_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)
        try:
            record = _attempt(cfg, out, run_dir, run_id, progress=progress, log=log, executor=executor)
        except BaseException:
            if force and finished_record(final_dir) is not None:
                log(f"cfbench: the finished run in {final_dir} is kept; this --force attempt is in {run_dir}")
            raise
        if force:
            swap_in(run_dir, final_dir, trash_dir(out, run_id))
            recover(out, run_id)  # removes the emptied staging / trash folders
        clean_finished(final_dir)
    return RunOutcome(record, final_dir, False)


def declared_jobs(cfg: RunConfig, data, cache_dir: Path) -> list[Any]:
    """The training jobs ``cfg``'s evaluators can name from the recipe alone (the MIA reference
    models), in evaluator order: what a run submits before it trains its target, and what a
    sweep helper trains for it."""
    return [job for name in cfg.evaluators
            for job in get("evaluator", name)(cfg.evaluator_params[name]).declare_jobs(cfg, data, cache_dir)]


def attempt_dir(out: str | Path, run_id: str, force: bool) -> Path:
    """Where an attempt of ``run_id`` writes (and a failed one leaves its record)."""
    return staging_dir(out, run_id) if force else Path(out) / run_id


def _record_failure(run_dir: Path, record: dict[str, Any], tb: str, log) -> None:
    """The failed record and ``error.txt``, both atomic; if even they cannot be written (a full
    disk), say so and leave nothing half-written: the original error is what is raised."""
    try:
        atomic_write_text(run_dir / ERROR, tb)
        write_json(run_dir / RECORD, record)
    except OSError as e:
        log(f"cfbench: could not record the failure in {run_dir}: {e}")


def _attempt(cfg: RunConfig, out: Path, run_dir: Path, run_id: str, *, progress: bool, log,
             executor) -> dict[str, Any]:
    """One attempt of the run in ``run_dir``: its record (written last), or the exception."""
    apply_determinism(cfg.deterministic)
    namespaces = {e: get("evaluator", e).metric_namespace() for e in cfg.evaluators}
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "name": f"{cfg.dataset}:defense={cfg.defense},model={cfg.model},seed={cfg.seed}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": "running",
        "reason": None, "config": cfg.to_dict(), "config_hash": cfg.config_hash(),
        "components": {"dataset": component_info("dataset", cfg.dataset),
                       "model": component_info("model", cfg.model),
                       "defense": component_info("defense", cfg.defense),
                       "evaluators": {e: component_info("evaluator", e) for e in cfg.evaluators}},
        "versions": versions(), "splits": None, "timings": {}, "warnings": [], "metrics": {},
        "notes": {}, "history": [], "jobs": [], "examples": [], "flags": [],
    }
    declared: list[dict[str, Any]] = record["jobs"]
    per_example: dict[str, Any] = {}
    own_executor = executor is None
    if own_executor:
        executor = LocalExecutor(progress=progress)
    executor.on_job = lambda job: declared.append(job.describe())
    timings = record["timings"]
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        data = load_data(cfg)
        save_npz_atomic(run_dir / SPLITS, {"pool_idx": data.pool_idx, "member_mask": data.member_mask,
                                           "test_idx": data.test_idx, "split_seed": int(data.split_seed)})
        record["splits"] = data.summary()
        timings["data"] = time.perf_counter() - t0
        if progress:
            log_line(cost_plan(cfg, len(data.member_idx)))
        # jobs the evaluators can name from the recipe alone (MIA reference models): start them now
        executor.submit(declared_jobs(cfg, data, out / CACHE_DIR))

        t0 = time.perf_counter()
        model, fctx = fit_recipe(cfg, data, data.x_train, data.y_train, seed=cfg.seed,
                                 checkpoint_dir=run_dir / "checkpoints", cache_dir=out / CACHE_DIR,
                                 run_dir=run_dir, progress=progress, desc=f"{cfg.defense} target",
                                 pool_positions=data.member_mask.nonzero()[0], run_jobs=executor.run)
        timings["train"] = time.perf_counter() - t0
        record["history"] = fctx.history
        clash = sorted(k for k in fctx.metrics if any(k.startswith(ns + ".") for ns in namespaces.values()))
        if clash:
            raise UsageError(f"defense {cfg.defense!r} wrote metric {clash[0]!r}, inside evaluator namespace "
                             f"{next(ns for ns in namespaces.values() if clash[0].startswith(ns + '.'))!r}.")
        record["metrics"].update(fctx.metrics)
        record["notes"]["defense"] = fctx.notes
        record["warnings"].extend(fctx.warnings)
        # refused (the run fails) unless the reloaded file reproduces these logits bit for bit
        save_model(model, run_dir / MODEL, {**model_meta(cfg, data, fctx), "run_id": run_id,
                                            "config_hash": record["config_hash"]}, probe=data.x_test[:64])

        ectx = EvalContext(model=model, config=cfg, data=data, threat=threat_of(cfg), device=torch.device(cfg.device),
                           run_dir=run_dir, cache_dir=out / CACHE_DIR, seed=cfg.seed, progress=progress,
                           run_jobs=executor.run, defense_metrics=dict(fctx.metrics))
        for name in cfg.evaluators:
            t0 = time.perf_counter()
            ev = get("evaluator", name)(cfg.evaluator_params[name])
            if progress:
                log_line(f"evaluating {name} ...")
            res = ev.evaluate(ectx)
            check_namespace(name, {**res.metrics, **res.per_example}, namespaces, {**record["metrics"], **per_example})
            per_example.update(res.per_example)
            record["metrics"].update(res.metrics)
            record["warnings"].extend(res.warnings)
            record["warnings"].extend(near_chance(res.metrics, data.dataset.num_classes))
            record["notes"].update(res.notes)
            merge_flags(record["flags"], res.flags)  # named sanity flags, one entry per name
            timings[f"eval.{name}"] = time.perf_counter() - t0
            for k, v in res.timings.items():
                timings[f"eval.{name}.{k}"] = v
        if per_example:
            save_npz_atomic(run_dir / PER_EXAMPLE, {k: np.asarray(v) for k, v in per_example.items()})
        # example images of the defense (e.g. cf-at's counterfactuals) and of the evaluators:
        # one channel, one file (never fails the run)
        saved, problems = save_examples({**fctx.examples, **ectx.examples}, run_dir / EXAMPLES)
        record["examples"] = saved
        record["warnings"].extend(problems)
        record["status"] = "ok"
    except KeyboardInterrupt:
        # no record: the checkpoints stay, and the next identical run resumes from them
        if own_executor:
            executor.close()
        raise
    except Exception as e:  # noqa: BLE001 - any failure is recorded, then re-raised
        if own_executor:
            executor.close()
        record["status"] = "failed"
        record["reason"] = f"{type(e).__name__}: {e}"
        timings["total"] = time.perf_counter() - t_all
        _record_failure(run_dir, record, traceback.format_exc(), log)
        raise
    timings["total"] = time.perf_counter() - t_all
    for job in declared:
        job["executor"] = f"{executor.name}:{getattr(executor, 'modes', {}).get(job['path'], 'declared')}"
    if own_executor:
        executor.close()
    write_json(run_dir / RECORD, record)
    return record
