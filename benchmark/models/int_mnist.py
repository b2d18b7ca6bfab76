"""The GAP network of Boopathy et al. (ICML 2020), "MNIST Small" / "CIFAR Small".

Reference code: AkhilanB/Proper-Interpretability, ``train.py`` (``filters = [16, 32, 100]``,
``kernels = [4, 4, 7]``, ``strides = [2, 2, 1]``, ``paddings = 'SAME'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..params import param
from .base import ModelBase


class IntMNIST(ModelBase):
    """conv16 4x4/2 -> conv32 4x4/2 -> conv100 7x7/1 -> global average pooling -> bias-free linear.

    As in the reference code (``train_int``): 'SAME' padding (28x28 -> 14 -> 7 -> 7, so the
    class activation maps are 7x7 on MNIST and 8x8 on 32x32 CIFAR), a ReLU on the *input* of
    the second and third convolutions but **none after the third**: the 100 feature maps that
    are averaged may be negative; the last layer has no bias, so the logit of class ``c`` is
    exactly the spatial mean of its class activation map ``M_c = sum_k W[c, k] A_k``.
    Initialisation as the reference code: conv weights ~ N(0, 1 / fan_in) (std
    ``1 / sqrt(k * k * C_in)``), conv biases 0, last layer ~ N(0, 1 / K).  ``width`` scales the
    channel counts (1.0 = the paper's 16, 32, 100).  No BatchNorm (Opacus-compatible).
    """

    name = "int-mnist"
    description = "Boopathy et al. (2020) GAP net: conv16 4x4/2, conv32 4x4/2, conv100 7x7/1, GAP, bias-free linear"
    input_sizes = (28, 32)

    @dataclass(frozen=True)
    class Params:
        width: float = param(1.0, "channel multiplier (1.0 = the paper's 16, 32, 100)", gt=0)

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        w = self.params.width
        c1, c2, c3 = (max(1, round(16 * w)), max(1, round(32 * w)), max(1, round(100 * w)))
        # 'SAME' for an even input and stride 2, kernel 4: one pixel each side; 7x7 stride 1: three
        self.conv1 = nn.Conv2d(in_channels, c1, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 7, stride=1, padding=3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c3, num_classes, bias=False)
        for conv in (self.conv1, self.conv2, self.conv3):
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            nn.init.normal_(conv.weight, std=1 / math.sqrt(fan_in))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc.weight, std=1 / math.sqrt(c3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map (N, K, h, w) of inputs in [0, 1] (normalised inside)."""
        h = self.conv1(self.normalize(x))
        h = self.conv2(self.act(h))
        return self.conv3(self.act(h))

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def cam(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class activation maps (N, h, w) of class ``target[i]`` for each input; differentiable.

        ``cam(x, t).mean((1, 2)) == forward(x)[range(N), t]`` (no bias).
        """
        target = torch.as_tensor(target, device=x.device).long().reshape(-1)
        if target.numel() != x.shape[0]:
            raise ValueError(f"cam: need one target per input, got {target.numel()} for {x.shape[0]}.")
        return torch.einsum("nk,nkhw->nhw", self.fc.weight[target], self.features(x))
