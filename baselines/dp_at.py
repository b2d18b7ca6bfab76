"""Differentially private adversarial training: PGD-AT's objective, optimised with DP-SGD.

Every step draws a Poisson batch, computes PGD examples against the *current* model (the
shared PGD, exactly as :class:`~cfbench_baselines.pgd_at.PGDAT` does: Madry et al.'s
random start, ``steps`` steps of ``2.5 eps / steps`` by default, model in eval mode), then
takes a DP-SGD step (:class:`~cfbench_baselines.dp_sgd.DPSGD`) on the per-example loss
``(1 - mix) CE(f(x'_i), y_i) + mix CE(f(x_i), y_i)``.  This is the straightforward
combination the design brief names -- PGD-AT's inner maximisation (Madry et al. 2018), DP-SGD's
outer update (Abadi et al. 2016) -- with Opacus doing the clipping, noise and accounting.

Choices:

* the attack runs through the *un-hooked* model (:func:`cfbench.dp.plain`): no activation
  is recorded and no ``grad_sample`` filled, so the attack's backward passes never reach
  the private update (with Opacus 1.6 a backward through the hooked model, even one taken
  w.r.t. the inputs only, fills every parameter's ``grad_sample``); the shared loop then
  clears all gradients before the DP step's backward;
* the adversarial example is a function of one training example and of the current
  (already private) model, and with ``mix > 0`` the clean and adversarial terms of an example
  form *one* per-example loss whose gradient is clipped once -- so each example still has
  sensitivity ``max_grad_norm`` and the accounting is exactly DP-SGD's (same sigma, q, steps,
  delta and accountants; the clean and adversarial copies are never two batch entries);
* PGD's randomness (its random start) uses the global PyTorch generator, like the noise;
* ghost clipping (``grad_sample_mode=ghost``, which ``auto`` picks for Linear-heavy models)
  supports one forward pass per example and step, so it is used only with ``mix = 0``
  (``auto`` then falls back to a per-sample-gradient mode; ``ghost`` with ``mix > 0`` is an error).
"""

from __future__ import annotations

from dataclasses import dataclass

from cfbench import dp
from cfbench.defenses.base import AdversarialDefense, compose
from cfbench.errors import UsageError
from cfbench.params import to_dict

from .dp_sgd import DPSGD, DPSGDParams
from .pgd_at import PGDATParams


@dataclass(frozen=True)
class DPATParams(PGDATParams, DPSGDParams):
    """DP-SGD's privacy parameters and PGD-AT's attack parameters (steps, step_size, rand_init, mix)."""

    def validate(self) -> None:
        DPSGDParams.validate(self)
        if self.grad_sample_mode == "ghost" and self.mix > 0:
            raise UsageError(f"grad_sample_mode='ghost' cannot be combined with mix={self.mix}: Opacus' ghost "
                             "clipping supports one forward pass per example and step, the mixed loss needs two. "
                             "Valid choices: mix=0, or grad_sample_mode=hooks, ew or functorch.")


class DPAT(DPSGD):
    """DP-SGD step on PGD adversarial (optionally mixed) batches; accounting as DP-SGD.

    The adversarial part is a composed ``pgd-at`` instance (:func:`cfbench.defenses.base.compose`)
    with this defense's attack parameters; only its ``adversarial`` / ``per_sample_loss``
    interface is used."""

    name = "dp-at"
    description = "DP adversarial training: PGD examples, then a DP-SGD step (Opacus); epsilon accounted"
    version = 1
    family = "dp"
    Params = DPATParams

    def ghost_applies(self) -> bool:
        return self.params.mix == 0

    def __init__(self, params=None):
        super().__init__(params)
        attack = {f: v for f, v in to_dict(self.params).items() if f in PGDATParams.__dataclass_fields__}
        self.base = compose("pgd-at", attack, require=AdversarialDefense)

    def private_loss(self, model, x, y, batch):
        per, logits = self.base.per_sample_loss(model, x, y, batch, x_adv=self.adversarial(model, x, y, batch))
        return per.mean(), logits

    def adversarial(self, model, x, y, batch):
        with dp.plain(model) as plain_model:
            return self.base.adversarial(plain_model, x, y, batch)
