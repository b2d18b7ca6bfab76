"""Opacus glue of the differentially private defenses (``dp-sgd``, ``dp-at``): model
preparation and the private training step.

:func:`make_compatible` applies ``ModuleValidator.fix`` *in place* (the caller keeps its
reference to the model) and lists every replaced module; :func:`incompatible_layers` names
the layers Opacus cannot handle; :func:`wrap` wraps the model for per-sample gradients in
one of Opacus' modes (:func:`choose_mode` picks the fastest on CPU; :class:`GhostClipping`
runs Opacus' ghost clipping inside the shared loop); :func:`dp_optimizer` builds the
matching DPOptimizer; :func:`plain` gives the un-hooked model for computations that must
not record per-sample gradients (the PGD of DP adversarial training); :func:`release`
removes every hook and attribute Opacus added.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import UsageError
from ..models import unwrap as _unwrap

#: per-sample-gradient modes of Opacus that apply to cfbench's models (see docs/dp.md);
#: "ghost" is Opacus' fast gradient clipping (per-sample norms without per-sample gradients)
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost")


# -- model preparation --------------------------------------------------------------------

def _trainable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from opacus.utils.module_utils import trainable_modules

    return trainable_modules(model)


def incompatible_layers(model: nn.Module) -> list[str]:
    """Every layer Opacus cannot train privately, as ``"name (Type): reason"``.

    Runs Opacus' registered module validators (``ModuleValidator.VALIDATORS``) and
    ``GradSampleModule``'s own check (a trainable layer must not carry buffers, which would
    hold non-private statistics) on each trainable layer, keeping the layer's name (Opacus'
    own messages do not name it).
    """
    from opacus.validators import ModuleValidator

    out = []
    for name, m in _trainable_modules(model):
        label = f"{name or '<root>'} ({type(m).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(m))
        errors = validator(m) if validator is not None else []
        if errors:
            out.extend(f"{label}: {e}" for e in errors)
        elif list(m.buffers()):
            out.append(f"{label}: a trainable layer with buffers (non-private statistics) is not supported by "
                       "Opacus' per-sample gradients")
    return out


def make_compatible(model: nn.Module, fix: bool = True) -> list[str]:
    """Make ``model`` trainable by Opacus *in place*; return the replaced modules.

    ``ModuleValidator.fix`` returns a fixed deep copy; its children are set back on
    ``model`` itself, so a caller holding ``model`` trains and saves the fixed network, and
    ``ModuleValidator.fix`` on a freshly built model (what ``cfbench.results.load_model``
    does) gives the same architecture.  Each entry reads ``"name: Old(...) -> New(...)"``.
    Raises :class:`UsageError` naming every layer that stays unsupported (or every layer
    that needed a fix when ``fix`` is False).
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()
    try:
        bad = incompatible_layers(model)
        if not bad:
            return []
        if not fix:
            raise UsageError("Opacus cannot train these layers privately: " + "; ".join(bad)
                             + ". Set fix_model=true to let opacus.validators.ModuleValidator.fix replace them "
                             "(e.g. BatchNorm -> GroupNorm), or use a model without them.")
        before = dict(model.named_modules())
        fixed = ModuleValidator.fix(model)
        if type(fixed) is not type(model):
            raise UsageError(f"Opacus would replace the whole model ({type(model).__name__} -> "
                             f"{type(fixed).__name__}); cfbench needs a model whose layers can be fixed in place.")
        for name, child in fixed.named_children():
            setattr(model, name, child)
        changed = [f"{name}: {before[name]!r} -> {m!r}" for name, m in model.named_modules()
                   if name in before and type(before[name]) is not type(m)]
        remaining = incompatible_layers(model)
        if remaining:
            raise UsageError("Opacus cannot train these layers privately, even after ModuleValidator.fix: "
                             + "; ".join(remaining) + ". Use a model without them.")
        return changed
    finally:
        model.train(was_training)


#: layer types PyTorch's expanded weights (grad_sample_mode="ew") computes per-sample gradients for
_EW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def choose_mode(model: nn.Module, *, allow_ghost: bool = True) -> str:
    """The fastest correct per-sample-gradient mode for ``model`` on CPU (``grad_sample_mode=auto``).

    Measured in ``benchmarks/bench_dp.py`` (docs/dp.md): ghost clipping saves materialising
    the per-sample gradients of the layers it clips by their ghost norm (Opacus 1.6:
    ``nn.Linear``, ``nn.Embedding``) at the price of a second backward pass, so it is
    fastest when those layers hold most of the trainable parameters (cnn8, cnn28) and
    slowest when convolutions do (gap-cnn, the ResNets); there expanded weights (``ew``) is
    fastest, when every trainable layer is of a type it supports; otherwise ``hooks``
    (Opacus' default, which falls back to functorch for unknown layers).
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    layers = list(_trainable_modules(model))
    total = sum(p.numel() for _, m in layers for p in m.parameters(recurse=False) if p.requires_grad)
    ghost_normed = sum(p.numel() for _, m in layers if type(m) in GradSampleModuleFastGradientClipping.NORM_SAMPLERS
                       for p in m.parameters(recurse=False) if p.requires_grad)
    if allow_ghost and total and ghost_normed / total > 0.5:
        return "ghost"
    if layers and all(type(m) in _EW_LAYERS for _, m in layers):
        return "ew"
    return "hooks"


def wrap(model: nn.Module, mode: str, max_grad_norm: float = 1.0) -> nn.Module:
    """Wrap ``model`` (in place: the wrapper holds the same module) for per-sample gradients
    (for ghost clipping: per-sample gradient norms and clipping coefficients)."""
    from opacus.grad_sample.utils import prepare_module

    if mode not in GRAD_SAMPLE_MODES:
        raise UsageError(f"unknown grad_sample_mode {mode!r}. Valid choices: {', '.join(GRAD_SAMPLE_MODES)}.")
    extra = {"max_grad_norm": max_grad_norm} if mode == "ghost" else {}
    return prepare_module(model, mode, batch_first=True, loss_reduction="mean", **extra)


def dp_optimizer(optimizer: torch.optim.Optimizer, mode: str, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float):
    """Opacus' DPOptimizer for ``mode`` (``DPOptimizerFastGradientClipping`` for ghost clipping)
    around ``optimizer``; noise from PyTorch's default generator."""
    from opacus.optimizers import get_optimizer_class

    cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
    return cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
               expected_batch_size=expected_batch_size, loss_reduction="mean")


class GhostClipping:
    """Opacus' ghost clipping (Li et al. 2022; Bu et al. 2023) inside a loop that calls
    ``loss.backward()`` once.

    Opacus packages its two backward passes into ``DPLossFastGradientClipping``, whose loss
    is not a tensor.  Here the loss hook runs the first pass itself (:meth:`first_pass`:
    hooks on, per-sample gradient norms, clipping coefficients ``c_i``), and the loop's own
    ``backward()`` is the second pass: hooks off, and a tensor hook on every output of the
    private model multiplies row ``i`` of the incoming gradient by ``c_i * B``.  For a loss
    that is the batch mean of per-example terms (``d loss / d logits_i = grad l_i / B``) this
    yields ``sum_i c_i grad l_i``: the clipped sum that Opacus' ``sum(c_i * l_i).backward()``
    gives.  Needs one output row per example (no batch coupling, which Opacus' validation
    already guarantees) and one forward per example per step (Opacus' ghost clipping does not
    support a layer used twice).
    """

    def __init__(self, private: nn.Module):
        self.private = private
        self.scale: torch.Tensor | None = None
        self._handle = private.register_forward_hook(self._on_output)

    def _on_output(self, module, inputs, out):
        if torch.is_grad_enabled() and torch.is_tensor(out) and out.requires_grad:
            out.register_hook(self._scale_rows)

    def _scale_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return grad
        return grad * self.scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))

    def first_pass(self, loss: torch.Tensor, batch_size: int) -> None:
        self.scale = None
        loss.backward(retain_graph=True)
        self.scale = self.private.get_clipping_coef() * batch_size
        self.private.disable_hooks()

    def after_step(self) -> None:
        self.scale = None
        self.private.enable_hooks()

    def remove(self) -> None:
        self._handle.remove()


def unwrap(private: nn.Module) -> nn.Module:
    return _unwrap(private)


@contextlib.contextmanager
def quiet_hooks() -> Iterator[None]:
    """Silence PyTorch's note that a full backward hook fires although the input needs no
    gradient: that is how Opacus' hooks on a model's first layer always run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        yield


@contextlib.contextmanager
def plain(private: nn.Module) -> Iterator[nn.Module]:
    """The wrapped module with Opacus' hooks off: forward/backward passes inside record no
    activations and no ``grad_sample`` (Opacus 1.6 fills every parameter's ``grad_sample``
    from any backward through the hooked model, even one taken w.r.t. the inputs only)."""
    toggles = hasattr(private, "disable_hooks") and getattr(private, "hooks_enabled", False)
    if toggles:
        private.disable_hooks()
    try:
        yield unwrap(private)
    finally:
        if toggles:
            private.enable_hooks()


def release(private: nn.Module) -> nn.Module:
    """Remove Opacus' hooks and the attributes it set on parameters and layers; return the
    plain module (trained in place)."""
    module = unwrap(private)
    if private is not module:
        private.cleanup()
    for m in module.modules():
        for attr in ("activations", "max_batch_len", "ft_compute_sample_grad"):
            if attr in m.__dict__:
                delattr(m, attr)
    for p in module.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample",
                     "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    return module
