"""The recipe: load a run's data, build its model and fit it with its defense, exactly as
the run does.  The target model and every model a run's evaluators or defense declare
(membership reference models, DeMem's oracle) go through :func:`fit_recipe`, so they are
trained exactly like the target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import params as P
from ..attacks.base import ThreatModel
from ..data.splits import RunData, make_split
from ..errors import UsageError
from ..registry import get
from .context import FitContext

if TYPE_CHECKING:
    from ..config import RunConfig


def load_data(cfg: RunConfig) -> RunData:
    """The dataset and its seeded pool / member / non-member / test split."""
    spec = cfg.dataset_spec()
    ds = spec.load(cfg.data_dir, download=cfg.download)
    if tuple(ds.x_train.shape[1:]) != tuple(spec.shape):
        raise UsageError(f"dataset {cfg.dataset!r} loaded images of shape {ds.x_train.shape[1:]}, "
                         f"expected {spec.shape}.")
    d = cfg.data
    return make_split(ds, d.pool_size, d.member_fraction, d.split_seed, d.test_size)


def build_model_for(cfg: RunConfig, data: RunData, seed: int) -> torch.nn.Module:
    """A freshly initialised model of the run's architecture (torch seeded with ``seed``)."""
    from ..models import build_model

    torch.manual_seed(seed)
    ds = data.dataset
    return build_model(cfg.model, ds.shape, ds.num_classes, ds.mean, ds.std, P.to_dict(cfg.model_params))


def threat_of(cfg: RunConfig) -> ThreatModel:
    return ThreatModel(cfg.threat.norm, cfg.eps)


def model_meta(cfg: RunConfig, data: RunData, fctx: FitContext) -> dict:
    """What :func:`cfbench.store.models.rebuild_model` needs to rebuild the architecture."""
    ds = data.dataset
    return {"model": cfg.model, "model_params": P.to_dict(cfg.model_params), "shape": list(ds.shape),
            "num_classes": ds.num_classes, "mean": list(ds.mean), "std": list(ds.std),
            "opacus_fixed": bool(fctx.notes.get("opacus_fixed_modules"))}


def fit_recipe(cfg: RunConfig, data: RunData, x: torch.Tensor, y: torch.Tensor, *, seed: int,
               checkpoint_dir: Path | None, cache_dir: Path | None, progress: bool = True,
               desc: str = "train", pool_positions=None, run_dir: Path | None = None,
               run_jobs: Callable[[Sequence], list[Path]] | None = None,
               ) -> tuple[torch.nn.Module, FitContext]:
    """Train a fresh model with the run's recipe (defense, hyper-parameters, training budget)."""
    model = build_model_for(cfg, data, seed)
    defense = get("defense", cfg.defense)(cfg.defense_params)
    ctx = FitContext(threat=threat_of(cfg), train=cfg.train, device=torch.device(cfg.device),
                     seed=seed, num_classes=data.dataset.num_classes, augmentation=cfg.dataset_info["augmentation"],
                     checkpoint_dir=checkpoint_dir, run_dir=run_dir, cache_dir=cache_dir, progress=progress,
                     desc=desc, config=cfg, data=data, pool_positions=pool_positions, run_jobs=run_jobs)
    defense.fit(model, x, y, ctx)
    model.eval()
    return model, ctx
