"""The global-average-pooling CNN with class activation maps (Zhou et al. 2016)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UsageError
from ..params import param
from .base import ModelBase


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
