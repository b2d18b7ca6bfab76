"""MART for cfbench: misclassification-aware adversarial training (Wang et al., ICLR 2020).

Y. Wang, D. Zou, J. Yi, J. Bailey, X. Ma, Q. Gu, "Improving adversarial robustness requires
revisiting misclassified examples", ICLR 2020; reference code github.com/YisenWang/MART
(``mart_loss``).  With p = softmax f and x' the adversarial example of x:

    L = BCE(p(x'), y) + beta * KL( p(x) || p(x') ) * (1 - p_y(x))
    BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x'))
    x' = argmax_{||x' - x|| <= eps} CE(f(x'), y)

The boosted CE (BCE) adds a margin term that pushes down the most likely wrong class; the
KL regulariser is weighted per example by 1 - p_y(x), so that misclassified (and barely
classified) clean examples get more weight.  beta = 6 is the paper's setting
(``--set beta=...``).

Choices, following the reference code where the paper is silent:
* the inner maximisation is cfbench's shared PGD on the cross-entropy, started at
  x + 0.001 * N(0, I) (as in ``mart_loss``; cfbench also clips that start to [0, 1]), with the
  model in eval mode; default step size 2.5 * eps / steps (= eps / 4 for 10 steps; the
  reference code uses 0.007 for eps = 0.031); L2 uses the same PGD in the L2 ball (the
  reference code only implements Linf);
* the KL term is summed over classes and averaged over the batch; the clean distribution and
  the weight 1 - p_y(x) are *not* detached, so gradients flow through them, as in the code;
* the reference code's numerical constants are kept: log(1.0001 - p + 1e-12) in the margin
  term, log(p' + 1e-12) in the KL and 1.0000001 - p_y(x) as the weight;
* the loss hook returns the clean logits, so the training accuracy in the history is clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cfbench.defenses import Defense
from cfbench.params import param

__version__ = "0.1.0"


@dataclass(frozen=True)
class MARTParams:
    beta: float = param(6.0, "weight of the misclassification-weighted KL term (paper: 6)", ge=0)
    steps: int = param(10, "PGD steps of the inner maximisation (on the cross-entropy)", ge=1)
    step_size: float | None = param(None, "PGD step size (default 2.5 * eps / steps)", gt=0)


def mart_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """The MART objective from clean and adversarial logits (a batch mean)."""
    probs_adv = F.softmax(logits_adv, dim=1)
    # most likely wrong class on the adversarial example
    top2 = torch.argsort(probs_adv, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - probs_adv + 1e-12), wrong)
    probs = F.softmax(logits, dim=1)
    p_true = probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(probs_adv + 1e-12), probs, reduction="none").sum(1)  # KL(p(x) || p(x'))
    return bce + beta * (kl * (1.0000001 - p_true)).mean()


class MART(Defense):
    """Wang et al. (2020): boosted CE on PGD examples + beta * KL(clean || adv) * (1 - p_y(clean))."""

    name = "mart"
    description = "MART (Wang et al. 2020): boosted CE on PGD examples + beta * (1 - p_y) * KL(clean || adv)"
    version = 1
    api_version = 1              # the cfbench plugin API this file is written for
    family = "adversarial"
    plugin_version = __version__  # shown in records when loaded with --plugin
    Params = MARTParams

    def adversarial(self, model, x, y, batch):
        p = self.params
        step = p.step_size if p.step_size is not None else 2.5 * batch.ctx.threat.eps / p.steps
        x_init = x + 0.001 * torch.randn_like(x)
        return batch.attack(model, x, y, steps=p.steps, step_size=step, x_init=x_init)

    def loss(self, model, x, y, batch):
        x_adv = self.adversarial(model, x, y, batch)
        logits = model(x)
        return mart_loss(logits, model(x_adv), y, self.params.beta), logits
