"""Tiny runs for tests and contract checks: a digits config, its split, a fit context and an
evaluation context, built exactly as a run builds them (no hand-made contexts in tests)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig, make_config
from ..data.splits import RunData
from ..evaluators.base import EvalContext
from ..execution.local import run_jobs
from ..training.context import FitContext
from ..training.recipe import load_data, threat_of

#: a digits recipe that trains in well under a second
TINY_SETTINGS = {"train.epochs": 1, "train.batch_size": 64, "model.width": 8, "data.pool_size": 256,
                 "data.test_size": 64}


def tiny_config(defense: str = "erm", *, sets: dict[str, Any] | None = None, evaluators=("clean",),
                seed: int = 0, model: str | None = None) -> RunConfig:
    """A resolved digits config (cnn8 width 8, pool 256, 1 epoch) with ``sets`` on top."""
    extra = dict(TINY_SETTINGS)
    if model is not None and model != "cnn8":
        extra.pop("model.width")
    for key in sets or {}:   # a user key replaces the tiny default, bare or qualified
        for k in [k for k in extra if k == key or ("." not in key and k.partition(".")[2] == key)]:
            extra.pop(k)
    extra.update(sets or {})
    return make_config(dataset="digits", defense=defense, model=model, seed=seed, sets=extra,
                       evaluators=tuple(evaluators))


@functools.lru_cache(maxsize=8)
def _data(pool: int | None, frac: float, split_seed: int, test: int | None) -> RunData:
    cfg = tiny_config(sets={"data.pool_size": pool, "data.member_fraction": frac, "data.split_seed": split_seed,
                            "data.test_size": test} if pool else None)
    return load_data(cfg)


def tiny_data(cfg: RunConfig) -> RunData:
    """The split of ``cfg`` (cached per split settings)."""
    d = cfg.data
    return _data(d.pool_size, d.member_fraction, d.split_seed, d.test_size) if d.pool_size else load_data(cfg)


def fit_context(cfg: RunConfig, data: RunData | None = None, *, root: Path | None = None,
                checkpoint: bool = False, **over: Any) -> FitContext:
    """The :class:`FitContext` ``fit_recipe`` would give the target of ``cfg`` (``over`` replaces fields)."""
    data = data if data is not None else tiny_data(cfg)
    kw: dict[str, Any] = dict(
        threat=threat_of(cfg), train=cfg.train, device=torch.device(cfg.device), seed=cfg.seed,
        num_classes=data.dataset.num_classes, augmentation=cfg.dataset_info["augmentation"],
        checkpoint_dir=(root / "checkpoints") if (root is not None and checkpoint) else None,
        cache_dir=(root / "_cache") if root is not None else None, progress=False, config=cfg, data=data,
        pool_positions=data.member_mask.nonzero()[0], run_jobs=run_jobs)
    kw.update(over)
    return FitContext(**kw)


def eval_context(cfg: RunConfig, model: torch.nn.Module, root: Path, data: RunData | None = None,
                 **over: Any) -> EvalContext:
    """The :class:`EvalContext` the runner would give the evaluators of ``cfg``."""
    data = data if data is not None else tiny_data(cfg)
    kw: dict[str, Any] = dict(model=model, config=cfg, data=data, threat=threat_of(cfg),
                              device=torch.device(cfg.device), run_dir=root, cache_dir=root / "_cache",
                              seed=cfg.seed, progress=False, run_jobs=run_jobs)
    kw.update(over)
    return EvalContext(**kw)


def direct_fit_context(*, eps: float = 0.1, norm: str = "Linf", epochs: int = 2, batch_size: int = 64,
                       lr: float = 0.05, seed: int = 0, num_classes: int = 10, augmentation: str = "shift",
                       train=None, **over: Any) -> FitContext:
    """A :class:`FitContext` for fitting a defense directly on arrays (no run: no config, data
    or executor unless given in ``over``); ``train`` replaces the TrainParams built from
    ``epochs``, ``batch_size`` and ``lr``; other ``TrainParams`` fields may be given in ``over``
    too (e.g. ``weight_decay``)."""
    import dataclasses

    from ..attacks.base import ThreatModel
    from ..config import TrainParams

    train_fields = {f.name for f in dataclasses.fields(TrainParams)}
    tp_over = {k: over.pop(k) for k in list(over) if k in train_fields}
    if train is None:
        train = TrainParams(epochs=epochs, batch_size=batch_size, lr=lr, **tp_over)
    kw: dict[str, Any] = dict(threat=ThreatModel(norm, eps), train=train, device=torch.device("cpu"), seed=seed,
                              num_classes=num_classes, augmentation=augmentation, progress=False)
    kw.update(over)
    return FitContext(**kw)
