"""DP-SGD (Abadi et al., CCS 2016) on Opacus.

Each step draws a Poisson batch (every training example independently with probability
``q``), computes per-sample gradients, clips each to L2 norm ``max_grad_norm`` (C), sums
them, adds N(0, (sigma C)^2 I) and divides by the expected batch size ``q N``; the
underlying optimizer (the run's SGD/Adam, learning-rate schedule and weight decay, which
act on the privatised gradient only) takes the step.  The privacy loss of the whole run is
accounted for by Opacus.

How it is built (Opacus 1.6): per-sample gradients from an Opacus ``GradSampleModule`` in
``grad_sample_mode`` (``hooks``, ``ew`` = PyTorch expanded weights, ``functorch``: the same
per-sample gradients; or ``ghost``: Opacus' fast gradient clipping, the same clipped sum
without materialising per-sample gradients, see :class:`cfbench.dp.GhostClipping`), the
clipping and noise of Opacus' ``DPOptimizer``, Opacus' accountants, and the shared training
loop (:func:`cfbench.training.train`) with the DPOptimizer, Poisson batches and a step hook.
The default ``auto`` picks the fastest mode for the model on CPU (:func:`cfbench.dp.choose_mode`:
ghost for cnn8 / cnn28, expanded weights for gap-cnn and the ResNets; docs/dp.md has the
measurements).

Choices the paper and Opacus leave open:

* sampling: Poisson, with ``q = 1 / ceil(N / B)`` and ``ceil(N / B)`` steps per epoch
  (B = ``train.batch_size``), exactly what ``PrivacyEngine.make_private`` does with a
  ``DataLoader(batch_size=B)``.  The batches come from Opacus' ``UniformWithReplacementSampler``
  driven by a generator seeded by (run seed, epoch), so a resumed run redraws them.  The
  DPOptimizer averages over the *expected* batch size ``q N`` (not truncated to an integer as
  ``make_private`` does);
* an empty Poisson batch is still a step (noise only): skipping it would break the
  accounting, which counts every draw;
* ``delta`` defaults to ``1 / (10 N)`` (N = training-set size, so below the ``1 / N`` a
  meaningful delta must stay under); a larger delta is allowed but warned about;
* ``target_epsilon`` calibrates sigma for ``train.epochs`` epochs with Opacus'
  ``get_noise_multiplier`` (bisection, at most 0.01 below the target) under the chosen
  accountant; the recorded ``dp.epsilon`` is then computed from the steps actually taken;
* accountant: PRV (Gopi et al. 2021; the tightest of Opacus') by default, RDP always also
  computed from the same history and recorded as ``dp.epsilon_rdp``;
* ``noise_multiplier = 0`` is the clipping-only control, recorded as epsilon = inf;
* layers Opacus cannot train (BatchNorm) are replaced with ``ModuleValidator.fix``
  (BatchNorm -> GroupNorm(min(32, C), C)) *in place*, and every replaced module is listed in
  the record (``notes.defense.opacus_fixed_modules``); the saved model is marked so that
  ``cfbench.results.load_model`` re-applies the fix;
* the noise comes from PyTorch's default generator (seeded by the run, restored on resume),
  not a cryptographically secure one (Opacus' ``secure_mode`` needs torchcsprng): the
  guarantee is the mathematical one, floating-point attacks on the sampler are out of scope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from cfbench import dp
from cfbench.defenses.base import Defense
from cfbench.errors import UsageError
from cfbench.params import param

DEFAULT_GRAD_SAMPLE_MODE = "auto"


@dataclass(frozen=True)
class DPSGDParams:
    target_epsilon: float | None = param(
        None, "privacy budget epsilon spent by the end of training (noise calibrated for train.epochs); "
              "give this or noise_multiplier", gt=0)
    noise_multiplier: float | None = param(
        None, "noise std / max_grad_norm (0 = clipping only, epsilon = inf); give this or target_epsilon", ge=0)
    max_grad_norm: float = param(1.0, "per-sample gradient clipping norm C", gt=0)
    delta: float | None = param(None, "delta of (epsilon, delta)-DP (default 1/(10 N), N = training-set size)",
                                gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = param("prv", "accountant of dp.epsilon (RDP is always also recorded)")
    grad_sample_mode: Literal["auto", "hooks", "ew", "functorch", "ghost"] = param(
        DEFAULT_GRAD_SAMPLE_MODE, "Opacus per-sample-gradient mode: hooks, ew (expanded weights), functorch, "
                                  "ghost (fast gradient clipping), or auto = the fastest for the model on CPU")
    fix_model: bool = param(True, "replace layers Opacus cannot train (BatchNorm -> GroupNorm) with "
                                  "ModuleValidator.fix; false = such a layer is an error")

    def validate(self) -> None:
        eps, sigma = self.target_epsilon, self.noise_multiplier
        if (eps is None) == (sigma is None):
            got = (f"both (target_epsilon={eps}, noise_multiplier={sigma})" if eps is not None
                   else "neither")
            raise UsageError(f"DP training needs exactly one of target_epsilon or noise_multiplier; got {got}. "
                             "Valid choices: --set target_epsilon=E (E > 0, noise calibrated for train.epochs) "
                             "or --set noise_multiplier=S (S >= 0; 0 = clipping only, epsilon = inf).")
        if eps is not None and math.isinf(eps):
            raise UsageError(f"target_epsilon={eps} is not a budget; it must be a finite number > 0 "
                             "(for the clipping-only control use noise_multiplier=0).")
        if sigma is not None and math.isinf(sigma):
            raise UsageError(f"noise_multiplier={sigma} is out of range; it must be a finite number >= 0.")
        if math.isinf(self.max_grad_norm):
            raise UsageError(f"max_grad_norm={self.max_grad_norm} is out of range; it must be a finite number > 0.")


class DPSGD(Defense):
    """Abadi et al. (2016) DP-SGD through Opacus: Poisson sampling, per-sample clipping, Gaussian noise."""

    name = "dp-sgd"
    description = "DP-SGD (Abadi et al. 2016) via Opacus: clipping + noise, Poisson sampling, epsilon accounted"
    version = 1
    family = "dp"
    Params = DPSGDParams

    def __init__(self, params=None):
        super().__init__(params)
        self._steps = 0          # noised optimizer steps taken (the accountant's history)
        self._empty = False      # the current Poisson batch is empty
        self._ghost = None       # dp.GhostClipping in grad_sample_mode="ghost"

    # -- hooks of the shared loop ----------------------------------------------------------
    def loss(self, model, x, y, batch):
        if len(x) == 0:          # an empty Poisson batch: a noise-only step (see _step)
            self._empty = True
            return torch.zeros((), device=x.device, requires_grad=True)
        out = self.private_loss(model, x, y, batch)
        if self._ghost is not None:
            self._ghost.first_pass(out[0] if isinstance(out, tuple) else out, len(x))
        return out

    def private_loss(self, model, x, y, batch):
        """Mean loss of a non-empty batch through the private (per-sample-gradient) model."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def _step(self, optimizer) -> None:
        if self._empty:
            for p in optimizer.params:
                if self._ghost is not None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            self._empty = False
        optimizer.step()
        # drop the per-sample gradients now: the next loss hook runs (and, in "ew" mode, checks
        # for stale per-sample gradients) before the shared loop's zero_grad
        optimizer.zero_grad(set_to_none=True)
        if self._ghost is not None:
            self._ghost.after_step()

    def _count_step(self, optimizer) -> None:
        self._steps += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"dp_steps": torch.tensor([self._steps], dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "dp_steps" in tensors:
            self._steps = int(tensors["dp_steps"][0])

    # -- fit -------------------------------------------------------------------------------
    def fit(self, model, x, y, ctx) -> None:
        from cfbench.training.loop import make_optimizer, train

        p, tp = self.params, ctx.train
        n = len(x)
        ctx.notes["opacus_fixed_modules"] = dp.make_compatible(model, p.fix_model)
        q, per_epoch = dp.sample_rate(n, tp.batch_size), dp.steps_per_epoch(n, tp.batch_size)
        planned = per_epoch * tp.epochs
        delta = p.delta if p.delta is not None else dp.default_delta(n)
        if delta >= 1 / n:
            ctx.warnings.append(f"dp: delta={delta:.3g} is not below 1/N = {1 / n:.3g} (N = {n}); such a guarantee "
                                "permits publishing a few training records.")
        sigma = (p.noise_multiplier if p.noise_multiplier is not None
                 else dp.noise_for_epsilon(p.target_epsilon, delta, q, planned, p.accountant))
        model.to(ctx.device)
        mode = self.resolve_mode(model)
        private = dp.wrap(model, mode, p.max_grad_norm)
        private.forbid_grad_accumulation()
        optimizer = dp.dp_optimizer(make_optimizer(model, tp), mode, noise_multiplier=sigma,
                                    max_grad_norm=p.max_grad_norm, expected_batch_size=q * n)
        optimizer.attach_step_hook(self._count_step)
        self._steps, self._empty = 0, False
        self._ghost = dp.GhostClipping(private) if mode == "ghost" else None
        try:
            with dp.quiet_hooks():
                train(private, x, y, ctx, self.loss, state=self, optimizer=optimizer, step_fn=self._step,
                      batches=lambda epoch: dp.poisson_batches(n, q, per_epoch, dp.poisson_generator(ctx.seed, epoch)))
        finally:
            if self._ghost is not None:
                self._ghost.remove()
                self._ghost = None
            dp.release(private)
        self._record(ctx, sigma=sigma, q=q, delta=delta, n=n, planned=planned, mode=mode)

    def resolve_mode(self, model) -> str:
        """``grad_sample_mode``, with ``auto`` resolved by :func:`cfbench.dp.choose_mode`."""
        mode = self.params.grad_sample_mode
        return dp.choose_mode(model, allow_ghost=self.ghost_applies()) if mode == "auto" else mode

    def ghost_applies(self) -> bool:
        """Ghost clipping needs one forward pass per example and step."""
        return True

    def _record(self, ctx, *, sigma: float, q: float, delta: float, n: int, planned: int, mode: str) -> None:
        p, steps = self.params, self._steps
        eps_rdp, order = dp.rdp_epsilon(sigma, q, steps, delta)
        eps = eps_rdp if p.accountant == "rdp" else dp.epsilon(sigma, q, steps, delta, p.accountant)
        ctx.metrics.update({
            "dp.epsilon": eps, "dp.epsilon_rdp": eps_rdp, "dp.delta": delta, "dp.noise_multiplier": sigma,
            "dp.max_grad_norm": p.max_grad_norm, "dp.sample_rate": q, "dp.steps": steps,
            "dp.accountant": p.accountant, "dp.target_epsilon": p.target_epsilon,
            "dp.rdp_order": order,
        })
        ctx.notes["dp"] = {
            "sampling": "Poisson (opacus UniformWithReplacementSampler), q = 1/ceil(N/B)",
            "training_set_size": n, "expected_batch_size": q * n, "planned_steps": planned,
            "delta_rule": "given" if p.delta is not None else "1/(10 N)", "grad_sample_mode": mode,
            "secure_rng": False, "clipping": "flat (all parameters together)",
        }
        if steps != planned:
            ctx.warnings.append(f"dp: {steps} noised steps were taken, {planned} were planned; "
                                "dp.epsilon is for the steps taken.")
