"""The evaluator contract.

An evaluator is a class registered under ``cfbench.evaluators``.  It receives the trained
model and an :class:`EvalContext` and returns flat, dotted metrics, each a number or a
``{"value", "ci_low", "ci_high", "n"}`` dict (see :func:`proportion`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..attacks.base import ThreatModel


@dataclass
class EvalContext:
    model: torch.nn.Module
    config: Any                    # cfbench.config.RunConfig
    data: Any                      # cfbench.data.splits.RunData
    threat: ThreatModel
    device: torch.device
    run_dir: Path
    cache_dir: Path
    seed: int
    progress: bool = True
    #: artifacts other evaluators / the report may use (e.g. adversarial examples)
    shared: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    #: extra timings in seconds (the harness records the evaluator's total itself)
    timings: dict[str, float] = field(default_factory=dict)


class Evaluator:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[int] = 1
    api_version: ClassVar[int] = 1
    Params: ClassVar[type]

    def __init__(self, params=None):
        self.params = params if params is not None else self.Params()

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        raise NotImplementedError


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """A rate with its exact Clopper-Pearson interval."""
    from ..mia.metrics import clopper_pearson

    if n == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    lo, hi = clopper_pearson(int(k), int(n), confidence)
    return {"value": k / n, "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched, on CPU."""
    model.eval()
    with torch.no_grad():
        out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
