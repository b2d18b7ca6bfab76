"""Counterfactual adversarial training (ICLR 2025 submission 14241, "using counterfactual
explanations to generate adversarial examples"): train on prototype-guided counterfactual
explanations instead of PGD examples, to keep robust-training-style data without the
membership leakage of PGD-AT.

What the submission states, and how it is built here:

1. **Generation, decoupled from training the target.**  Counterfactuals follow Van Looveren &
   Klaise (elastic net + autoencoder + latent class prototype; :mod:`cfbench.attacks.proto_cf`,
   attack ``proto-cf``).  For a training pair (x, y): take x's nearest neighbour of another
   class in the autoencoder's latent space, x_nn (label y' != y), and generate *its*
   counterfactual towards class y.  Read literally, x_nn is the instance being explained:
   delta is applied to x_nn, the L1/L2 terms measure the distance to x_nn (as in Van Looveren
   & Klaise), and the prototype of y is the mean code of the ``proto_k`` class-y training
   encodings nearest to x_nn's code (x itself is usually among them).  The result lies just
   across the boundary on y's side, near x_nn and so near x in latent space.
2. **Replacement.**  A fraction ``p`` of the training set (paper's best: 0.95) is replaced by
   these counterfactuals, each labelled y (the label of the example it replaces); the target
   model is then trained from scratch on the mixed set with plain cross-entropy through the
   shared loop -- literally the ``erm`` loss, so ``p = 0`` is bit-identical to ``erm``.

Choices where the submission is silent (all stated in ``notes.defense.counterfactuals``):

* **which classifier the counterfactuals flip**: generation must not depend on the target
  being trained, so it uses a separate *generator classifier*: a copy of the untrained target
  model (same architecture and initial weights) trained with ``erm`` on the same training
  data, seed and training recipe -- i.e. exactly the run's ``erm`` model.  Validity (flip
  rate) is measured against it; agreement of the final target with the counterfactual labels
  is recorded too (``cf.target_flip_rate``).
* **which examples are replaced**: the first ``round(p N)`` of a permutation seeded by the
  run's seed (nested across p: the examples replaced at p = 0.5 are also replaced at 0.9).  An
  example whose counterfactual search failed keeps its original image (``cf.replaced`` and
  ``cf.replaced_fraction`` are what was actually replaced).
* the autoencoder and the class prototypes come from the target's own training data (the
  defense sees nothing else); the autoencoder, the generator classifier and the generated
  set (for the whole training set, so that every p reuses it) are cached under
  ``<out>/_cache/cf-at/`` and ``<out>/_cache/proto-cf/``, keyed by a canonical hash of their
  recipe and the sha256 of the training images and labels, written atomically as safetensors;
* the counterfactual settings are ``proto-cf``'s (defaults: the alibi MNIST example of the
  Van Looveren & Klaise paper); ``cf_lr`` and ``cf_batch_size`` are ``proto-cf``'s ``lr``
  and ``batch_size`` (renamed so that they do not capture ``--set lr=`` / ``batch_size=``).

Controls and options (version 2), so that the effect of the counterfactuals can be told
apart from the removal of the members' own images:

* ``control=real-only``: the same chosen ``round(p N)`` examples are *removed*; the model
  trains on the kept real images alone (``control_budget=epochs``, default: the same epochs,
  so each kept image is seen as often as in cf-at; ``steps``: as many optimisation steps as
  with all N images).  Nothing is generated.
* ``control=neighbour``: each chosen x is replaced by the unoptimised latent neighbour x_nn
  (the instance cf-at would explain, of another class), labelled y -- cf-at without the
  counterfactual search.  Only the autoencoder is trained (for the neighbours).
* ``exclude_self``: x's own code is left out of the class-y prototype of its counterfactual;
  ``cf.x_in_prototype_fraction`` records how often it would otherwise be among the
  ``proto_k`` neighbours of x_nn's code.
* the FISTA momentum of ``proto-cf`` is ``(k + 1) / (k + 4)`` -- alibi's executed schedule,
  see :mod:`cfbench.attacks.proto_cf`.
* every run records which members were replaced (or removed): ``notes.defense.
  counterfactuals.replaced`` (training-set indices and pool positions); the replaced set is
  the pure function :func:`chosen_indices` of (N, p, seed) minus failed searches, so a summary
  script (``scripts/cfat_table.py``) can split membership scores (``<run>/mia_scores.npz``)
  into replaced and kept members for the target and for every reference model.

``generator=ace`` swaps only the generator: the same explained neighbours x_nn (the proto-cf
autoencoder's latent neighbours, so the autoencoder is still trained) and targets y, with ACE
(:mod:`cfbench.attacks.ace`, its defaults) flipping the same generator classifier; it needs
the dataset's DDPM (``cfbench ddpm train --dataset D --out <out>``, trained on the second half
of the test split, disjoint from the pool) and warns when the run's test subset overlaps it.
``cf.ae_error`` is then the proto-cf autoencoder's error on the ACE counterfactuals.

Outputs: ``cf.flip_rate`` (generator classifier, whole generated set), ``cf.target_flip_rate``
(final target on the counterfactuals it trained on), ``cf.l1`` / ``cf.l2`` / ``cf.linf`` (to
x_nn), ``cf.l1_to_x`` / ``cf.l2_to_x`` (to x), ``cf.l2_neighbour_to_x``, ``cf.ae_error`` (L_AE
of the counterfactuals) beside ``cf.ae_error_data`` (of the real images), ``cf.replaced``,
``cf.replaced_fraction``, ``cf.generator.train_accuracy``; 16 example triples
(x, x_nn, counterfactual) as ``counterfactual.*`` in ``<run>/examples.safetensors``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cfbench import params as P
from cfbench.attacks.proto_cf import ProtoCF, ProtoCFParams, data_fingerprint, quality
from cfbench.defenses.base import Defense, FitContext, compose
from cfbench.errors import UsageError
from cfbench.hashing import canonical_hash
from cfbench.mia.metrics import proportion
from cfbench.params import param
from cfbench.store.io import load_tensors, save_tensors_atomic

EXAMPLES_PREFIX = "counterfactual"
N_EXAMPLES = 16
#: cf-at setting -> proto-cf setting, where the names differ
RENAMED = {"cf_lr": "lr", "cf_batch_size": "batch_size"}
_G = ProtoCFParams()


@dataclass(frozen=True)
class CFATParams:
    p: float = param(0.95, "fraction of the training set replaced by counterfactuals (paper's best: 0.95)",
                     ge=0, le=1)
    steps: int = param(_G.steps, "FISTA iterations per round of the counterfactual search", ge=1)
    c_steps: int = param(_G.c_steps, "rounds of the search after which c is updated per example", ge=1)
    c_init: float = param(_G.c_init, "initial weight c of the prediction hinge", gt=0)
    beta: float = param(_G.beta, "weight of the L1 distance (shrinkage threshold)", ge=0)
    gamma: float = param(_G.gamma, "weight of the autoencoder reconstruction loss", ge=0)
    theta: float = param(_G.theta, "weight of the latent prototype loss", ge=0)
    kappa: float = param(_G.kappa, "confidence margin of a valid counterfactual", ge=0)
    cf_lr: float = param(_G.lr, "initial FISTA step size (proto-cf lr)", gt=0)
    proto_k: int = param(_G.proto_k, "training encodings averaged into the target-class prototype", ge=1)
    ae_epochs: int = param(_G.ae_epochs, "autoencoder training epochs", ge=1)
    ae_width: int = param(_G.ae_width, "autoencoder conv channels", ge=1)
    ae_latent_channels: int = param(_G.ae_latent_channels, "autoencoder latent channels", ge=1)
    cf_batch_size: int = param(_G.batch_size, "counterfactuals optimised together (proto-cf batch_size)", ge=1)
    exclude_self: bool = param(False, "leave x itself out of the class-y prototype of its counterfactual "
                                      "(by default x's own code is usually one of the proto_k neighbours)")
    control: Literal["none", "real-only", "neighbour"] = param(
        "none", "control instead of cf-at: real-only = train on the kept (1-p) real images alone; neighbour = "
                "replace the chosen images by their unoptimised latent neighbour x_nn, labelled y")
    control_budget: Literal["epochs", "steps"] = param(
        "epochs", "control=real-only: the same epochs over the kept images (each seen as often as in cf-at), "
                  "or as many optimisation steps as training on all N")
    generator: Literal["proto-cf", "ace"] = param(
        "proto-cf", "counterfactual generator: proto-cf (the submission's) or ace (Jeanneret et al. 2023, with its "
                    "defaults and the dataset's DDPM from `cfbench ddpm train`); same neighbours and targets")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            P.check_value(f, getattr(self, f.name), f"defense.{f.name}")
            v = getattr(self, f.name)
            if isinstance(v, float) and math.isinf(v):
                raise UsageError(f"defense.{f.name}: {v!r} is out of range; it must be finite.")

    def proto_cf_params(self) -> ProtoCFParams:
        names = {f.name for f in dataclasses.fields(ProtoCFParams)}
        kw = {RENAMED.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(self)
              if RENAMED.get(f.name, f.name) in names}
        return ProtoCFParams(**kw)


def _state_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _replacement_seed(seed: int) -> int:
    """Seed of the replacement permutation: derived from the run seed, distinct from the loop's
    batch-order seeds (``seed * 100003 + epoch``)."""
    return int.from_bytes(hashlib.sha256(f"cf-at replacement {int(seed)}".encode()).digest()[:7], "big")


def chosen_indices(n: int, p: float, seed: int) -> torch.Tensor:
    """The training-set positions cf-at replaces (before failed searches are put back): the
    first ``round(p n)`` of a permutation seeded by the run seed -- nested across p, and the
    same for cf-at and both controls.  Pure: a summary script recomputes it for any model
    (e.g. a membership reference model, from its training subset and seed)."""
    m = math.floor(p * n + 0.5)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_replacement_seed(seed)))
    return order[:m]


@torch.no_grad()
def self_in_prototype(gen: ProtoCF, nn: torch.Tensor) -> float:
    """Fraction of training examples x_i whose own latent code is among the ``proto_k`` class-y_i
    training codes nearest to the code of its neighbour x_nn -- i.e. among the codes the
    prototype of its counterfactual averages when x is not excluded."""
    codes, labels, k = gen.codes, gen.labels, gen.params.proto_k
    nn = nn.to(codes.device)
    hit = 0
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        members = rows
        for s in range(0, len(rows), 1024):
            r = rows[s:s + 1024]
            top = torch.cdist(codes[nn[r]].double(), codes[members].double()).topk(
                min(k, len(members)), largest=False).indices
            hit += int((members[top] == r[:, None]).any(1).sum())
    return hit / max(len(labels), 1)


def _model_identity(model: torch.nn.Module) -> dict:
    prm = getattr(model, "params", None)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "version": getattr(model, "version", None),
            "params": P.to_dict(prm) if dataclasses.is_dataclass(prm) else None,
            "initial_weights_sha256": _state_sha(model)}


class CFAT(Defense):
    """Training on prototype-guided counterfactuals of latent nearest neighbours (see module docstring)."""

    name = "cf-at"
    description = ("counterfactual AT (ICLR'25 sub. 14241): a fraction p of the training set replaced by "
                   "prototype-guided counterfactuals of latent neighbours, then plain training")
    version = 2
    family = "privacy"
    Params = CFATParams
    contract_params = {"steps": 2, "c_steps": 1, "ae_epochs": 1}

    def __init__(self, params=None):
        super().__init__(params)
        self.base = compose("erm")  # plain cross-entropy, exactly erm's

    def loss(self, model, x, y, batch):
        return self.base.loss(model, x, y, batch)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.defense_params.p > 0:
            c, h, w = cfg.dataset_info["shape"]
            if h % 2 or w % 2:
                raise UsageError(f"cf-at needs even image sides for its autoencoder; {cfg.dataset!r} has {h}x{w}.")

    # -- stage 1: the generated set (cached) -----------------------------------------------------
    def _generator_classifier(self, initial, x, y, ctx: FitContext, recipe: dict, cache: Path | None):
        clf = copy.deepcopy(initial)
        path = cache / f"clf-{canonical_hash(recipe)[:24]}.safetensors" if cache else None
        if path is not None and path.exists():
            tensors, _ = load_tensors(path)
            clf.load_state_dict(tensors)
            return clf.to(ctx.device).eval()
        gctx = FitContext(threat=ctx.threat, train=ctx.train, device=ctx.device, seed=ctx.seed,
                          num_classes=ctx.num_classes, augmentation=ctx.augmentation, checkpoint_dir=None,
                          cache_dir=None, progress=ctx.progress, desc=f"{ctx.desc} (cf generator classifier)")
        self.base.fit(clf, x, y, gctx)
        if path is not None:
            save_tensors_atomic(path, clf.state_dict(), {"recipe": recipe, "history": gctx.history})
        return clf.eval()

    @staticmethod
    def _ace(ctx: FitContext):
        """``generator=ace``: ACE with its defaults and the dataset's default DDPM (trained on the
        second half of the test split by ``cfbench ddpm train``; a clear error when missing)."""
        from cfbench.attacks.ace import ACE, ddpm_split

        if ctx.data is None:
            raise UsageError("cf-at generator=ace needs the run's dataset to find its DDPM (cfbench ddpm train); "
                             "fit it through `cfbench run` (or a FitContext with data).")
        ds = ctx.data.dataset
        overlap = np.intersect1d(np.asarray(ctx.data.test_idx), ddpm_split(ds))
        if len(overlap) and ctx.run_dir is not None:
            ctx.warnings.append(f"cf-at generator=ace: {len(overlap)} of the run's test images also trained the DDPM "
                                f"(the second half of the test split); set data.test_size={len(ds.x_test) // 2} to "
                                "evaluate on images the DDPM has not seen.")
        return ACE().fit(ds, cache_dir=ctx.cache_dir, augmentation=ctx.augmentation, device=ctx.device, setting=None)

    def generated_set(self, initial: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: FitContext) -> tuple[dict[str, torch.Tensor], dict]:
        """Counterfactuals for the whole training set (tensors ``x_cf``, ``valid``, ``neighbour``,
        ``margin``) and their metadata; from the cache when this recipe was generated before."""
        gp = self.params.proto_cf_params()
        fp = data_fingerprint(x, y)
        clf_recipe = {"kind": "cf-at generator classifier", "defense": "erm", "erm_version": self.base.version,
                      "model": _model_identity(initial), "train": P.to_dict(ctx.train),
                      "augmentation": ctx.augmentation, "seed": ctx.seed, "data": fp}
        gen = ProtoCF(gp)
        recipe = {"kind": "cf-at generated set", "cf_at_version": self.version, "proto_cf_version": ProtoCF.version,
                  "generator": P.to_dict(gp), "classifier": clf_recipe,
                  "autoencoder": gen.autoencoder_recipe(x, ctx.seed), "data": fp}
        if self.params.exclude_self:
            recipe["exclude_self"] = True
        ace = self._ace(ctx) if self.params.generator == "ace" else None
        if ace is not None:   # proto-cf recipes stay as they were (their caches remain valid)
            recipe.update(counterfactual_generator="ace", ace_version=ace.version, ace=P.to_dict(ace.params),
                          ddpm=ace.ddpm_meta.get("recipe"))
        cache = Path(ctx.cache_dir) / "cf-at" if ctx.cache_dir is not None else None
        path = cache / f"set-{canonical_hash(recipe)[:24]}.safetensors" if cache else None
        if path is not None and path.exists():
            tensors, meta = load_tensors(path)
            meta.update(cached=True, path=str(path))
            return tensors, meta
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            clf = self._generator_classifier(initial, x, y, ctx, clf_recipe, cache)
            gen.fit(x, y, seed=ctx.seed, device=ctx.device, cache_dir=ctx.cache_dir)
            if ace is not None:   # same explained neighbours x_nn and targets y, ACE instead of proto-cf
                nn = gen.nearest_other_class()
                res = ace.generate(clf, x.to(ctx.device)[nn.to(ctx.device)], y, progress=ctx.progress,
                                   desc=f"{ctx.desc} ACE counterfactuals")
            else:
                nn, res = gen.neighbour_counterfactuals(clf, progress=ctx.progress,
                                                        desc=f"{ctx.desc} counterfactuals",
                                                        exclude_self=self.params.exclude_self)
            xd, yd = x.to(ctx.device), y.to(ctx.device)
            with torch.no_grad():
                train_pred = torch.cat([clf(xd[i:i + 512]).argmax(1) for i in range(0, len(xd), 512)])
            q = quality(res.x, res.valid, xd[nn.to(ctx.device)], xd, gen)
            x_in_proto = self_in_prototype(gen, nn) if ace is None else None
        tensors = {"x_cf": res.x.cpu(), "valid": res.valid.cpu(), "neighbour": nn.cpu(), "margin": res.margin.cpu()}
        meta = {"recipe": recipe, "quality": q, "seconds": time.perf_counter() - t0,
                "generator_train_correct": int((train_pred == yd).sum()), "n": len(x), "x_in_prototype": x_in_proto,
                "ae_history": gen.ae_history, "ae_cached": gen.ae_cached}
        if path is not None:
            save_tensors_atomic(path, tensors, meta)
        meta.update(cached=False, path=str(path) if path else None)
        return tensors, meta

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, model, x, y, ctx: FitContext) -> None:
        from cfbench.training.loop import train

        prm = self.params
        if prm.control != "none":
            return self._fit_control(model, x, y, ctx)
        n = len(x)
        m = math.floor(prm.p * n + 0.5)
        notes = ctx.notes.setdefault("counterfactuals", {})
        notes["choices"] = {
            "explained_instance": "x_nn, the latent nearest neighbour of x with another label; delta applied to "
                                  "x_nn, L1/L2 measured to x_nn; target class y; trained with label y",
            "prototype": f"mean latent code of the {prm.proto_k} class-y training encodings nearest to x_nn"
                         + (", x itself excluded" if prm.exclude_self else " (x itself may be one of them)"),
            "generator_classifier": "copy of the untrained target trained with erm on the same data, seed and "
                                    "recipe (= the run's erm model); counterfactuals flip it",
            "replacement": "first round(p N) of a permutation seeded by the run seed; failed searches keep x",
            "generator": prm.generator,
            "pred_loss": "targeted hinge on logits: max(max_{i!=y} f_i - f_y, -kappa)",
            "fista_momentum": "(k+1)/(k+4) at iteration k = 0, 1, ... (alibi's executed schedule; "
                              "cfbench.attacks.proto_cf docstring)",
        }
        x_mixed = x
        use = torch.zeros(0, dtype=torch.long)
        if m == 0:
            notes["generated"] = "no counterfactuals: p = 0 trains on the original data (identical to erm)"
            ctx.metrics.update({"cf.replaced": 0, "cf.replaced_fraction": 0.0})
        else:
            initial = copy.deepcopy(model)
            tensors, meta = self.generated_set(initial, x, y, ctx)
            valid, nn = tensors["valid"].bool(), tensors["neighbour"].long()
            chosen = chosen_indices(n, prm.p, ctx.seed)
            use = chosen[valid[chosen]]
            x_mixed = x.clone()
            x_mixed[use] = tensors["x_cf"][use].to(x.dtype)
            ctx.metrics["cf.flip_rate"] = proportion(int(valid.sum()), n)
            ctx.metrics["cf.replaced"] = len(use)
            ctx.metrics["cf.replaced_fraction"] = len(use) / n
            ctx.metrics["cf.generator.train_accuracy"] = proportion(meta["generator_train_correct"], n)
            ctx.metrics.update({f"cf.{k}": v for k, v in meta["quality"].items()})
            ctx.metrics["cf.generation_seconds"] = meta["seconds"]
            if meta.get("x_in_prototype") is not None:   # with exclude_self: left out of the prototype
                ctx.metrics["cf.x_in_prototype_fraction"] = meta["x_in_prototype"]
            notes.update(cached=meta["cached"], cache_file=meta["path"], requested=m, failed_in_chosen=m - len(use),
                         autoencoder_mse_per_epoch=meta.get("ae_history"), generation_recipe=meta["recipe"])
            self._save_examples(x, y, tensors["x_cf"], nn, use, ctx, notes)
        self._note_replaced(ctx, notes, use, "replaced by its counterfactual")
        train(model, x_mixed, y, ctx, self.loss, state=self)
        if m > 0 and len(use):
            with torch.no_grad():
                xc, yc = x_mixed[use].to(ctx.device), y[use].to(ctx.device)
                agree = sum(int((model(xc[i:i + 512]).argmax(1) == yc[i:i + 512]).sum())
                            for i in range(0, len(xc), 512))
            ctx.metrics["cf.target_flip_rate"] = proportion(agree, len(use))

    @staticmethod
    def _note_replaced(ctx: FitContext, notes: dict, idx: torch.Tensor, meaning: str) -> None:
        """Which members were replaced (or removed), for a summary script that splits membership
        metrics into replaced and kept members: training-set indices and, inside a run, pool positions."""
        idx = torch.sort(idx).values
        notes["replaced"] = {"meaning": meaning, "train_index": idx.tolist(),
                             "pool_positions": (None if ctx.pool_positions is None
                                                else np.asarray(ctx.pool_positions)[idx.numpy()].tolist())}

    def _fit_control(self, model, x, y, ctx: FitContext) -> None:
        """The controls: ``real-only`` trains on the kept real images alone; ``neighbour`` replaces
        the chosen images by their unoptimised latent neighbour x_nn (another class), labelled y."""
        from cfbench.training.loop import train

        prm, n = self.params, len(x)
        chosen = chosen_indices(n, prm.p, ctx.seed)
        notes = ctx.notes.setdefault("counterfactuals", {})
        notes["control"] = prm.control
        ctx.metrics["cf.replaced"] = len(chosen)
        ctx.metrics["cf.replaced_fraction"] = len(chosen) / n
        if prm.control == "real-only":
            keep = torch.ones(n, dtype=torch.bool)
            keep[chosen] = False
            if not keep.any():
                raise UsageError(f"cf-at control=real-only with p={prm.p} keeps no real image to train on; "
                                 "use p < 1.")
            tp = ctx.train
            if prm.control_budget == "steps":
                k = int(keep.sum())
                tp = dataclasses.replace(tp, epochs=math.ceil(tp.epochs * math.ceil(n / tp.batch_size)
                                                              / math.ceil(k / tp.batch_size)))
            notes["choices"] = {"control": "real-only: the chosen round(p N) examples (cf-at's permutation) are "
                                           "removed; the model trains on the kept real images alone",
                                "budget": f"{prm.control_budget}: {tp.epochs} epochs over {int(keep.sum())} images"}
            self._note_replaced(ctx, notes, chosen, "removed (never trained on)")
            cctx = dataclasses.replace(ctx, train=tp)
            train(model, x[keep], y[keep], cctx, self.loss, state=self)
            ctx.history[:] = cctx.history
            return
        gen = ProtoCF(prm.proto_cf_params())
        with torch.random.fork_rng(devices=[]):
            gen.fit(x, y, seed=ctx.seed, device=ctx.device, cache_dir=ctx.cache_dir)
        nn = gen.nearest_other_class().cpu()
        x_mixed = x.clone()
        x_mixed[chosen] = x[nn[chosen]]
        notes["choices"] = {"control": "neighbour: each chosen x is replaced by x_nn (its latent nearest neighbour of "
                                       "another class, the instance cf-at explains), unoptimised, labelled y",
                            "autoencoder": "proto-cf's, trained on the training data (shared cache)"}
        self._note_replaced(ctx, notes, chosen, "replaced by its unoptimised latent neighbour x_nn")
        train(model, x_mixed, y, ctx, self.loss, state=self)

    @staticmethod
    def _save_examples(x, y, x_cf, nn, use, ctx: FitContext, notes: dict) -> None:
        """16 (x, x_nn, counterfactual) triples for the report, through the run's one example
        channel (``ctx.examples``, saved as ``counterfactual.*`` in ``<run>/examples.safetensors``)
        for the run's target only (``ctx.run_dir`` is None for reference models and the contract
        check)."""
        if ctx.run_dir is None or len(use) == 0:
            return
        idx = use[:N_EXAMPLES]
        ctx.examples[EXAMPLES_PREFIX] = {"clean": x[idx], "adv": x_cf[idx], "neighbour": x[nn[idx]],
                                         "y": y[idx], "neighbour_y": y[nn[idx]], "index": idx}
        notes["examples"] = (f"{EXAMPLES_PREFIX}.* in examples.safetensors: clean = x (label y), neighbour = x_nn "
                             "(label neighbour_y), adv = the counterfactual x_nn + delta towards y (trained with y)")
