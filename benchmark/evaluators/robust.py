"""Robust accuracy: PGD-k (fast, own PGD) and AutoAttack (standard version, via pyautoattack).

AutoAttack is the number cfbench reports as robust accuracy.  It is run through
``pyautoattack`` 0.2.0 (the package RobustBench depends on), ``version='standard'``:
APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries), with the run's seed.
Its own checks (randomised / dynamic defense, probability outputs, too many target classes,
Square beating the white-box attacks) are logged by the package; cfbench captures them into
the record's ``warnings`` and ``robust.autoattack.flags``, together with the robust accuracy
after each attack.  cfbench's own state file in the run directory makes an interrupted
evaluation resume after its last finished attack (see :class:`AutoAttackRobustness`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from ..attacks.pgd import STEP_SIZE_HELP, PGDAttack, PGDParams, default_step_size
from ..params import param
from ..store.io import load_tensors, save_tensors_atomic
from .base import EvalContext, EvalResult, Evaluator, predict, proportion


@dataclass(frozen=True)
class PGDEvalParams:
    steps: int = param(20, "PGD iterations", ge=1)
    step_size: float | None = param(None, STEP_SIZE_HELP, gt=0)
    restarts: int = param(1, "random restarts", ge=1)
    n_examples: int | None = param(None, "test examples attacked (default: all)", ge=1)
    batch_size: int = param(256, "attack batch size", ge=1)


class PGDRobustness(Evaluator):
    """Robust accuracy under PGD-k with random start in the run's threat model."""

    name = "pgd"
    namespace = "robust.pgd"
    contract_params = {"n_examples": 16, "steps": 2}
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
        ctx.examples["pgd"] = (x[:16], torch.cat(advs) if advs else x[:0], y[:16])
        res = EvalResult()
        res.metrics["robust.pgd.accuracy"] = proportion(correct, n)
        res.notes["robust.pgd"] = {"steps": p.steps, "restarts": p.restarts,
                                   "step_size": default_step_size(ctx.threat.eps, p.steps, p.step_size),
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


STATE_FILE = "autoattack_state.safetensors"


class AutoAttackRobustness(Evaluator):
    """AutoAttack (Croce & Hein 2020), standard version, through pyautoattack.

    The attacks of the version run in the package's order, **one ``run_standard_evaluation``
    call per attack**, each on the examples still robust after the previous ones.  That is
    exactly what one call does internally (same subsets in the same order, same batches, every
    attack re-seeded with the run's seed; tested against a single direct call), but it lets
    cfbench save its own state after each attack: ``autoattack_state.safetensors`` in the run
    directory (robust flags, adversarial examples, the attacks done and the accuracy after
    each), written atomically.  A killed evaluation resumes after the last finished attack.
    (pyautoattack 0.2.0's own ``state_path`` cannot resume: it writes the set of attacks with
    ``json.dump(default=str)`` and compares the string read back with a set, so every resume
    raises "created with a different set of attacks".)  The package's Square check, which
    compares the accuracies after all attacks, is called by cfbench on the whole breakdown.
    """

    name = "autoattack"
    namespace = "robust.autoattack"
    contract_params = {"n_examples": 8}
    description = "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack; flags recorded"
    version = 1
    Params = AutoAttackParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        from pyautoattack import AutoAttack
        from pyautoattack import checks as aa_checks

        p = self.params
        d = ctx.data
        n = min(p.n_examples, len(d.x_test))
        x, y = d.x_test[:n].contiguous(), d.y_test[:n].contiguous()
        ctx.model.eval()
        res = EvalResult()
        if n < p.n_examples:
            res.warnings.append(f"autoattack: only {n} test examples exist; evaluated {n}, not {p.n_examples}")
        adversary = AutoAttack(ctx.model, norm=ctx.threat.norm, eps=ctx.threat.eps, version=p.version,
                               device=str(ctx.device), seed=ctx.seed)
        attacks = list(adversary.attacks_to_run)
        key = {"n": n, "version": p.version, "norm": ctx.threat.norm, "eps": ctx.threat.eps,
               "seed": ctx.seed, "attacks": attacks, "x_sha256": _sha256(x), "y_sha256": _sha256(y)}
        state_path = ctx.run_dir / STATE_FILE
        state = _load_state(state_path, key)
        resumed = state is not None
        if state is None:
            clean = predict(ctx.model, x, ctx.device).argmax(1).cpu() == y
            state = {"robust": clean.clone(), "x_adv": x.clone(), "done": [], "acc": {"clean": int(clean.sum()) / n},
                     "seconds": {}}
            _save_state(state_path, key, state)
        resumed_after = list(state["done"])
        logger = logging.getLogger("auto-attack")
        handler = _Capture()
        old_level, old_prop = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        try:
            for attack in attacks:
                if attack in state["done"]:
                    continue
                t0 = time.perf_counter()
                idx = torch.nonzero(state["robust"], as_tuple=False).flatten()
                if len(idx):
                    adversary.attacks_to_run = [attack]
                    xs, ys = x[idx].contiguous(), y[idx].contiguous()
                    x_adv_s, _ = adversary.run_standard_evaluation(xs, ys, batch_size=p.batch_size)
                    x_adv_s = x_adv_s.detach().cpu()
                    broken = predict(ctx.model, x_adv_s, ctx.device).argmax(1).cpu() != ys
                    state["robust"][idx[broken]] = False
                    state["x_adv"][idx[broken]] = x_adv_s[broken]
                state["done"].append(attack)
                state["acc"][attack] = int(state["robust"].sum()) / n
                state["seconds"][attack] = time.perf_counter() - t0
                _save_state(state_path, key, state)
            aa_checks.check_square_sr(dict(state["acc"]), logger=logger)
        finally:
            adversary.attacks_to_run = attacks
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_prop
        robust = int(state["robust"].sum())
        res.metrics["robust.autoattack.accuracy"] = proportion(robust, n)
        for attack in attacks:
            res.metrics[f"robust.autoattack.after.{attack}"] = state["acc"][attack]
        # each call repeats the package's checks on its subset: keep every distinct message once
        flags_msgs = list(dict.fromkeys(r.getMessage() for r in handler.records if r.levelno >= logging.WARNING))
        res.metrics["robust.autoattack.n"] = n
        res.warnings.extend(f"autoattack: {m}" for m in flags_msgs)
        res.notes["robust.autoattack"] = {
            "package": "pyautoattack", "version": p.version, "norm": ctx.threat.norm, "eps": ctx.threat.eps,
            "n_examples": n, "attacks": attacks, "seed": ctx.seed, "flags": flags_msgs,
            "resumed": resumed, "resumed_after": resumed_after if resumed else None,
            "breakdown": dict(state["acc"]), "seconds_per_attack": dict(state["seconds"]),
            "driver": "one run_standard_evaluation call per attack on the still-robust examples; "
                      "cfbench's own resumable state",
        }
        ctx.examples["autoattack"] = (x[:16], state["x_adv"][:16].clone(), y[:16])
        state_path.unlink(missing_ok=True)
        return res


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _save_state(path, key: dict, state: dict) -> None:
    meta = {"key": key, "done": state["done"], "acc": state["acc"], "seconds": state["seconds"]}
    save_tensors_atomic(path, {"robust": state["robust"].to(torch.uint8), "x_adv": state["x_adv"]}, meta)


def _load_state(path, key: dict) -> dict | None:
    """The saved state if it exists and belongs to this evaluation; a stale or foreign file is
    ignored (and overwritten), never trusted."""
    if not path.exists():
        return None
    try:
        tensors, meta = load_tensors(path)
        robust, x_adv = tensors["robust"].bool(), tensors["x_adv"]
    except Exception:  # noqa: BLE001 - a truncated or foreign file: start over
        return None
    if meta.get("key") != key or robust.shape != (key["n"],):
        return None
    return {"robust": robust, "x_adv": x_adv, "done": list(meta["done"]), "acc": dict(meta["acc"]),
            "seconds": dict(meta.get("seconds", {}))}
