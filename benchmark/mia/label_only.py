"""Label-only membership inference: the distance to the decision boundary (Choquette-Choo,
Tramer, Carlini & Papernot, ICML 2021, "Label-Only Membership Inference Attacks").

A model's training points tend to lie farther from its decision boundary than unseen points,
so the smallest perturbation that changes the *predicted label* is a membership signal that
needs no confidence scores.  The attack thresholds that distance: score = distance, higher =
member; a point the model already misclassifies has distance 0 (Choquette-Choo et al.'s
convention: its label is already "flipped").

How the distance is found (the paper's white-box variant; the paper estimates it with the
label-only HopSkipJump attack and reports that the white-box Carlini-Wagner distance gives
the same membership leakage, Sec. 5):

* the smallest radius ``r`` of the ``norm`` ball (``L2`` by default, as the paper; ``Linf``
  possible) at which PGD finds an input whose predicted label differs from the true one,
  located by **bisection** on ``r`` over ``[0, R]``: ``search_steps`` halvings of the
  bracket, so the resolution is ``R / 2**search_steps``; the score is the bracket's upper
  end, the smallest radius found to flip the label;
* each probe is a PGD run inside the ball of radius ``r`` (per example): zero start,
  ``pgd_steps`` steps of ``2.5 r / pgd_steps`` (Madry et al.'s step rule), maximising the
  margin ``max_{j != y} z_j - z_y`` (the Carlini-Wagner objective, which targets the
  boundary itself rather than the loss), every iterate projected onto the ball and clipped
  to [0, 1]; the label counts as flipped if *any* iterate is misclassified (every iterate is
  a valid point of the ball);
* ``R`` defaults to the diameter of the input box -- ``sqrt(d)`` for ``L2`` (``d`` pixels),
  1 for ``Linf`` -- which contains every image, so only a point PGD cannot move off its label
  anywhere in the box keeps the cap ``R`` (counted in the evaluator's notes);
* the model is in eval mode; nothing is random.

The signal uses gradients, so it is computed with more access than a label-only attacker
has; what it measures is the quantity that attacker estimates with label queries.  Ties are
left as they are (breaking them by the logits would leak more than labels).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..attacks.pgd import project

__all__ = ["NORMS", "boundary_distance", "default_max_radius"]

NORMS = ("L2", "Linf")
#: Madry et al.'s step rule, the same factor as the shared PGD's default
_STEP_FACTOR = 2.5


def default_max_radius(shape, norm: str) -> float:
    """The diameter of the [0, 1] input box: ``sqrt(d)`` (L2) or 1 (Linf)."""
    if norm == "L2":
        return math.sqrt(float(np.prod(shape)))
    if norm == "Linf":
        return 1.0
    raise ValueError(f"unsupported norm {norm!r}; valid choices: {', '.join(NORMS)}")


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y`` per example (> 0 iff the label is flipped, ties aside)."""
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return other - z_y


def _flips(model, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, norm: str, steps: int) -> torch.Tensor:
    """Whether PGD inside the ball of (per-example) ``radius`` changes the predicted label.

    Each forward pass serves twice: its prediction tells whether the current iterate already
    flips the label (such examples leave the batch), its margin's gradient moves the rest.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    flipped = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    idx = torch.arange(len(x), device=x.device)
    delta = torch.zeros_like(x)
    for it in range(steps + 1):
        xi, yi, ri = x[idx], y[idx], radius[idx].view(shape)
        with torch.enable_grad():
            d = delta[idx].clone().requires_grad_(True)
            logits = model(xi + d)
            done = logits.argmax(1) != yi
            if it == steps:
                flipped[idx[done]] = True
                break
            (grad,) = torch.autograd.grad(_margin(logits, yi).sum(), d)
        with torch.no_grad():
            if norm == "Linf":
                move = grad.sign()
            else:
                move = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            d = project(d.detach() + _STEP_FACTOR * ri / steps * move, norm, ri)
            d = (xi + d).clamp(0, 1) - xi
        flipped[idx[done]] = True
        delta[idx] = d
        keep = ~done
        if not bool(keep.any()):
            break
        idx = idx[keep]
    return flipped


def boundary_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str = "L2",
                      max_radius: float | None = None, search_steps: int = 12, pgd_steps: int = 10,
                      device="cpu", batch_size: int = 512) -> tuple[np.ndarray, dict[str, int]]:
    """Distance of every ``x`` to the model's decision boundary (see the module docstring).

    Returns ``(distance (N,) float64, counts)`` with ``counts = {"misclassified": n0,
    "not_flipped": n_cap}``: ``n0`` examples scored 0 (already misclassified), ``n_cap``
    scored ``max_radius`` (no flip found in the whole box).
    """
    if norm not in NORMS:
        raise ValueError(f"unsupported norm {norm!r}; valid choices: {', '.join(NORMS)}")
    if search_steps < 1 or pgd_steps < 1:
        raise ValueError("search_steps and pgd_steps must be >= 1")
    big_r = float(max_radius) if max_radius is not None else default_max_radius(x.shape[1:], norm)
    model.eval()
    out, n_wrong, n_cap = [], 0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with torch.no_grad():
            wrong = model(xb).argmax(1) != yb
        lo = torch.zeros(len(xb), device=xb.device, dtype=xb.dtype)
        hi = torch.full_like(lo, big_r)
        capped = ~_flips(model, xb, yb, hi, norm, pgd_steps) & ~wrong
        active = ~wrong & ~capped
        for _ in range(search_steps):
            if not bool(active.any()):
                break
            idx = active.nonzero()[:, 0]
            mid = (lo[idx] + hi[idx]) / 2
            f = _flips(model, xb[idx], yb[idx], mid, norm, pgd_steps)
            hi[idx] = torch.where(f, mid, hi[idx])
            lo[idx] = torch.where(f, lo[idx], mid)
        d = torch.where(wrong, torch.zeros_like(hi), hi)
        out.append(d.double().cpu())
        n_wrong += int(wrong.sum())
        n_cap += int(capped.sum())
    if not out:
        raise ValueError("boundary_distance: empty input")
    return torch.cat(out).numpy(), {"misclassified": n_wrong, "not_flipped": n_cap}
