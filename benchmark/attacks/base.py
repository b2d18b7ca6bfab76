"""Base class of attack components (register under ``cfbench.attacks``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..component import Component

@dataclass(frozen=True)
class ThreatModel:
    """An lp ball around clean inputs in [0, 1]."""

    norm: str
    eps: float


class Attack(Component):
    """An adversarial attack: ``perturb(model, x, y, threat) -> x_adv`` (inputs in [0, 1])."""


    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                threat: ThreatModel) -> torch.Tensor:
        raise NotImplementedError
