"""ACE: adversarial counterfactual explanations polished by a diffusion model (Jeanneret, Simon
& Jurie, "Adversarial Counterfactual Visual Explanations", CVPR 2023; reference code
github.com/guillaumejs2403/ACE, ``main.py`` and ``core/attacks_and_models.py``).  Registered as
the attack ``ace``; same interface as ``proto-cf``: ``generate(model, x0, target)`` and
``perturb(model, x, y=target classes, threat)``.

1. **Pre-explanation.**  PGD on the classifier seen through the DDPM filter F_tau:

       x' <- clip_[0,1]( Pi_eps( x' - alpha * sign grad_x' [ CE(C(F_tau(x')), t) + lambda1 ||x - x'||_1
                                                              + lambda2 ||x - x'||_2 ] ) )

   from x' = x, ``iterations = 50`` steps of ``alpha = 1/255``, ``eps = 1`` (the reference
   code's 255/255: unbounded on [0, 1] images), the last iterate kept (no early stop).  F_tau
   (:meth:`cfbench.models.ddpm.DDPM.filter`) maps x' to [-1, 1], noises it to respaced step
   ``int(tau * respacing)`` (tau = 0.1 of a 50-step respacing of the 500-step DDPM: 5 steps,
   original timestep 41) and denoises over those steps, stochastically, with gradients through
   the whole chain (the reference code's default, non-checkpointed ``JointClassifierDDPM``).
2. **Refinement.**  ``mask = sum_c |x - x_pe|`` normalised by its per-image maximum, dilated by
   a ``dilation x dilation`` max-pool (stride 1), thresholded: pixels with a dilated value
   ``< inpaint = 0.15`` are *kept* from x.  RePaint-style regeneration: start from
   ``q_sample(x_pe, k_top)``; before each reverse step replace the kept region by
   ``q_sample(x, k)`` (fresh noise); at the end composite ``keep ? x : output``.

Choices (the paper and code leave them open, or they had to be re-scaled to 8x8 / 28x28):

* **lambda1** (``dist_l1``): 0.001 on 128x128x3 CelebA.  The sign step compares, per pixel,
  |dCE/dx_j| with lambda1, and per-pixel CE gradients of small images are much larger, so
  lambda1 is re-tuned here: **0.03**, the largest value of the grid {0, 0.001, 0.01, 0.03,
  0.1} on digits whose flip rate stays within a point of lambda1 = 0 (``docs/ace.md``).  The
  CE is summed over the batch (each example its own problem); the reference code averages it,
  so its effective per-example lambda1 is ``batch_size * dist_l1``.
* **dilation**: 15 at 128 px; scaled with the side, ``2 floor(15 H / 256) + 1`` (the odd size
  next to ``15 H / 128``): 1 (no dilation) on 8x8 digits, 3 on 28x28.
* **randomness**: every noise draw of the i-th instance of a ``generate`` call comes from its own
  ``torch.Generator`` seeded by ``(seed, i)``, so results do not depend on the batch size and
  are reproducible; the filter draws fresh noise at every PGD iteration (``stochastic``).
* **plain PGD baseline**: ``filter=false, inpaint=0`` is the reference code's
  ``attack_joint=False`` without refinement: the same PGD and L1 term on the bare classifier.
* validity is ``argmax C(x_cf) == t`` on the final (refined) image; the pre-explanation's is
  reported beside it.  The threat model passed to :meth:`ACE.perturb` is ignored (unbounded).

The DDPM.  :func:`ddpm_split` -- the **second half of the dataset's test split** -- is what it
is trained on: disjoint from every run's pool (members and non-members come from the training
split) and from the first half of the test split, where counterfactual quality is measured.
``cfbench ddpm train --dataset D`` (:mod:`cfbench.diffusion`) trains it and caches it as
``<out>/_cache/ddpm/ddpm-<dataset>-<hash>.safetensors``, named by :func:`ddpm_recipe`;
:meth:`ACE.fit` loads the default recipe for a dataset (or ``ddpm=<file>``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..hashing import canonical_hash
from ..models.ddpm import DDPM, DDPMParams, Respacing, tau_steps
from ..params import check_value, param, to_dict
from ..store.io import load_tensors
from .base import Attack, ThreatModel
from .batching import check_instances, concat_results, map_batches

#: bump when the DDPM's training changes (part of its cache key)
DDPM_VERSION = 1
DDPM_SPLIT = "test-second-half"


@dataclass(frozen=True)
class ACEParams:
    iterations: int = param(50, "PGD iterations (ACE: 50)", ge=1)
    step: float = param(1 / 255, "PGD sign-step size alpha (ACE: 1/255)", gt=0)
    eps: float = param(1.0, "Linf bound around x (ACE: 255/255 = unbounded on [0, 1] images)", gt=0)
    lambda1: float = param(0.03, "weight of ||x - x'||_1 (pixel sum; ACE CelebA: 0.001, re-tuned for 8x8 / 28x28)",
                           ge=0)
    lambda2: float = param(0.0, "weight of ||x - x'||_2 (ACE: 0)", ge=0)
    respacing: int = param(50, "respaced reverse-process steps (ACE CelebA: 50 of 500)", ge=1)
    tau: float = param(0.1, "fraction of the respaced steps the filter noises and denoises (ACE: 0.1)", gt=0, le=1)
    stochastic: bool = param(True, "fresh noise in the filter at each PGD iteration (ACE: true)")
    filter: bool = param(True, "attack through the DDPM filter F_tau (false: plain PGD on the classifier)")
    inpaint: float = param(0.15, "refinement mask threshold (ACE: 0.15; 0: no refinement, return the pre-explanation)",
                           ge=0, le=1)
    dilation: int = param(0, "max-pool kernel of the mask dilation (odd; 0: ACE's 15 at 128 px scaled to the image)",
                          ge=0)
    seed: int = param(0, "seed of the noise generators (one per instance)", ge=0)
    batch_size: int = param(64, "instances optimised together (independent problems)", ge=1)
    ddpm: str = param("default", "DDPM file written by `cfbench ddpm train`, or 'default' (the dataset's default "
                                 "recipe in <cache>/ddpm)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name), f"ace.{f.name}")
        for f in ("step", "eps", "lambda1", "lambda2"):
            if math.isinf(getattr(self, f)):
                raise UsageError(f"ace.{f}: {getattr(self, f)!r} is out of range; it must be finite.")
        if self.dilation and self.dilation % 2 == 0:
            raise UsageError(f"ace.dilation={self.dilation} must be odd (a centred max-pool), e.g. "
                             f"{self.dilation - 1} or {self.dilation + 1}; 0 scales ACE's 15 to the image.")

    @property
    def needs_ddpm(self) -> bool:
        return self.filter or self.inpaint > 0


def dilation_for(side: int, reference: int = 15, at: int = 128) -> int:
    """ACE's dilation kernel (15 at 128 px) scaled to an image side, rounded to an odd size >= 1."""
    return 2 * math.floor(reference * side / at / 2) + 1


# -- the DDPM: which data, which recipe, where -----------------------------------------------

def ddpm_split(ds) -> np.ndarray:
    """Indices into the test split the DDPM trains on: its second half (``n // 2 .. n - 1``)."""
    n = len(ds.x_test)
    return np.arange(n // 2, n)


def ddpm_recipe(ds, params: DDPMParams, seed: int, augmentation: str) -> dict[str, Any]:
    """Everything the trained DDPM depends on (its cache key is ``canonical_hash`` of this)."""
    idx = ddpm_split(ds)
    aug = augmentation if params.augmentation == "dataset" else params.augmentation
    return {"kind": "cfbench ddpm", "ddpm_version": DDPM_VERSION, "dataset": ds.name,
            "dataset_sha256": ds.fingerprint(), "shape": list(ds.shape), "split": DDPM_SPLIT,
            "indices": [int(idx[0]), int(idx[-1]) + 1] if len(idx) else [0, 0], "params": to_dict(params),
            "augmentation": aug, "seed": int(seed)}


def ddpm_path(cache_dir: str | Path, recipe: dict[str, Any]) -> Path:
    return Path(cache_dir) / "ddpm" / f"ddpm-{recipe['dataset']}-{canonical_hash(recipe)[:24]}.safetensors"


def load_ddpm(path: str | Path, device: torch.device | str = "cpu") -> tuple[DDPM, dict[str, Any]]:
    """A trained DDPM and its metadata (recipe, history) from a file of ``cfbench ddpm train``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"DDPM file {path} does not exist.")
    tensors, meta = load_tensors(path)
    recipe = meta.get("recipe")
    if not recipe or recipe.get("kind") != "cfbench ddpm":
        raise UsageError(f"{path} is not a DDPM written by `cfbench ddpm train` (no DDPM recipe in its metadata).")
    p = recipe["params"]
    params = DDPMParams(**{**p, "channels": tuple(p["channels"])})
    model = DDPM(recipe["shape"], params)
    model.unet.load_state_dict(tensors)
    return model.to(device).eval(), meta


def find_ddpm(spec: str, ds, cache_dir: str | Path | None, augmentation: str,
              device: torch.device | str = "cpu", setting: str | None = "ace.ddpm") -> tuple[DDPM, dict[str, Any]]:
    """The DDPM named by ``spec``: 'default' (the dataset's default recipe, seed 0, in
    ``<cache_dir>/ddpm``) or a file; a clear error saying how to train a missing one (and, when
    ``setting`` names the caller's key for the file, that it can point elsewhere)."""
    alt = f", or set {setting}=<file>" if setting else ""
    if spec != "default":
        model, meta = load_ddpm(spec, device)
        if meta["recipe"]["dataset"] != ds.name or list(meta["recipe"]["shape"]) != list(ds.shape):
            raise UsageError(f"{setting or 'ace.ddpm'}={spec} was trained on {meta['recipe']['dataset']} "
                             f"{meta['recipe']['shape']}, not on {ds.name} {list(ds.shape)}.")
        return model, meta
    if cache_dir is None:
        raise UsageError(f"{setting or 'ace.ddpm'}=default needs a cache directory (the run's <out>/_cache) to find "
                         f"the DDPM in{'; give ' + setting + '=<file> instead' if setting else ''}.")
    path = ddpm_path(cache_dir, ddpm_recipe(ds, DDPMParams(), 0, augmentation))
    if not path.exists():
        out = Path(cache_dir).parent
        raise UsageError(f"no DDPM for {ds.name} in {Path(cache_dir) / 'ddpm'} (default recipe; expected {path.name}). "
                         f"Train it first: `cfbench ddpm train --dataset {ds.name} --out {out}` (resumable){alt}.")
    return load_ddpm(path, device)


# -- the two stages ---------------------------------------------------------------------------

def _noise_source(gens: list[torch.Generator]):
    """Noise shaped like a batch, one generator per row (batch-size independent)."""
    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in gens]).to(like.device)
    return draw


def refinement_mask(x: torch.Tensor, x_pe: torch.Tensor, dilation: int, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ACE's ``generate_mask``: (normalised mask, bool ``keep`` = dilated mask < threshold)."""
    m = (x - x_pe).abs().sum(1, keepdim=True)
    top = m.flatten(1).amax(1).clamp_min(torch.finfo(m.dtype).tiny).view(-1, 1, 1, 1)
    m = m / top
    dil = F.max_pool2d(m, dilation, stride=1, padding=(dilation - 1) // 2)
    return m, dil < threshold


@torch.no_grad()
def refine(ddpm: DDPM, x: torch.Tensor, x_pe: torch.Tensor, keep: torch.Tensor, steps: int, r: Respacing, draw,
           stochastic: bool) -> torch.Tensor:
    """RePaint-style regeneration of the masked region (ACE ``filter_fn``); the kept pixels are
    copied from ``x`` exactly (the composite is taken in [0, 1])."""
    nz = draw if stochastic else torch.zeros_like
    ce, orig = x_pe * 2 - 1, x * 2 - 1
    keep_f = keep.to(ce.dtype)
    for k in range(steps - 1, -1, -1):
        if k == steps - 1:
            ce = ddpm.q_sample_respaced(ce, k, r, nz(ce))
        ce = ce * (1 - keep_f) + keep_f * ddpm.q_sample_respaced(orig, k, r, nz(ce))
        ce = ddpm.p_step(ce, k, r, nz(ce) if k > 0 else None)
    out = ((ce + 1) / 2).clamp(0, 1)
    return torch.where(keep.expand_as(out), x, out)


@dataclass
class ACEResult:
    """ACE counterfactuals of a batch of instances towards ``target``."""

    x: torch.Tensor          # the refined counterfactual (the pre-explanation when inpaint = 0)
    valid: torch.Tensor      # argmax C(x) == target
    margin: torch.Tensor     # f_t - max_{i != t} f_i on x
    x_pe: torch.Tensor       # the pre-explanation (PGD through F_tau)
    valid_pe: torch.Tensor
    mask: torch.Tensor       # bool: the regenerated region (True = taken from the DDPM)


def _margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    onehot = F.one_hot(target, logits.shape[1]).bool()
    return logits[onehot] - logits.masked_fill(onehot, -math.inf).amax(1)


class ACE(Attack):
    """Jeanneret et al.'s ACE (see the module docstring)."""

    name = "ace"
    description = ("ACE (Jeanneret et al. CVPR'23): PGD through a DDPM filter F_tau + L1, then mask and "
                   "RePaint refinement; y = target class")
    version = 1
    Params = ACEParams

    def __init__(self, params=None):
        super().__init__(params)
        self.ddpm: DDPM | None = None
        self.ddpm_meta: dict[str, Any] = {}

    def use(self, ddpm: DDPM, meta: dict[str, Any] | None = None) -> ACE:
        """Use this (trained) DDPM; its weights are frozen."""
        self.ddpm = ddpm.eval()
        for q in ddpm.parameters():
            q.requires_grad_(False)
        self.ddpm_meta = dict(meta or {})
        return self

    def fit(self, ds, *, cache_dir: str | Path | None = None, augmentation: str = "shift",
            device: torch.device | str = "cpu", setting: str | None = "ace.ddpm") -> ACE:
        """Load the DDPM of dataset ``ds`` (``params.ddpm``; see :func:`find_ddpm`; ``setting``:
        the caller's key for ``params.ddpm`` in error messages, None if it has none); nothing
        to fit when neither the filter nor the refinement is used."""
        if self.params.needs_ddpm:
            self.use(*find_ddpm(self.params.ddpm, ds, cache_dir, augmentation, device, setting))
        return self

    def _steps(self) -> tuple[int, Respacing | None]:
        p = self.params
        if not p.needs_ddpm:
            return 0, None
        if self.ddpm is None:
            raise UsageError("ace: no DDPM loaded; call fit(dataset, cache_dir=...) or use(ddpm) first "
                             "(or set filter=false inpaint=0 for plain PGD).")
        return tau_steps(p.tau, p.respacing), self.ddpm.respace(p.respacing)

    def pre_explanation(self, model, x0: torch.Tensor, target: torch.Tensor, draw) -> torch.Tensor:
        """Stage 1: PGD with sign steps on CE(C(F_tau(x'))) + lambda1 L1 + lambda2 L2, from x."""
        p = self.params
        steps, r = self._steps()
        x = x0.clone()
        for _ in range(p.iterations):
            x.requires_grad_(True)
            xf = self.ddpm.filter(x, steps, r, stochastic=p.stochastic, draw=draw) if p.filter else x
            loss = F.cross_entropy(model(xf), target, reduction="sum")
            d = (x - x0).flatten(1)
            if p.lambda1:
                loss = loss + p.lambda1 * d.abs().sum()
            if p.lambda2:
                loss = loss + p.lambda2 * d.norm(dim=1).sum()
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = x - p.step * grad.sign()
                x = torch.min(torch.max(x, x0 - p.eps), x0 + p.eps).clamp(0, 1)
        return x.detach()

    def _batch(self, model, x0, target, first: int) -> ACEResult:
        p = self.params
        gens = [torch.Generator().manual_seed(int(canonical_hash(["ace", p.seed, first + i])[:15], 16))
                for i in range(len(x0))]
        draw = _noise_source(gens)
        x_pe = self.pre_explanation(model, x0, target, draw)
        if p.inpaint > 0:
            steps, r = self._steps()
            k = p.dilation or dilation_for(x0.shape[-1])
            _, keep = refinement_mask(x0, x_pe, k, p.inpaint)
            x_cf = refine(self.ddpm, x0, x_pe, keep, steps, r, draw, p.stochastic)
        else:
            keep = (x_pe - x0).abs().sum(1, keepdim=True) == 0
            x_cf = x_pe
        with torch.no_grad():
            m, m_pe = _margin(model(x_cf), target), _margin(model(x_pe), target)
        return ACEResult(x=x_cf, valid=m > 0, margin=m, x_pe=x_pe, valid_pe=m_pe > 0, mask=~keep)

    def generate(self, model: torch.nn.Module, x0: torch.Tensor, target: torch.Tensor, *,
                 progress: bool = False, desc: str = "ACE counterfactuals") -> ACEResult:
        """Counterfactuals of ``x0`` (in [0, 1]) towards classes ``target`` (batched; the model
        runs in eval mode and its mode is restored)."""
        check_instances("ace", x0, target)
        if self.ddpm is not None and tuple(x0.shape[1:]) != self.ddpm.shape:
            raise UsageError(f"ace: the DDPM models {self.ddpm.shape} images, the instances are {tuple(x0.shape[1:])}.")
        dev = next(self.ddpm.parameters()).device if self.ddpm is not None else x0.device
        x0, target = x0.detach().to(dev), target.detach().to(dev).long()
        parts = map_batches(model, len(x0), self.params.batch_size,
                            lambda s, e: self._batch(model, x0[s:e], target[s:e], s), progress=progress, desc=desc)
        if not parts:
            e = torch.empty(0, device=dev)
            return ACEResult(x=x0.clone(), valid=e.bool(), margin=e, x_pe=x0.clone(), valid_pe=e.bool(),
                             mask=torch.zeros_like(x0[:, :1], dtype=torch.bool))
        return concat_results(ACEResult, parts)

    def perturb(self, model, x, y, threat: ThreatModel | None = None):
        """ACE counterfactuals of ``x`` towards the target classes ``y`` (threat model ignored)."""
        return self.generate(model, x, y).x
