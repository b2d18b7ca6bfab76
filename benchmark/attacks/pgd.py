"""Projected gradient descent (Madry et al. 2018), batched, Linf and L2.

This is the one PGD that every part of cfbench uses: PGD-AT and TRADES training, the PGD-k
robustness evaluator and the robustness-based membership attack.

Choices (stated because papers leave them open):
* gradients are taken with ``torch.autograd.grad`` w.r.t. the perturbation only, so the
  attack never writes into parameter ``.grad`` (important when it runs next to an optimizer
  or Opacus' per-sample gradient hooks);
* the model's train/eval mode is left to the caller (defenses run the inner maximisation in
  eval mode, see their docstrings);
* Linf random start: uniform in the ball; L2 random start: a Gaussian direction scaled to a
  radius ``eps * u`` with ``u ~ U(0, 1)``;
* every iterate is projected onto the ball and clipped to [0, 1];
* the returned example is the last iterate (Madry et al.), not the best-loss one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import param
from .base import Attack, ThreatModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``objective(model, x_adv) -> (N,)`` per-example values to maximise (see :func:`pgd`)
Objective = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations onto the ``norm`` ball of radius ``eps``."""
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    if norm == "L2":
        n = _flat_norm(delta)
        return delta * torch.clamp(eps / n, max=1.0)
    raise ValueError(f"unsupported norm {norm!r}; valid choices: Linf, L2")


def random_start(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if norm == "Linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return d / _flat_norm(d) * r * eps


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
        steps: int, norm: str = "Linf", rand_init: bool = True,
        loss_fn: LossFn | None = None, x_init: torch.Tensor | None = None,
        objective: Objective | None = None) -> torch.Tensor:
    """Maximise ``loss_fn(model(x_adv), y)`` over the ball; returns detached ``x_adv``.

    ``loss_fn`` defaults to the summed cross-entropy (summing keeps the per-example step
    independent of the batch size).  ``x_init`` overrides the random start (TRADES starts at
    ``x + 0.001 * N(0, I)``).

    ``objective(model, x_adv) -> per-example values (N,)`` replaces ``loss_fn`` when the
    quantity to maximise is not a function of the logits alone (Int's class-activation-map
    discrepancy ``D(x, x_adv)``, the top-k interpretation attack); its **sum** is ascended,
    so each example's step depends on its own value only.  To *minimise* a quantity, return
    its negative.  ``eps`` is an argument of every call, so a caller with a schedule (Int's
    eps ramp over training steps) passes the radius of the current step.
    """
    if objective is not None and loss_fn is not None:
        raise ValueError("pgd: give either loss_fn (over logits) or objective (over x_adv), not both")
    if eps == 0 or steps == 0:
        return x.detach().clone()
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="sum"))
    x = x.detach()
    if x_init is not None:
        delta = (x_init.detach() - x)
    elif rand_init:
        delta = random_start(x, norm, eps)
    else:
        delta = torch.zeros_like(x)
    delta = (x + project(delta, norm, eps)).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        if objective is not None:
            values = objective(model, x + delta)
            if values.shape != (x.shape[0],):
                raise ValueError(f"pgd: objective must return one value per example, shape ({x.shape[0]},); "
                                 f"got {tuple(values.shape)}")
            loss = values.sum()
        else:
            loss = loss_fn(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if norm == "Linf":
                step = step_size * grad.sign()
            else:
                step = step_size * grad / _flat_norm(grad)
            delta = project(delta + step, norm, eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


#: the default PGD step, as a fraction of eps per step: 2.5 * eps / steps (Madry et al. 2018)
DEFAULT_STEP_FACTOR = 2.5
STEP_SIZE_HELP = "step size (default 2.5 * eps / steps, Madry et al.)"


def default_step_size(eps: float, steps: int, step_size: float | None = None) -> float:
    """``step_size`` if given, else Madry et al.'s ``2.5 * eps / steps``: the one place the
    default lives (the pgd attack and evaluator, PGD-AT, TRADES, DeMem, DP-AT)."""
    return float(step_size) if step_size is not None else DEFAULT_STEP_FACTOR * eps / steps


@dataclass(frozen=True)
class PGDParams:
    steps: int = param(20, "PGD iterations", ge=1)
    step_size: float | None = param(None, STEP_SIZE_HELP, gt=0)
    rand_init: bool = param(True, "random start inside the ball")
    restarts: int = param(1, "random restarts; an example counts as robust only if it survives all", ge=1)
    eot: int = param(1, "gradient samples per step (EOT, Athalye et al. 2018; > 1 for randomised models)", ge=1)


def eot_cross_entropy(y: torch.Tensor, samples: int) -> Objective:
    """Per-example cross-entropy averaged over ``samples`` forward passes: its gradient is the
    EOT gradient E_t[grad CE(f_t(x'), y)] of a randomised model (Athalye et al. 2018)."""
    def objective(model, x_adv):
        return sum(F.cross_entropy(model(x_adv), y, reduction="none") for _ in range(samples)) / samples
    return objective


class PGDAttack(Attack):
    """PGD-k with random start and restarts (Madry et al. 2018), Linf or L2.

    An example the model already misclassifies is returned unchanged (it is its own
    adversarial example), so it never counts as robust; with ``eot > 1`` every step ascends
    the cross-entropy averaged over ``eot`` forward passes (EOT, for randomised models)."""

    name = "pgd"
    description = "projected gradient descent (Madry et al. 2018), Linf/L2, random start, restarts, EOT"
    version = 2
    Params = PGDParams

    def perturb(self, model, x, y, threat: ThreatModel):
        p = self.params
        alpha = default_step_size(threat.eps, p.steps, p.step_size)
        best = x.detach().clone()
        with torch.no_grad():
            fooled = model(x).argmax(1) != y
        objective = eot_cross_entropy(y, p.eot) if p.eot > 1 else None
        for _ in range(p.restarts):
            x_adv = pgd(model, x, y, eps=threat.eps, step_size=alpha, steps=p.steps, norm=threat.norm,
                        rand_init=p.rand_init, objective=objective)
            with torch.no_grad():
                wrong = model(x_adv).argmax(1) != y
            take = wrong & ~fooled
            best[take] = x_adv[take]
            best[~fooled & ~wrong] = x_adv[~fooled & ~wrong]
            fooled |= wrong
        return best
