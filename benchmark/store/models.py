"""Saving a run's model and loading it back (safetensors, no pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from .io import load_tensors, read_tensor_meta, save_tensors_atomic
from .record import MODEL


def save_model(model, path: str | Path, meta: dict[str, Any]) -> Path:
    """The plain state dict (wrappers such as Opacus' removed) with ``meta`` (architecture name,
    parameters, input shape, normalisation) under the file's ``cfbench`` metadata key."""
    from ..models import unwrap

    return save_tensors_atomic(path, unwrap(model).state_dict(), meta)


def rebuild_model(meta: dict[str, Any]):
    """The architecture described by a saved model's metadata, freshly initialised."""
    from ..models import build_model

    model = build_model(meta["model"], tuple(meta["shape"]), meta["num_classes"], tuple(meta["mean"]),
                        tuple(meta["std"]), meta["model_params"])
    if meta.get("opacus_fixed"):
        from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    return model


def load_model(run_dir: str | Path, device: str = "cpu"):
    """The final, evaluated model of a run, in eval mode, from ``model.safetensors``.

    Weights are read with safetensors (no pickle); the architecture is rebuilt from the
    registry with the model name and parameters stored in the file's metadata.
    """
    path = Path(run_dir) / MODEL
    if not path.exists():
        raise UsageError(f"{path} does not exist: is {run_dir} a finished cfbench run directory?")
    model = rebuild_model(read_tensor_meta(path))
    model.load_state_dict(load_tensors(path)[0])
    return model.to(device).eval()
