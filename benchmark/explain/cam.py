"""Interpretation maps of a classifier: class activation maps for global-average-pooling
networks, Grad-CAM and saliency (through captum) for the others, and one dispatcher.

Maps
----
``cam``
    Class activation maps (Zhou et al., CVPR 2016) ``M_c(x)[h, w] = sum_k W[c, k] A_k(x)[h, w]``
    with ``A`` the final feature map of a GAP network and ``W`` its last linear layer, **no
    bias**, not divided by the map area (the logit of class ``c`` is the spatial mean of
    ``M_c`` plus the bias, if any).  A *GAP model* is one with a ``cam(x, target)`` method
    (``gap-cnn``, ``int-mnist``); when it also exposes ``features(x)`` and ``fc`` (both do),
    the maps of every class come from one forward pass (:func:`all_class_maps`).
``gradcam``
    Grad-CAM (Selvaraju et al., ICCV 2017) at a convolutional layer ``A``:
    ``sum_k alpha_k A_k`` with ``alpha_k = mean_{h,w} d logit_c / d A_k[h, w]``, computed by
    captum's ``LayerGradCam`` with ``relu_attributions=False``.  The final ReLU of Grad-CAM is
    left out on purpose: without it, Grad-CAM of a GAP network at its last feature map is
    exactly ``M_c / (h w)`` (CAM up to a constant, tested), the maps keep their full ranking
    (a ReLU ties every negative cell at 0, which makes rank correlations degenerate), and the
    interpretation attack has a gradient everywhere.  The default layer is the output of the
    last ``nn.Conv2d`` in module order -- or of the ``nn.ReLU`` right after it, when there is
    one (the rectified feature map Grad-CAM is usually taken on); ``layer`` names another
    (``model.get_submodule`` path).
``saliency``
    Simonyan et al. (2014): ``max_channel |d logit_c / d x|`` at input resolution, by captum's
    ``Saliency(abs=True)``.  For a piecewise-linear (ReLU) network its input gradient is zero
    almost everywhere, so a gradient-based attack *on the map* makes no progress (the
    interpretation evaluator warns when it sees that).

``maps(model, x, classes, method="auto")`` returns (N, h, w) maps, ``auto`` meaning ``cam``
for GAP models and ``gradcam`` otherwise.  With ``differentiable=True`` the result is a
function of ``x`` that autograd can differentiate (what the Int defense and the top-k
interpretation attack ascend): CAM is so by construction; Grad-CAM and saliency are then
computed here with ``create_graph=True`` (captum's attributions are detached), and tested to
equal captum's.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..errors import UsageError
from ..models.base import unwrap

Method = Literal["auto", "cam", "gradcam", "saliency"]
METHODS = ("auto", "cam", "gradcam", "saliency")


def is_gap_model(model: nn.Module) -> bool:
    """True when the model offers class activation maps (a ``cam(x, target)`` method)."""
    return callable(getattr(unwrap(model), "cam", None))


def resolve_method(model: nn.Module, method: str = "auto") -> str:
    """The map a model gets: ``auto`` -> ``cam`` for GAP models, else ``gradcam``."""
    if method not in METHODS:
        raise UsageError(f"unknown interpretation map {method!r}; valid choices: {', '.join(METHODS)}.")
    if method == "auto":
        return "cam" if is_gap_model(model) else "gradcam"
    if method == "cam" and not is_gap_model(model):
        raise UsageError(f"map 'cam' needs a global-average-pooling model with a cam() method (gap-cnn, "
                         f"int-mnist); {type(unwrap(model)).__name__} has none. Valid choices for it: "
                         "auto, gradcam, saliency.")
    return method


def _targets(classes, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(classes, device=device).long().reshape(-1)
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"need one class per input, got {t.numel()} for {n} inputs")
    return t


# -- class activation maps -------------------------------------------------------------------

def all_class_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), maps (N, C, h, w))`` of a GAP model, differentiable, in one pass.

    Uses ``features(x)`` and the linear layer ``fc`` when the model exposes them (the logits
    are then ``maps.mean((2, 3)) + fc.bias``, the model's own forward), else one ``cam`` call
    per class and a separate forward pass.
    """
    m = unwrap(model)
    fc = getattr(m, "fc", None)
    if callable(getattr(m, "features", None)) and isinstance(fc, nn.Linear):
        feats = m.features(x)                                     # (N, K, h, w)
        maps = torch.einsum("ck,nkhw->nchw", fc.weight, feats)
        logits = maps.mean(dim=(2, 3))
        if fc.bias is not None:
            logits = logits + fc.bias
        return logits, maps
    if not is_gap_model(m):
        raise UsageError(f"class activation maps need a GAP model with cam(); {type(m).__name__} has none.")
    n = x.shape[0]
    logits = model(x)
    maps = torch.stack([m.cam(x, torch.full((n,), c, dtype=torch.long, device=x.device))
                        for c in range(logits.shape[1])], dim=1)
    return logits, maps


def class_activation_map(model: nn.Module, x: torch.Tensor, classes) -> torch.Tensor:
    """``M_c(x)`` (N, h, w) of class ``classes[i]`` for each input (the model's ``cam``)."""
    return unwrap(model).cam(x, _targets(classes, x.shape[0], x.device))


# -- Grad-CAM and saliency ---------------------------------------------------------------------

def default_gradcam_layer(model: nn.Module) -> str:
    """Name of the layer Grad-CAM uses by default (see the module docstring)."""
    named = [(name, mod) for name, mod in unwrap(model).named_modules() if name]
    last = max((i for i, (_, mod) in enumerate(named) if isinstance(mod, nn.Conv2d)), default=None)
    if last is None:
        raise UsageError(f"Grad-CAM needs a convolutional layer; {type(unwrap(model)).__name__} has no nn.Conv2d. "
                         "Use the saliency map (interpretation.method=saliency).")
    if last + 1 < len(named) and isinstance(named[last + 1][1], nn.ReLU):
        return named[last + 1][0]
    return named[last][0]


def _layer(model: nn.Module, layer: str | None) -> nn.Module:
    m = unwrap(model)
    name = layer or default_gradcam_layer(m)
    try:
        return m.get_submodule(name)
    except AttributeError as e:
        names = [n for n, _ in m.named_modules() if n]
        raise UsageError(f"Grad-CAM layer {name!r} is not a submodule of {type(m).__name__}; valid choices: "
                         f"{', '.join(names)}.") from e


def _gradcam_differentiable(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    store: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        store["a"] = out

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = store["a"]
    score = logits.gather(1, t.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return (alpha * a).sum(dim=1)


def _saliency_differentiable(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if not x.requires_grad:
        x = x.clone().requires_grad_(True)
    score = model(x).gather(1, t.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, x, create_graph=True)
    return g.abs().amax(dim=1)


def maps(model: nn.Module, x: torch.Tensor, classes, method: str = "auto", *, layer: str | None = None,
         differentiable: bool = False) -> torch.Tensor:
    """Interpretation maps (N, h, w) of class ``classes[i]`` for each input ``x[i]``.

    ``method``: ``auto`` (CAM for GAP models, else Grad-CAM), ``cam``, ``gradcam`` or
    ``saliency`` (module docstring).  ``layer`` is Grad-CAM's layer (default
    :func:`default_gradcam_layer`).  ``differentiable=False`` returns detached maps (captum for
    Grad-CAM and saliency); ``True`` keeps the graph to ``x`` and the parameters.
    """
    kind = resolve_method(model, method)
    t = _targets(classes, x.shape[0], x.device)
    if kind == "cam":
        out = class_activation_map(model, x, t)
        return out if differentiable else out.detach()
    if differentiable:
        if kind == "gradcam":
            return _gradcam_differentiable(model, x, t, _layer(model, layer))
        return _saliency_differentiable(model, x, t)
    from captum.attr import LayerGradCam, Saliency

    xin = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if kind == "gradcam":
            attr = LayerGradCam(model, _layer(model, layer)).attribute(xin, target=t, relu_attributions=False)
            out = attr.sum(dim=1)
        else:
            out = Saliency(model).attribute(xin, target=t, abs=True).amax(dim=1)
    return out.detach()


def map_shape(model: nn.Module, x: torch.Tensor, method: str = "auto", *, layer: str | None = None) -> tuple[int, int]:
    """``(h, w)`` of the maps of ``model`` for inputs shaped like ``x``."""
    with torch.enable_grad():
        return tuple(maps(model, x[:1], torch.zeros(1, dtype=torch.long), method, layer=layer).shape[1:])  # type: ignore[return-value]
