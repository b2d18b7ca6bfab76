"""Image classifiers.  Every model takes inputs in [0, 1] and normalises them itself.

A model component subclasses :class:`ModelBase` and registers under the ``cfbench.models``
entry-point group.  The per-channel normalisation ``(x - mean) / std`` is the model's first
layer (:class:`Normalize`), so attacks, threat-model radii and membership-inference queries
all work in the [0, 1] pixel space and a saved model carries its own normalisation.

Built-in models:

=================  ==========================  ===============================================
name               class                       inputs
=================  ==========================  ===============================================
``cnn8``           :class:`SmallCNN8`          8x8 (sklearn digits)
``cnn28``          :class:`SmallCNN28`         28x28 (MNIST, Fashion-MNIST)
``gap-cnn``        :class:`GAPCNN`             any size >= 8; exposes class activation maps
``preact-resnet18`` :class:`PreActResNet18`    32x32 (CIFAR); has BatchNorm
``wrn``            :class:`WideResNet`         32x32 (CIFAR); has BatchNorm
=================  ==========================  ===============================================

DP-SGD (Opacus) needs per-sample gradients, which BatchNorm does not allow: ``cnn8``,
``cnn28`` and ``gap-cnn`` contain no BatchNorm and pass ``opacus.validators.ModuleValidator``
as they are; the two ResNets must be converted with ``ModuleValidator.fix`` (BatchNorm ->
GroupNorm) before a DP run.  No model uses in-place activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .params import build, param

__all__ = [
    "ModelBase", "Normalize", "SmallCNN8", "SmallCNN28", "GAPCNN", "PreActResNet18",
    "WideResNet", "build_model", "count_parameters",
]


# --------------------------------------------------------------------------- base

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
    from . import registry

    cls = registry.get("model", name)
    c, h, w = info_shape
    if h != w:
        raise UsageError(f"model {name!r}: images must be square, got {h}x{w}.")
    p = build(cls.Params, params, where="model.")
    return cls(c, num_classes, h, tuple(mean), tuple(std), p)


# --------------------------------------------------------------------------- small CNNs

def _conv_relu(c_in: int, c_out: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU()]


class SmallCNN8(ModelBase):
    """Small CNN for 8x8 images (sklearn digits); trains in seconds on a CPU.

    conv3x3(w) - ReLU - conv3x3(2w) - ReLU - maxpool2 (-> 4x4) - conv3x3(2w) - ReLU -
    flatten (2w*16 = 1024 for w = 32) - Linear(128) - ReLU - Linear(classes).
    cfbench's own design (no published reference); PyTorch default initialisation;
    no BatchNorm, so it is Opacus-compatible as is.
    """

    name = "cnn8"
    description = "small 3-conv CNN for 8x8 digits (fast on CPU)"
    input_sizes = (8,)

    @dataclass(frozen=True)
    class Params:
        width: int = param(32, "channels of the first conv (the others are 2x)", ge=1)

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        w = self.params.width
        self.convs = nn.Sequential(
            *_conv_relu(in_channels, w), *_conv_relu(w, 2 * w), nn.MaxPool2d(2),
            *_conv_relu(2 * w, 2 * w))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.convs(self.normalize(x)))


class SmallCNN28(ModelBase):
    """The small CNN of Madry et al. (2018)'s MNIST challenge, scaled for CPU.

    conv5x5(w, pad 2) - ReLU - maxpool2 - conv5x5(2w, pad 2) - ReLU - maxpool2 (-> 7x7) -
    flatten - Linear(hidden) - ReLU - Linear(classes).  Madry et al. use w = 32 and a
    1024-unit hidden layer; cfbench defaults to ``hidden = 256`` for CPU speed (set
    ``hidden=1024`` for the original).  PyTorch default initialisation; no BatchNorm.
    """

    name = "cnn28"
    description = "Madry-style 2-conv CNN for 28x28 MNIST / Fashion-MNIST (hidden 256 for CPU)"
    input_sizes = (28,)

    @dataclass(frozen=True)
    class Params:
        width: int = param(32, "channels of the first conv (the second has 2x)", ge=1)
        hidden: int = param(256, "units of the hidden fully connected layer (Madry et al.: 1024)", ge=1)

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        w, hidden = self.params.width, self.params.hidden
        self.convs = nn.Sequential(
            *_conv_relu(in_channels, w, 5), nn.MaxPool2d(2),
            *_conv_relu(w, 2 * w, 5), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.convs(self.normalize(x)))


# --------------------------------------------------------------------------- GAP CNN

class GAPCNN(ModelBase):
    """CNN with global average pooling and class activation maps (Zhou et al., CVPR 2016).

    Three blocks conv3x3 - ReLU with w, 2w and 4w = K channels; a block is followed by a
    2x2 max-pool only while its map is at least 16x16, so 8x8 inputs keep an 8x8 final map,
    28x28 -> 14x14 and 32x32 -> 8x8.  Then global average pooling and one Linear(K, classes),
    so ``logit_c = mean_{h,w} sum_k W[c, k] A_k[h, w] + b_c``.  No BatchNorm (Opacus-compatible
    as is); with ``groups > 0`` each conv is followed by GroupNorm(groups), also
    Opacus-compatible.  PyTorch default initialisation.

    :meth:`cam` returns ``M_c[h, w] = sum_k W[c, k] A_k[h, w]`` in logit units, *not* divided
    by the map area: its spatial **mean** plus ``b_c`` is the logit of class c.
    """

    name = "gap-cnn"
    description = "3-conv CNN with global average pooling and class activation maps (any size >= 8)"
    min_image_size: ClassVar[int] = 8

    @dataclass(frozen=True)
    class Params:
        width: int = param(32, "channels of the first conv (then 2x, 4x)", ge=1)
        groups: int = param(0, "GroupNorm groups after each conv (0 = no normalisation)", ge=0)

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        if image_size < self.min_image_size:
            raise UsageError(f"model {self.name!r} does not support {image_size}x{image_size} images; "
                             f"supported sizes: any size >= {self.min_image_size}.")
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        w, groups = self.params.width, self.params.groups
        channels = (w, 2 * w, 4 * w)
        if groups and any(c % groups for c in channels):
            raise UsageError(f"model {self.name!r}: groups={groups} must divide the channel "
                             f"counts {channels}.")
        layers: list[nn.Module] = []
        size, c_in = image_size, in_channels
        for c in channels:
            layers.append(nn.Conv2d(c_in, c, 3, padding=1))
            if groups:
                layers.append(nn.GroupNorm(groups, c))
            layers.append(nn.ReLU())
            if size >= 16:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c
        self.body = nn.Sequential(*layers)
        self.feature_size = size
        self.fc = nn.Linear(channels[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map (N, K, h, w) of inputs in [0, 1] (normalised inside)."""
        return self.body(self.normalize(x))

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def cam(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class activation maps (N, h, w) of class ``target[i]`` for each input; differentiable.

        ``cam(x, t).mean((1, 2)) + fc.bias[t] == forward(x)[range(N), t]``.
        """
        target = torch.as_tensor(target, device=x.device).long().reshape(-1)
        if target.numel() != x.shape[0]:
            raise ValueError(f"cam: need one target per input, got {target.numel()} for {x.shape[0]}.")
        weights = self.fc.weight[target]                     # (N, K)
        return torch.einsum("nk,nkhw->nhw", weights, self.features(x))


# --------------------------------------------------------------------------- ResNets

class _PreActBlock(nn.Module):
    """BN - ReLU - conv3x3 - BN - ReLU - conv3x3, plus the (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(ModelBase):
    """Pre-activation ResNet-18 (He et al., ECCV 2016), CIFAR version.

    As in Rice, Wong & Kolter (ICML 2020) "Overfitting in adversarially robust deep
    learning": stem conv3x3(w), four stages of two pre-activation blocks with w, 2w, 4w, 8w
    channels (strides 1, 2, 2, 2; 1x1-conv shortcut when the shape changes), BN - ReLU,
    global average pooling (4x4), Linear.  w = 64 is the standard network (11.2M parameters).
    PyTorch default initialisation, as in the reference code.  Contains BatchNorm: DP
    training must first apply ``opacus.validators.ModuleValidator.fix``.
    """

    name = "preact-resnet18"
    description = "pre-activation ResNet-18 for 32x32 images (Rice et al. 2020)"
    input_sizes = (32,)

    @dataclass(frozen=True)
    class Params:
        width: int = param(64, "channels of the stem and first stage (then 2x, 4x, 8x)", ge=1)

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        w = self.params.width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        stages, c_in = [], w
        for i, stride in enumerate((1, 2, 2, 2)):
            c_out = w * 2 ** i
            stages.append(nn.Sequential(_PreActBlock(c_in, c_out, stride), _PreActBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _WideBlock(nn.Module):
    """Wide basic block of the TRADES / RobustBench WideResNet (pre-activation, dropout between convs).

    When the shape changes, the shortcut 1x1 conv is applied to the *pre-activated* input,
    exactly as in the reference code.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
                         if c_in != c_out else None)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (self.shortcut(act) if self.shortcut is not None else x)


def _valid_depths() -> str:
    return ", ".join(str(6 * n + 4) for n in range(1, 7)) + ", ..."


class WideResNet(ModelBase):
    """Wide residual network WRN-depth-widen (Zagoruyko & Komodakis, BMVC 2016).

    The CIFAR version used by TRADES (Zhang et al., 2019) and RobustBench: stem conv3x3(16),
    three groups of n = (depth - 4) / 6 wide blocks with 16k, 32k, 64k channels (k = widen;
    strides 1, 2, 2), BN - ReLU, global average pooling (8x8), Linear.  Initialisation as in
    the reference code: convs He/kaiming normal with fan_out (std sqrt(2 / (k*k*out))),
    BatchNorm weight 1 / bias 0, Linear bias 0 (weight PyTorch default).  cfbench defaults to
    WRN-16-4 for CPU; WRN-28-10 and WRN-34-10 are the usual published networks.  Contains
    BatchNorm: DP training must first apply ``opacus.validators.ModuleValidator.fix``.
    """

    name = "wrn"
    description = "wide ResNet for 32x32 images (TRADES / RobustBench version; default WRN-16-4)"
    input_sizes = (32,)

    @dataclass(frozen=True)
    class Params:
        depth: int = param(16, "depth; must be 6n+4 (10, 16, 22, 28, 34, ...)")
        widen: int = param(4, "widening factor k", ge=1)
        dropout: float = param(0.0, "dropout probability between the two convs of a block", ge=0, lt=1)

        def validate(self) -> None:
            if (self.depth - 4) % 6 != 0 or self.depth < 10:
                raise UsageError(f"model 'wrn': depth {self.depth} is not valid; it must be "
                                 f"6n+4 with n >= 1: {_valid_depths()}.")

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        p = self.params
        n = (p.depth - 4) // 6
        widths = (16, 16 * p.widen, 32 * p.widen, 64 * p.widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        for i, stride in enumerate((1, 2, 2)):
            c_in, c_out = widths[i], widths[i + 1]
            groups.append(nn.Sequential(*(
                _WideBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, p.dropout)
                for j in range(n))))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))
