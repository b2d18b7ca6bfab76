"""Per-example signals of one model, computed once and cached.

A *signal file* holds one model's logits (float32) on

* the pool, under each query augmentation: ``pool`` of shape ``(P, A, C)``;
* the RMIA population (points no model trained on), same augmentations: ``population``
  ``(Z, A, C)``;
* for the target only, the pool under PGD (robustness-based inference): ``pool_adv``
  ``(P, C)``.

Query augmentations (:func:`augmentations`), chosen to match the dataset's training
augmentation family (:attr:`cfbench.data.specs.DatasetSpec.augmentation`):

=============  ===========================================================================
family         queries
=============  ===========================================================================
``none``       identity
``shift``      identity and the four 1-pixel shifts (up, down, left, right; zero fill, as
               the training augmentation pads with zeros)
``flip-shift`` the five above and their horizontal mirrors (10 queries)
=============  ===========================================================================

Carlini et al. query mirror x shifts (2 or 18 queries on CIFAR-10); one-pixel shifts stay
well inside the training augmentation's range (up to 1/8 of the side) on 8x8 and 28x28
images.  The identity is always query 0, and the threshold attacks use only it.  The
evaluator queries these augmentations only when the recipe trains with augmentation
(its ``augmentations=auto``), otherwise the identity alone.

Files live at ``<cache>/signals/<key>.safetensors`` where ``key`` hashes the model's identity
(a reference model: recipe hash + index; the target: sha256 of its weights, so a reused run
reuses its signals) and everything the signals depend on (dataset, pool, population,
augmentations, PGD settings, :data:`SIGNALS_VERSION`).  Written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..attacks.pgd import pgd
from ..hashing import canonical_hash
from ..models import unwrap
from ..store.io import atomic_write_bytes, clean

__all__ = [
    "AUGMENTATIONS",
    "SIGNALS_VERSION",
    "adversarial_logits",
    "augment_query",
    "augmentations",
    "load_signals",
    "query_logits",
    "save_signals",
    "signal_path",
    "weights_sha256",
]

#: bump when the way signals are computed changes
SIGNALS_VERSION = 1

_SHIFTS = {"identity": (0, 0), "shift_up": (-1, 0), "shift_down": (1, 0), "shift_left": (0, -1),
           "shift_right": (0, 1)}
#: query augmentations per dataset augmentation family (query 0 is always the identity)
AUGMENTATIONS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "shift": tuple(_SHIFTS),
    "flip-shift": tuple(_SHIFTS) + tuple(f"mirror_{s}" if s != "identity" else "mirror" for s in _SHIFTS),
}


def augmentations(family: str, enabled: bool = True) -> tuple[str, ...]:
    """Query augmentation names for a dataset augmentation family (identity only if disabled)."""
    if family not in AUGMENTATIONS:
        from ..errors import UsageError
        raise UsageError(f"unknown augmentation family {family!r}. Valid choices: "
                         f"{', '.join(AUGMENTATIONS)}.")
    return AUGMENTATIONS[family] if enabled else ("identity",)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate images by (dy, dx) pixels (positive = down / right), zero fill."""
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p))
    return xp[..., p - dy:p - dy + h, p - dx:p - dx + w]


def augment_query(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the named query augmentation to a batch (N, C, H, W)."""
    mirror = name == "mirror" or name.startswith("mirror_")
    base = name[len("mirror_"):] if name.startswith("mirror_") else ("identity" if mirror else name)
    if base not in _SHIFTS:
        raise ValueError(f"unknown query augmentation {name!r}; valid: "
                         f"{sorted(set(AUGMENTATIONS['flip-shift']))}")
    out = _shift(x, *_SHIFTS[base])
    return out.flip(-1) if mirror else out


@torch.no_grad()
def query_logits(model: torch.nn.Module, x: torch.Tensor, augs, device, batch_size: int = 512) -> np.ndarray:
    """Logits ``(N, A, C)`` float32 of ``model`` (eval mode) on each augmentation of ``x``."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        out.append(torch.stack([model(augment_query(xb, a)).float() for a in augs], dim=1).cpu())
    if not out:
        raise ValueError("query_logits: empty input")
    return torch.cat(out).numpy()


def adversarial_logits(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                       steps: int, step_size: float, rand_init: bool, seed: int, device,
                       batch_size: int = 512) -> np.ndarray:
    """Logits ``(N, C)`` of ``model`` on untargeted PGD examples (true labels, last iterate).

    The shared PGD (:func:`cfbench.attacks.pgd.pgd`) with the model in eval mode; the random
    start is drawn from torch's global RNG seeded with ``seed`` (restored afterwards).
    """

    model.eval()
    out = []
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            xa = pgd(model, xb, yb, eps=eps, step_size=step_size, steps=steps, norm=norm,
                     rand_init=rand_init)
            with torch.no_grad():
                out.append(model(xa).float().cpu())
    finally:
        torch.set_rng_state(state)
    return torch.cat(out).numpy()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes, bytes), wrappers stripped."""
    h = hashlib.sha256()
    for k, v in sorted(unwrap(model).state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the file cache
# --------------------------------------------------------------------------------------------
def signal_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    return Path(cache_dir) / "signals" / f"{canonical_hash({'v': SIGNALS_VERSION, **key})}.safetensors"


def load_signals(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if the file is missing or lacks one of ``required``."""
    if not path.exists():
        return None
    from safetensors.numpy import load_file

    try:
        arrays = load_file(str(path))
    except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
        return None
    if any(r not in arrays for r in required):
        return None
    return arrays


def save_signals(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Numpy arrays as safetensors (``meta`` as JSON), through the store's atomic writer."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={"cfbench": json.dumps(clean(meta), default=str)})
    atomic_write_bytes(path, data)
