"""Result records, the record store, and loading a run's model back.

One immutable JSON record per run at ``<out>/<run-id>/record.json``, written atomically
(temporary file + ``os.replace``).  The store is a directory of such run folders; nothing is
ever a single file that concurrent runs rewrite.  The schema is documented in README.md
(section "Result records"); ``SCHEMA_VERSION`` changes when it does.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RECORD = "record.json"
MODEL = "model.safetensors"

KEY_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pyautoattack", "opacus", "safetensors", "pandas")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become None/'inf', tuples lists, numpy scalars Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    from . import __version__

    pk = {}
    for name in KEY_PACKAGES:
        try:
            pk[name] = md.version(name)
        except md.PackageNotFoundError:
            pk[name] = None
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cfbench": __version__,
            "git_commit": git_commit(), "packages": pk, "torch_threads": torch.get_num_threads()}


def read_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_records(root: str | Path, *, status: str | None = "ok") -> Iterator[dict[str, Any]]:
    """Every record under ``root`` (recursively), optionally only those with a given status."""
    root = Path(root)
    if not root.exists():
        return
    for path in sorted(root.rglob(RECORD)):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if status is None or rec.get("status") == status:
            rec["_path"] = str(path.parent)
            yield rec


def metric_value(m: Any) -> Any:
    """The number of a metric that is either a number or a ``{value, ...}`` dict."""
    return m.get("value") if isinstance(m, dict) else m


def save_tensors_atomic(path: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """A safetensors file with ``meta`` as JSON under the ``cfbench`` metadata key, written to a
    private temporary name and renamed (readers never see half a file), mode 0644."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"cfbench": json.dumps(_clean(meta), default=str)})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files and the cache are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and ``cfbench`` metadata of a file written by :func:`save_tensors_atomic` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("cfbench", "{}"))
    return load_file(str(path)), meta


def save_model(model, path: Path, meta: dict[str, Any]) -> None:
    from .training import unwrap

    save_tensors_atomic(path, unwrap(model).state_dict(), meta)


def load_model(run_dir: str | Path, device: str = "cpu"):
    """The final, evaluated model of a run, in eval mode, from ``model.safetensors``.

    Weights are read with safetensors (no pickle); the architecture is rebuilt from the
    registry with the model name and parameters stored in the file's metadata.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models import build_model

    path = Path(run_dir) / MODEL
    if not path.exists():
        from .errors import UsageError
        raise UsageError(f"{path} does not exist: is {run_dir} a finished cfbench run directory?")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["cfbench"])
    model = build_model(meta["model"], tuple(meta["shape"]), meta["num_classes"], tuple(meta["mean"]),
                        tuple(meta["std"]), meta["model_params"])
    fix = meta.get("opacus_fixed")
    if fix:
        from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
