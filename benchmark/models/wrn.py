"""WideResNet (Zagoruyko & Komodakis 2016), as in TRADES / RobustBench."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..params import param
from .base import ModelBase


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
