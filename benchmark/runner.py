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

from . import params as P
from .attacks.base import ThreatModel
from .config import RunConfig
from .data.splits import RunData, make_split
from .defense import FitContext
from .errors import UsageError
from .evaluators.base import EvalContext
from .registry import get, registry
from .results import MODEL, RECORD, SCHEMA_VERSION, read_record, save_model, versions, write_json

CACHE_DIR = "_cache"


def load_data(cfg: RunConfig) -> RunData:
    spec = cfg.dataset_spec()
    ds = spec.load(cfg.data_dir, download=cfg.download)
    if tuple(ds.x_train.shape[1:]) != tuple(spec.shape):
        raise UsageError(f"dataset {cfg.dataset!r} loaded images of shape {ds.x_train.shape[1:]}, "
                         f"expected {spec.shape}.")
    d = cfg.data
    return make_split(ds, d.pool_size, d.member_fraction, d.split_seed, d.test_size)


def build_model_for(cfg: RunConfig, data: RunData, seed: int) -> torch.nn.Module:
    from .models import build_model

    torch.manual_seed(seed)
    ds = data.dataset
    return build_model(cfg.model, ds.shape, ds.num_classes, ds.mean, ds.std, P.to_dict(cfg.model_params))


def threat_of(cfg: RunConfig) -> ThreatModel:
    return ThreatModel(cfg.threat.norm, cfg.eps())


def fit_recipe(cfg: RunConfig, data: RunData, x: torch.Tensor, y: torch.Tensor, *, seed: int,
               checkpoint_dir: Path | None, cache_dir: Path | None, progress: bool = True,
               desc: str = "train", pool_positions=None, run_dir: Path | None = None,
               ) -> tuple[torch.nn.Module, FitContext]:
    """Train a fresh model with the run's recipe (defense, hyper-parameters, training budget).

    The target model and every membership-inference reference model go through here, so
    reference models are trained exactly like the target.
    """
    model = build_model_for(cfg, data, seed)
    defense = get("defense", cfg.defense)(cfg.defense_params)
    spec = cfg.dataset_spec()
    ctx = FitContext(threat=threat_of(cfg), train=cfg.resolved_train(), device=torch.device(cfg.device),
                     seed=seed, num_classes=data.dataset.num_classes, augmentation=spec.augmentation,
                     checkpoint_dir=checkpoint_dir, run_dir=run_dir, cache_dir=cache_dir, progress=progress,
                     desc=desc, config=cfg, data=data, pool_positions=pool_positions)
    defense.fit(model, x, y, ctx)
    model.eval()
    return model, ctx


def component_info(kind: str, name: str) -> dict[str, Any]:
    entry = registry(kind).entry(name)
    cls = registry(kind).get(name)
    return {"name": name, "version": getattr(cls, "version", 1), **entry.provenance(),
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "family": getattr(cls, "family", None), "description": getattr(cls, "description", "")}


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
        "notes": {}, "history": [],
    }
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
                                 pool_positions=data.member_mask.nonzero()[0])
        timings["train"] = time.perf_counter() - t0
        record["history"] = fctx.history
        record["metrics"].update(fctx.metrics)
        record["notes"]["defense"] = fctx.notes
        record["warnings"].extend(fctx.warnings)
        ds = data.dataset
        save_model(model, run_dir / MODEL, {
            "model": cfg.model, "model_params": P.to_dict(cfg.model_params), "shape": list(ds.shape),
            "num_classes": ds.num_classes, "mean": list(ds.mean), "std": list(ds.std),
            "opacus_fixed": bool(fctx.notes.get("opacus_fixed_modules")), "run_id": run_id,
            "config_hash": record["config_hash"]})

        ectx = EvalContext(model=model, config=cfg, data=data, threat=threat_of(cfg), device=torch.device(cfg.device),
                           run_dir=run_dir, cache_dir=out / CACHE_DIR, seed=cfg.seed, progress=progress)
        for name in cfg.evaluators:
            t0 = time.perf_counter()
            ev = get("evaluator", name)(cfg.evaluator_params[name])
            if progress:
                log(f"  evaluating {name} ...")
            res = ev.evaluate(ectx)
            record["metrics"].update(res.metrics)
            record["warnings"].extend(res.warnings)
            record["notes"].update(res.notes)
            timings[f"eval.{name}"] = time.perf_counter() - t0
            for k, v in res.timings.items():
                timings[f"eval.{name}.{k}"] = v
        from .report import save_examples  # example images for the report (never fails the run)
        record["warnings"].extend(save_examples(ectx.shared, run_dir / "examples.safetensors"))
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
