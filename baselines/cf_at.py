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

    def __post_init__(self):
        for f in dataclasses.fields(self):
            P.check_value(f, getattr(self, f.name), f"defense.{f.name}")
            v = getattr(self, f.name)
            if isinstance(v, float) and math.isinf(v):
                raise UsageError(f"defense.{f.name}: {v!r} is out of range; it must be finite.")

    def generator(self) -> ProtoCFParams:
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
    version = 1
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

    def generated_set(self, initial: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      ctx: FitContext) -> tuple[dict[str, torch.Tensor], dict]:
        """Counterfactuals for the whole training set (tensors ``x_cf``, ``valid``, ``neighbour``,
        ``margin``) and their metadata; from the cache when this recipe was generated before."""
        gp = self.params.generator()
        fp = data_fingerprint(x, y)
        clf_recipe = {"kind": "cf-at generator classifier", "defense": "erm", "erm_version": self.base.version,
                      "model": _model_identity(initial), "train": P.to_dict(ctx.train),
                      "augmentation": ctx.augmentation, "seed": ctx.seed, "data": fp}
        gen = ProtoCF(gp)
        recipe = {"kind": "cf-at generated set", "cf_at_version": self.version, "proto_cf_version": ProtoCF.version,
                  "generator": P.to_dict(gp), "classifier": clf_recipe,
                  "autoencoder": gen.autoencoder_recipe(x, ctx.seed), "data": fp}
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
            nn, res = gen.neighbour_counterfactuals(clf, progress=ctx.progress, desc=f"{ctx.desc} counterfactuals")
            xd, yd = x.to(ctx.device), y.to(ctx.device)
            with torch.no_grad():
                train_pred = torch.cat([clf(xd[i:i + 512]).argmax(1) for i in range(0, len(xd), 512)])
            q = quality(res.x, res.valid, xd[nn.to(ctx.device)], xd, gen)
        tensors = {"x_cf": res.x.cpu(), "valid": res.valid.cpu(), "neighbour": nn.cpu(), "margin": res.margin.cpu()}
        meta = {"recipe": recipe, "quality": q, "seconds": time.perf_counter() - t0,
                "generator_train_correct": int((train_pred == yd).sum()), "n": len(x),
                "ae_history": gen.ae_history, "ae_cached": gen.ae_cached}
        if path is not None:
            save_tensors_atomic(path, tensors, meta)
        meta.update(cached=False, path=str(path) if path else None)
        return tensors, meta

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, model, x, y, ctx: FitContext) -> None:
        from cfbench.training.loop import train

        n = len(x)
        m = math.floor(self.params.p * n + 0.5)
        notes = ctx.notes.setdefault("counterfactuals", {})
        notes["choices"] = {
            "explained_instance": "x_nn, the latent nearest neighbour of x with another label; delta applied to "
                                  "x_nn, L1/L2 measured to x_nn; target class y; trained with label y",
            "prototype": f"mean latent code of the {self.params.proto_k} class-y training encodings nearest to x_nn",
            "generator_classifier": "copy of the untrained target trained with erm on the same data, seed and "
                                    "recipe (= the run's erm model); counterfactuals flip it",
            "replacement": "first round(p N) of a permutation seeded by the run seed; failed searches keep x",
            "pred_loss": "targeted hinge on logits: max(max_{i!=y} f_i - f_y, -kappa)",
        }
        x_mixed = x
        if m == 0:
            notes["generated"] = "no counterfactuals: p = 0 trains on the original data (identical to erm)"
            ctx.metrics.update({"cf.replaced": 0, "cf.replaced_fraction": 0.0})
        else:
            initial = copy.deepcopy(model)
            tensors, meta = self.generated_set(initial, x, y, ctx)
            valid, nn = tensors["valid"].bool(), tensors["neighbour"].long()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_replacement_seed(ctx.seed)))
            chosen = order[:m]
            use = chosen[valid[chosen]]
            x_mixed = x.clone()
            x_mixed[use] = tensors["x_cf"][use].to(x.dtype)
            ctx.metrics["cf.flip_rate"] = proportion(int(valid.sum()), n)
            ctx.metrics["cf.replaced"] = len(use)
            ctx.metrics["cf.replaced_fraction"] = len(use) / n
            ctx.metrics["cf.generator.train_accuracy"] = proportion(meta["generator_train_correct"], n)
            ctx.metrics.update({f"cf.{k}": v for k, v in meta["quality"].items()})
            ctx.metrics["cf.generation_seconds"] = meta["seconds"]
            notes.update(cached=meta["cached"], cache_file=meta["path"], requested=m, failed_in_chosen=m - len(use),
                         autoencoder_mse_per_epoch=meta.get("ae_history"), generation_recipe=meta["recipe"])
            self._save_examples(x, y, tensors["x_cf"], nn, use, ctx, notes)
        train(model, x_mixed, y, ctx, self.loss, state=self)
        if m > 0 and len(use):
            with torch.no_grad():
                xc, yc = x_mixed[use].to(ctx.device), y[use].to(ctx.device)
                agree = sum(int((model(xc[i:i + 512]).argmax(1) == yc[i:i + 512]).sum())
                            for i in range(0, len(xc), 512))
            ctx.metrics["cf.target_flip_rate"] = proportion(agree, len(use))

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
