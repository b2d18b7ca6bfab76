"""The Fashion-MNIST network of Song, Shokri & Mittal (CCS 2019), "Privacy risks of securing
machine learning models against adversarial examples".

Their Fashion-MNIST experiments (inspire-group/privacy-vs-robustness, ``FMNIST/model.py`` of the
PyTorch defenses; the TensorFlow PGD-AT code builds the same network with ``width_num = 16``) use
a VGG-like 6-layer CNN: 3x3 convolutions with 16w, 16w, 16w (stride 2), 32w, 32w, 32w (stride 2)
channels, ReLU after each, no pooling and no BatchNorm, then FC-200 - ReLU - FC-classes; ``w =
16`` gives the paper's 256 / 512 filters.  It is the model of VALIDATION.md row 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..params import param
from .base import ModelBase


class SongVGG(ModelBase):
    """conv(16w) - conv(16w) - conv(16w)/2 - conv(32w) - conv(32w) - conv(32w)/2 (3x3, padding 1,
    ReLU) - flatten - Linear(200) - ReLU - Linear(classes).

    As the reference code: convolutions initialised Kaiming-normal with zero biases, the first
    linear layer with PyTorch's default, the last linear layer (weights and bias) with zeros (so
    every logit starts at 0).  ``width`` is the reference's ``width_num`` (16 = the paper's
    256 / 512 filters, about 0.85 GFLOP multiply-adds per 28x28 image: a GPU model; 2 gives 32 /
    64 filters for CPU runs).  No BatchNorm (Opacus-compatible).  Inputs 28x28 (7x7 before the
    classifier) or 32x32 (8x8).
    """

    name = "song-vgg"
    description = "Song, Shokri & Mittal (2019) F-MNIST VGG: six 3x3 convs (16w x3, 32w x3; two stride 2), FC-200"
    input_sizes = (28, 32)

    @dataclass(frozen=True)
    class Params:
        width: int = param(16, "width_num of the reference code: 16w / 32w channels (16 = the paper's 256 / 512)",
                           ge=1)

    def __init__(self, in_channels, num_classes, image_size, mean, std, params=None):
        super().__init__(in_channels, num_classes, image_size, mean, std, params)
        c1, c2 = 16 * self.params.width, 32 * self.params.width
        layers: list[nn.Module] = []
        chans = [(in_channels, c1, 1), (c1, c1, 1), (c1, c1, 2), (c1, c2, 1), (c2, c2, 1), (c2, c2, 2)]
        for cin, cout, stride in chans:
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
            nn.init.kaiming_normal_(conv.weight)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
        self.features = nn.Sequential(*layers)
        side = (image_size + 3) // 4  # two stride-2 convolutions with padding 1: 28 -> 14 -> 7, 32 -> 16 -> 8
        self.fc1 = nn.Linear(c2 * side * side, 200)
        self.fc2 = nn.Linear(200, num_classes)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.normalize(x)).flatten(1)
        return self.fc2(self.act(self.fc1(h)))
