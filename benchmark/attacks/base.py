"""Base class of attack components (register under ``cfbench.attacks``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ThreatModel:
    """An lp ball around clean inputs in [0, 1]."""

    norm: str
    eps: float


class Attack:
    """An adversarial attack: ``perturb(model, x, y, threat) -> x_adv`` (inputs in [0, 1])."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1
    api_version: ClassVar[int] = 1
    Params: ClassVar[type]

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    def perturb(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                threat: ThreatModel) -> torch.Tensor:
        raise NotImplementedError
