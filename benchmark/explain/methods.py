"""Explanations of a classifier's decision, as maps the size of the input, min-max normalised
per image: what an explanation service hands out and what an inversion attacker receives
(Zhao et al., ICCV 2021; :mod:`cfbench.evaluators.inversion`).

======================== ========== ===========================================================
name                     channels   raw map ``E`` (before normalisation) of class ``t``
======================== ========== ===========================================================
``cam``                  1          class activation map ``sum_k W[t, k] A_k`` of a GAP model
                                    (Zhou et al. 2016; :mod:`cfbench.explain.cam`), bilinearly
                                    upsampled to the input size
``saliency``             C          ``|d f_t / d x|`` (Simonyan et al. 2014; captum ``Saliency``)
``input_x_gradient``     C          ``x * d f_t / d x`` (Shrikumar et al. 2016; captum
                                    ``InputXGradient``), signed
``integrated_gradients`` C          ``x * mean_a d f_t / d x (a x)`` over ``ig_steps``
                                    Gauss-Legendre points, zero baseline (Sundararajan et al.
                                    2017; captum ``IntegratedGradients``), signed
``gradcam``              1          ``ReLU(sum_k w_k A_k)``, ``w_k = mean_{h,w} d f_t / d A_k``
                                    computed **per example** (Selvaraju et al. 2017; captum
                                    ``LayerGradCam``), bilinearly upsampled
``counterfactual``       C          the counterfactual instance ``x'`` of ``proto-cf``
                                    (Van Looveren & Klaise) towards the runner-up class
``counterfactual_delta`` C          ``x' - x``, signed (the "what would have to change" map)
``ace_counterfactual``   C          the counterfactual instance of ``ace`` (Jeanneret et al.
                                    2023, :mod:`cfbench.attacks.ace`) towards the runner-up
                                    class; needs the dataset's DDPM (``cfbench ddpm train``)
``ace_counterfactual_delta`` C      ``x' - x`` of the ``ace`` counterfactual, signed
======================== ========== ===========================================================

``f_t`` is the logit of the explained class ``t`` -- by default the model's prediction
(GNIME explains the arg-max too).  Every map is then min-max normalised **per image** over
all its pixels and channels, ``(E - min E) / (max E - min E)`` (a constant map becomes 0), as
GNIME (WSP-LAB/GNIME ``scripts/xai.py``) normalises gradients and Grad-CAM.

Choices, where the papers or GNIME differ or are silent:

* **Grad-CAM weights per example.**  GNIME's ``GradCAM.generate_gradcam`` averages the
  gradients over the batch axis too (``reduce_mean(grads, axis=(0, 1, 2))``), so every image
  of a batch is weighted with one batch-wide ``w_k``; captum's ``LayerGradCam`` averages each
  example's gradient over its own spatial positions only, which is Selvaraju et al.'s
  definition.  ``tests/test_inversion.py`` checks that an image's Grad-CAM does not depend on
  the batch it is explained in.  GNIME also takes ``|.|`` of Grad-CAM; here the standard ReLU
  is kept (negative evidence is not "attention").
* **Grad-CAM layer**: :func:`cfbench.explain.cam.default_gradcam_layer` (shared with the
  interpretation evaluator): the ReLU right after the model's last ``Conv2d`` -- the
  rectified map Keras' ``Conv2D(..., activation='relu')`` gives GNIME -- or that conv.  On
  ``gap-cnn`` this is the feature map that CAM uses, and Grad-CAM equals ``ReLU(CAM) / (h w)``
  (tested).  (The interpretation evaluator leaves Grad-CAM's ReLU out for rank statistics;
  an explanation *shown* to a user keeps it.)
* **signs**: saliency is ``|gradient|`` (Simonyan et al., captum's default, GNIME);
  Input x Gradient and Integrated Gradients keep their sign (taking ``|.|`` would discard
  the completeness property that defines them); after min-max normalisation zero sits at a
  per-image grey level.
* **upsampling**: CAM and Grad-CAM maps are resized to the input with bilinear interpolation
  (captum's ``LayerAttribution.interpolate``) so every explanation has the input's size (on
  ``gap-cnn`` 8x8 inputs keep an 8x8 map; 28x28 inputs give 14x14); this adds no information.
* **counterfactual**: a counterfactual *is* an explanation ("had the input looked like x',
  the model would have said t'").  The explainer is the model owner's: ``proto-cf``
  (:mod:`cfbench.attacks.proto_cf`) fitted on the target's training data (its autoencoder and
  class prototypes), each instance explained towards the class the target ranks second.  An
  instance whose search fails keeps ``proto-cf``'s last iterate (what its ``perturb`` hands
  out); the validity rate is reported by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models import unwrap
from .cam import class_activation_map, default_gradcam_layer, is_gap_model

if TYPE_CHECKING:
    from ..attacks.proto_cf import ProtoCF

__all__ = [
    "COUNTERFACTUAL_METHODS",
    "EXPLANATIONS",
    "GRADIENT_METHODS",
    "check_method",
    "explain",
    "explanation_channels",
    "gradcam_layer",
    "has_cam",
    "minmax_per_image",
    "raw_explanation",
]

#: every explanation name with a one-line description
EXPLANATIONS: dict[str, str] = {
    "cam": "class activation map of a GAP model (Zhou et al. 2016)",
    "saliency": "|gradient| of the class logit (Simonyan et al. 2014; captum Saliency)",
    "input_x_gradient": "input x gradient (captum InputXGradient)",
    "integrated_gradients": "integrated gradients, zero baseline (captum IntegratedGradients)",
    "gradcam": "Grad-CAM with per-example weights (captum LayerGradCam)",
    "counterfactual": "proto-cf counterfactual instance towards the runner-up class",
    "counterfactual_delta": "x' - x of the proto-cf counterfactual",
    "ace_counterfactual": "ACE counterfactual instance towards the runner-up class (needs `cfbench ddpm train`)",
    "ace_counterfactual_delta": "x' - x of the ACE counterfactual",
}
GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "gradcam")
COUNTERFACTUAL_METHODS = ("counterfactual", "counterfactual_delta", "ace_counterfactual", "ace_counterfactual_delta")
#: the counterfactual methods whose map is the instance x' itself (the others are x' - x)
COUNTERFACTUAL_INSTANCES = ("counterfactual", "ace_counterfactual")


def check_method(name: str) -> None:
    if name not in EXPLANATIONS:
        raise UsageError(f"unknown explanation {name!r}. Valid choices: {', '.join(EXPLANATIONS)}.")


def explanation_channels(name: str, in_channels: int) -> int:
    """Channels of the explanation ``name`` for inputs with ``in_channels`` channels."""
    check_method(name)
    return 1 if name in ("cam", "gradcam") else in_channels


def has_cam(model: nn.Module) -> bool:
    """Whether the model exposes class activation maps (``cam(x, target)``, e.g. ``gap-cnn``)."""
    return is_gap_model(model)


def minmax_per_image(e: torch.Tensor) -> torch.Tensor:
    """``(e - min) / (max - min)`` over all but the first axis; a constant map becomes 0."""
    flat = e.flatten(1)
    lo = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(e.dtype).tiny), torch.zeros_like(flat))
    return out.view_as(e)


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The module Grad-CAM reads: :func:`cfbench.explain.cam.default_gradcam_layer` (the ReLU
    right after the last ``Conv2d``, or that conv), the one rule shared with the
    interpretation evaluator."""
    m = unwrap(model)
    return m.get_submodule(default_gradcam_layer(m))


def _cam_raw(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not has_cam(model):
        raise UsageError(f"explanation 'cam' needs a model with class activation maps (a global-average-pooling "
                         f"model such as gap-cnn); {type(unwrap(model)).__name__} has none. Use 'gradcam' instead.")
    with torch.no_grad():
        maps = class_activation_map(model, x, target).unsqueeze(1)
    return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False) \
        if maps.shape[-2:] != x.shape[-2:] else maps


def _captum(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, ig_steps: int) -> torch.Tensor:
    from captum.attr import (
        InputXGradient,
        IntegratedGradients,
        LayerAttribution,
        LayerGradCam,
        Saliency,
    )

    xg = x.detach().clone().requires_grad_(True)
    if name == "saliency":
        out = Saliency(model).attribute(xg, target=target, abs=True)
    elif name == "input_x_gradient":
        out = InputXGradient(model).attribute(xg, target=target)
    elif name == "integrated_gradients":
        out = IntegratedGradients(model).attribute(xg, baselines=0.0, target=target, n_steps=ig_steps,
                                                   method="gausslegendre")
    else:  # gradcam
        maps = LayerGradCam(model, gradcam_layer(model)).attribute(xg, target=target, relu_attributions=True)
        out = LayerAttribution.interpolate(maps, tuple(x.shape[-2:]), interpolate_mode="bilinear") \
            if maps.shape[-2:] != x.shape[-2:] else maps
    return out.detach()


def raw_explanation(model: nn.Module, x: torch.Tensor, method: str, target: torch.Tensor | None = None, *,
                    ig_steps: int = 50, counterfactual: ProtoCF | None = None,
                    cf_target: torch.Tensor | None = None) -> torch.Tensor:
    """The unnormalised map of ``method`` for one batch (see the module docstring).

    ``target``: classes to explain (default: the prediction); ``counterfactual``: a fitted
    ``ProtoCF`` for the counterfactual methods, ``cf_target`` its target classes (default:
    the runner-up class).  The model runs in eval mode; its mode is restored.
    """
    check_method(method)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        if target is None or (method in COUNTERFACTUAL_METHODS and cf_target is None):
            with torch.no_grad():
                logits = model(x)
            if target is None:
                target = logits.argmax(1)
            if method in COUNTERFACTUAL_METHODS and cf_target is None:
                cf_target = logits.topk(2, dim=1).indices[:, 1]
        target = torch.as_tensor(target, device=x.device).long().reshape(-1)
        if method == "cam":
            return _cam_raw(model, x, target)
        if method in GRADIENT_METHODS:
            return _captum(method, model, x, target, ig_steps)
        if counterfactual is None:
            raise UsageError(f"explanation {method!r} needs a fitted proto-cf generator (counterfactual=...).")
        x_cf = counterfactual.generate(model, x, cf_target).x.to(x.device)
        return x_cf if method in COUNTERFACTUAL_INSTANCES else x_cf - x
    finally:
        model.train(was_training)


def explain(model: nn.Module, x: torch.Tensor, method: str, target: torch.Tensor | None = None, *,
            batch_size: int = 256, ig_steps: int = 50, counterfactual: ProtoCF | None = None,
            cf_target: torch.Tensor | None = None,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Min-max normalised explanations ``(N, C_e, H, W)`` of ``x`` (float32, batched).

    Every image's map depends only on that image (no batch-wide statistics), so the batch
    size changes nothing but speed.  ``progress(n)`` is called after each batch.
    """
    check_method(method)
    out = []
    for s in range(0, len(x), batch_size):
        sl = slice(s, s + batch_size)
        e = raw_explanation(model, x[sl], method, None if target is None else target[sl], ig_steps=ig_steps,
                            counterfactual=counterfactual, cf_target=None if cf_target is None else cf_target[sl])
        out.append(minmax_per_image(e.float()).cpu())
        if progress is not None:
            progress(len(e))
    if not out:
        return torch.empty(0, explanation_channels(method, x.shape[1]), *x.shape[-2:])
    return torch.cat(out)
