"""PGD adversarial training (Madry et al., ICLR 2018).

    min_theta  E_(x,y) [ max_{||delta|| <= eps} CE(f(x + delta), y) ]

The inner maximisation is the shared PGD (:mod:`cfbench.attacks.pgd`): random start,
``steps`` steps of size ``step_size`` (default 2.5 * eps / steps, Madry et al.'s rule),
projection onto the ball and clipping to [0, 1], in the run's threat model (Linf or L2).

Choices:
* the attack runs with the model in eval mode (batch-norm statistics frozen, no dropout),
  then the model goes back to train mode for the update -- the common choice in
  RobustBench-era code, stated because Madry et al. leave it open;
* ``mix`` (default 0 = Madry) optionally adds the clean loss: (1-mix)*adv + mix*clean, as in
  Goodfellow et al.'s mixed objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from cfbench.attacks.pgd import STEP_SIZE_HELP, default_step_size
from cfbench.defenses.base import AdversarialDefense
from cfbench.params import param


@dataclass(frozen=True)
class PGDATParams:
    steps: int = param(10, "PGD steps of the inner maximisation", ge=1)
    step_size: float | None = param(None, STEP_SIZE_HELP, gt=0)
    rand_init: bool = param(True, "random start inside the ball")
    mix: float = param(0.0, "weight of the clean loss: (1-mix)*CE(adv) + mix*CE(clean)", ge=0, le=1)


class PGDAT(AdversarialDefense):
    """Madry et al. (2018) min-max training on PGD examples, Linf or L2."""

    name = "pgd-at"
    description = "PGD adversarial training (Madry et al. 2018): min-max on PGD examples, Linf/L2"
    version = 1
    family = "adversarial"
    Params = PGDATParams

    def step_size(self, eps: float) -> float:
        return default_step_size(eps, self.params.steps, self.params.step_size)

    def adversarial(self, model, x, y, batch):
        p = self.params
        return batch.attack(model, x, y, steps=p.steps, step_size=self.step_size(batch.ctx.threat.eps),
                            rand_init=p.rand_init)

    def per_sample_loss(self, model, x, y, batch, x_adv=None):
        """Per-example training loss (vector) and the adversarial logits; ``x_adv`` reuses
        adversarial examples already computed by :meth:`adversarial` (DeMem composes this)."""
        x_adv = self.adversarial(model, x, y, batch) if x_adv is None else x_adv
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y, reduction="none")
        if self.params.mix > 0:
            loss = (1 - self.params.mix) * loss + self.params.mix * F.cross_entropy(model(x), y, reduction="none")
        return loss, logits
