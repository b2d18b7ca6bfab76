"""The torchattacks zoo: a named list of attacks, per-attack and worst-case robust accuracy.

``--evaluators ...,attacks`` runs, on the first ``n_examples`` test examples (the examples
AutoAttack uses), each attack of ``attacks`` from torchattacks 3.5.1 (Kim 2020, "Torchattacks:
a PyTorch repository for adversarial attacks", arXiv 2010.01950) and reports

* ``robust.attacks.<attack>.accuracy`` -- robust accuracy under that attack alone;
* ``robust.attacks.worst_case.accuracy`` -- an example is robust only if it is classified
  correctly clean and after *every* attack of the list (the per-example worst case);
* ``robust.attacks.n`` and, in the notes, each attack's settings, time and -- for the
  minimum-norm attacks -- the median distance of the adversarial examples it found.

AutoAttack stays the source of the headline number; the zoo is the second opinion Carlini
et al. (2019) ask for: attacks of different kinds (margin-based CW, linearising DeepFool,
boundary-seeking FAB, EOT-PGD for randomness, gradient-free SPSA and Square).  Its sanity
flag ``gradient_free_beats_whitebox`` is raised when the gradient-free attacks (SPSA, Square)
break, among the examples every white-box attack of the list left robust, more than
``max_gradient_free_gain`` of the evaluated examples (lower 95% bound); the model-level checks of
:func:`.robust.model_checks` run too.

Attacks and the choices made (torchattacks' classes; cfbench's defaults):

=============  ===================================================================================
``apgd-ce``    ``APGD(norm, eps, steps, n_restarts=1, loss='ce', seed)`` -- the same algorithm as
               AutoAttack's first attack (cross-checked in tests/test_attack_zoo.py)
``apgd-dlr``   ``APGD(..., loss='dlr')`` (not in the default list)
``cw-l2``      ``CW(c=cw_c, kappa=0, steps, lr=0.01)`` (Carlini & Wagner 2017), minimum L2 norm
``deepfool``   ``DeepFool(steps=min(steps, 50), overshoot=0.02)`` (Moosavi-Dezfooli et al. 2016), L2
``fab``        ``FAB(norm, eps, steps, n_restarts=1, untargeted, seed)`` (Croce & Hein 2020)
``eot-pgd``    ``EOTPGD(eps, alpha=2.5 eps / steps, steps, eot_iter=eot_samples)`` (Athalye et al.
               2018), Linf only
``spsa``       ``SPSA(eps, delta=0.01, lr=0.01, nb_iter=spsa_iterations, nb_sample=spsa_samples)``
               (Uesato et al. 2018), gradient-free, Linf only
``square``     ``Square(norm, eps, n_queries=square_queries, p_init=0.8, loss='margin',
               resc_schedule=False, seed)`` (Andriushchenko et al. 2020) -- AutoAttack's settings,
               gradient-free
``pgd``        ``PGD`` / ``PGDL2`` (``steps``, alpha = 2.5 eps / steps, random start)
``fgsm``       ``FGSM(eps)``, Linf only (not in the default list)
=============  ===================================================================================

* Minimum-norm attacks (CW-L2, DeepFool, FAB) are not bounded by the threat model: every
  attack's output is projected onto the run's ball (and clipped to [0, 1]) and an example
  counts as broken only if the projected image is misclassified -- a valid adversarial
  example of the run's threat model.  (For an L2 attack under an Linf threat this is a
  conservative use of its direction.)
* An attack that torchattacks implements for Linf only (EOT-PGD, SPSA, FGSM) is skipped under
  another norm, and the notes say so.
* An attack output that is not finite (DeepFool divides by the gradient difference, NaN when
  the gradient is zero) is replaced by the clean image -- NaN is no adversarial example --
  and counted in the notes (``non_finite_outputs``).
* Only the examples classified correctly clean are attacked (a clean error is never robust);
  torch is seeded with the run's seed before each attack, so each number does not depend on
  the order of the list.
* torchattacks is an optional dependency, installed *without* its own dependencies (``pip
  install --no-deps torchattacks==3.5.1``, done by ``scripts/setup.sh``): its ``requests`` pin
  and torchvision are needed only by its bundled RobustBench loaders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..attacks.pgd import default_step_size, project
from ..errors import UsageError
from ..params import param
from . import sanity as S
from .base import EvalContext, EvalResult, Evaluator, predict, proportion

#: every attack the zoo knows: name -> (kind, norms it supports, minimum-norm?)
ATTACKS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "apgd-ce": ("white-box", ("Linf", "L2"), False),
    "apgd-dlr": ("white-box", ("Linf", "L2"), False),
    "cw-l2": ("white-box", ("Linf", "L2"), True),
    "deepfool": ("white-box", ("Linf", "L2"), True),
    "fab": ("white-box", ("Linf", "L2"), True),
    "eot-pgd": ("white-box", ("Linf",), False),
    "pgd": ("white-box", ("Linf", "L2"), False),
    "fgsm": ("white-box", ("Linf",), False),
    "spsa": ("gradient-free", ("Linf",), False),
    "square": ("gradient-free", ("Linf", "L2"), False),
}
DEFAULT_ATTACKS = ("apgd-ce", "cw-l2", "deepfool", "fab", "eot-pgd", "spsa", "square")
TORCHATTACKS_VERSION = "3.5.1"


@dataclass(frozen=True)
class AttackZooParams:
    attacks: tuple[str, ...] = param(DEFAULT_ATTACKS, "attacks to run (comma-separated), from: "
                                     + ", ".join(ATTACKS))
    n_examples: int = param(200, "test examples attacked: the first n of the test split", ge=1)
    batch_size: int = param(250, "attack batch size", ge=1)
    steps: int = param(100, "iterations of APGD, CW, FAB, EOT-PGD and PGD (DeepFool: at most 50)", ge=1)
    square_queries: int = param(5000, "Square's query budget (AutoAttack: 5000)", ge=1)
    spsa_iterations: int = param(20, "SPSA's Adam iterations (cost: 2 x spsa_samples forward passes each)", ge=1)
    spsa_samples: int = param(128, "SPSA's perturbation samples per gradient estimate", ge=2)
    eot_samples: int = param(10, "EOT-PGD's gradient samples per step", ge=1)
    cw_c: float = param(1.0, "CW-L2's constant c (weight of the misclassification term)", gt=0)
    max_gradient_free_gain: float = param(0.01, "flag when SPSA/Square break, among the examples every white-box "
                                                "attack left robust, more than this fraction of the evaluated "
                                                "examples (lower 95% bound)",
                                          ge=0, le=1)
    sanity: bool = param(True, "run the sanity checks (gradient-free vs white-box, model-level checks)")

    def validate(self):
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise UsageError(f"attacks.attacks: unknown attack {bad[0]!r}. Valid choices: {', '.join(ATTACKS)}.")
        if not self.attacks:
            raise UsageError(f"attacks.attacks is empty. Valid choices: {', '.join(ATTACKS)}.")
        if len(set(self.attacks)) != len(self.attacks):
            raise UsageError("attacks.attacks lists an attack twice; list each once.")


def _torchattacks():
    try:
        import torchattacks
    except ImportError as e:
        raise UsageError("the `attacks` evaluator needs torchattacks: install it without its dependencies, "
                         f"`pip install --no-deps torchattacks=={TORCHATTACKS_VERSION}` (scripts/setup.sh does), "
                         "or leave `attacks` out of --evaluators.") from e
    return torchattacks


def build_attack(name: str, model: torch.nn.Module, norm: str, eps: float, p: AttackZooParams, num_classes: int,
                 seed: int):
    """The torchattacks object of zoo attack ``name`` with cfbench's settings (module docstring)."""
    ta = _torchattacks()
    alpha = default_step_size(eps, p.steps)
    if name in ("apgd-ce", "apgd-dlr"):
        return ta.APGD(model, norm=norm, eps=eps, steps=p.steps, n_restarts=1, seed=seed,
                       loss="ce" if name == "apgd-ce" else "dlr")
    if name == "cw-l2":
        return ta.CW(model, c=p.cw_c, kappa=0, steps=p.steps, lr=0.01)
    if name == "deepfool":
        return ta.DeepFool(model, steps=min(p.steps, 50), overshoot=0.02)
    if name == "fab":
        return ta.FAB(model, norm=norm, eps=eps, steps=p.steps, n_restarts=1, multi_targeted=False,
                      n_classes=num_classes, seed=seed)
    if name == "eot-pgd":
        return ta.EOTPGD(model, eps=eps, alpha=alpha, steps=p.steps, eot_iter=p.eot_samples, random_start=True)
    if name == "pgd":
        if norm == "Linf":
            return ta.PGD(model, eps=eps, alpha=alpha, steps=p.steps, random_start=True)
        return ta.PGDL2(model, eps=eps, alpha=alpha, steps=p.steps, random_start=True)
    if name == "fgsm":
        return ta.FGSM(model, eps=eps)
    if name == "spsa":
        return ta.SPSA(model, eps=eps, delta=0.01, lr=0.01, nb_iter=p.spsa_iterations, nb_sample=p.spsa_samples,
                       max_batch_size=min(64, p.spsa_samples))
    if name == "square":
        return ta.Square(model, norm=norm, eps=eps, n_queries=p.square_queries, n_restarts=1, p_init=0.8,
                         loss="margin", resc_schedule=False, seed=seed)
    raise UsageError(f"unknown attack {name!r}. Valid choices: {', '.join(ATTACKS)}.")


class AttackZoo(Evaluator):
    """A named list of torchattacks attacks: per-attack and worst-case-per-example robust accuracy."""

    name = "attacks"
    namespace = "robust.attacks"
    contract_params = {"n_examples": 8, "steps": 2, "square_queries": 20, "spsa_iterations": 1,
                       "spsa_samples": 8, "eot_samples": 2}
    description = ("torchattacks zoo (CW-L2, DeepFool, FAB, EOT-PGD, SPSA, Square, APGD): per-attack and "
                   "worst-case robust accuracy + sanity flags")
    version = 1
    Params = AttackZooParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        ta = _torchattacks()
        p = self.params
        d = ctx.data
        n = min(p.n_examples, len(d.x_test))
        x, y = d.x_test[:n].contiguous(), d.y_test[:n].contiguous()
        norm, eps = ctx.threat.norm, ctx.threat.eps
        model = ctx.model.eval()
        res = EvalResult()
        if n < p.n_examples:
            res.warnings.append(f"attacks: only {n} test examples exist; evaluated {n}, not {p.n_examples}")
        checks = None
        if p.sanity:
            from .robust import model_checks

            checks, flags = model_checks(ctx, self.name)
            res.flags.extend(flags)
        clean_ok = predict(model, x, ctx.device).argmax(1) == y
        idx = torch.nonzero(clean_ok, as_tuple=False).flatten()
        robust: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        for name in p.attacks:
            kind, norms, min_norm = ATTACKS[name]
            if norm not in norms:
                info[name] = {"skipped": f"torchattacks implements {name} for {', '.join(norms)} only, not {norm}"}
                continue
            t0 = time.perf_counter()
            torch.manual_seed(ctx.seed)
            atk = build_attack(name, model, norm, eps, p, d.dataset.num_classes, ctx.seed)
            rob = torch.zeros(n, dtype=torch.bool)
            dists = []
            non_finite = 0
            for i in range(0, len(idx), p.batch_size):
                sel = idx[i:i + p.batch_size]
                xb, yb = x[sel].to(ctx.device), y[sel].to(ctx.device)
                adv = atk(xb, yb).detach()
                # an attack dividing by a zero gradient (DeepFool on a rounding model) returns NaN:
                # that is no adversarial example, the clean image stands
                bad = ~torch.isfinite(adv).flatten(1).all(1)
                non_finite += int(bad.sum())
                adv = torch.where(bad.view(-1, *([1] * (adv.dim() - 1))), xb, adv)
                x_adv = (xb + project(adv - xb, norm, eps)).clamp(0, 1)
                with torch.no_grad():
                    ok = model(x_adv).argmax(1) == yb
                    if min_norm:
                        fooled = model(adv).argmax(1) != yb
                        delta = (adv - xb)[fooled].flatten(1)
                        dists.append(delta.norm(p=2 if norm == "L2" else float("inf"), dim=1).cpu())
                rob[sel] = ok.cpu()
            robust[name] = rob
            info[name] = {"kind": kind, "class": f"torchattacks.{type(atk).__name__}", "seconds":
                          time.perf_counter() - t0, "settings": _settings(atk), "non_finite_outputs": non_finite}
            if min_norm:
                dd = torch.cat(dists) if dists else torch.empty(0)
                info[name]["found"] = int(dd.numel())
                info[name][f"median_{norm}_distance_found"] = float(dd.median()) if dd.numel() else None
            res.metrics[f"robust.attacks.{name}.accuracy"] = proportion(int(rob.sum()), n)
        worst = clean_ok.clone()
        for rob in robust.values():
            worst &= rob
        res.metrics["robust.attacks.worst_case.accuracy"] = proportion(int(worst.sum()), n)
        ctx.shared["robust.attacks"] = {"clean": clean_ok, "robust": dict(robust), "worst_case": worst, "n": n}
        res.metrics["robust.attacks.n"] = n
        sanity: dict[str, Any] = {"model": checks} if checks is not None else {}
        white = [a for a in robust if ATTACKS[a][0] == "white-box"]
        free = [a for a in robust if ATTACKS[a][0] == "gradient-free"]
        if p.sanity and white and free:
            white_rob = clean_ok.clone()
            for a in white:
                white_rob &= robust[a]
            broken_free = torch.zeros(n, dtype=torch.bool)
            for a in free:
                broken_free |= ~robust[a]
            ev, fl = S.check_gradient_free(int((white_rob & broken_free).sum()), int(white_rob.sum()), n,
                                           p.max_gradient_free_gain, attack=" / ".join(free), evaluator=self.name,
                                           whitebox=white)
            sanity["gradient_free_beats_whitebox"] = ev
            if fl:
                res.flags.append(fl)
        res.notes["robust.attacks"] = {
            "package": f"torchattacks {getattr(ta, '__version__', '?')}", "norm": norm, "eps": eps, "n_examples": n,
            "examples": f"the first {n} test examples", "attacks": info, "seed": ctx.seed,
            "worst_case": "robust = correct clean and after every attack of the list",
            "projection": "every output projected onto the threat model's ball and clipped to [0, 1]",
            "sanity": sanity,
        }
        res.flags = S.merge_flags([], res.flags)
        return res


def _settings(atk) -> dict[str, Any]:
    """The public numeric / string settings of a torchattacks object (for the notes)."""
    out = {}
    for k, v in vars(atk).items():
        if k.startswith("_") or k in ("model", "device", "attack", "model_name", "normalization_used",
                                      "supported_mode", "loss_fn"):
            continue
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
    return out
