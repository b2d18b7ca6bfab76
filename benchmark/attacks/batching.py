"""What the counterfactual generators (``proto-cf``, ``ace``) share around their per-batch
optimisation: checking the instances, running consecutive batches with the model in eval mode
(its mode restored afterwards) under an optional progress bar, and concatenating the per-batch
result dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import UsageError
from ..progress import Progress

T = TypeVar("T")


def check_instances(name: str, x0: torch.Tensor, target: torch.Tensor) -> None:
    """One target class per instance, instances in [0, 1]; a UsageError naming ``name`` otherwise."""
    if len(x0) != len(target):
        raise UsageError(f"{name}: {len(x0)} instances but {len(target)} target classes.")
    if x0.numel() and (x0.min() < 0 or x0.max() > 1):
        raise UsageError(f"{name}: instances must lie in [0, 1] (got values in "
                         f"[{float(x0.min()):.3g}, {float(x0.max()):.3g}]).")


def map_batches(model: torch.nn.Module, n: int, batch_size: int, run: Callable[[int, int], T], *,
                progress: bool = False, desc: str = "counterfactuals") -> list[T]:
    """``[run(start, stop) for each batch of range(n)]`` with ``model`` in eval mode (its mode is
    restored, also on error) and, with ``progress``, a bar counting instances (one line per batch
    when stderr is a log file: :class:`~cfbench.progress.Progress`)."""
    was_training = model.training
    model.eval()
    parts: list[T] = []
    bar = Progress(n, desc, "img", enabled=progress, leave=False)
    try:
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            parts.append(run(s, e))
            bar.update(e - s)
    finally:
        model.train(was_training)
        bar.close()
    return parts


def concat_results(cls: type[T], parts: list[T]) -> T:
    """The per-batch results (dataclasses of tensors) joined along the batch dimension."""
    return cls(**{f.name: torch.cat([getattr(r, f.name) for r in parts]) for f in dataclasses.fields(cls)})


__all__ = ["check_instances", "concat_results", "map_batches"]
