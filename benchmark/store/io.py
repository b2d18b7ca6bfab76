"""The one atomic writer (and its readers) for every file cfbench writes.

Every file -- records, models, checkpoints, caches, score arrays, examples, reports and
tables -- is written to a unique temporary name in its target folder (``mkstemp``), flushed,
given mode 0644 (``mkstemp`` creates 0600; results are meant to be shared) and renamed over
the target with ``os.replace``: a reader never sees half a file, two writers never share a
temporary name, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def clean(obj: Any) -> Any:
    """JSON-safe: NaN becomes None, inf 'inf', tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object opened on a unique
    temporary file next to ``path``; it is fsynced, made 0644 and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Pretty JSON (NaN/inf made JSON-safe first; never emits NaN)."""
    return atomic_write_text(path, json.dumps(clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_tensors_atomic(path: str | Path, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """A safetensors file (torch tensors) with ``meta`` as JSON under the ``cfbench`` metadata key."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"cfbench": json.dumps(clean(meta or {}), default=str)})
    return atomic_write_bytes(path, data)


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and ``cfbench`` metadata of a file written by :func:`save_tensors_atomic` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("cfbench", "{}"))
    return load_file(str(path)), meta


def read_tensor_meta(path: str | Path) -> dict[str, Any]:
    """Only the ``cfbench`` metadata of a safetensors file (tensors are not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("cfbench", "{}"))


def save_npz_atomic(path: str | Path, arrays: dict[str, Any]) -> Path:
    """A compressed ``.npz`` of plain numeric arrays (read back with ``allow_pickle=False``)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())
