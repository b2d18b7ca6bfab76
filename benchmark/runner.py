"""One run: config -> data -> model -> defense.fit -> evaluators -> record.

A run is a pure function of its config: ``execute`` reuses a finished record with the same
config hash instead of recomputing it, resumes an interrupted training from its last
checkpoint, and records a failed run as failed (with its reason) -- a failed record is
never reused and never enters a leaderboard.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .errors import UsageError
from .evaluators.base import EvalContext
from .execution.local import LocalExecutor
from .registry import get, registry
from .store import CACHE_DIR, EXAMPLES, MODEL, RECORD, SCHEMA_VERSION, read_record, versions, write_json
from .store.examples import save_examples
from .store.models import save_model
from .training.recipe import fit_recipe, load_data, model_meta, threat_of


def component_info(kind: str, name: str) -> dict[str, Any]:
    entry = registry(kind).entry(name)
    cls = registry(kind).get(name)
    return {"name": name, "version": getattr(cls, "version", 1), **entry.provenance(),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "family": getattr(cls, "family", None), "description": getattr(cls, "description", "")}


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
            log=print) -> RunOutcome:
    out = Path(out)
    run_id = cfg.run_id()
    run_dir = out / run_id
    if (run_dir / RECORD).exists() and not force:
        rec = read_record(run_dir)
        if rec.get("status") == "ok":
            return RunOutcome(rec, run_dir, True)
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        "notes": {}, "history": [], "jobs": [], "examples": [],
    }
    declared: list[dict[str, Any]] = record["jobs"]
    executor = LocalExecutor(progress=progress, on_job=lambda job: declared.append(job.describe()))
    timings = record["timings"]
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        data = load_data(cfg)
        data.save(run_dir / "splits.npz")
        record["splits"] = data.summary()
        timings["data"] = time.perf_counter() - t0

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
        save_model(model, run_dir / MODEL, {**model_meta(cfg, data, fctx), "run_id": run_id,
                                            "config_hash": record["config_hash"]})

        ectx = EvalContext(model=model, config=cfg, data=data, threat=threat_of(cfg), device=torch.device(cfg.device),
                           run_dir=run_dir, cache_dir=out / CACHE_DIR, seed=cfg.seed, progress=progress,
                           run_jobs=executor.run)
        for name in cfg.evaluators:
            t0 = time.perf_counter()
            ev = get("evaluator", name)(cfg.evaluator_params[name])
            if progress:
                log(f"  evaluating {name} ...")
            res = ev.evaluate(ectx)
            check_namespace(name, res.metrics, namespaces, record["metrics"])
            record["metrics"].update(res.metrics)
            record["warnings"].extend(res.warnings)
            record["notes"].update(res.notes)
            timings[f"eval.{name}"] = time.perf_counter() - t0
            for k, v in res.timings.items():
                timings[f"eval.{name}.{k}"] = v
        # example images of the defense (e.g. cf-at's counterfactuals) and of the evaluators:
        # one channel, one file (never fails the run)
        saved, problems = save_examples({**fctx.examples, **ectx.examples}, run_dir / EXAMPLES)
        record["examples"] = saved
        record["warnings"].extend(problems)
        record["status"] = "ok"
    except KeyboardInterrupt:
        # no record: the checkpoints stay, and the next identical run resumes from them
        raise
    except Exception as e:  # noqa: BLE001 - any failure is recorded, then re-raised
        record["status"] = "failed"
        record["reason"] = f"{type(e).__name__}: {e}"
        (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        timings["total"] = time.perf_counter() - t_all
        write_json(run_dir / RECORD, record)
        raise
    timings["total"] = time.perf_counter() - t_all
    write_json(run_dir / RECORD, record)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "error.txt").unlink(missing_ok=True)
    return RunOutcome(record, run_dir, False)
