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
``int-mnist``      :class:`IntMNIST`           28x28 / 32x32; Boopathy et al.'s GAP network (CAMs)
``song-vgg``       :class:`SongVGG`            28x28 / 32x32; Song et al. (2019)'s F-MNIST VGG
=================  ==========================  ===============================================

DP-SGD (Opacus) needs per-sample gradients, which BatchNorm does not allow: ``cnn8``,
``cnn28`` and ``gap-cnn`` contain no BatchNorm and pass ``opacus.validators.ModuleValidator``
as they are; the two ResNets must be converted with ``ModuleValidator.fix`` (BatchNorm ->
GroupNorm) before a DP run.  No model uses in-place activations.
"""

from __future__ import annotations

from .base import ModelBase, Normalize, build_model, count_parameters, unwrap
from .gap import GAPCNN
from .resnet import PreActResNet18
from .small import SmallCNN8, SmallCNN28
from .wrn import WideResNet

__all__ = [
    "ModelBase", "Normalize", "SmallCNN8", "SmallCNN28", "GAPCNN", "PreActResNet18",
    "WideResNet", "build_model", "count_parameters", "unwrap",
]
