"""The evaluator contract.

An evaluator is a class registered under ``cfbench.evaluators``.  It receives the trained
model and an :class:`EvalContext` and returns flat, dotted metrics, each a number or a
``{"value", "ci_low", "ci_high", "n"}`` dict (see :func:`proportion`).

Metrics are namespaced: every key an evaluator returns starts with its :attr:`Evaluator.namespace`
(default: its registry name; the built-in robustness evaluators use ``robust.pgd`` and
``robust.autoattack``).  A namespace must be the evaluator's name or end in ``.<name>``, so
no evaluator can write another's numbers (a plugin cannot overwrite ``clean.accuracy``); the
runner rejects a key outside the namespace.

An evaluator that needs models trained with the run's recipe (membership reference models)
*declares* them as :class:`~cfbench.execution.jobs.TrainingJob` values and hands them to
``ctx.run_jobs``, the run's executor; it never calls the runner.  Example images for the
report go into ``ctx.examples`` (``{prefix: (x_clean, x_changed, y)}``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..component import Component
from ..attacks.base import ThreatModel
from ..mia.metrics import proportion  # noqa: F401 - part of the evaluator API (clean, robust use it)

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..data.splits import RunData


@dataclass
class EvalContext:
    model: torch.nn.Module
    config: RunConfig
    data: RunData
    threat: ThreatModel
    device: torch.device
    run_dir: Path
    cache_dir: Path
    seed: int
    progress: bool = True
    #: runs declared training jobs, returns their model paths (the run's executor)
    run_jobs: Callable[[Sequence[Any]], list[Path]] | None = None
    #: example images for the report: ``{prefix: (x_clean, x_changed, y)}`` (one channel for all)
    examples: dict[str, Any] = field(default_factory=dict)
    #: artifacts later evaluators may use (e.g. the path of the membership scores)
    shared: dict[str, Any] = field(default_factory=dict)
    #: the metrics the defense recorded while training the target (read-only; e.g. ``dp.epsilon``
    #: and ``dp.delta``, which the membership evaluator's DP audit sets its bound beside)
    defense_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    #: extra timings in seconds (the harness records the evaluator's total itself)
    timings: dict[str, float] = field(default_factory=dict)
    #: named sanity flags (:func:`cfbench.evaluators.sanity.flag`): merged by name into ``record["flags"]``
    flags: list[dict[str, Any]] = field(default_factory=list)
    #: per-example outcomes over the run's test split, namespaced like metrics (e.g.
    #: ``clean.correct``: bool per test image; ``robust.autoattack.robust``: bool per attacked
    #: image, the first n of the test split); saved in ``<run>/per_example.npz`` for paired
    #: comparisons (``cfbench compare``)
    per_example: dict[str, Any] = field(default_factory=dict)


class Evaluator(Component):
    #: prefix of every metric key (None: the evaluator's name); see the module docstring
    namespace: ClassVar[str | None] = None

    @classmethod
    def metric_namespace(cls) -> str:
        ns = cls.namespace or cls.name
        if ns != cls.name and not ns.endswith("." + cls.name):
            raise ValueError(f"evaluator {cls.name!r}: namespace {ns!r} must be {cls.name!r} or end in "
                             f"'.{cls.name}'")
        return ns

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        raise NotImplementedError

    def declare_jobs(self, cfg: RunConfig, data: RunData, cache_dir: Path) -> list[Any]:
        """Training jobs this evaluator will need, named from the recipe alone (before the
        target exists), so the executor can start them early; default none.  ``evaluate``
        still hands them to ``ctx.run_jobs`` (already-started jobs are not run twice)."""
        return []


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched, on CPU."""
    model.eval()
    with torch.no_grad():
        out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
