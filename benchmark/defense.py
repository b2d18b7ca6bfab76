"""The defense contract.

A defense is a class registered under the ``cfbench.defenses`` entry-point group:

    class MyDefense(Defense):
        name = "my-defense"                 # registry name (what --defense takes)
        description = "one line for cfbench list"
        version = 1                         # bump when behaviour changes: part of the cache key
        Params = MyParams                   # frozen dataclass of typed hyper-parameters

        def loss(self, model, x, y, batch):  # the per-batch loss hook of the shared loop
            x_adv = batch.attack(model, x, y)          # the shared PGD, in the run's threat model
            return F.cross_entropy(model(x_adv), y)

The constructor only stores the hyper-parameters (scikit-learn style); ``fit`` does the
work.  The default ``fit`` runs the shared training loop (:func:`cfbench.training.train`) with
``loss`` as its hook -- optimizer, schedule, progress bar, per-epoch safetensors checkpoints
and resume come for free.  A defense that must own the loop (DP-SGD with Opacus, a
generation stage before training) overrides ``fit`` and can still call ``train``.

Numbers a defense wants in the record (e.g. ``dp.epsilon``) go into ``ctx.metrics``; notes
and choices into ``ctx.notes``; warnings into ``ctx.warnings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .attacks.base import ThreatModel


@dataclass
class FitContext:
    """What a defense receives besides the model and the training data."""

    threat: ThreatModel
    train: Any                     # resolved cfbench.config.TrainParams
    device: torch.device
    seed: int
    num_classes: int
    augmentation: str              # dataset augmentation family: "none", "shift", "flip-shift"
    checkpoint_dir: Path | None = None
    #: the run's directory when fitting the run's *target* model (None for membership reference
    #: models, the DeMem oracle, the contract check or a direct fit): where a defense may leave
    #: files for the report, e.g. cf-at's example counterfactuals
    run_dir: Path | None = None
    cache_dir: Path | None = None  # shared cache for artifacts keyed by recipe (e.g. generated sets)
    progress: bool = True
    desc: str = "train"
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    # set by cfbench.runner.fit_recipe (None when a defense is fitted directly): the run's
    # RunConfig and RunData, and the positions in data's pool of the training examples x
    # (a defense that needs the run's reference models, e.g. DeMem's oracle, uses them)
    config: Any = None
    data: Any = None
    pool_positions: Any = None


@dataclass
class Batch:
    """Per-batch context handed to :meth:`Defense.loss`."""

    epoch: int
    step: int                      # global step
    indices: torch.Tensor          # positions of the batch in the training set
    ctx: FitContext

    def attack(self, model, x, y, *, steps: int, step_size: float, rand_init: bool = True,
               loss_fn=None, x_init=None, eval_mode: bool = True):
        """Shared PGD in the run's threat model; runs the model in eval mode by default."""
        from .attacks.pgd import pgd

        was_training = model.training
        if eval_mode:
            model.eval()
        try:
            return pgd(model, x, y, eps=self.ctx.threat.eps, step_size=step_size, steps=steps,
                       norm=self.ctx.threat.norm, rand_init=rand_init, loss_fn=loss_fn, x_init=x_init)
        finally:
            model.train(was_training)


class Defense:
    """Base class of defenses (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1
    api_version: ClassVar[int] = 1
    Params: ClassVar[type]
    #: family used to colour plots and group leaderboards ("erm", "adversarial", "dp", "privacy", ...)
    family: ClassVar[str] = "other"

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: Batch):
        """Mean training loss of a batch; may return ``(loss, logits)`` for accuracy tracking."""
        raise NotImplementedError

    def fit(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: FitContext) -> None:
        from .training import train

        train(model, x, y, ctx, self.loss, state=self)

    # Defense-internal state that must survive a resume (e.g. running per-sample losses).
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def on_epoch_start(self, model: torch.nn.Module, epoch: int, ctx: FitContext) -> None:
        pass

    @classmethod
    def check_config(cls, cfg) -> None:
        """Reject settings that are invalid in combination (raise UsageError)."""
