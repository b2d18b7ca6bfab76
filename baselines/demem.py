"""DeMem (Luo & Li, "Privacy-Enhanced Robust Adversarial Learning via De-Memorization",
arXiv 2412.05767, MLSP 2025): a sample-wise, loss-based de-memorization penalty on the
high-risk (memorized) training samples only, added to an adversarial training method.

The paper's exact loss is not available to cfbench (only the abstract-level facts in
REFERENCES.md), so this is a **reconstruction**; every choice is stated here and in the
record (``notes.defense.demem.choices``) and argued in docs/demem.md.

    L = 1/B sum_i [ l_i + beta * m_i * max(0, b - l_i) ]

* ``l_i`` is the **base defense's own per-sample loss** (PGD-AT: CE on the PGD example;
  TRADES: CE(clean) + trades_beta * KL_i), from ``base.per_sample_loss`` with the base's own
  adversarial examples -- DeMem holds a base instance built by :func:`cfbench.defenses.base.compose` and adds only the
  penalty (``--set base=pgd-at|trades``; ``steps``, ``step_size``, ``trades_beta`` go to the
  base's Params).
* **Penalty: per-sample flooding** (Ishida et al. 2020, applied per sample as in iFlood, Xie
  et al. 2022) on the selected samples: below the flood level ``b`` the gradient of a selected
  sample's loss is scaled by ``1 - beta`` -- ``beta = 1`` stops the descent, ``beta = 2``
  (default) is exactly flooding ``|l - b| + b`` (ascent back to ``b``), ``beta = 0`` is the
  base defense bit for bit.  It stops the model from driving a memorized sample's loss
  towards zero, which is what loss-based membership inference (LiRA, RMIA) detects.
* **Flood level** ``b = flood``, default ``ln 2``: the cross-entropy at which the true class
  has probability 1/2, so a high-risk sample is never fitted with more than even confidence
  on the base's (adversarial) input.  ``flood=none`` takes instead the mean (detached) base
  loss of the batch's *low-risk* samples (a high-risk sample may not be fit better than a
  typical one); that was the first default, and on digits with PGD-AT it bound in only 0.6%
  of the updates (the typical loss falls to ~0.02), so it left PGD-AT nearly unchanged
  (docs/demem.md).
* **Risk score**, per training sample, from running losses tracked during training: at each
  step the batch's clean and adversarial (the base's PGD example) cross-entropies are
  computed with the model in eval mode under ``no_grad`` (no batch-norm update, no random
  draw: the training trajectory is untouched) and folded into exponential averages
  (momentum ``ema`` per visit, i.e. per epoch; the first visit sets the value).
  ``risk=loss``: the mean of the two running losses (samples that stay hard to fit are the
  atypical, memorization-prone ones).  ``risk=oracle``: ``OUT_i - running clean loss_i``, where
  ``OUT_i`` is the mean clean CE of sample i under the membership suite's reference models
  that did *not* train on it (the target fits it better than models that never saw it: the
  LiRA signal).  The oracle's reference models use the **base recipe** (no DeMem penalty),
  ``oracle_models`` of them with reference seed ``oracle_seed`` (default 0, the ``mia``
  evaluator's default), declared as training jobs (:func:`cfbench.execution.reference.reference_jobs`)
  and run by the run's executor -- the same cache as a base run's own
  membership evaluation, so after ``cfbench run --defense pgd-at`` they cost nothing.  They
  train on subsets of the whole pool (members and non-members): a stronger-than-realistic
  defender (it sees the population), stated in the record.
* **High-risk set**: re-selected at the start of every epoch from ``warmup`` on: the top
  ``fraction`` of the training set by risk, or every sample with risk >= ``threshold``.
  ``select=all`` applies the same penalty (same ``b``) to every sample (the paper's ablation:
  uniform treatment, as DP); ``select=random``: as many random samples as the high-risk set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from cfbench import params as P
from cfbench.attacks.pgd import STEP_SIZE_HELP
from cfbench.defenses.base import AdversarialDefense, Defense, compose
from cfbench.errors import UsageError
from cfbench.params import param

_TRADES_BETA = 6.0
_LOG = ("epoch", "high_risk", "penalty_set", "penalised_updates", "updates", "flood_sum", "batches")


@dataclass(frozen=True)
class DeMemParams:
    base: Literal["pgd-at", "trades"] = param("pgd-at", "adversarial training method the penalty is added to")
    beta: float = param(2.0, "penalty weight: 0 = the base defense, 1 = stop descent below b, 2 = flooding", ge=0)
    select: Literal["high-risk", "all", "random"] = param(
        "high-risk", "samples penalised: the high-risk set (DeMem), all (ablation), or as many random ones (control)")
    risk: Literal["loss", "oracle"] = param(
        "loss", "risk score: running clean+adversarial loss, or reference models' OUT loss - running clean loss")
    fraction: float = param(0.1, "high-risk set = this top fraction of the training set by risk", gt=0, le=1)
    threshold: float | None = param(None, "high-risk set = risk >= threshold instead of the top fraction")
    flood: float | None = param(math.log(2), "flood level b of the per-sample loss (ln 2: p_y <= 1/2); "
                                             "none = mean base loss of the batch's low-risk samples", ge=0)
    ema: float = param(0.9, "momentum of the per-sample running losses (one update per visit)", ge=0, lt=1)
    warmup: int = param(1, "epochs of plain base training before the first selection", ge=1)
    oracle_models: int = param(8, "risk=oracle: reference models (base recipe, oracle_seed)", ge=2)
    oracle_seed: int = param(0, "risk=oracle: reference seed of the oracle's models (the mia evaluator's default "
                                "reference_seed, so a base run's membership models are shared)")
    steps: int = param(10, "base: PGD steps of the inner maximisation", ge=1)
    step_size: float | None = param(None, "base: PGD " + STEP_SIZE_HELP, gt=0)
    trades_beta: float = param(_TRADES_BETA, "base=trades: TRADES' beta (KL weight)", ge=0)

    def validate(self) -> None:
        if self.base != "trades" and self.trades_beta != _TRADES_BETA:
            raise UsageError(f"trades_beta={self.trades_beta} applies only to base=trades, not base={self.base}.")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UsageError(f"threshold={self.threshold} must be a finite number (or none for the fraction rule).")


def reference_out_loss(models, in_mask: torch.Tensor, data, positions, device):
    """Mean clean CE of each training example (``positions`` in ``data``'s pool) over the
    reference ``models`` that did not train on it (``in_mask[i, n]``: model i trained on pool
    example n).  Returns ``(out_loss, out_models_per_example)``."""
    n_pool = len(data.pool_idx)
    x, y = data.x_pool, data.y_pool
    total, count = torch.zeros(n_pool, dtype=torch.float64), torch.zeros(n_pool)
    for i, model in enumerate(models):
        with torch.no_grad():
            loss = torch.cat([F.cross_entropy(model(xb.to(device)), yb.to(device), reduction="none").cpu()
                              for xb, yb in zip(x.split(512), y.split(512))])
        total += torch.where(in_mask[i], 0.0, loss.double())
        count += (~in_mask[i]).float()
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    if (count[pos] == 0).any():
        raise UsageError(f"risk=oracle: {int((count[pos] == 0).sum())} training examples are IN for all "
                         f"{len(models)} reference models; raise oracle_models or use member_fraction=0.5.")
    return (total[pos] / count[pos]).float(), count[pos]


class DeMem(Defense):
    """Luo & Li (2024): adversarial training + de-memorization penalty on high-risk samples only."""

    name = "demem"
    description = "DeMem (Luo & Li 2024): AT (pgd-at/trades) + per-sample flooding of high-risk samples only"
    version = 1
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

    # -- training ------------------------------------------------------------------------
    def fit(self, model, x, y, ctx) -> None:
        from cfbench.training.loop import train

        p, n, dev = self.params, len(x), ctx.device
        self._n, self._log = n, []
        self._ema = torch.zeros(2, n, device=dev)            # running clean, adversarial CE
        self._seen = torch.zeros(n, dtype=torch.bool, device=dev)
        self._top = self._mask = torch.zeros(n, dtype=torch.bool, device=dev)
        self._out, oracle = None, None
        if p.risk == "oracle":
            if ctx.config is None or ctx.data is None or ctx.pool_positions is None or ctx.cache_dir is None \
                    or ctx.run_jobs is None:
                raise UsageError("demem risk=oracle needs the run's membership reference models: fit it through "
                                 "`cfbench run` (cfbench.training.recipe.fit_recipe with an executor), or use risk=loss.")
            from cfbench.execution import reference as XR
            from cfbench.mia.reference import reference_in_mask

            base_cfg = ctx.config.with_defense(p.base, self.base.params)
            jobs = XR.reference_jobs(base_cfg, ctx.data, p.oracle_models, ctx.cache_dir, seed=p.oracle_seed)
            trained = sum(not j.path.exists() for j in jobs)
            paths = ctx.run_jobs(jobs)
            models = (XR.load_reference(base_cfg, ctx.data, path, dev) for path in paths)
            in_mask = torch.from_numpy(reference_in_mask(len(ctx.data.pool_idx), int(ctx.data.member_mask.sum()),
                                                         p.oracle_models, p.oracle_seed))
            out, count = reference_out_loss(models, in_mask, ctx.data, ctx.pool_positions, dev)
            oracle = {"recipe_hash": jobs[0].meta["recipe_hash"], "models": p.oracle_models,
                      "reference_seed": p.oracle_seed, "trained_now": trained,
                      "out_models_per_example_min": int(count.min())}
            self._out = out.to(dev)
        if ctx.train.epochs is not None and p.warmup >= ctx.train.epochs:
            ctx.warnings.append(f"demem: warmup={p.warmup} >= epochs={ctx.train.epochs}: no penalty was applied")
        train(model, x, y, ctx, self.loss, state=self)
        self._record(ctx, oracle)

    @torch.no_grad()
    def _track(self, model, x, x_adv, y, idx) -> None:
        was = model.training
        model.eval()
        try:
            loss = F.cross_entropy(model(torch.cat([x, x_adv])), torch.cat([y, y]), reduction="none")
        finally:
            model.train(was)
        new = loss.view(2, -1)
        old = self._ema[:, idx]
        m = self.params.ema
        self._ema[:, idx] = torch.where(self._seen[idx], m * old + (1 - m) * new, new)
        self._seen[idx] = True

    def risk_scores(self) -> torch.Tensor:
        """Current risk score of every training sample (-inf where not yet seen)."""
        clean, adv = self._ema
        r = self._out - clean if self._out is not None else 0.5 * (clean + adv)
        return torch.where(self._seen, r, torch.full_like(r, -math.inf))

    def on_epoch_start(self, model, epoch, ctx) -> None:
        self.base.on_epoch_start(model, epoch, ctx)
        p, n = self.params, self._n
        top = torch.zeros_like(self._seen)
        active = epoch >= p.warmup and bool(self._seen.any())
        if active:
            r = self.risk_scores()
            if p.threshold is not None:
                top = self._seen & (r >= p.threshold)
            else:
                top[torch.topk(r, min(math.ceil(p.fraction * n), int(self._seen.sum()))).indices] = True
        mask = top
        if p.select == "all":
            mask = torch.full_like(top, active)
        elif p.select == "random":
            g = torch.Generator().manual_seed(ctx.seed * 100_003 + epoch + 0x5EED)
            mask = torch.zeros_like(top)
            mask[torch.randperm(n, generator=g)[:int(top.sum())].to(mask.device)] = True
        self._top, self._mask = top, mask
        self._log.append([epoch, int(top.sum()), int(mask.sum()), 0, 0, 0.0, 0])

    def loss(self, model, x, y, batch):
        p = self.params
        x_adv = self.base.adversarial(model, x, y, batch)
        idx = batch.indices.to(self._seen.device)
        self._track(model, x, x_adv, y, idx)
        per, logits = self.base.per_sample_loss(model, x, y, batch, x_adv=x_adv)
        mask, typical, d = self._mask[idx], ~self._top[idx], per.detach()
        b = p.flood if p.flood is not None else (d[typical].mean() if typical.any() else d.mean())
        total = per.mean() + p.beta * (mask * F.relu(b - per)).mean()
        row = self._log[-1]
        row[3] += int((mask & (d < b)).sum())
        row[4] += len(idx)
        row[5] += float(b)
        row[6] += 1
        return total, logits

    # -- state and record ----------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"ema": self._ema, "seen": self._seen.to(torch.uint8),
             "log": torch.tensor(self._log, dtype=torch.float64).reshape(-1, len(_LOG))}
        t.update({f"base.{k}": v for k, v in self.base.state_tensors().items()})
        return t

    def load_state_tensors(self, tensors) -> None:
        dev = self._seen.device
        self._ema, self._seen = tensors["ema"].to(dev), tensors["seen"].to(dev).bool()
        self._log = [[int(v) for v in r[:5]] + [float(r[5]), int(r[6])] for r in tensors["log"].tolist()]
        self.base.load_state_tensors({k[5:]: v for k, v in tensors.items() if k.startswith("base.")})

    def _record(self, ctx, oracle) -> None:
        p, n = self.params, self._n
        rows = [dict(zip(_LOG, r)) for r in self._log]
        for r in rows:
            r["mean_flood_level"] = r.pop("flood_sum") / max(r.pop("batches"), 1)
        on = [r for r in rows if r["epoch"] >= p.warmup]
        last = rows[-1] if rows else {"high_risk": 0, "penalty_set": 0}
        ctx.metrics.update({
            "demem.high_risk_fraction": last["high_risk"] / n, "demem.penalty_set_fraction": last["penalty_set"] / n,
            "demem.penalised_fraction": (sum(r["penalised_updates"] for r in on) /
                                         max(sum(r["updates"] for r in on), 1)),
        })
        ctx.notes["demem"] = {
            "reconstruction": "paper's loss unavailable; see the cfbench_baselines.demem docstring and docs/demem.md",
            "choices": {
                "loss": "mean_i [l_i + beta * m_i * relu(b - l_i)], l_i = base.per_sample_loss (per-sample flooding)",
                "flood_level": (f"fixed {p.flood}" if p.flood is not None
                                else "mean detached base loss of the batch's low-risk samples"),
                "risk": ("OUT_i - EMA clean CE_i; OUT_i = mean clean CE over base-recipe reference models without i "
                         "(trained on the pool incl. non-members)" if p.risk == "oracle"
                         else "mean of the EMAs of clean and adversarial CE (eval mode, in-batch, augmented inputs)"),
                "selection": (f"risk >= {p.threshold}" if p.threshold is not None else f"top {p.fraction} by risk")
                + f", re-selected every epoch from epoch {p.warmup}; penalty on: {p.select}",
            },
            "base": {"name": p.base, "params": P.to_dict(self.base.params)},
            "oracle": oracle, "epochs": rows,
        }
