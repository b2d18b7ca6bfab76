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
work.  The default ``fit`` runs the shared training loop (:func:`cfbench.training.loop.train`) with
``loss`` as its hook -- optimizer, schedule, progress bar, per-epoch safetensors checkpoints
and resume come for free.  A defense that must own the loop (DP-SGD with Opacus, a
generation stage before training) overrides ``fit`` and can still call ``train``.

An *adversarial* defense (:class:`AdversarialDefense`: PGD-AT, TRADES) declares how it builds
its adversarial examples (``adversarial``) and its per-example loss on them
(``per_sample_loss``); composite defenses (DeMem on PGD-AT or TRADES, DP-AT on PGD-AT,
cf-at on ERM) hold an instance of their base built by :func:`compose` and call only that
interface -- one mechanism, no inheritance between registered defenses.

Numbers a defense wants in the record (e.g. ``dp.epsilon``) go into ``ctx.metrics``; notes
and choices into ``ctx.notes``; warnings into ``ctx.warnings``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..component import Component
from ..training.context import Batch, FitContext

__all__ = ["Defense", "AdversarialDefense", "compose", "Batch", "FitContext"]

class Defense(Component):
    """Base class of defenses (see the module docstring for the contract)."""

    #: family used to colour plots and group leaderboards ("erm", "adversarial", "dp", "privacy", ...)
    family: ClassVar[str] = "other"

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: Batch):
        """Mean training loss of a batch; may return ``(loss, logits)`` for accuracy tracking."""
        raise NotImplementedError

    def fit(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: FitContext) -> None:
        from ..training.loop import train

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


class AdversarialDefense(Defense):
    """A defense whose loss is a per-example loss on adversarial examples it generates.

    Subclasses implement :meth:`adversarial` and :meth:`per_sample_loss`; :meth:`loss` is
    their batch mean.  Composite defenses use exactly these two methods.
    """

    def adversarial(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The adversarial examples of a batch (shape of ``x``, inside the threat model)."""
        raise NotImplementedError

    def per_sample_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: Batch,
                        x_adv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example training loss (vector of length ``len(x)``) and logits for accuracy
        tracking; ``x_adv`` reuses examples already computed by :meth:`adversarial`."""
        raise NotImplementedError

    def loss(self, model, x, y, batch):
        per, logits = self.per_sample_loss(model, x, y, batch)
        return per.mean(), logits


def compose(name: str, values: dict[str, Any] | None = None, *, require: type = Defense,
            where: str | None = None) -> Defense:
    """An instance of the registered defense ``name`` with hyper-parameters ``values`` (cast
    and validated like ``--set``), for a composite defense to build on.  ``require`` is the
    interface the composite needs (e.g. :class:`AdversarialDefense`)."""
    from .. import params as P
    from ..errors import UsageError
    from ..registry import get

    cls = get("defense", name)
    if not issubclass(cls, require):
        raise UsageError(f"defense {name!r} cannot be used as a base here: it is not a {require.__name__} "
                         f"(it must implement {', '.join(m for m in ('adversarial', 'per_sample_loss') if require is AdversarialDefense) or 'the Defense contract'}).")
    return cls(P.build(cls.Params, values or {}, where=where or f"{name}."))
