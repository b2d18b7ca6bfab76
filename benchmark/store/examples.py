"""The one channel for example images: every generator (PGD, AutoAttack, counterfactuals,
...) hands ``{prefix: (x_clean, x_changed, y)}`` or ``{prefix: {slot: tensor}}`` to the run,
which writes them all into ``<run>/examples.safetensors``; reports read them from there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import save_tensors_atomic
from .record import EXAMPLES

SLOTS = ("clean", "adv", "y")


def save_examples(examples: dict[str, Any], path: str | Path) -> tuple[list[str], list[str]]:
    """Save example tensors to one safetensors file; returns ``(prefixes saved, warnings)``.

    A tuple ``(x_clean, x_changed, y)`` becomes tensors ``<prefix>.clean``, ``<prefix>.adv``,
    ``<prefix>.y``; a dict of named tensors becomes ``<prefix>.<name>``.  Never raises:
    problems come back as warning strings (examples only feed the report; they must never
    fail a run).  Nothing is written when there is nothing to save.
    """
    import torch

    tensors: dict[str, Any] = {}
    problems: list[str] = []
    saved: list[str] = []
    for prefix, value in examples.items():
        items = value.items() if isinstance(value, dict) else zip(SLOTS, value or ())
        ok = False
        for name, t in items:
            if isinstance(t, torch.Tensor):
                tensors[f"{prefix}.{name}"] = t.detach().cpu().clone().contiguous()  # own storage: views share it
                ok = True
            else:
                problems.append(f"report: example {prefix}[{name!r}] is a {type(t).__name__}, not a tensor; not saved")
        if ok:
            saved.append(prefix)
    if not tensors:
        return [], problems
    try:
        save_tensors_atomic(path, tensors, {"prefixes": saved})
    except Exception as e:  # noqa: BLE001 - examples must never fail a run
        problems.append(f"report: could not save example images to {path}: {type(e).__name__}: {e}")
        saved = []
    return saved, problems


def load_examples(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{prefix: {slot: array}}`` from ``<run_dir>/examples.safetensors`` ({} if absent)."""
    path = Path(run_dir) / EXAMPLES
    if not path.exists():
        return {}
    from safetensors.numpy import load_file

    out: dict[str, dict[str, Any]] = {}
    for key, arr in load_file(str(path)).items():
        prefix, _, slot = key.rpartition(".")
        out.setdefault(prefix or key, {})[slot] = arr
    return out
