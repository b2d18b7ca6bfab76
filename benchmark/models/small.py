"""Small CNNs for 8x8 (digits) and 28x28 (MNIST, Fashion-MNIST) images."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..params import param
from .base import ModelBase


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
