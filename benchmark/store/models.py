"""Saving a run's model and loading it back (safetensors, no pickle).

What is saved is exactly what was evaluated: :func:`save_model` writes the plain state dict
and the architecture's metadata, reloads the file into a freshly built model and compares
its logits on a probe batch with the evaluated model's, **bit for bit**; a model whose
reloaded outputs differ is refused (:class:`ModelReloadError`, the run fails with the reason
and the file is removed).  That catches state the state dict does not carry: a forward
(pre-)hook registered on the instance, a module attribute changed after construction, an
input transform applied outside the model.  Input transforms and hooks belong in the model,
as modules of a registered model class (then the registry rebuilds them).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..errors import CfbenchError, UsageError
from .io import load_tensors, read_tensor_meta, save_tensors_atomic
from .record import MODEL

#: probe images drawn uniformly in [0, 1] when no probe batch is given
PROBE_SIZE = 32


class ModelReloadError(CfbenchError):
    """The saved model, loaded back, does not reproduce the evaluated model's outputs."""


def save_model(model, path: str | Path, meta: dict[str, Any], probe=None, *, verify: bool = True) -> Path:
    """The plain state dict (wrappers such as Opacus' removed) with ``meta`` (architecture name,
    parameters, input shape, normalisation) under the file's ``cfbench`` metadata key; then,
    unless ``verify`` is False, :func:`verify_reload` on ``probe`` (default: :data:`PROBE_SIZE`
    seeded uniform images of the model's input shape).  Raises :class:`ModelReloadError`
    (and removes the file) when the reloaded model's logits differ."""
    from ..models import unwrap

    path = Path(path)
    save_tensors_atomic(path, unwrap(model).state_dict(), meta)
    if verify:
        try:
            verify_reload(model, path, probe)
        except ModelReloadError:
            path.unlink(missing_ok=True)
            raise
    return path


def probe_batch(meta: dict[str, Any], n: int = PROBE_SIZE):
    """``n`` images uniform in [0, 1] of the saved model's input shape, from a fixed seed."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *meta["shape"]), generator=g)


def verify_reload(model, path: str | Path, probe=None) -> None:
    """Load ``path`` into a freshly built model and compare its logits with ``model``'s on
    ``probe`` (and on :func:`probe_batch`), both in eval mode on the model's device, each
    forward pass from the same torch seed (so a model that draws noise in its forward pass
    draws the same noise twice).  Any difference -- one bit of one logit -- raises
    :class:`ModelReloadError` naming the largest difference and the likely cause."""
    import torch

    from ..models import unwrap

    path = Path(path)
    meta = read_tensor_meta(path)
    inner = unwrap(model)
    try:
        device = next(inner.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    reloaded = _load(path, meta, device)
    batches = [probe_batch(meta)] + ([probe] if probe is not None and len(probe) else [])
    was_training = inner.training
    inner.eval()
    try:
        for i, xb in enumerate(batches):
            xb = xb.to(device)
            a, b = _seeded_forward(inner, xb), _seeded_forward(reloaded, xb)
            if a.shape != b.shape or not torch.equal(a, b):
                diff = float("inf") if a.shape != b.shape else float((a.double() - b.double()).abs().max())
                what = "uniform probe images" if i == 0 else f"the first {len(xb)} test images"
                raise ModelReloadError(
                    f"the saved model does not reproduce the evaluated model: on {what} its reloaded logits differ "
                    f"(max |difference| {diff:.3g}). Something in the evaluated model is not in its state dict -- a "
                    "forward (pre-)hook, an input transform outside the model, or an attribute changed after it was "
                    "built. Put it into the model as a module of a registered model class, so that "
                    "cfbench.load_model rebuilds it; cfbench refuses to save a model it cannot reproduce.")
    finally:
        inner.train(was_training)


def _seeded_forward(model, x):
    import torch

    devices = [x.device.index] if x.device.type == "cuda" and x.device.index is not None else []
    with torch.random.fork_rng(devices=devices), _deterministic_kernels():
        torch.manual_seed(0)
        with torch.no_grad():
            return model(x).detach().float()


@contextlib.contextmanager
def _deterministic_kernels():
    """cuDNN's deterministic, non-benchmarked kernels for the comparison (no-op on CPU)."""
    import torch

    cudnn = torch.backends.cudnn
    old = (cudnn.deterministic, cudnn.benchmark)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = old


def rebuild_model(meta: dict[str, Any]):
    """The architecture described by a saved model's metadata, freshly initialised."""
    from ..models import build_model

    model = build_model(meta["model"], tuple(meta["shape"]), meta["num_classes"], tuple(meta["mean"]),
                        tuple(meta["std"]), meta["model_params"])
    if meta.get("opacus_fixed"):
        from opacus.validators import ModuleValidator
        model = ModuleValidator.fix(model)
    return model


def _load(path: Path, meta: dict[str, Any], device):
    model = rebuild_model(meta)
    model.load_state_dict(load_tensors(path)[0])
    return model.to(device).eval()


def load_model(run_dir: str | Path, device: str = "cpu"):
    """The final, evaluated model of a run, in eval mode, from ``model.safetensors``.

    Weights are read with safetensors (no pickle); the architecture is rebuilt from the
    registry with the model name and parameters stored in the file's metadata.  The run
    checked when it saved the file that this reproduces the evaluated model's logits
    exactly (:func:`verify_reload`).
    """
    path = Path(run_dir) / MODEL
    if not path.exists():
        raise UsageError(f"{path} does not exist: is {run_dir} a finished cfbench run directory?")
    return _load(path, read_tensor_meta(path), device)
