"""TRADES (Zhang et al., ICML 2019).

    L = CE(f(x), y) + beta * KL( softmax f(x) || softmax f(x') ),
    x' = argmax_{||x' - x|| <= eps} KL( softmax f(x) || softmax f(x') )

As in the authors' reference code (yaodongyu/TRADES, ``trades_loss``): the inner
maximisation starts at ``x + 0.001 * N(0, I)``, runs ``steps`` signed-gradient (Linf) or
normalised-gradient (L2) steps on the KL term with the model in eval mode and the clean
distribution detached, projects and clips to [0, 1]; the outer KL is the batch mean
(the reference code sums and divides by the batch size).  beta = 6 is the paper's CIFAR-10
setting; cfbench's default is 6.0 too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cfbench.attacks.pgd import STEP_SIZE_HELP, default_step_size
from cfbench.defenses.base import AdversarialDefense
from cfbench.params import param


@dataclass(frozen=True)
class TRADESParams:
    beta: float = param(6.0, "weight of the KL robustness term (paper: 6 on CIFAR-10)", ge=0)
    steps: int = param(10, "PGD steps on the KL term", ge=1)
    step_size: float | None = param(None, STEP_SIZE_HELP, gt=0)


def kl_sum(adv_logits: torch.Tensor, clean_probs: torch.Tensor) -> torch.Tensor:
    """sum_i KL(p_clean_i || p_adv_i), the quantity the inner maximisation ascends."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), clean_probs, reduction="sum")


class TRADES(AdversarialDefense):
    """Zhang et al. (2019): clean CE + beta * KL(clean || adversarial)."""

    name = "trades"
    description = "TRADES (Zhang et al. 2019): CE(clean) + beta * KL(f(x) || f(x')), x' maximises the KL"
    version = 1
    family = "adversarial"
    Params = TRADESParams

    def adversarial(self, model, x, y, batch):
        p = self.params
        eps = batch.ctx.threat.eps
        alpha = default_step_size(eps, p.steps, p.step_size)
        was = model.training
        model.eval()
        with torch.no_grad():
            clean_probs = F.softmax(model(x), dim=1)
        model.train(was)
        x_init = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
        return batch.attack(model, x, y, steps=p.steps, step_size=alpha, x_init=x_init,
                            loss_fn=lambda logits, _y: kl_sum(logits, clean_probs))

    def per_sample_loss(self, model, x, y, batch, x_adv=None):
        """Per-example CE(f(x_i), y_i) + beta * KL_i (vector) and the clean logits; ``x_adv``
        reuses adversarial examples already computed by :meth:`adversarial` (DeMem composes this)."""
        x_adv = self.adversarial(model, x, y, batch) if x_adv is None else x_adv
        logits = model(x)
        natural = F.cross_entropy(logits, y, reduction="none")
        robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="none").sum(1)
        return natural + self.params.beta * robust, logits

    # loss (AdversarialDefense): the batch mean = mean CE + beta * batchmean KL (the reference code's reduction)
