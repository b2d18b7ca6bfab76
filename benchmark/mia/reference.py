"""Reference models for membership inference: which pool examples each one trains on, the
recipe hash that identifies them, and :func:`train_reference`, a pure function of
``(recipe, index)`` that any executor can map over indices.

**Subsets (paired complementary draws).**  The pool has ``P`` examples and the target trains
on ``M`` of them (``M = round(member_fraction * P)``).  Reference model ``i`` trains on ``M``
pool examples too (the same data size as the target): for the pair ``j = i // 2`` a random
permutation ``pi_j`` of the pool is drawn from ``(reference_seed, j)``; model ``2j`` takes
its first ``M`` entries and model ``2j + 1`` its last ``M``.  With ``M = P / 2`` (the
default split of an even pool) the two are complementary halves, so every example is IN for
exactly one model of each pair -- the standard LiRA / RMIA construction, exactly ``K / 2``
IN models per example for even ``K``.  With an odd pool or ``member_fraction != 0.5`` the
two draws overlap (``2M > P``) or leave ``P - 2M`` examples OUT of both, and the IN count is
``K * M / P`` on average.  An odd ``K`` leaves the last model unpaired.  Carlini et al.'s
reference code instead draws, per example, exactly ``K * M / P`` IN models (so the models'
training-set sizes vary); cfbench keeps every reference model's training set the same size
as the target's, as the recipe must match.

**Training seed** of model ``i``: 31 bits of ``sha256("cfbench-mia-ref:<reference_seed>:<i>")``,
independent of the target's seed, so every later run of the same recipe (any target seed)
reuses the same reference models.

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

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "REFERENCE_SCHEME_VERSION",
    "reference_subset",
    "reference_in_mask",
    "reference_train_seed",
    "reference_recipe",
    "reference_recipe_hash",
    "reference_dir",
    "reference_path",
    "train_reference",
    "load_reference",
    "read_reference_meta",
]

#: bump when the subset construction or the training of reference models changes
REFERENCE_SCHEME_VERSION = 1
_TAG = 0x4D4941  # "MIA": keeps the subset stream apart from other seeded streams


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------------
def reference_subset(n_pool: int, n_members: int, index: int, seed: int = 0) -> np.ndarray:
    """Boolean mask over the pool: the examples reference model ``index`` trains on.

    Model ``2j`` takes the first ``n_members`` entries of a permutation drawn from
    ``(seed, j)``, model ``2j + 1`` the last ``n_members`` (see the module docstring).
    """
    if not 0 < n_members < n_pool:
        raise ValueError(f"need 0 < n_members < n_pool, got {n_members} and {n_pool}")
    if index < 0:
        raise ValueError(f"reference index must be >= 0, got {index}")
    perm = np.random.default_rng([_TAG, int(seed), int(index) // 2]).permutation(n_pool)
    chosen = perm[:n_members] if index % 2 == 0 else perm[n_pool - n_members:]
    mask = np.zeros(n_pool, dtype=bool)
    mask[chosen] = True
    return mask


def reference_in_mask(n_pool: int, n_members: int, k: int, seed: int = 0) -> np.ndarray:
    """``(k, n_pool)`` boolean matrix: ``[i, n]`` = reference model ``i`` trains on example ``n``."""
    if k == 0:
        return np.zeros((0, n_pool), dtype=bool)
    return np.stack([reference_subset(n_pool, n_members, i, seed) for i in range(k)])


def reference_train_seed(index: int, seed: int = 0) -> int:
    """The torch seed of reference model ``index`` (31 bits of a sha256)."""
    h = hashlib.sha256(f"cfbench-mia-ref:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# identity and layout
# --------------------------------------------------------------------------------------------
def reference_recipe(cfg, data, seed: int = 0) -> dict[str, Any]:
    """Everything that determines the reference models' training (see the module docstring)."""
    c = cfg.canonical()
    for key in ("seed", "evaluators", "data"):
        c.pop(key, None)
    c["reference"] = {
        "scheme": "paired-permutation-subsets",
        "version": REFERENCE_SCHEME_VERSION,
        "seed": int(seed),
        "dataset_sha256": data.dataset.fingerprint()[:16],
        "pool_sha256": _sha(data.pool_idx),
        "n_pool": int(len(data.pool_idx)),
        "n_members": int(data.member_mask.sum()),
    }
    return c


def reference_recipe_hash(cfg, data, seed: int = 0) -> str:
    from ..config import canonical_hash

    return canonical_hash(reference_recipe(cfg, data, seed))


def reference_dir(cache_dir: str | Path, recipe_hash: str) -> Path:
    return Path(cache_dir) / "refmodels" / recipe_hash


def reference_path(cache_dir: str | Path, recipe_hash: str, index: int) -> Path:
    return reference_dir(cache_dir, recipe_hash) / f"{int(index)}.safetensors"


# --------------------------------------------------------------------------------------------
# training and loading
# --------------------------------------------------------------------------------------------
def read_reference_meta(path: str | Path) -> dict[str, Any]:
    """The metadata stored with a reference model (index, recipe hash, training seconds, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["cfbench"])


def train_reference(cfg, data, index: int, cache_dir: str | Path, *, seed: int | None = None,
                    progress: bool = False, recipe_hash: str | None = None) -> Path:
    """Train reference model ``index`` of the run's recipe (unless cached); return its path.

    A pure function of ``(recipe, index)``: the subset, the training seed and the recipe
    (``fit_recipe``: the run's defense, hyper-parameters, model, epochs, batch size) are all
    determined by ``cfg``, ``data``'s pool and ``seed`` (the reference seed; default: the
    ``mia`` evaluator's ``reference_seed`` in ``cfg``, else 0).  If the file already exists it
    is returned untouched, so an executor can map this over indices in any order, in
    parallel, and re-run it safely.  ``recipe_hash`` may be passed to skip recomputing it.
    """
    from .. import runner
    from ..results import save_tensors_atomic
    from ..training import unwrap

    if seed is None:
        mp = getattr(cfg, "evaluator_params", {}).get("mia")
        seed = int(getattr(mp, "reference_seed", 0))
    recipe_hash = recipe_hash or reference_recipe_hash(cfg, data, seed)
    path = reference_path(cache_dir, recipe_hash, index)
    if path.exists():
        return path
    n_pool = len(data.pool_idx)
    n_members = int(data.member_mask.sum())
    mask = reference_subset(n_pool, n_members, index, seed)
    x = data.x_pool[torch.from_numpy(mask)]
    y = data.y_pool[torch.from_numpy(mask)]
    ckpt = path.with_suffix(".ckpt")
    t0 = time.perf_counter()
    model, fctx = runner.fit_recipe(
        cfg, data, x, y, seed=reference_train_seed(index, seed), checkpoint_dir=ckpt,
        cache_dir=Path(cache_dir), progress=progress, desc=f"{cfg.defense} reference {index}",
        pool_positions=np.flatnonzero(mask))
    seconds = time.perf_counter() - t0
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    meta = {
        "kind": "cfbench-mia-reference", "index": int(index), "recipe_hash": recipe_hash,
        "reference_seed": int(seed), "train_seed": reference_train_seed(index, seed),
        "subset_sha256": _sha(np.flatnonzero(mask)), "n_train": int(mask.sum()),
        "train_seconds": seconds, "model": cfg.model,
        "opacus_fixed": bool(fctx.notes.get("opacus_fixed_modules")),
        "final_loss": (fctx.history[-1].get("loss") if fctx.history else None),
    }
    save_tensors_atomic(path, tensors, meta)
    shutil.rmtree(ckpt, ignore_errors=True)
    return path


def load_reference(cfg, data, path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the run's architecture and load a cached reference model (eval mode, no pickle)."""
    from safetensors.torch import load_file

    from .. import runner

    meta = read_reference_meta(path)
    model = runner.build_model_for(cfg, data, 0)
    if meta.get("opacus_fixed"):
        from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
