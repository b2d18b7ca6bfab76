"""Explanation leakage: XAI-aware model inversion (Zhao, Zhang, Xiao & Lim, "Exploiting
Explanations for Model Inversion in Explainable AI", ICCV 2021) as a privacy evaluator.

Threat model
------------
The attacker queries the target for its softmax ``y~`` and an explanation ``E~`` of its
prediction (:mod:`cfbench.explain.methods`) on **auxiliary data disjoint from the members**,
trains an inversion network ``(y~, E~) -> x`` on those pairs, and then reconstructs other
people's inputs from their ``(y~, E~)``.

Data.  The run's pool is split into members (the target's training set) and non-members.
The non-members are split once more, seeded by ``inv_seed``: ``attacker_fraction`` of them
(default half) are the attacker's auxiliary data, the rest are **held-out non-members**.  The
auxiliary data is taken from the pool's non-members rather than from the test split because
they are drawn exactly like the members (same split of the same training set), so the
held-out non-members are the right control for the member/non-member gap, and the test
split stays free for the evaluation classifier.  The test split is halved (seeded): the
first half trains the **evaluation classifier** (the dataset's default model, e.g. ``cnn8``,
plain ERM at the dataset's default recipe) -- data that neither the attacker nor the target
trained on -- and the second half are the **test images** reconstructed.  Reconstructions
are evaluated on members, held-out non-members and test images (each capped at
``max_eval``, a seeded subset).

Explanations and inversion networks
-----------------------------------
``explanations`` (default: all of cam, saliency, input_x_gradient, integrated_gradients,
gradcam, counterfactual; ``counterfactual_delta``, ``ace_counterfactual`` and
``ace_counterfactual_delta`` on request -- ACE needs the dataset's DDPM from ``cfbench ddpm
train``, trained on the second half of the test split, which overlaps the test images
reconstructed here but not the pool) of the target's predicted class,
min-max normalised per image; ``cam`` is skipped with a warning on a model without class
activation maps.  Counterfactuals come from ``proto-cf`` fitted on the members (the model
owner's explainer), towards the target's runner-up class, with ``cf_*`` settings (default:
proto-cf's).  For every explanation and every architecture in ``architectures`` (default
(e) ``flatten``, (f) ``unet``, (g) ``expmi``; :mod:`cfbench.models.inversion`) one network is
trained, plus (d) ``prediction`` from ``y~`` alone.  Training: MSE, Adam(1e-4, beta1 = 0.5),
batch 128, seeded 80/20 train / validation split of the auxiliary data, early stopping on the
validation MSE with ``patience`` (default 50) epochs, at most ``max_epochs`` (default 500),
best weights restored.  GNIME caps at 300 epochs with patience 10 on a ~28k-image auxiliary
set; cfbench's auxiliary sets are far smaller (324 images on digits: ~3 steps an epoch at
batch 128), so an epoch is a few steps and both are raised (the digits evidence needed a
2,000-epoch cap, docs/inversion.md).

Attention transfer (``attention_transfer``, for targets without explanations): a surrogate
``gap-cnn`` is trained on the auxiliary images labelled with the **target's** predicted
classes (what the attacker's queries return; the surrogate then attends like the target), its
CAM of the target's predicted class is the surrogate explanation ``E_s``; a (d)-shaped network
learns ``y~ -> E_s`` on the auxiliary data, and an ExpMI (g) network is trained on
``(predicted E_s, y~) -> x``.  At evaluation only ``y~`` is used.

Metrics (``inversion.<name>.<set>.<metric>``)
---------------------------------------------
``<name>`` is ``prediction``, ``<explanation>.<architecture>`` or ``attention_transfer``;
``<set>`` is ``members``, ``nonmembers`` (held-out) or ``test``.  Per image: ``mse`` (mean
squared error over pixels), ``psnr`` (torchmetrics ``peak_signal_noise_ratio``, data range
1), ``ssim`` (torchmetrics ``structural_similarity_index_measure``, Gaussian window: Wang et
al.'s sigma 1.5 / 11x11 on sides >= 16; sigma 0.5 / 5x5 on smaller images, since an 11x11
window is wider than an 8x8 digit -- ``ssim_sigma`` overrides; torchmetrics reflect-pads the
borders and averages the SSIM map over every pixel), averaged with a t interval; ``accuracy``: the evaluation classifier's top-1 accuracy on the reconstructions
against the true labels (Clopper-Pearson).

The privacy signal, ``inversion.<name>.gap.*``: how much better members are reconstructed
than held-out non-members, signed so that **positive = members leak more**: ``mse``
(non-member minus member mean), ``psnr``, ``ssim`` and ``accuracy`` (member minus non-member),
with Welch (means) and Newcombe (proportions) intervals, and ``auc``: the AUC of ``-MSE``
separating members from held-out non-members (0.5 = no gap; Hanley-McNeil interval).  This
is the evaluator's view -- computing it needs the originals, which a real attacker lacks.

``inversion.<name>.gain.mse``: the mean per-member reduction of the MSE relative to (d)
``prediction`` on the same images (paired t interval): what the explanation leaks *beyond*
the prediction.  ``inversion.eval_classifier.accuracy``: the evaluation classifier on the
real test images.

Cost and caching
----------------
Everything is trained once and cached under ``<cache>/inversion/`` as safetensors, named by
``canonical_hash`` of what it depends on (the sha256 of the target's weights, the
explanation and its settings, the architecture, the training settings, the fingerprint of
the images, the seed and :data:`INVERSION_VERSION`): the explanations of one target, each
inversion network, the surrogate and the evaluation classifier (shared by every target of
one split).  A second evaluation of the same target trains nothing.

Report: for each network an ``inversion-<name>`` example grid (members: originals as
``clean``, reconstructions as ``adv``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from ..attacks.proto_cf import ProtoCF, ProtoCFParams, data_fingerprint
from ..errors import UsageError
from ..explain import methods as X
from ..hashing import canonical_hash
from ..mia import metrics as M
from ..mia.signals import weights_sha256
from ..models import unwrap
from ..models.inversion import (
    EXPLANATION_ARCHITECTURES,
    InversionNet,
    pad_to,
    reconstruct,
    train_inverter,
    working_size,
)
from ..params import param
from ..store.io import load_tensors, save_tensors_atomic
from .base import EvalContext, EvalResult, Evaluator, predict, proportion

#: bump when anything cached by this evaluator is computed differently
INVERSION_VERSION = 1
SETS = ("members", "nonmembers", "test")
DEFAULT_EXPLANATIONS = ("cam", "saliency", "input_x_gradient", "integrated_gradients", "gradcam", "counterfactual")
_CF = ProtoCFParams()


@dataclass(frozen=True)
class InversionParams:
    explanations: tuple[str, ...] = param(DEFAULT_EXPLANATIONS, "explanations the attacker receives: "
                                          + ", ".join(X.EXPLANATIONS))
    architectures: tuple[str, ...] = param(EXPLANATION_ARCHITECTURES, "XAI-aware inversion networks: flatten (e), "
                                           "unet (f), expmi (g); the prediction-only (d) always runs")
    attention_transfer: bool = param(True, "attention transfer through a surrogate gap-cnn's CAM (for targets "
                                           "without explanations)")
    attacker_fraction: float = param(0.5, "fraction of the pool's non-members that is the attacker's auxiliary "
                                          "data (the rest: held-out non-members)", gt=0, lt=1)
    val_fraction: float = param(0.2, "validation split of the auxiliary data for early stopping", gt=0, lt=1)
    inv_lr: float = param(1e-4, "Adam learning rate of the inversion networks (Zhao et al. / GNIME: 1e-4)", gt=0)
    beta1: float = param(0.5, "Adam beta1 of the inversion networks (GNIME: 0.5)", gt=0, lt=1)
    inv_batch_size: int = param(128, "batch size of the inversion networks (GNIME: 128)", ge=1)
    max_epochs: int = param(500, "epoch cap of an inversion network (GNIME: 300 epochs of a 28k-image set)", ge=1)
    patience: int = param(50, "early-stopping patience in epochs on the validation MSE (GNIME: 10)", ge=1)
    width: int = param(16, "channels of the finest level of the inversion networks (doubling per level)", ge=1)
    ig_steps: int = param(50, "integration points of integrated gradients (captum's default 50)", ge=1)
    cf_steps: int = param(_CF.steps, "FISTA iterations per round of the counterfactual explanations", ge=1)
    cf_c_steps: int = param(_CF.c_steps, "rounds of the counterfactual search", ge=1)
    cf_ae_epochs: int = param(_CF.ae_epochs, "epochs of proto-cf's autoencoder (trained on the members)", ge=1)
    classifier_epochs: int | None = param(None, "epochs of the surrogate and the evaluation classifier "
                                                "(default: the dataset's)", ge=1)
    eval_model: str | None = param(None, "model of the evaluation classifier (default: the dataset's default model)")
    max_eval: int | None = param(None, "evaluate at most this many images per set (seeded subset; default all)", ge=2)
    ssim_sigma: float | None = param(None, "Gaussian sigma of SSIM (default 1.5 on sides >= 16, else 0.5)", gt=0)
    n_examples: int = param(8, "example reconstructions per network for the report", ge=0)
    confidence: float = param(0.95, "confidence level of the intervals", gt=0, lt=1)
    inv_seed: int = param(0, "seed of the attacker / held-out / evaluation splits and of the networks")
    explain_batch_size: int = param(256, "batch size of the explanation computation (no effect on results)", ge=1)

    def validate(self) -> None:
        for e in self.explanations:
            X.check_method(e)
        for a in self.architectures:
            if a not in EXPLANATION_ARCHITECTURES:
                raise UsageError(f"inversion.architectures: {a!r} is not an XAI-aware architecture. Valid choices: "
                                 f"{', '.join(EXPLANATION_ARCHITECTURES)} (the prediction-only network always runs).")
        if len(set(self.explanations)) != len(self.explanations) or len(set(self.architectures)) != len(
                self.architectures):
            raise UsageError("inversion: explanations and architectures must not repeat a name.")


# --------------------------------------------------------------------------------------------
# pure metrics
# --------------------------------------------------------------------------------------------
def ssim_sigma_for(side: int) -> float:
    """Default SSIM Gaussian sigma: 1.5 (Wang et al., 11x11 window) for sides >= 16, else 0.5 (5x5)."""
    return 1.5 if side >= 16 else 0.5


def image_metrics(recon: torch.Tensor, x: torch.Tensor, *, sigma: float | None = None) -> dict[str, np.ndarray]:
    """Per-image ``mse``, ``psnr`` (dB, data range 1) and ``ssim`` (float64 arrays) of
    reconstructions against originals, both (N, C, H, W) in [0, 1] (torchmetrics)."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if recon.shape != x.shape:
        raise ValueError(f"reconstructions {tuple(recon.shape)} and originals {tuple(x.shape)} differ in shape")
    r, t = recon.detach().double().clamp(0, 1), x.detach().double()
    sigma = sigma if sigma is not None else ssim_sigma_for(min(x.shape[-2:]))
    mse = (r - t).pow(2).flatten(1).mean(1)
    psnr = peak_signal_noise_ratio(r, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(r, t, data_range=1.0, sigma=sigma, reduction="none")
    return {"mse": mse.numpy(), "psnr": psnr.numpy(), "ssim": ssim.reshape(-1).numpy()}


def mean_ci(values, confidence: float = 0.95) -> dict[str, Any]:
    """Mean with a Student-t interval (``ci_*`` None for fewer than 2 values, or when a value is
    not finite: :func:`cfbench.mia.metrics.mean_interval` keeping them)."""
    return M.mean_interval(values, confidence, drop_nonfinite=False)


def welch_diff(a, b, confidence: float = 0.95) -> dict[str, Any]:
    """``mean(a) - mean(b)`` with a Welch-Satterthwaite t interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = float(a.mean() - b.mean())
    out = {"value": d, "ci_low": None, "ci_high": None, "n": int(a.size + b.size), "method": "welch"}
    if a.size < 2 or b.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        out.update(ci_low=d, ci_high=d)
        return out
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    out.update(ci_low=d - half, ci_high=d + half)
    return out


def _wilson(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return centre - half, centre + half


def newcombe_diff(k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> dict[str, Any]:
    """``k1/n1 - k2/n2`` with Newcombe's (1998, method 10) hybrid Wilson score interval."""
    if n1 == 0 or n2 == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": n1 + n2}
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = _wilson(k1, n1, z)
    l2, u2 = _wilson(k2, n2, z)
    d = p1 - p2
    return {"value": d, "ci_low": d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            "ci_high": d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2), "n": n1 + n2, "method": "newcombe"}


def set_metrics(prefix: str, per: dict[str, dict[str, np.ndarray]], correct: dict[str, np.ndarray],
                confidence: float, baseline: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Metrics of one network: per set (mean with interval), the member/non-member gap, the
    membership AUC of -MSE, and (with ``baseline``: the prediction-only per-member MSE) the gain."""
    out: dict[str, Any] = {}
    for s in SETS:
        for m in ("mse", "psnr", "ssim"):
            out[f"{prefix}.{s}.{m}"] = mean_ci(per[s][m], confidence)
        out[f"{prefix}.{s}.accuracy"] = proportion(int(correct[s].sum()), int(correct[s].size), confidence)
    mem, non = per["members"], per["nonmembers"]
    out[f"{prefix}.gap.mse"] = welch_diff(non["mse"], mem["mse"], confidence)
    out[f"{prefix}.gap.psnr"] = welch_diff(mem["psnr"], non["psnr"], confidence)
    out[f"{prefix}.gap.ssim"] = welch_diff(mem["ssim"], non["ssim"], confidence)
    out[f"{prefix}.gap.accuracy"] = newcombe_diff(int(correct["members"].sum()), int(correct["members"].size),
                                                  int(correct["nonmembers"].sum()), int(correct["nonmembers"].size),
                                                  confidence)
    scores = -np.concatenate([mem["mse"], non["mse"]])
    labels = np.r_[np.ones(mem["mse"].size, bool), np.zeros(non["mse"].size, bool)]
    a = M.auc(scores, labels)
    hm = M.auc_hanley_mcneil(a, int(labels.sum()), int((~labels).sum()), confidence)
    out[f"{prefix}.gap.auc"] = {"value": a, "ci_low": hm["ci_low"], "ci_high": hm["ci_high"], "n": int(labels.size),
                                "method": "hanley-mcneil-1982"}
    if baseline is not None:
        out[f"{prefix}.gain.mse"] = {**mean_ci(baseline["mse"] - mem["mse"], confidence), "method": "paired-t"}
    return out


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------
def _split(rng: np.random.Generator, positions: np.ndarray, n_first: int) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(positions)
    return perm[:n_first], perm[n_first:]


class ExplanationInversion(Evaluator):
    """Zhao et al.'s XAI-aware model inversion on the run's target (see the module docstring)."""

    name = "inversion"
    description = ("explanation leakage: inversion networks (Zhao et al. ICCV'21) reconstruct inputs from the "
                   "prediction and its explanation (CAM, gradients, Grad-CAM, counterfactuals); member/non-member gap")
    version = 1
    Params = InversionParams
    contract_params: ClassVar[dict[str, str]] = {"explanations": "saliency", "architectures": "expmi", "max_epochs": "2",
                       "classifier_epochs": "1", "n_examples": "2"}

    # -- caching helpers -------------------------------------------------------------------------
    def _cached(self, ctx: EvalContext, kind: str, key: dict[str, Any]) -> Path:
        digest = canonical_hash({"v": INVERSION_VERSION, **key})[:24]
        return Path(ctx.cache_dir) / "inversion" / f"{kind}-{digest}.safetensors"

    def _classifier(self, ctx: EvalContext, kind: str, model_name: str, x: torch.Tensor, y: torch.Tensor,
                    extra_key: dict[str, Any], notes: dict[str, Any]) -> torch.nn.Module:
        """A classifier trained with plain cross-entropy on (x, y) at the dataset's default
        recipe (cached), through the shared training loop."""
        from ..config import TrainParams
        from ..models import build_model
        from ..training import FitContext, train

        spec = ctx.config.dataset_spec()
        ds = ctx.data.dataset
        p = self.params
        tp = TrainParams(epochs=p.classifier_epochs or spec.default_epochs, batch_size=spec.default_batch_size,
                         lr=spec.default_lr)
        seed = p.inv_seed
        key = {"kind": kind, "model": model_name, "train": {k: getattr(tp, k) for k in
                                                            ("epochs", "batch_size", "lr", "optimizer", "momentum",
                                                             "weight_decay", "schedule", "augment")},
               "seed": seed, "data": data_fingerprint(x, y), **extra_key}
        path = self._cached(ctx, kind, key)
        torch.manual_seed(seed)
        model = build_model(model_name, ds.shape, ds.num_classes, ds.mean, ds.std, None)
        if path.exists():
            model.load_state_dict(load_tensors(path)[0])
            notes[kind] = {"cached": True, "model": model_name, "n_train": len(x), "epochs": tp.epochs}
            return model.to(ctx.device).eval()
        fctx = FitContext(threat=ctx.threat, train=tp, device=ctx.device, seed=seed, num_classes=ds.num_classes,
                          augmentation=ctx.config.dataset_info["augmentation"], progress=ctx.progress,
                          desc=f"inversion {kind}")

        def ce(m, xb, yb, batch):
            logits = m(xb)
            return F.cross_entropy(logits, yb), logits

        train(model, x, y, fctx, ce)
        save_tensors_atomic(path, model.state_dict(), {"key": key, "history": fctx.history})
        notes[kind] = {"cached": False, "model": model_name, "n_train": len(x), "epochs": tp.epochs}
        return model.eval()

    def _explanations(self, ctx: EvalContext, model, sha: str, method: str, x_all: torch.Tensor,
                      cf_raw: dict[str, torch.Tensor], notes: dict[str, Any]) -> torch.Tensor:
        """Normalised explanations of ``method`` on ``x_all`` (cached per target and method)."""
        p = self.params
        settings: dict[str, Any] = {}
        if method == "integrated_gradients":
            settings = {"ig_steps": p.ig_steps, "baseline": 0.0, "method": "gausslegendre"}
        if method in X.COUNTERFACTUAL_METHODS:
            settings = self._cf_settings(ctx, ace=method.startswith("ace_"))
        key = {"kind": "explanation", "target": sha, "method": method, "settings": settings,
               "images": data_fingerprint(x_all)}
        path = self._cached(ctx, "expl", key)
        if path.exists():
            notes.setdefault("explanations", {})[method] = {"cached": True}
            return load_tensors(path)[0]["e"]
        t0 = time.perf_counter()
        if method in X.COUNTERFACTUAL_METHODS:
            x_cf = self._counterfactuals(ctx, model, x_all, cf_raw, notes, ace=method.startswith("ace_"))
            e = X.minmax_per_image(x_cf if method in X.COUNTERFACTUAL_INSTANCES else x_cf - x_all)
        else:
            e = X.explain(model, x_all.to(ctx.device), method, batch_size=p.explain_batch_size, ig_steps=p.ig_steps)
        save_tensors_atomic(path, {"e": e}, {"key": key})
        notes.setdefault("explanations", {})[method] = {"cached": False, "seconds": time.perf_counter() - t0}
        return e

    def _cf_settings(self, ctx: EvalContext, ace: bool = False) -> dict[str, Any]:
        p = self.params
        if ace:   # ACE with its defaults and the dataset's default DDPM (cfbench.attacks.ace)
            from ..attacks.ace import ACE, ACEParams
            from ..params import to_dict as P_to_dict

            return {"ace": {"params": P_to_dict(ACEParams(seed=p.inv_seed)), "version": ACE.version},
                    "ddpm": "default", "dataset_sha256": ctx.data.dataset.fingerprint(), "target_class": "runner-up"}
        return {"proto_cf": {"steps": p.cf_steps, "c_steps": p.cf_c_steps, "ae_epochs": p.cf_ae_epochs,
                             "version": ProtoCF.version}, "explainer_data": data_fingerprint(ctx.data.x_train,
                                                                                             ctx.data.y_train),
                "seed": p.inv_seed, "target_class": "runner-up"}

    def _counterfactuals(self, ctx: EvalContext, model, x_all: torch.Tensor, cf_raw: dict[str, torch.Tensor],
                         notes: dict[str, Any], ace: bool = False) -> torch.Tensor:
        """Raw proto-cf (or, with ``ace``, ACE) counterfactuals of ``x_all`` towards the runner-up
        class (once per evaluation)."""
        if ace:
            return self._ace_counterfactuals(ctx, model, x_all, cf_raw, notes)
        if "x" in cf_raw:
            return cf_raw["x"]
        p = self.params
        gen = ProtoCF(ProtoCFParams(steps=p.cf_steps, c_steps=p.cf_c_steps, ae_epochs=p.cf_ae_epochs))
        gen.fit(ctx.data.x_train, ctx.data.y_train, seed=p.inv_seed, device=ctx.device, cache_dir=ctx.cache_dir)
        with torch.no_grad():
            logits = predict(model, x_all, ctx.device)
        runner_up = logits.topk(2, dim=1).indices[:, 1]
        res = gen.generate(model, x_all.to(ctx.device), runner_up.to(ctx.device), progress=ctx.progress,
                           desc="inversion counterfactuals")
        cf_raw["x"] = res.x.cpu()
        notes["counterfactual"] = {"valid_rate": float(res.valid.float().mean()) if len(res.valid) else None,
                                   "n": len(res.valid), "explainer": "proto-cf fitted on the members",
                                   "target_class": "the target's runner-up class"}
        return cf_raw["x"]

    def _ace_counterfactuals(self, ctx: EvalContext, model, x_all: torch.Tensor, cf_raw: dict[str, torch.Tensor],
                             notes: dict[str, Any]) -> torch.Tensor:
        """ACE counterfactuals (its defaults; the dataset's DDPM, trained on the second half of the
        test split -- disjoint from members and non-members, not from the test images here)."""
        from ..attacks.ace import ACE, ACEParams

        if "ace" in cf_raw:
            return cf_raw["ace"]
        gen = ACE(ACEParams(seed=self.params.inv_seed)).fit(
            ctx.data.dataset, cache_dir=ctx.cache_dir, augmentation=ctx.config.dataset_info["augmentation"],
            device=ctx.device, setting=None)   # the inversion evaluator has no DDPM setting of its own
        runner_up = predict(model, x_all, ctx.device).topk(2, dim=1).indices[:, 1]
        res = gen.generate(model, x_all.to(ctx.device), runner_up.to(ctx.device), progress=ctx.progress,
                           desc="inversion ACE counterfactuals")
        cf_raw["ace"] = res.x.cpu()
        notes["ace_counterfactual"] = {"valid_rate": float(res.valid.float().mean()) if len(res.valid) else None,
                                       "n": len(res.valid), "explainer": "ace with the dataset's DDPM "
                                       "(second half of the test split)", "target_class": "the target's runner-up class"}
        return cf_raw["ace"]

    def _network(self, ctx: EvalContext, arch: str, key: dict[str, Any], pred: torch.Tensor,
                 expl: torch.Tensor | None, target: torch.Tensor, out_channels: int, expl_channels: int,
                 summaries: dict[str, Any], label: str) -> InversionNet:
        """Train (or load) one inversion network on the attacker's pairs."""
        p = self.params
        size = working_size(max(target.shape[-2:]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.inv_seed)
            net = InversionNet(arch, num_classes=pred.shape[1], image_channels=out_channels, size=size,
                               expl_channels=expl_channels, width=p.width)
        train_cfg = {"lr": p.inv_lr, "beta1": p.beta1, "batch_size": p.inv_batch_size, "max_epochs": p.max_epochs,
                     "patience": p.patience, "val_fraction": p.val_fraction, "seed": p.inv_seed}
        full_key = {"kind": "inversion-net", "net": net.config(), "train": train_cfg, **key}
        path = self._cached(ctx, "net", full_key)
        if path.exists():
            tensors, meta = load_tensors(path)
            net.load_state_dict(tensors)
            s = dict(meta.get("summary", {}))
            s["cached"] = True
        else:
            e_in = pad_to(expl, size) if expl is not None else None
            with torch.random.fork_rng(devices=[]):
                net, s = train_inverter(net, pred, e_in, target, lr=p.inv_lr, beta1=p.beta1,
                                        batch_size=p.inv_batch_size, max_epochs=p.max_epochs, patience=p.patience,
                                        val_fraction=p.val_fraction, seed=p.inv_seed, device=ctx.device)
            save_tensors_atomic(path, net.state_dict(), {"key": full_key, "summary": s})
            s = dict(s, cached=False)
        summaries[label] = {k: s.get(k) for k in ("epochs", "best_epoch", "best_val_mse", "stopped_early", "n_train",
                                                  "n_val", "cached")}
        return net.to(ctx.device).eval()

    # -- evaluate ----------------------------------------------------------------------------------
    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        t_start = time.perf_counter()
        res = EvalResult()
        notes: dict[str, Any] = {}
        d = ctx.data
        model = unwrap(ctx.model).eval()
        c, h, w = d.dataset.shape
        rng = np.random.default_rng([p.inv_seed, 0x494E56])

        # -- data: attacker / held-out non-members / members / test (eval-classifier half + reconstructed half)
        nonmember_pos = np.flatnonzero(~d.member_mask)
        member_pos = np.flatnonzero(d.member_mask)
        n_att = round(p.attacker_fraction * len(nonmember_pos))
        if n_att < 2 or len(nonmember_pos) - n_att < 2:
            raise UsageError(f"inversion: {len(nonmember_pos)} non-members cannot be split into >= 2 attacker "
                             f"examples and >= 2 held-out non-members with attacker_fraction={p.attacker_fraction}; "
                             "use a larger data.pool_size or another inversion.attacker_fraction.")
        att_pos, held_pos = _split(rng, nonmember_pos, n_att)
        n_test = len(d.test_idx)
        if n_test < 4:
            raise UsageError(f"inversion: the test split has {n_test} images; it needs >= 4 (half train the "
                             "evaluation classifier, half are reconstructed). Raise data.test_size.")
        clf_pos, test_pos = _split(rng, np.arange(n_test), n_test // 2)
        mem_pos = rng.permutation(member_pos)
        if p.max_eval is not None:
            mem_pos, held_pos, test_pos = mem_pos[:p.max_eval], held_pos[:p.max_eval], test_pos[:p.max_eval]
        x_pool, y_pool, x_test, y_test = d.x_pool, d.y_pool, d.x_test, d.y_test
        xs = {"attacker": x_pool[att_pos], "members": x_pool[mem_pos], "nonmembers": x_pool[held_pos],
              "test": x_test[test_pos]}
        ys = {"attacker": y_pool[att_pos], "members": y_pool[mem_pos], "nonmembers": y_pool[held_pos],
              "test": y_test[test_pos]}
        order = ("attacker", *SETS)
        bounds = np.cumsum([0] + [len(xs[s]) for s in order])
        parts = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(order)}
        x_all = torch.cat([xs[s] for s in order])
        notes["protocol"] = {
            "attacker": "a seeded attacker_fraction of the pool's non-members (auxiliary data: queried for softmax "
                        "and explanation)",
            "nonmembers": "the other non-members (held out from the attacker)",
            "test": "a seeded half of the test split (the other half trains the evaluation classifier)",
            "sizes": {s: len(xs[s]) for s in order} | {"eval_classifier_train": len(clf_pos)},
            "explained_class": "the target's prediction (arg-max)", "normalisation": "min-max per image",
            "training": {"loss": "MSE", "optimizer": f"Adam(lr={p.inv_lr}, betas=({p.beta1}, 0.999))",
                         "batch_size": p.inv_batch_size, "val_fraction": p.val_fraction, "patience": p.patience,
                         "max_epochs": p.max_epochs},
            "gap_sign": "positive = members reconstructed better than held-out non-members",
        }

        # -- target queries
        sha = weights_sha256(model)
        probs = torch.softmax(predict(model, x_all, ctx.device), dim=1)
        pred = {s: probs[parts[s]] for s in order}

        # -- evaluation classifier (trained on the other half of the test split)
        t0 = time.perf_counter()
        eval_name = p.eval_model or ctx.config.dataset_spec().default_model
        clf = self._classifier(ctx, "eval_classifier", eval_name, x_test[clf_pos], y_test[clf_pos], {}, notes)
        clf_test = predict(clf, xs["test"], ctx.device).argmax(1)
        res.metrics["inversion.eval_classifier.accuracy"] = proportion(
            int((clf_test == ys["test"]).sum()), len(ys["test"]), p.confidence)
        res.timings["eval_classifier"] = time.perf_counter() - t0

        sigma = p.ssim_sigma if p.ssim_sigma is not None else ssim_sigma_for(min(h, w))
        notes["ssim"] = {"sigma": sigma, "window": int(3.5 * sigma + 0.5) * 2 + 1, "library": "torchmetrics"}
        summaries: dict[str, Any] = {}
        recon_examples: dict[str, torch.Tensor] = {}
        per_all: dict[str, dict[str, dict[str, np.ndarray]]] = {}

        def score(label: str, recons: dict[str, torch.Tensor], baseline=None) -> dict[str, dict[str, np.ndarray]]:
            per = {s: image_metrics(recons[s], xs[s], sigma=sigma) for s in SETS}
            correct = {s: (predict(clf, recons[s], ctx.device).argmax(1) == ys[s]).numpy() for s in SETS}
            res.metrics.update(set_metrics(f"inversion.{label}", per, correct, p.confidence, baseline))
            recon_examples[label] = recons["members"][:p.n_examples]
            per_all[label] = per
            return per

        def inputs(e: torch.Tensor | None, s: str) -> torch.Tensor | None:
            return None if e is None else pad_to(e[parts[s]], working_size(max(h, w)))

        def run_net(label: str, arch: str, key: dict[str, Any], e: torch.Tensor | None, baseline=None):
            net = self._network(ctx, arch, {"target": sha, "attacker": data_fingerprint(xs["attacker"]), **key},
                                pred["attacker"], None if e is None else e[parts["attacker"]], xs["attacker"], c,
                                0 if e is None else e.shape[1], summaries, label)
            recons = {s: reconstruct(net, pred[s], inputs(e, s), h, w, device=ctx.device).clamp(0, 1) for s in SETS}
            return score(label, recons, baseline)

        # -- (d) prediction only
        t0 = time.perf_counter()
        base = run_net("prediction", "prediction", {"explanation": None}, None)
        base_members = base["members"]
        res.timings["prediction"] = time.perf_counter() - t0

        # -- explanations x architectures
        cf_raw: dict[str, torch.Tensor] = {}
        skipped: dict[str, str] = {}
        for method in p.explanations:
            if method == "cam" and not X.has_cam(model):
                skipped[method] = (f"the target ({ctx.config.model}) has no class activation maps (a GAP model such "
                                   "as gap-cnn has); use gradcam")
                res.warnings.append(f"inversion: explanation 'cam' skipped: {skipped[method]}.")
                continue
            t0 = time.perf_counter()
            e = self._explanations(ctx, model, sha, method, x_all, cf_raw, notes)
            for arch in p.architectures:
                run_net(f"{method}.{arch}", arch, {"explanation": method,
                                                   "explanation_sha": data_fingerprint(e[parts["attacker"]])},
                        e, {"mse": base_members["mse"]})
            res.timings[method] = time.perf_counter() - t0

        # -- attention transfer: y -> surrogate CAM -> ExpMI
        if p.attention_transfer:
            t0 = time.perf_counter()
            x_att = xs["attacker"]
            y_sur = pred["attacker"].argmax(1)
            sur = self._classifier(ctx, "surrogate", "gap-cnn", x_att, y_sur, {"target": sha}, notes)
            e_sur = X.explain(sur, x_att.to(ctx.device), "cam", target=y_sur.to(ctx.device),
                              batch_size=p.explain_batch_size)
            ex_net = self._network(ctx, "prediction", {"target": sha, "attacker": data_fingerprint(x_att),
                                                       "stage": "attention-transfer explanation",
                                                       "surrogate_cam": data_fingerprint(e_sur)},
                                   pred["attacker"], None, e_sur, e_sur.shape[1], 0, summaries,
                                   "attention_transfer.explanation")
            e_hat = torch.cat([reconstruct(ex_net, pred[s], None, h, w, device=ctx.device) for s in order]).clamp(0, 1)
            run_net("attention_transfer", "expmi", {"explanation": "attention-transfer",
                                                    "explanation_sha": data_fingerprint(e_hat[parts["attacker"]])},
                    e_hat, {"mse": base_members["mse"]})
            res.timings["attention_transfer"] = time.perf_counter() - t0

        # -- report grids and notes
        y_mem = ys["members"][:p.n_examples]
        if p.n_examples:
            for label, r in recon_examples.items():
                ctx.examples[f"inversion-{label.replace('.', '-').replace('_', '-')}"] = (
                    xs["members"][:p.n_examples], r, y_mem)
        notes["networks"] = summaries
        notes["skipped"] = skipped
        notes["summary_mse"] = {label: {s: float(per[s]["mse"].mean()) for s in SETS} for label, per in per_all.items()}
        notes["eval_classifier_model"] = eval_name
        res.notes["inversion"] = notes
        res.timings["total_inversion"] = time.perf_counter() - t_start
        return res
