"""The model contract: inputs in [0, 1], normalisation as the first layer, typed params."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UsageError
from ..params import build

class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` are buffers shaped (1, C, 1, 1)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(tuple(float(m) for m in mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(float(s) for s in std), dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ModelBase(nn.Module):
    """Base class of model components (register under the ``cfbench.models`` entry points).

    A subclass declares ``name``, ``description``, a frozen ``Params`` dataclass of
    hyper-parameters (fields built with :func:`cfbench.params.param`) and, when it only
    supports some spatial sizes, ``input_sizes``.  Its ``__init__`` calls
    ``super().__init__(...)`` first (which checks the size, sets ``self.params`` and
    ``self.normalize``) and its ``forward`` applies ``self.normalize`` first: inputs are
    always in [0, 1], shape (N, C, H, W) with H == W == ``image_size``; the output is logits
    (N, num_classes).  Bump ``version`` when behaviour changes: it is part of cache keys.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1
    api_version: ClassVar[int] = 1
    #: spatial sizes supported (None = any)
    input_sizes: ClassVar[tuple[int, ...] | None] = None

    @dataclass(frozen=True)
    class Params:
        """No hyper-parameters."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], params: Any = None):
        super().__init__()
        label = self.name or type(self).__name__
        sizes = type(self).input_sizes
        if sizes is not None and image_size not in sizes:
            raise UsageError(
                f"model {label!r} does not support {image_size}x{image_size} images; "
                f"supported sizes: {', '.join(f'{s}x{s}' for s in sizes)}.")
        if len(mean) != in_channels or len(std) != in_channels:
            raise UsageError(f"model {label!r}: mean and std need one value per channel "
                             f"({in_channels}), got {len(mean)} and {len(std)}.")
        if any(float(s) <= 0 for s in std):
            raise UsageError(f"model {label!r}: std must be positive, got {tuple(std)}.")
        if params is None:
            params = self.Params()
        elif isinstance(params, dict):
            params = build(self.Params, params, where="model.")
        elif not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} expects params of type "
                            f"{self.Params.__qualname__}, got {type(params).__name__}.")
        validate = getattr(params, "validate", None)
        if callable(validate):
            validate()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.params = params
        self.normalize = Normalize(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, info_shape: tuple[int, int, int], num_classes: int,
                mean: Sequence[float], std: Sequence[float],
                params: dict[str, Any] | None = None) -> ModelBase:
    """Build the model registered as ``name`` for images of shape ``(C, H, W)``.

    ``params`` maps hyper-parameter names to values (strings such as ``--set`` gives are
    cast to the declared types); unknown names and out-of-range values raise UsageError.
    """
    from .. import registry

    cls = registry.get("model", name)
    c, h, w = info_shape
    if h != w:
        raise UsageError(f"model {name!r}: images must be square, got {h}x{w}.")
    p = build(cls.Params, params, where="model.")
    return cls(c, num_classes, h, tuple(mean), tuple(std), p)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip wrappers such as Opacus' GradSampleModule (whose weights carry `_module.`)."""
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model
