"""Robust accuracy: PGD-k (fast, own PGD) and AutoAttack (standard version, via pyautoattack).

AutoAttack is the number cfbench reports as robust accuracy.  It is run through
``pyautoattack`` 0.2.0 (the package RobustBench depends on), ``version='standard'``:
APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries), with the run's seed.
Its own checks (randomised / dynamic defense, probability outputs, too many target classes,
Square beating the white-box attacks) are logged by the package; cfbench captures them into
the record's ``warnings`` and ``robust.autoattack.flags``, together with the robust accuracy
after each attack.  A state file in the run directory makes an interrupted evaluation resume.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

import torch

from ..attacks.pgd import PGDAttack, PGDParams
from ..params import param
from .base import EvalContext, EvalResult, Evaluator, predict, proportion


@dataclass(frozen=True)
class PGDEvalParams:
    steps: int = param(20, "PGD iterations", ge=1)
    step_size: float | None = param(None, "step size (default 2.5 * eps / steps)", gt=0)
    restarts: int = param(1, "random restarts", ge=1)
    n_examples: int | None = param(None, "test examples attacked (default: all)", ge=1)
    batch_size: int = param(256, "attack batch size", ge=1)


class PGDRobustness(Evaluator):
    """Robust accuracy under PGD-k with random start in the run's threat model."""

    name = "pgd"
    description = "robust accuracy under PGD-k (random start, restarts) in the run's threat model"
    version = 1
    Params = PGDEvalParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        d = ctx.data
        n = min(p.n_examples or len(d.x_test), len(d.x_test))
        x, y = d.x_test[:n], d.y_test[:n]
        attack = PGDAttack(PGDParams(steps=p.steps, step_size=p.step_size, restarts=p.restarts))
        torch.manual_seed(ctx.seed)
        ctx.model.eval()
        correct = 0
        advs = []
        for i in range(0, n, p.batch_size):
            xb, yb = x[i:i + p.batch_size].to(ctx.device), y[i:i + p.batch_size].to(ctx.device)
            xa = attack.perturb(ctx.model, xb, yb, ctx.threat)
            with torch.no_grad():
                correct += int((ctx.model(xa).argmax(1) == yb).sum())
            if i == 0:
                advs.append(xa[:16].cpu())
        ctx.shared["pgd_examples"] = (x[:16], torch.cat(advs) if advs else x[:0], y[:16])
        res = EvalResult()
        res.metrics["robust.pgd.accuracy"] = proportion(correct, n)
        res.notes["robust.pgd"] = {"steps": p.steps, "restarts": p.restarts,
                                   "step_size": p.step_size or 2.5 * ctx.threat.eps / p.steps,
                                   "norm": ctx.threat.norm, "eps": ctx.threat.eps}
        return res


@dataclass(frozen=True)
class AutoAttackParams:
    n_examples: int = param(500, "test examples evaluated (the first n of the test split)", ge=1)
    version: Literal["standard", "plus"] = param("standard", "AutoAttack version")
    batch_size: int = param(250, "attack batch size", ge=1)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


_PERTURBED = re.compile(r"^([a-z\-]+) - \d+/\d+ - (\d+) out of (\d+) successfully perturbed")


class AutoAttackRobustness(Evaluator):
    """AutoAttack (Croce & Hein 2020), standard version, through pyautoattack."""

    name = "autoattack"
    description = "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack; flags recorded"
    version = 1
    Params = AutoAttackParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        from pyautoattack import AutoAttack

        p = self.params
        d = ctx.data
        n = min(p.n_examples, len(d.x_test))
        x, y = d.x_test[:n].contiguous(), d.y_test[:n].contiguous()
        ctx.model.eval()
        res = EvalResult()
        if n < p.n_examples:
            res.warnings.append(f"autoattack: only {n} test examples exist; evaluated {n}, not {p.n_examples}")
        state_path = ctx.run_dir / "autoattack_state.json"
        resumed = state_path.exists()
        adversary = AutoAttack(ctx.model, norm=ctx.threat.norm, eps=ctx.threat.eps, version=p.version,
                               device=str(ctx.device), seed=ctx.seed)
        logger = logging.getLogger("auto-attack")
        handler = _Capture()
        old_level, old_prop = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        try:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=p.batch_size, state_path=state_path)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_prop
        from pyautoattack.state import EvaluationState

        flags = EvaluationState.from_disk(state_path).robust_flags
        robust = int(flags.sum())
        res.metrics["robust.autoattack.accuracy"] = proportion(robust, n)
        # per-attack breakdown: robust accuracy after each attack, from the package's log
        clean_correct = int((predict(ctx.model, x, ctx.device).argmax(1) == y).sum())
        remaining = clean_correct
        breakdown = {"clean": clean_correct / n}
        for rec in handler.records:
            m = _PERTURBED.match(rec.getMessage())
            if m:
                remaining -= int(m.group(2))
                breakdown[m.group(1)] = remaining / n
        if not resumed:
            for attack, value in breakdown.items():
                if attack != "clean":
                    res.metrics[f"robust.autoattack.after.{attack}"] = value
        flags_msgs = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
        res.metrics["robust.autoattack.n"] = n
        res.warnings.extend(f"autoattack: {m}" for m in flags_msgs)
        res.notes["robust.autoattack"] = {
            "package": "pyautoattack", "version": p.version, "norm": ctx.threat.norm, "eps": ctx.threat.eps,
            "n_examples": n, "attacks": list(adversary.attacks_to_run), "seed": ctx.seed,
            "flags": flags_msgs, "resumed": resumed, "breakdown": None if resumed else breakdown,
        }
        ctx.shared["autoattack_examples"] = (x[:16], x_adv[:16].cpu(), y[:16])
        state_path.unlink(missing_ok=True)
        return res
