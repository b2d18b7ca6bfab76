"""Prototype-guided counterfactual explanations (Van Looveren & Klaise, "Interpretable
counterfactual explanations guided by prototypes", ECML-PKDD 2021, arXiv 1907.02584), the
generator behind counterfactual adversarial training (``cf-at``).  Registered as the attack
``proto-cf``.

Objective, for an instance ``x0`` and a target class ``t``, over ``x' = x0 + delta`` in [0, 1]:

    L = c * L_pred + beta * ||delta||_1 + ||delta||_2^2 + gamma * L_AE + theta * L_proto
    L_pred  = max( max_{i != t} f_i(x') - f_t(x'), -kappa )      (f = the classifier's logits)
    L_AE    = ||x' - AE(x')||_2^2
    L_proto = ||ENC(x') - proto_t||_2^2

Every norm is a per-example sum over pixels (latent units); a batch is the sum of independent
per-example problems, so batching does not couple examples.

Optimisation (as the paper and its reference implementation, alibi's ``CounterfactualProto``):
FISTA (Beck & Teboulle) on the smooth part ``c L_pred + ||delta||^2 + gamma L_AE + theta
L_proto``, whose gradient (clipped element-wise to +-``grad_clip``) is taken at the slack point
``y_k``; the L1 term is handled by the projected shrinkage-thresholding step of EAD (Chen et
al. 2018) with threshold ``beta`` around ``x0`` and projection onto [0, 1]; momentum
``(k + 1) / (k + 4)`` at iteration ``k = 0, 1, ...`` (see below); step size
``lr * (1 - k / steps) ** 0.5`` (polynomial decay to 0).  Among
the iterates that are valid counterfactuals (``f_t - max_{i != t} f_i > 0`` and ``>= kappa``)
the one with the smallest ``beta ||delta||_1 + ||delta||_2^2`` is kept.  ``c`` starts at
``c_init`` and is updated per example after each of ``c_steps`` rounds of ``steps`` iterations
(alibi): a round that found a valid counterfactual lowers the upper bound and bisects, one that
did not raises the lower bound and bisects, or multiplies ``c`` by 10 while no upper bound
exists.  Defaults are the settings of the alibi MNIST example built on the paper
(``c_init = 1``, ``c_steps = 2``, 1,000 iterations, ``beta = 0.1``, ``gamma = theta = 100``,
``kappa = 0``, ``lr = 0.01``, gradients clipped to +-1000).

Prototypes: the autoencoder (:mod:`cfbench.attacks.autoencoder`) is trained on the training
data given to :meth:`ProtoCF.fit`; ``proto_t`` for an instance is the mean latent code of the
``proto_k`` training encodings of class ``t`` nearest (Euclidean, flattened codes) to the
instance's own code -- the paper's definition ("the average encoding over the K nearest
instances in the latent space with the same class label").

**Momentum, (k + 1) / (k + 4), not k / (k + 3).**  EAD's Algorithm 1 writes
``y_{k+1} = x_{k+1} + k / (k + 3) (x_{k+1} - x_k)`` for ``k = 0, 1, ...``; alibi's
``CounterfactualProto`` writes ``zt = global_step / (global_step + 3)``,
but evaluates it *after* ``optimizer.apply_gradients(..., global_step=global_step)`` has
incremented the step: each iteration of its ``attack`` loop runs ``apply_grads`` and then
``adv_updater`` / ``adv_updater_s``, so iteration ``k`` (0-based) uses ``(k + 1) / (k + 4)``
(1/4 at the first iteration, never 0), while the step size (``polynomial_decay`` read inside
``apply_gradients``, before the increment) uses ``k``.  cfbench follows what alibi executes,
the reference implementation the cf-at submission builds on; the two schedules differ by one
iteration's shift and meet as ``k`` grows (``tests/test_cf_at.py`` checks an iterate sequence
against a float64 transcription of alibi's loop order, and that the paper's ``k / (k + 3)``
gives a different one).

Choices where the paper is silent or differs from its code (each stated in the record):

* **target class**: cf-at needs counterfactuals *towards a given class* (the label of the
  training example they replace), so ``L_pred`` is the targeted hinge above -- the strongest
  non-target logit against the target logit -- not the paper's untargeted hinge away from the
  original class (alibi with ``target_class`` keeps the untargeted hinge and only restricts
  the prototype and the validity check to the target).  Whenever the original class is the
  strongest competitor the two coincide; the targeted form also rules out a flip to a third
  class.  Logits, not probabilities (alibi feeds probabilities; logits do not saturate and
  are what Carlini-Wagner-style hinges use).
* **prototype neighbours**: ``proto_k = 5`` (alibi's default is the whole class, which gives
  the class mean; the paper's K is not stated for MNIST); class labels of the training
  encodings are the true labels (alibi uses the classifier's predictions).
* **failures**: :meth:`ProtoCF.generate` reports per example whether a valid counterfactual was
  found; :meth:`ProtoCF.perturb` (the attack interface) returns the best valid counterfactual,
  or the last iterate where none was found -- check validity with the model.
* the threat model passed to :meth:`ProtoCF.perturb` is ignored: counterfactuals are not
  norm-bounded (their size is what L1/L2/proximity metrics report).

``perturb(model, x, y, threat)``: ``model`` is the classifier whose decision is flipped, ``x``
the instances to explain, ``y`` the **target classes** (not the true labels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..params import param
from ..hashing import canonical_hash
from ..store.io import load_tensors, save_tensors_atomic
from .autoencoder import ConvAutoencoder, train_autoencoder
from .base import Attack, ThreatModel
from .batching import check_instances, concat_results, map_batches

NO_BOUND = 1e10


@dataclass(frozen=True)
class ProtoCFParams:
    c_init: float = param(1.0, "initial weight c of the prediction hinge (alibi MNIST example: 1)", gt=0)
    c_steps: int = param(2, "rounds of FISTA after which c is bisected / multiplied by 10 per example "
                            "(alibi MNIST example: 2)", ge=1)
    steps: int = param(1000, "FISTA iterations per round (alibi MNIST example: 1000)", ge=1)
    beta: float = param(0.1, "weight of the L1 distance (= the shrinkage threshold)", ge=0)
    gamma: float = param(100.0, "weight of the autoencoder reconstruction loss L_AE (alibi MNIST example: 100)", ge=0)
    theta: float = param(100.0, "weight of the prototype loss L_proto (alibi MNIST example: 100)", ge=0)
    kappa: float = param(0.0, "confidence margin of the hinge (valid: target logit ahead by >= kappa)", ge=0)
    lr: float = param(0.01, "initial FISTA step size; decays as (1 - k/steps)^0.5 to 0", gt=0)
    proto_k: int = param(5, "prototype = mean code of the k nearest training encodings of the target class", ge=1)
    ae_epochs: int = param(30, "autoencoder training epochs over the training data", ge=1)
    ae_width: int = param(16, "autoencoder conv channels (alibi MNIST example: 16)", ge=1)
    ae_latent_channels: int = param(1, "autoencoder latent channels (alibi MNIST example: 1, a 14x14 code on "
                                          "28x28)", ge=1)
    batch_size: int = param(256, "examples optimised together (independent problems; no effect on results)", ge=1)
    grad_clip: float = param(1000.0, "element-wise gradient clipping (alibi: 1000)", gt=0)

    def __post_init__(self):
        from ..params import check_value

        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name), f"proto-cf.{f.name}")
        for f in ("c_init", "beta", "gamma", "theta", "kappa", "lr", "grad_clip"):
            if math.isinf(getattr(self, f)):
                raise UsageError(f"proto-cf.{f}: {getattr(self, f)!r} is out of range; it must be finite.")


#: fields of ProtoCFParams that only concern the autoencoder (its cache key)
AE_FIELDS = ("ae_epochs", "ae_width", "ae_latent_channels")


@dataclass
class CFResult:
    """Counterfactuals of a batch of instances ``x0`` towards ``target``."""

    x: torch.Tensor          # best valid counterfactual, or the last iterate where none was found
    valid: torch.Tensor      # bool: the classifier predicts the target class (margin > 0 and >= kappa)
    margin: torch.Tensor     # f_t - max_{i != t} f_i of the classifier on x
    const: torch.Tensor      # the last c used for each example


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 over the dtype, shape and bytes of each tensor (identifies a training set)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(1)


def nearest_other_class(codes: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Index of each row's nearest row (Euclidean) with a different label; ties: lowest index."""
    codes = _flat(codes).double()
    n = len(codes)
    if n and (labels == labels[0]).all():
        raise UsageError(f"every training example has label {int(labels[0])}: there is no neighbour of "
                         "another class to start a counterfactual from.")
    out = torch.empty(n, dtype=torch.long)
    sq = (codes * codes).sum(1)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d = sq[s:e, None] - 2 * codes[s:e] @ codes.T + sq[None, :]
        d[labels[s:e, None] == labels[None, :]] = math.inf
        out[s:e] = d.argmin(1).cpu()
    return out


class ProtoCF(Attack):
    """Van Looveren & Klaise's prototype-guided counterfactuals (see the module docstring)."""

    name = "proto-cf"
    description = ("prototype-guided counterfactuals (Van Looveren & Klaise): elastic net + autoencoder + "
                   "latent class prototype, FISTA; y = target class")
    version = 1
    Params = ProtoCFParams

    def __init__(self, params=None):
        super().__init__(params)
        self.ae: ConvAutoencoder | None = None
        self.codes: torch.Tensor | None = None      # flattened latent codes of the fitted training set
        self.labels: torch.Tensor | None = None
        self.x_fit: torch.Tensor | None = None
        self.ae_history: list[float] = []
        self.ae_cached = False

    # -- fitting: autoencoder + latent codes of the training set ------------------------------
    def autoencoder_recipe(self, x: torch.Tensor, seed: int) -> dict[str, Any]:
        p = self.params
        return {"kind": "proto-cf-autoencoder", "version": self.version,
                "params": {f: getattr(p, f) for f in AE_FIELDS}, "seed": int(seed),
                "data": data_fingerprint(x)}

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, device: torch.device | str | None = None,
            cache_dir: str | Path | None = None) -> ProtoCF:
        """Train the autoencoder on ``x`` (seeded) and encode the training set (prototypes and
        nearest neighbours are drawn from it).  With ``cache_dir`` the autoencoder is stored as
        ``<cache_dir>/proto-cf/ae-<hash>.safetensors``, keyed by its settings, the seed and
        the sha256 of ``x``, and loaded from there when it exists."""
        if len(x) != len(y):
            raise UsageError(f"proto-cf fit: {len(x)} images but {len(y)} labels.")
        ConvAutoencoder.check_shape(x.shape)
        p = self.params
        device = torch.device(device) if device is not None else x.device
        path = None
        if cache_dir is not None:
            key = canonical_hash(self.autoencoder_recipe(x, seed))[:24]
            path = Path(cache_dir) / "proto-cf" / f"ae-{key}.safetensors"
        if path is not None and path.exists():
            tensors, meta = load_tensors(path)
            ae = ConvAutoencoder(x.shape[1], p.ae_width, p.ae_latent_channels)
            ae.load_state_dict(tensors)
            self.ae, self.ae_history, self.ae_cached = ae.to(device).eval(), list(meta.get("history", [])), True
        else:
            self.ae, self.ae_history = train_autoencoder(
                x, width=p.ae_width, latent_channels=p.ae_latent_channels, epochs=p.ae_epochs, seed=seed,
                device=device)
            self.ae_cached = False
            if path is not None:
                save_tensors_atomic(path, self.ae.state_dict(), {"history": self.ae_history,
                                                                 "recipe": self.autoencoder_recipe(x, seed)})
        for q in self.ae.parameters():
            q.requires_grad_(False)
        self.x_fit = x.detach().to(device)
        self.labels = y.detach().to(device).long()
        self.codes = self.encode(self.x_fit)
        return self

    def _require_fit(self) -> None:
        if self.ae is None:
            raise UsageError("proto-cf: call fit(x_train, y_train) first: the autoencoder and the class "
                             "prototypes are learned from the training data.")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened latent codes, batched."""
        self._require_fit()
        bs = self.params.batch_size
        return torch.cat([_flat(self.ae.encode(x[i:i + bs])) for i in range(0, len(x), bs)]) if len(x) else \
            torch.empty(0)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example ``||x - AE(x)||_2^2`` (the L_AE term)."""
        self._require_fit()
        bs = self.params.batch_size
        return torch.cat([(x[i:i + bs] - self.ae(x[i:i + bs])).pow(2).flatten(1).sum(1)
                          for i in range(0, len(x), bs)]) if len(x) else torch.empty(0)

    @torch.no_grad()
    def prototypes(self, codes: torch.Tensor, target: torch.Tensor,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the ``proto_k`` training codes of class ``target[i]`` nearest to ``codes[i]``;
        ``exclude[i]`` (an index into the fitted training set, or -1) is left out of row i's
        candidates (cf-at's ``exclude_self``: x's own code out of its counterfactual's prototype)."""
        self._require_fit()
        codes, target = _flat(codes), target.to(self.labels.device).long()
        out = torch.empty_like(codes)
        for c in target.unique().tolist():
            rows = (target == c).nonzero().flatten()
            members = (self.labels == c).nonzero().flatten()
            pool = self.codes[members]
            if len(pool) == 0:
                raise UsageError(f"proto-cf: no training example of target class {c}, so it has no prototype. "
                                 f"Valid targets: {sorted(set(self.labels.tolist()))}.")
            k = min(self.params.proto_k, len(pool) - (1 if exclude is not None else 0))
            if k < 1:
                raise UsageError(f"proto-cf: class {c} has a single training example, so excluding it leaves no "
                                 "prototype; use exclude_self=false.")
            for s in range(0, len(rows), 1024):
                r = rows[s:s + 1024]
                d = torch.cdist(codes[r].double(), pool.double())
                if exclude is not None:
                    d[exclude.to(members.device)[r, None] == members[None, :]] = math.inf
                nn = d.topk(k, largest=False).indices
                out[r] = pool[nn].mean(1)
        return out

    def nearest_other_class(self) -> torch.Tensor:
        """For every fitted training example, the index of its latent nearest neighbour of another class."""
        self._require_fit()
        return nearest_other_class(self.codes, self.labels)

    # -- generation -----------------------------------------------------------------------------
    def _smooth_loss(self, model, xs, x0, onehot, proto, const):
        p = self.params
        logits = model(xs)
        z_t = (logits * onehot).sum(1)
        other = logits.masked_fill(onehot.bool(), -math.inf).amax(1)
        loss = const * (other - z_t).clamp_min(-p.kappa) + (xs - x0).pow(2).flatten(1).sum(1)
        if p.gamma > 0 or p.theta > 0:
            z = self.ae.encode(xs)
            if p.gamma > 0:
                loss = loss + p.gamma * (xs - self.ae.decode(z)).pow(2).flatten(1).sum(1)
            if p.theta > 0:
                loss = loss + p.theta * (_flat(z) - proto).pow(2).sum(1)
        return loss.sum()

    def _batch(self, model, x0: torch.Tensor, target: torch.Tensor, proto: torch.Tensor) -> CFResult:
        p = self.params
        n, dev = len(x0), x0.device
        onehot = torch.nn.functional.one_hot(target, logits_classes(model, x0[:1])).to(x0.dtype)
        const = torch.full((n,), float(p.c_init), device=dev, dtype=torch.float64)
        lower = torch.zeros(n, device=dev, dtype=torch.float64)
        upper = torch.full((n,), NO_BOUND, device=dev, dtype=torch.float64)
        best = x0.clone()
        best_dist = torch.full((n,), math.inf, device=dev, dtype=x0.dtype)
        best_margin = torch.full((n,), -math.inf, device=dev, dtype=x0.dtype)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        adv = x0.clone()
        for _ in range(p.c_steps):
            adv, adv_s = x0.clone(), x0.clone()
            round_found = torch.zeros(n, dtype=torch.bool, device=dev)
            c = const.to(x0.dtype)
            for k in range(p.steps):
                lr = p.lr * (1 - k / p.steps) ** 0.5
                adv_s.requires_grad_(True)
                (grad,) = torch.autograd.grad(self._smooth_loss(model, adv_s, x0, onehot, proto, c), adv_s)
                with torch.no_grad():
                    z = adv_s - lr * grad.clamp(-p.grad_clip, p.grad_clip)
                    d = z - x0
                    new = torch.where(d > p.beta, (z - p.beta).clamp(max=1.0),
                                      torch.where(d < -p.beta, (z + p.beta).clamp(min=0.0), x0))
                    zt = (k + 1) / (k + 4)   # alibi's executed schedule (module docstring)
                    adv_s = (new + zt * (new - adv)).clamp(0.0, 1.0)
                    adv = new
                    logits = model(adv)
                    margin = (logits * onehot).sum(1) - logits.masked_fill(onehot.bool(), -math.inf).amax(1)
                    valid = (margin > 0) & (margin >= p.kappa)
                    delta = (adv - x0).flatten(1)
                    dist = p.beta * delta.abs().sum(1) + delta.pow(2).sum(1)
                    better = valid & (dist < best_dist)
                    best[better] = adv[better]
                    best_dist[better] = dist[better]
                    best_margin[better] = margin[better]
                    round_found |= valid
            upper = torch.where(round_found, torch.minimum(upper, const), upper)
            lower = torch.where(round_found, lower, torch.maximum(lower, const))
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
            found |= round_found
        with torch.no_grad():
            last_logits = model(adv)
            last_margin = (last_logits * onehot).sum(1) - last_logits.masked_fill(onehot.bool(), -math.inf).amax(1)
        x_out = torch.where(found.view(-1, *([1] * (x0.dim() - 1))), best, adv)
        margin = torch.where(found, best_margin, last_margin)
        return CFResult(x=x_out.detach(), valid=found, margin=margin.detach(), const=const)

    def generate(self, model: torch.nn.Module, x0: torch.Tensor, target: torch.Tensor, *,
                 progress: bool = False, desc: str = "counterfactuals",
                 exclude: torch.Tensor | None = None) -> CFResult:
        """Counterfactuals of ``x0`` towards classes ``target`` for ``model`` (batched; the
        model and the autoencoder run in eval mode; the model's mode is restored); ``exclude``:
        per instance, a fitted training index left out of its prototype (see :meth:`prototypes`)."""
        self._require_fit()
        check_instances("proto-cf", x0, target)
        dev = self.codes.device
        x0, target = x0.detach().to(dev), target.detach().to(dev).long()

        def run(s: int, e: int) -> CFResult:
            xb, tb = x0[s:e], target[s:e]
            ex = exclude[s:e] if exclude is not None else None
            return self._batch(model, xb, tb, self.prototypes(self.encode(xb), tb, ex))

        parts = map_batches(model, len(x0), self.params.batch_size, run, progress=progress, desc=desc)
        if not parts:
            e = torch.empty(0, device=dev)
            return CFResult(x=x0.clone(), valid=e.bool(), margin=e, const=e.double())
        return concat_results(CFResult, parts)

    def perturb(self, model, x, y, threat: ThreatModel | None = None):
        """Counterfactuals of ``x`` towards the target classes ``y`` (threat model ignored)."""
        return self.generate(model, x, y).x

    def neighbour_counterfactuals(self, model: torch.nn.Module, *, progress: bool = False,
                                  desc: str = "counterfactuals",
                                  exclude_self: bool = False) -> tuple[torch.Tensor, CFResult]:
        """cf-at's generation: for every fitted training pair (x_i, y_i), the counterfactual of
        its latent nearest neighbour of another class, x_nn, towards y_i.  Returns the neighbour
        indices and the :class:`CFResult` (distances in the objective are to x_nn).  The
        prototype of y_i is drawn from the class-y_i training codes nearest to x_nn's code, of
        which x_i's own is usually one; ``exclude_self`` leaves x_i out of them."""
        self._require_fit()
        nn = self.nearest_other_class()
        nn_d = nn.to(self.x_fit.device)
        exclude = torch.arange(len(self.labels), device=self.labels.device) if exclude_self else None
        return nn, self.generate(model, self.x_fit[nn_d], self.labels, progress=progress, desc=desc,
                                 exclude=exclude)


def logits_classes(model: torch.nn.Module, x: torch.Tensor) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    with torch.no_grad():
        return int(model(x).shape[1])


def quality(cf: torch.Tensor, valid: torch.Tensor, explained: torch.Tensor, labelled: torch.Tensor,
            gen: ProtoCF) -> dict[str, float | None]:
    """Mean proximity and plausibility of the valid counterfactuals: L1/L2 to the explained
    instance (x_nn) and to the example whose label they carry (x), L_AE of the counterfactuals
    and, for reference, of the real images they replace."""
    out: dict[str, float | None] = {}
    v = valid.bool()
    if not v.any():
        return {k: None for k in ("l1", "l2", "linf", "l1_to_x", "l2_to_x", "ae_error", "ae_error_data",
                                  "l2_neighbour_to_x")}
    c, e, x = cf[v], explained[v], labelled[v]
    d, dx = (c - e).flatten(1), (c - x).flatten(1)
    out["l1"] = float(d.abs().sum(1).mean())
    out["l2"] = float(d.norm(dim=1).mean())
    out["linf"] = float(d.abs().amax(1).mean())
    out["l1_to_x"] = float(dx.abs().sum(1).mean())
    out["l2_to_x"] = float(dx.norm(dim=1).mean())
    out["l2_neighbour_to_x"] = float((e - x).flatten(1).norm(dim=1).mean())
    out["ae_error"] = float(gen.reconstruction_error(c).mean())
    out["ae_error_data"] = float(gen.reconstruction_error(x).mean())
    return out
