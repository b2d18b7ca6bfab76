"""DeMem (Luo & Li, "Privacy-Enhanced Robust Adversarial Learning via De-Memorization",
arXiv 2412.05767, MLSP 2025): a sample-wise, loss-based de-memorisation penalty on the
high-risk training samples only, added to an adversarial training method.

The paper's exact loss is not available to cfbench; its abstract is the spec: DP hurts the
low-risk, *typical* samples; DeMem applies a **sample-wise, loss-based de-memorisation
penalty** to the **high-risk samples, identified through memorisation** (atypical samples
that the model learns by heart *late in training*); PGD-AT on CIFAR-10: about 8% lower
leakage at strict FPR with no loss of natural or robust accuracy.  This is a reconstruction;
every choice is stated here, in the record (``notes.defense.demem.choices``) and in
docs/demem.md.

    L = 1/B sum_i [ l_i + beta_i * m_i * max(0, b_i - l_i) ]

* ``l_i`` is the **base defense's own per-sample loss** (PGD-AT: CE on its PGD example;
  TRADES: CE(clean) + trades_beta * KL_i), from ``base.per_sample_loss`` with the base's own
  adversarial examples; ``beta = 0`` is the base bit for bit.
* **Who (m_i), frozen after warm-up.**  The first ``warmup`` epochs (default: a quarter of the
  schedule, at least 1) are plain base training.  At the start of epoch ``warmup`` the
  high-risk set S is chosen once -- the top ``fraction`` by risk (or risk >= ``threshold``) --
  and kept to the end.  Why frozen: version 1 re-selected every epoch by the *current*
  running loss, so the set was always the samples the model was *failing* to fit, whose loss
  is above any level -- the penalty could not act on them (0.6-3.3% of updates penalised).
  The score must survive fitting: it is taken **before** the samples are fitted.

  - ``risk=loss`` (default, a realistic defender): the running base loss at the end of
    warm-up -- an exponential average (momentum ``ema`` per visit, one visit per epoch; the
    first visit sets it) of ``l_i`` itself (detached, as trained: no extra forward pass, no
    random draw, the trajectory is untouched).  Samples still hard after warm-up, when the
    typical ones are fitted, are the atypical ones a network can only learn late, by heart.
  - ``risk=oracle``: the **memorisation score** of Feldman & Zhang (2020) in loss form,
    ``OUT_i - IN_i``: the mean base loss of sample i under the membership suite's reference
    models that did *not* train on it minus the mean under those that did.  The reference
    models use the **base recipe** (no penalty), ``oracle_models`` of them with reference
    seed ``oracle_seed`` (the ``mia`` evaluator's default 0: a base run's reference models are
    reused from the cache), declared as training jobs.  It does not depend on the target's
    trajectory at all.  They trained on halves of the pool, members *and* non-members: a
    stronger-than-realistic defender (stated in the record).

* **When (b_i): a per-sample level.**  The penalty is active whenever a selected sample's loss
  falls below its own level ``b_i``: below it the sample's gradient is scaled by ``1 -
  beta_i`` (``beta = 2``, the default, is per-sample flooding ``|l - b| + b``, Ishida et al.
  2020 / iFlood, Xie et al. 2022: ascent back to the level).

  - ``level=warmup`` (default): ``b_i = level_scale x`` the sample's running loss at the end
    of warm-up -- the loss it had before the model started memorising it, a proxy for the
    loss of a model that never saw it (an atypical sample is one such models get wrong).
  - ``level=out``: ``b_i = level_scale x OUT_i`` -- exactly "no better fitted than by a model
    that did not train on it" (needs the oracle's reference models).
  - a number: one level for every selected sample (version 1's ``flood``).

* **Controls with matched prescribed mass** (``select``).  Every variant computes the same S
  and levels b_S (the warm-up trajectory is the same bit for bit: no penalty acts before it
  ends).  Mass = sum over penalised samples of ``beta_i``, with the level distribution:
  ``select=random``: |S| samples drawn at random (seeded by the run seed), the levels b_S
  assigned to them by a random bijection, the same ``beta`` -- same count, same levels, same
  total weight; ``select=all``: every sample, each given a level of b_S (b_S tiled over a
  random permutation), with ``beta_i = beta |S| / N`` -- the same total weight ``beta |S|``
  and the same level distribution spread over everyone (the paper's contrast: uniform
  treatment, as DP).  What is *realised* (how often and how far samples fall below their
  levels) depends on which samples carry the levels, so every record carries, per epoch, the
  **activity** (fraction of the penalised set's sample-updates in which the penalty was
  active) and the realised **mass** (sum of ``beta_i * max(0, b_i - l_i)`` over the epoch's
  updates, per training sample).

State: the running losses, the frozen set and levels and the per-epoch log are defense state
(``state_tensors``), so a resumed training continues bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cfbench import params as P
from cfbench.attacks.pgd import STEP_SIZE_HELP
from cfbench.defenses.base import AdversarialDefense, Batch, Defense, compose
from cfbench.errors import UsageError
from cfbench.params import param

_TRADES_BETA = 6.0
#: per-epoch log columns (state tensor ``log``)
_LOG = ("epoch", "penalty_set", "set_updates", "penalised_updates", "mass_sum", "level_sum", "updates")


@dataclass(frozen=True)
class DeMemParams:
    base: Literal["pgd-at", "trades"] = param("pgd-at", "adversarial training method the penalty is added to")
    beta: float = param(2.0, "penalty weight: 0 = the base defense, 1 = stop descent below b_i, 2 = flooding", ge=0)
    select: Literal["high-risk", "all", "random"] = param(
        "high-risk", "penalised samples: the high-risk set (DeMem), or the matched-mass controls: as many "
                     "random samples with the same levels (random), every sample with beta |S|/N (all)")
    risk: Literal["loss", "oracle"] = param(
        "loss", "risk score, frozen after warm-up: running base loss at the end of warm-up (loss), or the "
                "reference models' OUT - IN base loss (oracle, Feldman-Zhang memorisation)")
    fraction: float = param(0.1, "high-risk set = this top fraction of the training set by risk", gt=0, le=1)
    threshold: float | None = param(None, "high-risk set = risk >= threshold instead of the top fraction")
    level: float | Literal["warmup", "out"] = param(
        "warmup", "per-sample level b_i below which the penalty acts: warmup = the sample's running loss at "
                  "the end of warm-up, out = its reference models' OUT loss (each x level_scale), or one number")
    level_scale: float = param(1.0, "multiplies the warmup / out levels", gt=0)
    ema: float = param(0.5, "momentum of the per-sample running losses (one update per visit)", ge=0, lt=1)
    warmup: int | None = param(None, "epochs of plain base training before the set is frozen (default: a "
                                     "quarter of the epochs, at least 1)", ge=1)
    oracle_models: int = param(8, "risk=oracle / level=out: reference models (base recipe, oracle_seed)", ge=2)
    oracle_seed: int = param(0, "risk=oracle / level=out: reference seed of the oracle's models (the mia "
                                "evaluator's default reference_seed, so a base run's models are shared)")
    steps: int = param(10, "base: PGD steps of the inner maximisation", ge=1)
    step_size: float | None = param(None, "base: PGD " + STEP_SIZE_HELP, gt=0)
    trades_beta: float = param(_TRADES_BETA, "base=trades: TRADES' beta (KL weight)", ge=0)

    def validate(self) -> None:
        if self.base != "trades" and self.trades_beta != _TRADES_BETA:
            raise UsageError(f"trades_beta={self.trades_beta} applies only to base=trades, not base={self.base}.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UsageError(f"threshold={self.threshold} must be a finite number (or none for the fraction rule).")
        if isinstance(self.level, float) and not (math.isfinite(self.level) and self.level >= 0):
            raise UsageError(f"level={self.level} must be a finite number >= 0, or one of: warmup, out.")

    @property
    def needs_references(self) -> bool:
        return self.risk == "oracle" or self.level == "out"


def warmup_epochs(p: DeMemParams, epochs: int | None) -> int:
    """The warm-up length: ``warmup``, or a quarter of ``epochs`` (at least 1)."""
    if p.warmup is not None:
        return p.warmup
    return max(1, math.ceil(0.25 * epochs)) if epochs else 1


@torch.no_grad()
def _base_losses(base: AdversarialDefense, model, x, y, ctx, seed: int) -> torch.Tensor:
    """The base's per-sample loss of every (x, y) under ``model`` (eval mode), its adversarial
    examples drawn under a forked RNG seeded with ``seed`` (the caller's RNG is untouched)."""
    out = []
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in range(0, len(x), 256):
            xb, yb = x[s:s + 256].to(ctx.device), y[s:s + 256].to(ctx.device)
            batch = Batch(0, 0, torch.arange(s, s + len(xb)), ctx)
            with torch.enable_grad():
                x_adv = base.adversarial(model, xb, yb, batch)
            per, _ = base.per_sample_loss(model, xb, yb, batch, x_adv=x_adv)
            out.append(per.detach().float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def in_out_losses(losses: torch.Tensor, in_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss of each example over the models that trained on it (IN) and that did not (OUT);
    ``losses[i, n]``, ``in_mask[i, n]``: model i trained on example n.  Raises where a side is empty."""
    inn, out = in_mask.float(), (~in_mask).float()
    if (inn.sum(0) == 0).any() or (out.sum(0) == 0).any():
        bad = int(((inn.sum(0) == 0) | (out.sum(0) == 0)).sum())
        raise UsageError(f"demem oracle: {bad} training examples are IN for all or for none of the reference "
                         "models; raise oracle_models (>= 2, paired) or use member_fraction=0.5.")
    return (losses * inn).sum(0) / inn.sum(0), (losses * out).sum(0) / out.sum(0)


class DeMem(Defense):
    """Luo & Li (2024): adversarial training + de-memorisation penalty on high-risk samples only."""

    name = "demem"
    description = ("DeMem (Luo & Li 2024): AT (pgd-at/trades) + per-sample flooding of a high-risk set frozen "
                   "after warm-up, at per-sample levels")
    version = 2
    family = "privacy"
    Params = DeMemParams
    contract_params = {"steps": 2}

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        values = {"steps": p.steps, "step_size": p.step_size}
        if p.base == "trades":
            values["beta"] = p.trades_beta
        self.base = compose(p.base, values, require=AdversarialDefense)

    # -- the oracle's reference models -------------------------------------------------------------
    def _references(self, x, y, ctx):
        p = self.params
        if ctx.config is None or ctx.data is None or ctx.pool_positions is None or ctx.cache_dir is None \
                or ctx.run_jobs is None:
            raise UsageError("demem risk=oracle / level=out needs the run's membership reference models: fit it "
                             "through `cfbench run` (cfbench.training.recipe.fit_recipe with an executor), or use "
                             "risk=loss with level=warmup.")
        from cfbench.execution import reference as XR
        from cfbench.mia.reference import reference_in_mask

        base_cfg = ctx.config.with_defense(p.base, self.base.params)
        jobs = XR.reference_jobs(base_cfg, ctx.data, p.oracle_models, ctx.cache_dir, seed=p.oracle_seed)
        trained = sum(not j.path.exists() for j in jobs)
        paths = ctx.run_jobs(jobs)
        losses = torch.stack([_base_losses(self.base, XR.load_reference(base_cfg, ctx.data, path, ctx.device),
                                           x, y, ctx, seed=1000 + i) for i, path in enumerate(paths)])
        pool_in = reference_in_mask(len(ctx.data.pool_idx), int(ctx.data.member_mask.sum()), p.oracle_models,
                                    p.oracle_seed)
        in_mask = torch.from_numpy(pool_in[:, np.asarray(ctx.pool_positions)])
        inn, out = in_out_losses(losses, in_mask)
        info = {"recipe_hash": jobs[0].meta["recipe_hash"], "models": p.oracle_models,
                "reference_seed": p.oracle_seed, "trained_now": trained,
                "in_models_per_example_min": int(in_mask.sum(0).min()),
                "out_models_per_example_min": int((~in_mask).sum(0).min()),
                "note": "reference models trained on halves of the pool (members and non-members): a "
                        "stronger-than-realistic defender"}
        return inn, out, info

    # -- training ------------------------------------------------------------------------------------
    def fit(self, model, x, y, ctx) -> None:
        from cfbench.training.loop import train

        p, n, dev = self.params, len(x), ctx.device
        self._n, self._log = n, []
        self._warmup = warmup_epochs(p, ctx.train.epochs)
        self._ema = torch.zeros(n, device=dev)
        self._seen = torch.zeros(n, dtype=torch.bool, device=dev)
        self._top = torch.zeros(n, dtype=torch.bool, device=dev)       # the frozen high-risk set S
        self._mask = torch.zeros(n, dtype=torch.bool, device=dev)      # the penalised set
        self._level = torch.zeros(n, device=dev)                       # b_i of the penalised samples
        self._weight = torch.zeros(n, device=dev)                      # beta_i of the penalised samples
        self._frozen = torch.zeros((), dtype=torch.bool)
        self._in = self._out = None
        oracle = None
        if p.needs_references:
            self._in, self._out, oracle = self._references(x, y, ctx)
            self._in, self._out = self._in.to(dev), self._out.to(dev)
        if ctx.train.epochs is not None and self._warmup >= ctx.train.epochs:
            ctx.warnings.append(f"demem: warmup={self._warmup} >= epochs={ctx.train.epochs}: no penalty was applied")
        train(model, x, y, ctx, self.loss, state=self)
        self._record(ctx, oracle)

    def risk_scores(self) -> torch.Tensor:
        """The risk score of every training sample now (frozen into S at the end of warm-up)."""
        if self.params.risk == "oracle":
            return self._out - self._in
        return torch.where(self._seen, self._ema, torch.full_like(self._ema, -math.inf))

    def levels(self) -> torch.Tensor:
        """b_i for every training sample by the ``level`` rule (before assignment to the penalised set)."""
        p = self.params
        if p.level == "warmup":
            return p.level_scale * self._ema
        if p.level == "out":
            return p.level_scale * self._out
        return torch.full_like(self._ema, float(p.level))

    def _freeze(self, ctx) -> None:
        p, n = self.params, self._n
        r = self.risk_scores()
        top = torch.zeros_like(self._seen)
        if p.threshold is not None:
            top = torch.isfinite(r) & (r >= p.threshold)
        else:
            k = min(math.ceil(p.fraction * n), int(torch.isfinite(r).sum()))
            top[torch.topk(r, k).indices] = True
        b_all = self.levels()
        sel = torch.nonzero(top).flatten()
        b_sel = b_all[sel]
        g = torch.Generator().manual_seed(ctx.seed * 100_003 + 0x5EED)
        mask, level, weight = torch.zeros_like(top), torch.zeros_like(self._level), torch.zeros_like(self._weight)
        if p.select == "high-risk":
            mask, level[sel], weight[sel] = top, b_sel, p.beta
        elif p.select == "random":
            chosen = torch.randperm(n, generator=g)[:len(sel)].to(top.device)
            mask[chosen] = True
            level[chosen] = b_sel[torch.randperm(len(sel), generator=g).to(top.device)]
            weight[chosen] = p.beta
        elif len(sel):                                             # all: every sample, levels of S tiled
            mask[:] = True
            tiled = b_sel[torch.randperm(len(sel), generator=g).to(top.device)].repeat(math.ceil(n / len(sel)))[:n]
            level[:] = tiled[torch.randperm(n, generator=g).to(top.device)]
            weight[:] = p.beta * len(sel) / n
        self._top, self._mask, self._level, self._weight = top, mask, level, weight
        self._frozen = torch.ones((), dtype=torch.bool)

    def on_epoch_start(self, model, epoch, ctx) -> None:
        self.base.on_epoch_start(model, epoch, ctx)
        if epoch >= self._warmup and not bool(self._frozen):
            self._freeze(ctx)
        self._log.append([epoch, int(self._mask.sum()), 0, 0, 0.0, 0.0, 0])

    def loss(self, model, x, y, batch):
        x_adv = self.base.adversarial(model, x, y, batch)
        per, logits = self.base.per_sample_loss(model, x, y, batch, x_adv=x_adv)
        idx = batch.indices.to(self._seen.device)
        d = per.detach()
        if not bool(self._frozen):                                 # warm-up: track the running loss
            m = self.params.ema
            self._ema[idx] = torch.where(self._seen[idx], m * self._ema[idx] + (1 - m) * d, d)
            self._seen[idx] = True
            return per.mean(), logits
        mask, b, w = self._mask[idx], self._level[idx], self._weight[idx]
        hinge = mask * torch.relu(b - per)
        total = per.mean() + (w * hinge).mean()
        row = self._log[-1]
        row[2] += int(mask.sum())
        row[3] += int((mask & (d < b)).sum())
        row[4] += float((w * hinge.detach()).sum())
        row[5] += float((b * mask).sum())
        row[6] += len(idx)
        return total, logits

    # -- state and record ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"ema": self._ema, "seen": self._seen.to(torch.uint8), "top": self._top.to(torch.uint8),
             "mask": self._mask.to(torch.uint8), "level": self._level, "weight": self._weight,
             "frozen": self._frozen.to(torch.uint8).reshape(1),
             "log": torch.tensor(self._log, dtype=torch.float64).reshape(-1, len(_LOG))}
        t.update({f"base.{k}": v for k, v in self.base.state_tensors().items()})
        return t

    def load_state_tensors(self, tensors) -> None:
        dev = self._seen.device
        self._ema, self._seen = tensors["ema"].to(dev), tensors["seen"].to(dev).bool()
        self._top, self._mask = tensors["top"].to(dev).bool(), tensors["mask"].to(dev).bool()
        self._level, self._weight = tensors["level"].to(dev), tensors["weight"].to(dev)
        self._frozen = tensors["frozen"].bool().reshape(())
        self._log = [[int(v) for v in r[:4]] + [float(r[4]), float(r[5]), int(r[6])] for r in tensors["log"].tolist()]
        self.base.load_state_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("base.")})

    def _record(self, ctx, oracle) -> None:
        p, n = self.params, self._n
        rows = []
        for r in self._log:
            row = dict(zip(_LOG, r))
            su = row["set_updates"]
            row["activity"] = row["penalised_updates"] / su if su else None
            row["mass_per_sample"] = row.pop("mass_sum") / n
            row["mean_level"] = row.pop("level_sum") / su if su else None
            rows.append(row)
        on = [r for r in rows if r["epoch"] >= self._warmup]
        su = sum(r["set_updates"] for r in on)
        sel = torch.nonzero(self._top).flatten().cpu()
        pen = torch.nonzero(self._mask).flatten().cpu()
        ctx.metrics.update({
            "demem.high_risk_fraction": len(sel) / n,
            "demem.penalty_set_fraction": len(pen) / n,
            "demem.penalty_activity": sum(r["penalised_updates"] for r in on) / su if su else 0.0,
            "demem.penalty_mass": sum(r["mass_per_sample"] for r in on),
            "demem.prescribed_weight": float(self._weight.sum()) / n,
            "demem.mean_level": float(self._level[self._mask].mean()) if len(pen) else None,
        })
        pos = None if ctx.pool_positions is None else np.asarray(ctx.pool_positions)
        ctx.notes["demem"] = {
            "reconstruction": "paper's loss unavailable; see the cfbench_baselines.demem docstring and docs/demem.md",
            "choices": {
                "loss": "mean_i [l_i + beta_i * m_i * relu(b_i - l_i)], l_i = base.per_sample_loss (per-sample flooding)",
                "selection": ((f"risk >= {p.threshold}" if p.threshold is not None else f"top {p.fraction} by risk")
                              + f", frozen at the start of epoch {self._warmup} (0-based) to the end"),
                "risk": ("OUT_i - IN_i: mean base loss over base-recipe reference models without / with i "
                         "(Feldman-Zhang memorisation; models trained on the pool incl. non-members)"
                         if p.risk == "oracle" else
                         f"running base loss at the end of warm-up (EMA {p.ema} per visit, detached, as trained)"),
                "level": (f"{p.level_scale} x running base loss at the end of warm-up" if p.level == "warmup" else
                          f"{p.level_scale} x reference models' OUT base loss" if p.level == "out" else
                          f"fixed {p.level}"),
                "penalised": {"high-risk": "the high-risk set S, its own levels, beta",
                              "random": "|S| random samples, the levels of S by a random bijection, beta "
                                        "(matched: count, level distribution, total weight beta |S|)",
                              "all": "every sample, the levels of S tiled at random, beta |S| / N "
                                     "(matched: level distribution, total weight beta |S|)"}[p.select],
            },
            "warmup_epochs": self._warmup,
            "base": {"name": p.base, "params": P.to_dict(self.base.params)},
            "oracle": oracle, "epochs": rows,
            "high_risk_train_index": sel.tolist(),
            "high_risk_pool_positions": None if pos is None else pos[sel.numpy()].tolist(),
            "penalised_pool_positions": None if pos is None else pos[pen.numpy()].tolist(),
        }
