"""Robust accuracy: PGD-k (fast, own PGD) and AutoAttack (standard version, via pyautoattack),
each carrying the sanity flags of :mod:`.sanity`.

AutoAttack is the number cfbench reports as robust accuracy.  It is run through
``pyautoattack`` 0.2.0 (the package RobustBench depends on), ``version='standard'``:
APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries), with the run's seed.
Its own checks (randomised / dynamic defense, probability outputs, too many target classes,
zero gradients) are logged by the package; cfbench captures them into the record's
``warnings`` and turns each into a named flag (:func:`.sanity.autoattack_flag`).  cfbench's
own state file in the run directory makes an interrupted evaluation resume after its last
finished attack (see :class:`AutoAttackRobustness`).

Both evaluators attack **the first n examples of the test split** (PGD may take more than
AutoAttack; the comparison uses the common ones), and an example the model misclassifies
clean is never robust.  Both run the model-level checks of :func:`model_checks`
(randomised forward, vanishing gradients, the eps sweep; computed once per run and shared),
and AutoAttack compares itself with PGD on its examples (``pgd_autoattack_gap``) and its
Square with the white-box attacks before it (``gradient_free_beats_whitebox``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import params as P
from ..attacks.base import ThreatModel
from ..attacks.pgd import STEP_SIZE_HELP, PGDAttack, PGDParams, default_step_size
from ..params import param
from ..progress import Progress, log_line
from ..store.io import load_tensors, save_tensors_atomic
from ..store.lifecycle import eval_state_path
from . import sanity as S
from .base import EvalContext, EvalResult, Evaluator, predict, proportion


@dataclass(frozen=True)
class PGDEvalParams:
    steps: int = param(20, "PGD iterations", ge=1)
    step_size: float | None = param(None, STEP_SIZE_HELP, gt=0)
    restarts: int = param(1, "random restarts", ge=1)
    n_examples: int | None = param(None, "test examples attacked: the first n of the test split (default: all)",
                                   ge=1)
    batch_size: int = param(256, "attack batch size", ge=1)
    eot_samples: int = param(20, "gradient samples per step (EOT) when the forward pass is randomised", ge=1)
    sanity: bool = param(True, "run the model-level sanity checks (randomness, gradients, eps sweep)")


def pgd_robust(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, p: PGDEvalParams,
               device, seed: int, eot: int = 1, keep: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example robustness under PGD-k (restarts, EOT) and the first ``keep`` adversarial
    examples, both on CPU.  Robust = classified correctly clean *and* after the attack."""
    attack = PGDAttack(PGDParams(steps=p.steps, step_size=p.step_size, restarts=p.restarts, eot=eot))
    torch.manual_seed(seed)
    model.eval()
    robust, advs = [], []
    for i in range(0, len(x), p.batch_size):
        xb, yb = x[i:i + p.batch_size].to(device), y[i:i + p.batch_size].to(device)
        xa = attack.perturb(model, xb, yb, threat)
        with torch.no_grad():
            ok = (model(xb).argmax(1) == yb) & (model(xa).argmax(1) == yb)
        robust.append(ok.cpu())
        if sum(len(a) for a in advs) < keep:
            advs.append(xa[:keep].cpu())
    rob = torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool)
    return rob, (torch.cat(advs)[:keep] if advs else x[:0])


def run_pgd_params(ctx: EvalContext) -> PGDEvalParams:
    """The ``pgd`` evaluator's settings of this run, or its defaults when it is not evaluated
    (used by the sanity checks, so that they attack as the run's PGD does)."""
    given = (ctx.config.evaluator_params or {}).get("pgd") if ctx.config is not None else None
    return given if isinstance(given, PGDEvalParams) else PGDEvalParams()


def model_checks(ctx: EvalContext, evaluator: str,
                 pgd_params: PGDEvalParams | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The model-level checks (``randomized_forward``, ``vanishing_gradients``, ``eps_sweep``)
    on the first :data:`.sanity.SANITY_N` test examples: (evidence, flags raised by
    ``evaluator``).  Computed once per run (cached in ``ctx.shared``, keyed by the examples,
    threat model, seed and PGD settings) and shared by the robustness evaluators; each one
    that asks re-raises the flags under its own name (the runner merges them by name).  The
    sweep attacks with ``pgd_params`` (the pgd evaluator passes its own), else the run's."""
    p = pgd_params or run_pgd_params(ctx)
    d = ctx.data
    n = min(S.SANITY_N, len(d.x_test))
    key = ("robust.sanity.model", n, ctx.threat.norm, ctx.threat.eps, ctx.seed, tuple(sorted(P.to_dict(p).items())))
    cached = ctx.shared.get("robust.sanity.model")
    if cached is None or cached["key"] != key:
        x, y = d.x_test[:n], d.y_test[:n]
        rnd = S.forward_randomness(ctx.model, x, ctx.device)
        eot = p.eot_samples if rnd["randomized"] else 1
        checks: dict[str, Any] = {"examples": f"the first {n} test examples", "randomness": rnd}
        with torch.no_grad():
            correct = predict(ctx.model, x, ctx.device).argmax(1) == y
        norms = S.input_gradient_norms(ctx.model, x[correct], y[correct], ctx.device)
        checks["gradients"] = S.check_gradients(norms, "?")[0]
        points = []
        for e in S.sweep_radii(ctx.threat.eps, ctx.threat.norm, int(x[0].numel())):
            scale = e / ctx.threat.eps
            pe = dataclasses.replace(p, step_size=None if p.step_size is None else p.step_size * scale)
            rob, _ = pgd_robust(ctx.model, x, y, ThreatModel(ctx.threat.norm, e), pe, ctx.device, ctx.seed, eot=eot)
            points.append((e, rob))
        checks["eps_sweep"] = S.check_sweep(points, ctx.threat.eps, "?", labels=y)[0]
        checks["pgd"] = {**P.to_dict(p), "eot": eot}
        cached = {"key": key, "checks": checks, "norms": norms, "points": points, "labels": y}
        ctx.shared["robust.sanity.model"] = cached
    checks = cached["checks"]
    flags = []
    rnd = checks["randomness"]
    if rnd["randomized"]:
        flags.append(S.flag("randomized_forward", evaluator,
                            f"two forward passes of the same {rnd['n']} examples differ (max |logit difference| "
                            f"{rnd['max_abs_diff']:.3g}, {rnd['changed_predictions']} predictions changed): EOT "
                            "required, and used", rnd))
    fl = S.check_gradients(cached["norms"], evaluator)[1]
    if fl:
        flags.append(fl)
    fl = S.check_sweep(cached["points"], ctx.threat.eps, evaluator, labels=cached["labels"])[1]
    if fl:
        flags.append(fl)
    return checks, flags


class PGDRobustness(Evaluator):
    """Robust accuracy under PGD-k with random start in the run's threat model.

    Robust means correctly classified clean and after the attack (a clean error is never
    robust).  When two forward passes of the same input differ (a randomised defense), every
    step averages the gradient over ``eot_samples`` passes (EOT).  With ``sanity`` on, the
    model-level checks of :func:`model_checks` run and their flags go into the record.
    Per-example results are left in ``ctx.shared["robust.pgd"]`` for AutoAttack's comparison.
    """

    name = "pgd"
    namespace = "robust.pgd"
    contract_params = {"n_examples": 16, "steps": 2}
    description = "robust accuracy under PGD-k (random start, restarts, EOT if randomised) + sanity checks"
    version = 2
    Params = PGDEvalParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        d = ctx.data
        n = min(p.n_examples or len(d.x_test), len(d.x_test))
        x, y = d.x_test[:n], d.y_test[:n]
        res = EvalResult()
        if p.sanity:
            checks, flags = model_checks(ctx, self.name, p)
            randomized = checks["randomness"]["randomized"]
            res.flags.extend(flags)
        else:
            checks = None
            randomized = S.forward_randomness(ctx.model, x[:S.SANITY_N], ctx.device)["randomized"]
        eot = p.eot_samples if randomized else 1
        robust, advs = pgd_robust(ctx.model, x, y, ctx.threat, p, ctx.device, ctx.seed, eot=eot)
        ctx.examples["pgd"] = (x[:16], advs, y[:16])
        ctx.shared["robust.pgd"] = {"robust": robust, "n": n, "norm": ctx.threat.norm, "eps": ctx.threat.eps,
                                    "params": P.to_dict(p), "eot": eot}
        res.metrics["robust.pgd.accuracy"] = proportion(int(robust.sum()), n)
        # per attacked example (the first n of the test split), for paired comparisons (cfbench compare)
        res.per_example["robust.pgd.robust"] = torch.as_tensor(robust).bool().cpu().numpy()
        res.metrics["robust.pgd.n"] = n
        res.notes["robust.pgd"] = {"steps": p.steps, "restarts": p.restarts,
                                   "step_size": default_step_size(ctx.threat.eps, p.steps, p.step_size),
                                   "norm": ctx.threat.norm, "eps": ctx.threat.eps, "n_examples": n,
                                   "examples": f"the first {n} test examples", "eot": eot,
                                   "robust_means": "correct on the clean input and after the attack",
                                   "sanity": checks}
        res.flags = S.merge_flags([], res.flags)
        return res


@dataclass(frozen=True)
class AutoAttackParams:
    n_examples: int = param(500, "test examples evaluated (the first n of the test split)", ge=1)
    version: Literal["standard", "plus", "rand"] = param(
        "standard", "AutoAttack version (standard becomes rand, with EOT, for a randomised forward pass)")
    batch_size: int = param(250, "attack batch size", ge=1)
    max_pgd_gap: float = param(0.05, "flag when PGD exceeds AutoAttack on the same examples by more than this "
                                     "(lower end of the paired 95% interval)", ge=0, le=1)
    max_square_gain: float = param(0.01, "flag when Square, after the white-box attacks, breaks more than this "
                                         "fraction of the evaluated examples (lower 95% bound)", ge=0, le=1)
    sanity: bool = param(True, "run the sanity checks (PGD gap, Square vs white-box, model-level checks)")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


STATE_FILE = eval_state_path("", "autoattack").name   # autoattack_state.safetensors


class AutoAttackRobustness(Evaluator):
    """AutoAttack (Croce & Hein 2020), standard version, through pyautoattack.

    The attacks of the version run in the package's order, **one ``run_standard_evaluation``
    call per attack**, each on the examples still robust after the previous ones.  That is
    exactly what one call does internally (same subsets in the same order, same batches, every
    attack re-seeded with the run's seed; tested against a single direct call), but it lets
    cfbench save its own state after each attack: ``autoattack_state.safetensors`` in the run
    directory (robust flags, adversarial examples, the attacks done and the accuracy after
    each), written atomically.  Each attack is itself run one batch at a time (``batch_size``
    examples of those it started on: the batches one call makes internally, each re-seeded by
    the package with the run's seed, so the result is the same), with the state saved after each
    batch: a killed evaluation resumes at the batch it was in, not at the start of the attack
    (on 1,000 Fashion-MNIST images one FAB-T or Square is tens of minutes of a CPU core).
    The finished state stays in the run folder until the run's record is written (the runner
    then removes it with the checkpoints): a run killed in a later evaluator -- typically the
    membership evaluator waiting for its reference models -- takes AutoAttack's result from
    it on resume instead of attacking again.  The state is keyed by the examples, the threat,
    the version, the seed and a fingerprint of the model's weights, so a different model
    never inherits it.
    (pyautoattack 0.2.0's own ``state_path`` cannot resume: it writes the set of attacks with
    ``json.dump(default=str)`` and compares the string read back with a set, so every resume
    raises "created with a different set of attacks".)

    Sanity (``sanity=true``, :mod:`.sanity`): a randomised forward pass switches version
    ``standard`` to ``rand`` (APGD-CE and APGD-DLR with 20 EOT iterations) and raises
    ``randomized_forward``; PGD is compared with AutoAttack on these very examples -- the
    ``pgd`` evaluator's per-example results when it ran earlier in the run on them, else
    PGD with its settings run here (``pgd_autoattack_gap``, metrics
    ``robust.autoattack.sanity.pgd_accuracy`` and ``.pgd_gap``); the examples Square breaks
    after the white-box attacks give ``gradient_free_beats_whitebox`` (this replaces the
    package's ``check_square_sr`` as a flag; its warning is still recorded); the model-level
    checks of :func:`model_checks` run too.  Every warning of the package's own checks is a
    named flag (:func:`.sanity.autoattack_flag`).
    """

    name = "autoattack"
    namespace = "robust.autoattack"
    contract_params = {"n_examples": 8}
    description = "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) via pyautoattack; sanity flags recorded"
    version = 2
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
        checks: dict[str, Any] | None = None
        if p.sanity:
            checks, flags = model_checks(ctx, self.name)
            res.flags.extend(flags)
            randomized = checks["randomness"]["randomized"]
        else:
            randomized = S.forward_randomness(ctx.model, x[:p.batch_size], ctx.device)["randomized"]
        version = "rand" if (randomized and p.version == "standard") else p.version
        adversary = AutoAttack(ctx.model, norm=ctx.threat.norm, eps=ctx.threat.eps, version=version,
                               device=str(ctx.device), seed=ctx.seed)
        attacks = list(adversary.attacks_to_run)
        key = {"n": n, "version": version, "norm": ctx.threat.norm, "eps": ctx.threat.eps,
               "seed": ctx.seed, "attacks": attacks, "x_sha256": _sha256(x), "y_sha256": _sha256(y),
               "model_sha256": _model_sha256(ctx.model)}
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
        # one line (log) / one bar step (terminal) per attack: k/K attacks, examples still robust, ETA
        bar = Progress(len(attacks), "autoattack", "attack", initial=len(state["done"]), enabled=bool(ctx.progress))
        try:
            for attack in attacks:
                if attack in state["done"]:
                    continue
                t0 = time.perf_counter()
                if state.get("current") == attack:      # resumed inside this attack
                    idx, start = state["current_idx"], int(state["attacked"])
                    spent = float(state["seconds"].get(attack, 0.0))
                else:
                    idx, start, spent = torch.nonzero(state["robust"], as_tuple=False).flatten(), 0, 0.0
                    state.update(current=attack, current_idx=idx, attacked=0)
                if ctx.progress and bar.bar is None:
                    log_line(f"autoattack: {attack} on the {len(idx)} of {n} examples still robust"
                             + (f" (resumed after {start})" if start else "") + " ...")
                adversary.attacks_to_run = [attack]
                # one call per batch of the attack's examples: the batches one call would make
                # (each re-seeds the attack with the run's seed), with the state saved after each
                for b in range(start, len(idx), p.batch_size):
                    sub = idx[b:b + p.batch_size]
                    xs, ys = x[sub].contiguous(), y[sub].contiguous()
                    x_adv_s, _ = adversary.run_standard_evaluation(xs, ys, batch_size=p.batch_size)
                    x_adv_s = x_adv_s.detach().cpu()
                    broken = predict(ctx.model, x_adv_s, ctx.device).argmax(1).cpu() != ys
                    state["robust"][sub[broken]] = False
                    state["x_adv"][sub[broken]] = x_adv_s[broken]
                    state["attacked"] = b + len(sub)
                    state["seconds"][attack] = spent + time.perf_counter() - t0
                    if state["attacked"] < len(idx):
                        _save_state(state_path, key, state)
                        if ctx.progress and bar.bar is None:   # a log file: one line per saved batch
                            log_line(f"autoattack: {attack} {state['attacked']}/{len(idx)} attacked, "
                                     f"{int(state['robust'].sum())}/{n} still robust")
                state["done"].append(attack)
                state.update(current=None, current_idx=torch.zeros(0, dtype=torch.long), attacked=0)
                state["acc"][attack] = int(state["robust"].sum()) / n
                state["seconds"][attack] = spent + time.perf_counter() - t0
                _save_state(state_path, key, state)
                bar.update(1, done=attack, robust=f"{int(state['robust'].sum())}/{n}")
            aa_checks.check_square_sr(dict(state["acc"]), logger=logger)
        finally:
            bar.close()
            adversary.attacks_to_run = attacks
            logger.removeHandler(handler)
            logger.setLevel(old_level)
            logger.propagate = old_prop
        robust = int(state["robust"].sum())
        res.metrics["robust.autoattack.accuracy"] = proportion(robust, n)
        res.per_example["robust.autoattack.robust"] = state["robust"].bool().cpu().numpy()
        for attack in attacks:
            res.metrics[f"robust.autoattack.after.{attack}"] = state["acc"][attack]
        # each call repeats the package's checks on its subset: keep every distinct message once
        flags_msgs = list(dict.fromkeys(r.getMessage() for r in handler.records if r.levelno >= logging.WARNING))
        res.metrics["robust.autoattack.n"] = n
        res.warnings.extend(f"autoattack: {m}" for m in flags_msgs)
        for m in flags_msgs:
            fl = S.autoattack_flag(m, self.name)
            if fl is not None:
                res.flags.append(fl)
        sanity: dict[str, Any] = {"model": checks} if checks is not None else {}
        if version != p.version:
            sanity["eot"] = (f"randomised forward pass: version {p.version!r} replaced by {version!r} "
                             f"(attacks {', '.join(attacks)}, EOT over {adversary.apgd.eot_iter} samples)")
        if p.sanity:
            self._compare(ctx, x, y, state, attacks, randomized, res, sanity)
        res.notes["robust.autoattack"] = {
            "package": "pyautoattack", "version": version, "requested_version": p.version, "norm": ctx.threat.norm,
            "eps": ctx.threat.eps, "n_examples": n, "examples": f"the first {n} test examples", "attacks": attacks,
            "seed": ctx.seed, "flags": flags_msgs, "resumed": resumed, "resumed_after": resumed_after if resumed else None,
            "breakdown": dict(state["acc"]), "seconds_per_attack": dict(state["seconds"]),
            "driver": "one run_standard_evaluation call per attack on the still-robust examples; "
                      "cfbench's own resumable state",
            "sanity": sanity,
        }
        ctx.examples["autoattack"] = (x[:16], state["x_adv"][:16].clone(), y[:16])
        # the finished state stays until the run's record is written (store.lifecycle.clean_finished)
        res.flags = S.merge_flags([], res.flags)  # a warning repeated by the per-attack calls: one flag
        return res

    def _compare(self, ctx: EvalContext, x, y, state, attacks, randomized: bool, res: EvalResult,
                 sanity: dict[str, Any]) -> None:
        """PGD vs AutoAttack on the same examples; Square vs the white-box attacks before it."""
        p = self.params
        n = len(x)
        shared = ctx.shared.get("robust.pgd")
        if (shared is not None and shared["n"] >= n and shared["norm"] == ctx.threat.norm
                and shared["eps"] == ctx.threat.eps):
            pgd_rob = shared["robust"][:n]
            label = f"PGD-{shared['params']['steps']} (the pgd evaluator, its first {n} examples)"
        else:
            pp = run_pgd_params(ctx)
            pgd_rob, _ = pgd_robust(ctx.model, x, y, ctx.threat, pp, ctx.device, ctx.seed,
                                    eot=pp.eot_samples if randomized else 1)
            label = f"PGD-{pp.steps} (run by autoattack on its examples)"
        ev, fl = S.check_gap(pgd_rob, state["robust"], p.max_pgd_gap, self.name, label)
        sanity["pgd_autoattack_gap"] = ev
        res.metrics["robust.autoattack.sanity.pgd_accuracy"] = proportion(int(pgd_rob.sum()), n)
        res.metrics["robust.autoattack.sanity.pgd_gap"] = {k: ev["gap"][k] for k in ("value", "ci_low", "ci_high", "n")}
        if fl:
            res.flags.append(fl)
        if "square" in attacks:
            order = ["clean"] + list(attacks)
            i = order.index("square")
            before = round(state["acc"][order[i - 1]] * n)
            after = round(state["acc"]["square"] * n)
            white = [a for a in attacks[:attacks.index("square")]]
            ev, fl = S.check_gradient_free(before - after, before, n, p.max_square_gain, attack="square",
                                           evaluator=self.name, whitebox=white)
            sanity["gradient_free_beats_whitebox"] = ev
            if fl:
                res.flags.append(fl)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _model_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of the model's parameters and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _save_state(path, key: dict, state: dict) -> None:
    """``current`` / ``current_idx`` / ``attacked``: the attack in progress, the examples it
    started on and how many of them it has attacked (resume inside an attack, batch by batch)."""
    meta = {"key": key, "done": state["done"], "acc": state["acc"], "seconds": state["seconds"],
            "current": state.get("current"), "attacked": int(state.get("attacked", 0))}
    current_idx = state.get("current_idx")
    tensors = {"robust": state["robust"].to(torch.uint8), "x_adv": state["x_adv"],
               "current_idx": (torch.zeros(0, dtype=torch.long) if current_idx is None else current_idx.long())}
    save_tensors_atomic(path, tensors, meta)


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
    state = {"robust": robust, "x_adv": x_adv, "done": list(meta["done"]), "acc": dict(meta["acc"]),
             "seconds": dict(meta.get("seconds", {})), "current": None, "attacked": 0}
    current, idx = meta.get("current"), tensors.get("current_idx")
    attacked = int(meta.get("attacked") or 0)
    # an attack in progress (a state written before per-batch resume has none): trusted only
    # if it is consistent -- one of the key's attacks, not done, a valid subset and count
    if (current in key["attacks"] and current not in state["done"] and idx is not None and idx.ndim == 1
            and 0 <= attacked <= len(idx) and (len(idx) == 0 or (0 <= int(idx.min()) and int(idx.max()) < key["n"]))):
        state.update(current=current, current_idx=idx.long(), attacked=attacked)
    return state
