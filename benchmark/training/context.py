"""What a defense receives besides the model and the training data (:class:`FitContext`),
and the per-batch context of the shared loop's loss hook (:class:`Batch`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..attacks.base import ThreatModel

if TYPE_CHECKING:  # annotations only: no import at run time
    from ..config import RunConfig, TrainParams
    from ..data.splits import RunData


@dataclass
class FitContext:
    """What a defense receives besides the model and the training data."""

    threat: ThreatModel
    train: TrainParams             # resolved: epochs, batch size and lr filled in
    device: torch.device
    seed: int
    num_classes: int
    augmentation: str              # dataset augmentation family: "none", "shift", "flip-shift"
    checkpoint_dir: Path | None = None
    #: the run's directory when fitting the run's *target* model (None for membership reference
    #: models, the DeMem oracle, the contract check or a direct fit)
    run_dir: Path | None = None
    cache_dir: Path | None = None  # shared cache for artifacts keyed by recipe (e.g. generated sets)
    progress: bool = True
    desc: str = "train"
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: example images for the report, ``{prefix: (x_clean, x_changed, y)}`` (the one channel:
    #: the runner saves them with the evaluators' examples into examples.safetensors)
    examples: dict[str, Any] = field(default_factory=dict)
    # set by cfbench.training.recipe.fit_recipe (None when a defense is fitted directly): the
    # run's resolved config and data, and the positions in data's pool of the training examples
    config: RunConfig | None = None
    data: RunData | None = None
    pool_positions: np.ndarray | None = None
    #: runs training jobs a defense declares (e.g. DeMem's oracle reference models) and returns
    #: their model paths: the run's executor (set by the runner and by the executor itself;
    #: None for a direct fit, where a defense that needs jobs must say so)
    run_jobs: Callable[[Sequence[Any]], list[Path]] | None = None  # Sequence[execution.jobs.TrainingJob]


@dataclass
class Batch:
    """Per-batch context handed to :meth:`cfbench.defenses.base.Defense.loss`."""

    epoch: int
    step: int                      # global step
    indices: torch.Tensor          # positions of the batch in the training set
    ctx: FitContext

    def attack(self, model, x, y, *, steps: int, step_size: float, rand_init: bool = True,
               loss_fn=None, x_init=None, eval_mode: bool = True, eps: float | None = None,
               objective=None):
        """Shared PGD in the run's threat model; runs the model in eval mode by default.

        ``eps`` replaces the run's radius for this call (a schedule such as Int's eps ramp);
        ``objective(model, x_adv) -> (N,)`` replaces ``loss_fn`` (see :func:`cfbench.attacks.pgd.pgd`)."""
        from ..attacks.pgd import pgd

        was_training = model.training
        if eval_mode:
            model.eval()
        try:
            return pgd(model, x, y, eps=self.ctx.threat.eps if eps is None else eps, step_size=step_size,
                       steps=steps, norm=self.ctx.threat.norm, rand_init=rand_init, loss_fn=loss_fn,
                       x_init=x_init, objective=objective)
        finally:
            model.train(was_training)
