"""Counterfactual quality (evaluator ``counterfactual``): the same instances explained by each
generator -- ``ace`` (Jeanneret et al. 2023), ``proto-cf`` (Van Looveren & Klaise 2021) and
``pgd``, a plain unbounded PGD baseline (ACE's attack with no DDPM filter and no refinement:
the reference code's ``attack_joint=False``) -- and measured with one set of metrics.

Instances.  The first ``n_examples`` images of the test split (its first half: the second half
trains the DDPM and the feature classifier below, so neither has seen an explained image), each
explained towards the target model's **runner-up class** t (its second-highest logit; the
closest class to flip to) away from its predicted class c.

Generators.  ``ace`` with its defaults (tau = 0.1 of 50 respaced steps of the dataset's
500-step DDPM, 50 sign steps of 1/255, lambda1 re-tuned for small images, mask threshold
0.15; ``ace_*`` settings override) -- the DDPM must have been trained with
``cfbench ddpm train --dataset D --out <out>``; ``proto-cf`` with its defaults, fitted on the
run's members (the model owner's explainer, as in ``cf-at``); ``pgd``: the ACE PGD with the
same steps and L1 weight on the bare classifier.

Metrics, per generator g (``counterfactual.<g>.*``), over all n instances:

* ``flip_rate``: fraction with ``argmax C(x_cf) == t`` (Clopper-Pearson interval) -- validity;
* ``l1`` (pixel sum of |x_cf - x|), ``l2``, ``linf``: per-instance distances, averaged;
* ``sparsity``: fraction of pixel values left unchanged (|x_cf - x| <= ``sparsity_tol``, default
  half an 8-bit grey level), averaged;
* ``fd``: plausibility, the Fréchet distance between the counterfactuals and the explained
  originals (ACE's FID protocol: CFs against the real images they come from) in the
  penultimate-layer feature space of a **feature classifier trained here**: the dataset's
  default model (``cnn8`` on digits, ``cnn28`` on (Fashion-)MNIST) with ``erm`` at the run's
  training recipe, seed 0, on the second half of the test split (the DDPM's data) -- no
  downloaded Inception.  Computed by torchmetrics' ``FrechetInceptionDistance`` with that
  feature extractor.  ``counterfactual.reference.fd`` is the same distance between the originals
  and as many other real images (the feature classifier's own training images): the
  estimator's floor at this n (small n biases every FD upwards);
* ``cout``: COUT (Khorram & Fuxin 2022, the ACE code's ``eval_utils/cout_metrics.py``),
  generalised to any channel count: pixels ordered by ``sum_c |x_cf - x|`` (descending;
  stable, so ties keep raster order), inserted from x_cf into x in chunks of
  ``max(1, HW // 50)``; COUT = AUC of p_t minus AUC of p_c along the insertion curve (target
  model's softmax), trapezoidal over the inserted fraction; in [-1, 1], higher is better.
  (The reference code's AUC assumes equal chunks; both agree when the chunk divides HW, e.g.
  every 8x8 image.)
* intervals: ``l1``, ``l2``, ``linf``, ``sparsity`` and ``cout`` are means with a Student-t
  95% interval over the instances; ``fd`` carries a percentile-bootstrap interval
  (``fd_bootstrap`` resamples of the instances, the same ones on both sides; float64 features,
  scipy's ``sqrtm``);
* paired differences on the same instances, ``<a>.<metric>_minus_<b>`` (Student-t intervals of
  the per-instance differences of L1, L2, Linf, sparsity): ``ace``, ``ace.pre`` and
  ``proto-cf`` minus ``pgd``, and ``ace`` minus ``ace_pre`` (what the refinement changes);
* ``seconds``; and for ``ace`` also ``ace.pre.*`` (flip rate, L1, FD of the pre-explanation,
  before refinement) and ``ace.mask_fraction`` (per-instance fraction of pixels regenerated, averaged).

``counterfactual.feature_classifier.accuracy``: the feature classifier on the explained
originals; ``counterfactual.n``.  Example images: ``counterfactual-<g>`` (clean = x, adv =
x_cf, y = t) in ``examples.safetensors``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..attacks.ace import ACE, ACEParams, ddpm_split
from ..attacks.proto_cf import ProtoCF, ProtoCFParams, data_fingerprint
from ..errors import UsageError
from ..hashing import canonical_hash
from ..params import check_value, param, to_dict
from ..store.io import load_tensors, save_tensors_atomic
from .base import EvalContext, EvalResult, Evaluator, predict, proportion
from .interpretation import t_interval

GENERATORS = ("ace", "proto-cf", "pgd")
_A, _P = ACEParams(), ProtoCFParams()


@dataclass(frozen=True)
class CounterfactualParams:
    generators: tuple[str, ...] = param(GENERATORS, "counterfactual generators to compare (comma-separated): "
                                                    "ace, proto-cf, pgd")
    n_examples: int = param(100, "instances explained: the first n of the test split (at most its first half)", ge=2)
    ace_iterations: int = param(_A.iterations, "PGD iterations of ace and pgd", ge=1)
    ace_step: float = param(_A.step, "PGD sign-step size of ace and pgd (ACE: 1/255)", gt=0)
    ace_lambda1: float = param(_A.lambda1, "L1 weight of ace and pgd", ge=0)
    ace_tau: float = param(_A.tau, "ace: fraction of the respaced steps in the filter", gt=0, le=1)
    ace_inpaint: float = param(_A.inpaint, "ace: refinement mask threshold (0: no refinement)", ge=0, le=1)
    ace_ddpm: str = param(_A.ddpm, "ace: DDPM file, or 'default' (trained by `cfbench ddpm train`)")
    ace_batch_size: int = param(_A.batch_size, "ace / pgd: instances optimised together", ge=1)
    proto_steps: int = param(_P.steps, "proto-cf: FISTA iterations per round", ge=1)
    proto_c_steps: int = param(_P.c_steps, "proto-cf: rounds of the c search", ge=1)
    proto_ae_epochs: int = param(_P.ae_epochs, "proto-cf: autoencoder epochs", ge=1)
    sparsity_tol: float = param(0.5 / 255, "a pixel counts as changed when |x_cf - x| exceeds this", ge=0)
    n_images: int = param(8, "example images per generator in the report", ge=0)
    fd_bootstrap: int = param(200, "bootstrap resamples of the Frechet-distance interval (0: none)", ge=0)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name), f"counterfactual.{f.name}")
        bad = [g for g in self.generators if g not in GENERATORS]
        if bad or not self.generators:
            raise UsageError(f"counterfactual.generators: {bad[0] if bad else '(empty)'!r} is not a generator. "
                             f"Valid choices: {', '.join(GENERATORS)} (comma-separated).")


# -- metrics (pure functions) ---------------------------------------------------------------

class PenultimateFeatures(nn.Module):
    """The input of a classifier's last ``nn.Linear`` (its penultimate activations)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UsageError(f"{type(model).__name__} has no nn.Linear layer to take features from.")
        self.model, self.last = model, linears[-1]
        self.num_features = self.last.in_features

    def forward(self, x):
        out: list[torch.Tensor] = []
        h = self.last.register_forward_hook(lambda m, i, o: out.append(i[0].flatten(1)))
        try:
            self.model(x)
        finally:
            h.remove()
        return out[0]


def frechet_distance(features: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``features`` of two image sets (torchmetrics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=features, normalize=True, input_img_size=tuple(real.shape[1:]))
    with torch.no_grad():
        for i in range(0, len(real), 256):
            fid.update(real[i:i + 256], real=True)
        for i in range(0, len(fake), 256):
            fid.update(fake[i:i + 256], real=False)
        return float(fid.compute())


def _fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(mu @ mu + np.trace(s1 + s2 - 2 * np.real(covmean)))


@torch.no_grad()
def fd_bootstrap(features: nn.Module, real: torch.Tensor, fake: torch.Tensor, n_boot: int = 200, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile-bootstrap interval of the Fréchet distance between paired sets (``fake[i]`` is
    the counterfactual of ``real[i]``): the same instances resampled on both sides, float64
    features, scipy's ``sqrtm``.  (None, None) for ``n_boot = 0``."""
    if n_boot == 0:
        return None, None
    fr = torch.cat([features(real[i:i + 256]) for i in range(0, len(real), 256)]).double().cpu().numpy()
    ff = torch.cat([features(fake[i:i + 256]) for i in range(0, len(fake), 256)]).double().cpu().numpy()
    rng = np.random.default_rng(seed)
    stats = []
    with warnings.catch_warnings():   # fewer instances than features: singular covariances (as in the point estimate)
        warnings.simplefilter("ignore")
        for _ in range(n_boot):
            i = rng.integers(0, len(fr), len(fr))
            stats.append(_fd_from_features(fr[i], ff[i]))
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


@torch.no_grad()
def cout(model: nn.Module, x: torch.Tensor, x_cf: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
         steps: int = 50) -> torch.Tensor:
    """Per-instance COUT of counterfactuals ``x_cf`` of ``x`` from class ``c`` to ``t`` (module docstring)."""
    n, hw = len(x), x.shape[-2] * x.shape[-1]
    order = torch.argsort(-(x_cf - x).abs().sum(1).flatten(1), dim=1, stable=True)
    chunk = max(1, hw // steps)
    counts = [0] + [min(p + chunk, hw) for p in range(0, hw, chunk)]
    rows = torch.arange(n).view(-1, 1)
    pc, pt = [], []
    for k in counts:
        m = torch.zeros(n, hw, dtype=x.dtype, device=x.device)
        m[rows, order[:, :k]] = 1
        m = m.view(n, 1, *x.shape[-2:])
        p = torch.softmax(model(x_cf * m + x * (1 - m)), 1)
        pc.append(p[torch.arange(n), c])
        pt.append(p[torch.arange(n), t])
    frac = torch.tensor(counts, dtype=torch.float64) / hw
    auc = lambda curve: torch.trapezoid(torch.stack(curve, 1).double().cpu(), frac, dim=1)
    return auc(pt) - auc(pc)


def distances(x: torch.Tensor, x_cf: torch.Tensor, tol: float) -> dict[str, torch.Tensor]:
    """Per-instance L1 (pixel sum), L2, Linf and sparsity (fraction of values with |d| <= tol)."""
    d = (x_cf - x).flatten(1).double()
    return {"l1": d.abs().sum(1), "l2": d.norm(dim=1), "linf": d.abs().amax(1),
            "sparsity": (d.abs() <= tol).double().mean(1)}


def paired_differences(per: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``counterfactual.<a>.<metric>_minus_<b>``: per-instance differences (same instances) of L1,
    L2, Linf and sparsity with Student-t intervals, for ace / ace.pre / proto-cf against pgd and
    ace against its pre-explanation."""
    pairs = [(a, "pgd") for a in ("ace", "ace.pre", "proto-cf") if a in per and "pgd" in per]
    pairs += [("ace", "ace.pre")] if "ace" in per and "ace.pre" in per else []
    out: dict[str, Any] = {}
    for a, b in pairs:
        for k in ("l1", "l2", "linf", "sparsity"):
            out[f"counterfactual.{a}.{k}_minus_{b.replace('.', '_')}"] = t_interval((per[a][k] - per[b][k]).numpy())
    return out


# -- the evaluator ------------------------------------------------------------------------------

class CounterfactualQuality(Evaluator):
    """Validity, proximity, sparsity, plausibility (FD) and COUT of ace / proto-cf / pgd counterfactuals."""

    name = "counterfactual"
    description = ("counterfactual quality of ace / proto-cf / plain PGD: flip rate, L1/L2/Linf, sparsity, "
                   "Frechet distance in a locally trained classifier's features, COUT")
    version = 2
    Params = CounterfactualParams
    contract_params = {"generators": "pgd,proto-cf", "n_examples": 8, "ace_iterations": 3, "proto_steps": 3,
                       "proto_c_steps": 1, "proto_ae_epochs": 1, "n_images": 2, "fd_bootstrap": 10}

    def _feature_classifier(self, ctx: EvalContext, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
        from ..defenses.base import FitContext, compose
        from ..models import build_model

        cfg, ds = ctx.config, ctx.data.dataset
        name = cfg.dataset_spec().default_model
        recipe = {"kind": "counterfactual feature classifier", "model": name, "defense": "erm",
                  "train": to_dict(cfg.train), "augmentation": cfg.dataset_info["augmentation"], "seed": 0,
                  "data": data_fingerprint(x, y), "split": "test-second-half", "version": self.version}
        torch.manual_seed(0)
        model = build_model(name, ds.shape, ds.num_classes, ds.mean, ds.std, {})
        path = Path(ctx.cache_dir) / "counterfactual" / f"features-{canonical_hash(recipe)[:24]}.safetensors"
        if path.exists():
            model.load_state_dict(load_tensors(path)[0])
        else:
            fctx = FitContext(threat=ctx.threat, train=cfg.train, device=ctx.device, seed=0,
                              num_classes=ds.num_classes, augmentation=cfg.dataset_info["augmentation"],
                              progress=ctx.progress, desc="counterfactual feature classifier")
            with torch.random.fork_rng(devices=[]):
                compose("erm").fit(model, x, y, fctx)
            save_tensors_atomic(path, model.state_dict(), {"recipe": recipe, "history": fctx.history})
        return model.to(ctx.device).eval()

    def _generate(self, g: str, ctx: EvalContext, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        p, model = self.params, ctx.model
        if g == "proto-cf":
            gen = ProtoCF(ProtoCFParams(steps=p.proto_steps, c_steps=p.proto_c_steps, ae_epochs=p.proto_ae_epochs))
            gen.fit(ctx.data.x_train, ctx.data.y_train, seed=ctx.seed, device=ctx.device, cache_dir=ctx.cache_dir)
            return {"x": gen.generate(model, x, t, progress=ctx.progress, desc="proto-cf counterfactuals").x.cpu()}
        ap = ACEParams(iterations=p.ace_iterations, step=p.ace_step, lambda1=p.ace_lambda1, tau=p.ace_tau,
                       batch_size=p.ace_batch_size, ddpm=p.ace_ddpm, seed=ctx.seed,
                       inpaint=p.ace_inpaint if g == "ace" else 0.0, filter=g == "ace")
        ace = ACE(ap).fit(ctx.data.dataset, cache_dir=ctx.cache_dir,
                          augmentation=ctx.config.dataset_info["augmentation"], device=ctx.device,
                          setting="counterfactual.ace_ddpm")
        res = ace.generate(model, x.to(ctx.device), t, progress=ctx.progress, desc=f"{g} counterfactuals")
        return {"x": res.x.cpu(), "x_pe": res.x_pe.cpu(), "mask": res.mask.cpu()}

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        ds = ctx.data.dataset
        half = len(ds.x_test) // 2
        test_idx = np.asarray(ctx.data.test_idx)
        n = min(p.n_examples, len(test_idx))
        if n > half or (n and test_idx[:n].max() >= half):
            raise UsageError(f"counterfactual.n_examples={p.n_examples}: the explained images must lie in the first "
                             f"half of the test split ({half} images; the second half trains the DDPM and the "
                             f"feature classifier). Choose n_examples <= {half}.")
        x = ctx.data.x_test[:n]
        y = ctx.data.y_test[:n]
        logits = predict(ctx.model, x, ctx.device)
        top2 = logits.topk(2, dim=1).indices
        c, t = top2[:, 0], top2[:, 1]
        split = ddpm_split(ds)
        x_feat, y_feat = torch.from_numpy(ds.x_test[split]), torch.from_numpy(ds.y_test[split])
        feats = PenultimateFeatures(self._feature_classifier(ctx, x_feat, y_feat))
        fpred = predict(feats.model, x, ctx.device).argmax(1)
        metrics: dict[str, Any] = {
            "counterfactual.n": n,
            "counterfactual.feature_classifier.accuracy": proportion(int((fpred == y).sum()), n),
            "counterfactual.reference.fd": frechet_distance(feats, x, x_feat[:n]),
        }
        notes: dict[str, Any] = {
            "instances": f"first {n} images of the test split, towards the target's runner-up class",
            "feature_classifier": f"{ctx.config.dataset_spec().default_model} trained with erm (run's training "
                                  f"recipe, seed 0) on the second half of the test split ({len(split)} images)",
            "fd": "torchmetrics FrechetInceptionDistance with the feature classifier's penultimate layer; "
                  "CFs against the explained originals",
        }
        ctx.model.eval()
        per: dict[str, dict[str, torch.Tensor]] = {}
        for g in p.generators:
            t0 = time.perf_counter()
            out = self._generate(g, ctx, x, t)
            secs = time.perf_counter() - t0
            m, per[g] = self._measure(g, ctx, feats, x, out["x"], c, t)
            metrics.update(m)
            metrics[f"counterfactual.{g}.seconds"] = secs
            if g == "ace":
                pre, per["ace.pre"] = self._measure("ace.pre", ctx, feats, x, out["x_pe"], c, t, with_cout=False)
                metrics.update({k: v for k, v in pre.items() if k.rsplit(".", 1)[1] in ("flip_rate", "l1", "fd")})
                metrics["counterfactual.ace.mask_fraction"] = t_interval(out["mask"].double().flatten(1).mean(1))
            if p.n_images:
                k = min(p.n_images, n)
                ex = {"clean": x[:k], "adv": out["x"][:k], "y": t[:k]}
                if "x_pe" in out and g == "ace":
                    ex["pre"] = out["x_pe"][:k]
                ctx.examples[f"counterfactual-{g}"] = ex
        metrics.update(paired_differences(per))
        return EvalResult(metrics=metrics, notes=notes)

    def _measure(self, g, ctx, feats, x, x_cf, c, t, with_cout: bool = True
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Metrics of one generator (means with Student-t intervals, FD with a bootstrap
        interval) and the per-instance values behind them (for paired differences)."""
        ns = f"counterfactual.{g}."
        pred = predict(ctx.model, x_cf, ctx.device).argmax(1)
        out: dict[str, Any] = {ns + "flip_rate": proportion(int((pred == t).sum()), len(x))}
        per = distances(x, x_cf, self.params.sparsity_tol)
        if with_cout:
            dev = ctx.device
            per["cout"] = cout(ctx.model, x.to(dev), x_cf.to(dev), c.to(dev), t.to(dev))
        out.update({ns + k: t_interval(v.numpy()) for k, v in per.items()})
        lo, hi = fd_bootstrap(feats, x, x_cf, self.params.fd_bootstrap, seed=ctx.seed)
        out[ns + "fd"] = {"value": frechet_distance(feats, x, x_cf), "ci_low": lo, "ci_high": hi, "n": len(x),
                          "method": "percentile bootstrap over instances (resamples repeat instances, which biases "
                                    "FD upwards: the range can lie above the point estimate)"}
        return out, per
