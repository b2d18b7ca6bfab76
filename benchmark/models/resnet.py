"""PreAct ResNet-18 (He et al. 2016) for 32x32 images."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..params import param
from .base import ModelBase


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
