"""Membership reference models as training jobs: their identity, cache layout and loading.

The subsets and seeds are pure math in :mod:`cfbench.mia.reference`; this module turns them
into :class:`~cfbench.execution.jobs.TrainingJob` values that the membership evaluator and
DeMem's oracle *declare* and the run's executor runs, into one content-addressed cache
shared by every run and attack of the same recipe.

**Recipe hash**: :func:`reference_recipe` is ``cfg.canonical()`` without the run's seed,
its evaluators and the data section (whose effect is captured exactly by the pool's
sha256 -- which dataset indices form the pool -- the dataset's own sha256 and the member
count ``M``), plus the reference scheme (version, ``reference_seed``).  ``canonical_hash``
of that dict names the folder ``<cache>/refmodels/<recipe_hash>/`` and model ``i`` is
``<i>.safetensors`` in it (weights as a plain state dict; the training time, subset sha256
and model description in the file's metadata).  Files are written atomically
(temporary file + ``os.replace``); an interrupted training resumes from its per-epoch
checkpoint in ``<i>.ckpt/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..hashing import canonical_hash
from ..mia.reference import REFERENCE_SCHEME_VERSION, reference_subset, reference_train_seed
from ..store.io import load_tensors, read_tensor_meta
from ..training.recipe import build_model_for
from .jobs import TrainingJob, subset_sha

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..data.splits import RunData

KIND = "cfbench-mia-reference"


def reference_recipe(cfg: RunConfig, data: RunData, seed: int = 0) -> dict[str, Any]:
    """Everything that determines the reference models' training (see the module docstring)."""
    c = cfg.canonical()
    for key in ("seed", "evaluators", "data"):
        c.pop(key, None)
    c["reference"] = {
        "scheme": "paired-permutation-subsets",
        "version": REFERENCE_SCHEME_VERSION,
        "seed": int(seed),
        "dataset_sha256": data.dataset.fingerprint()[:16],
        "pool_sha256": subset_sha(data.pool_idx),
        "n_pool": int(len(data.pool_idx)),
        "n_members": int(data.member_mask.sum()),
    }
    return c


def reference_recipe_hash(cfg: RunConfig, data: RunData, seed: int = 0) -> str:
    return canonical_hash(reference_recipe(cfg, data, seed))


def reference_dir(cache_dir: str | Path, recipe_hash: str) -> Path:
    return Path(cache_dir) / "refmodels" / recipe_hash


def reference_path(cache_dir: str | Path, recipe_hash: str, index: int) -> Path:
    return reference_dir(cache_dir, recipe_hash) / f"{int(index)}.safetensors"


def reference_job(cfg: RunConfig, data: RunData, index: int, cache_dir: str | Path, *, seed: int = 0,
                  recipe_hash: str | None = None, of: int | None = None) -> TrainingJob:
    """The training job of reference model ``index`` of the run's recipe (reference seed ``seed``)."""
    recipe_hash = recipe_hash or reference_recipe_hash(cfg, data, seed)
    mask = reference_subset(len(data.pool_idx), int(data.member_mask.sum()), index, seed)
    return TrainingJob(cfg=cfg, data=data, subset=mask, seed=reference_train_seed(index, seed),
                       path=reference_path(cache_dir, recipe_hash, index), cache_dir=Path(cache_dir), kind=KIND,
                       desc=f"{cfg.defense} reference {index + 1}/{of}" if of else f"{cfg.defense} reference {index}",
                       meta={"index": int(index), "recipe_hash": recipe_hash, "reference_seed": int(seed)})


def reference_jobs(cfg: RunConfig, data: RunData, k: int, cache_dir: str | Path, *, seed: int = 0) -> list[TrainingJob]:
    """The jobs of reference models ``0 .. k-1`` (one recipe hash for all)."""
    h = reference_recipe_hash(cfg, data, seed)
    return [reference_job(cfg, data, i, cache_dir, seed=seed, recipe_hash=h, of=k) for i in range(k)]


def read_reference_meta(path: str | Path) -> dict[str, Any]:
    """The metadata stored with a reference model (index, recipe hash, training seconds, ...)."""
    return read_tensor_meta(path)


def load_reference(cfg: RunConfig, data: RunData, path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the run's architecture and load a cached reference model (eval mode, no pickle)."""
    tensors, meta = load_tensors(path)
    model = build_model_for(cfg, data, 0)
    if meta.get("opacus_fixed"):
        from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    model.load_state_dict(tensors)
    return model.to(device).eval()
