"""ERM: plain empirical-risk minimisation, the reference point of every trade-off."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from cfbench.defenses.base import Defense
from cfbench.params import param


@dataclass(frozen=True)
class ERMParams:
    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)


class ERM(Defense):
    """Undefended training: mean cross-entropy on clean mini-batches."""

    name = "erm"
    description = "undefended training (cross-entropy on clean inputs); the reference point"
    version = 1
    family = "erm"
    Params = ERMParams

    def loss(self, model, x, y, batch):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.params.label_smoothing), logits
