"""Batched ensembles: train M models of one recipe at once, as one "stacked" network.

Pool members (membership reference models, DeMem's oracle) share the recipe -- defense,
hyper-parameters, architecture, training budget -- and differ only in their training subset
and seed.  For the small CNNs of this benchmark a CPU spends most of a step on per-call
overhead, not arithmetic, so M models in one network win over M networks in turn:

* :class:`StackedNet` turns M members of a supported family (``cnn8``, ``cnn28``) into one
  network: every convolution becomes a grouped convolution (``groups = M``; the members'
  inputs concatenated along channels, activations ``(B, M*C, H, W)``), every linear layer a
  batched matrix product (``torch.baddbmm`` over weights ``(M, out, in)``).  Its interface is
  a plain model's: ``forward`` maps ``(M*B, C, H, W)`` (member-major: rows ``m*B .. m*B+B-1``
  are member ``m``'s batch) to logits ``(M*B, K)``, so the defenses' own per-example losses
  (``per_sample_loss``) run on it unchanged.
* :func:`train_stacked` is :func:`cfbench.training.loop.train` for M members at once: each
  member keeps its own data order and augmentation (its per-epoch generator), its own random
  numbers (a ``torch.Generator`` seeded as the serial loop seeds torch's global one, so PGD's
  random starts and TRADES' ``0.001 * N(0, I)`` starts are the very numbers one-at-a-time
  training draws) and the same optimizer, schedule and weight decay (SGD with momentum and
  weight decay acts element by element, so one optimizer over the stacked parameters is M
  optimizers).  The loss is
  the sum of the members' batch means, so each member's gradient is its own; the PGD inner
  loop runs on the stacked input, and since its objective is a sum of per-example terms,
  each member's perturbation gets exactly its own gradient.

**Identity.**  A member trained here is the *same artefact* as the one-at-a-time model of
the same job: same cache key, same file layout and metadata (plus ``train_mode =
"batched"`` and ``batch_members``), shared by every run.  The two differ only by float
summation order (grouped vs plain convolution kernels, one sum of M losses); measured on
digits (8 members, 2 epochs, width 32) the final weights differ by at most 3e-8 for ERM and
for most PGD-AT members, by up to 2.5e-3 where PGD's sign step flipped on a near-zero
gradient (test logits 2.3e-3, test accuracy equal within 1 point).  ``tests/test_ensemble.py``
checks the stated tolerance: ERM final weights within ``ERM_WEIGHT_ATOL`` and test logits
within ``LOGIT_ATOL``; PGD-AT and TRADES weights within ``ADV_WEIGHT_ATOL``, logits within
``ADV_LOGIT_ATOL`` and test accuracy within ``ACCURACY_POINTS`` points.

**Supported** (:func:`batch_problem` says why not otherwise): the built-in ``erm``,
``pgd-at`` and ``trades`` at the versions below, models ``cnn8`` / ``cnn28`` (exact classes:
a subclass may change ``forward``), SGD (Adam would be exact too, but it turns a rounding
difference in a near-zero gradient into a step of size lr: 2e-2 apart after 2 epochs of
TRADES, so it trains one at a time), equal-size training subsets, one device.
Anything else trains one at a time.

**Checkpoints.**  Given ``checkpoint`` (a file path), :func:`train_stacked` writes the
stacked network, the optimizer, every member's generator state and histories at the end of
every epoch (the one atomic safetensors writer of :mod:`cfbench.training.checkpoint`), and a
killed group resumes from it: same members (their ids are stored and compared), same
weights as an uninterrupted group, bit for bit (tested).  A checkpoint of a different group
(other members: the pool was split differently after the restart) is not used; the caller
removes it.  A member with a checkpoint of an interrupted one-at-a-time training resumes
one at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .context import Batch, FitContext
from .loop import _epoch_generator, augment, lr_at, make_optimizer

#: built-in defenses whose per-batch loss is reproduced here, with the version it matches
SUPPORTED_DEFENSES = {"erm": 1, "pgd-at": 1, "trades": 1}
#: model families that stack (exact classes: ``cfbench.models.small``)
SUPPORTED_MODELS = ("cnn8", "cnn28")
#: tolerances of batched vs one-at-a-time training, tested in tests/test_ensemble.py
ERM_WEIGHT_ATOL = 1e-5
LOGIT_ATOL = 1e-4
ADV_WEIGHT_ATOL = 1e-2
ADV_LOGIT_ATOL = 5e-2
ACCURACY_POINTS = 2.0

TRAIN_MODES = ("auto", "serial", "batched")


class Diverged(RuntimeError):
    """A member's loss became non-finite: the caller trains the group one at a time (which raises
    :class:`cfbench.errors.TrainingDiverged` for exactly that member)."""


# -- the stacked network ---------------------------------------------------------------

class _GroupedConv(nn.Module):
    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        c = convs[0]
        self.m = len(convs)
        self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.weight = nn.Parameter(torch.cat([k.weight.detach() for k in convs], 0).clone())
        self.bias = nn.Parameter(torch.cat([k.bias.detach() for k in convs], 0).clone())

    def forward(self, h):
        return F.conv2d(h, self.weight, self.bias, self.stride, self.padding, self.dilation, self.m)

    def member(self, i: int) -> dict[str, torch.Tensor]:
        n = self.weight.shape[0] // self.m
        return {"weight": self.weight[i * n:(i + 1) * n], "bias": self.bias[i * n:(i + 1) * n]}


class _BatchedLinear(nn.Module):
    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([k.weight.detach() for k in linears]).clone())  # (M, out, in)
        self.bias = nn.Parameter(torch.stack([k.bias.detach() for k in linears]).clone())      # (M, out)

    def forward(self, h):  # (M, B, in) -> (M, B, out)
        return torch.baddbmm(self.bias.unsqueeze(1), h, self.weight.transpose(1, 2))

    def member(self, i: int) -> dict[str, torch.Tensor]:
        return {"weight": self.weight[i], "bias": self.bias[i]}


class _Flatten(nn.Module):
    """(B, M*C, H, W) -> (M, B, C*H*W): each member's features in its own model's order."""

    def __init__(self, m: int):
        super().__init__()
        self.m = m

    def forward(self, h):
        b = h.shape[0]
        return h.reshape(b, self.m, -1).transpose(0, 1)


class StackedNet(nn.Module):
    """M members of one supported family as one network (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        first = members[0]
        self.m = len(members)
        self.normalize = first.normalize               # identical buffers: one dataset
        self._names: list[tuple[str, nn.Module]] = []  # (member prefix, stacked layer) per parametrised layer
        self.layers = nn.ModuleList()
        for seq_name in ("convs", "classifier"):
            seqs = [getattr(mm, seq_name) for mm in members]
            for j, layer in enumerate(seqs[0]):
                same = [s[j] for s in seqs]
                if isinstance(layer, nn.Conv2d):
                    new: nn.Module = _GroupedConv(same)
                    self._names.append((f"{seq_name}.{j}", new))
                elif isinstance(layer, nn.Linear):
                    new = _BatchedLinear(same)
                    self._names.append((f"{seq_name}.{j}", new))
                elif isinstance(layer, nn.Flatten):
                    new = _Flatten(self.m)
                elif isinstance(layer, (nn.ReLU, nn.MaxPool2d)):  # per channel: per member
                    new = layer
                else:  # pragma: no cover - batch_problem refuses such families first
                    raise TypeError(f"cannot stack layer {type(layer).__name__}")
                self.layers.append(new)

    def forward(self, x):
        n, c, hh, ww = x.shape
        b = n // self.m
        # (M*B, C, H, W) -> (B, M*C, H, W).  NCHW: channels-last memory and a strided-slice max
        # pool were measured too (faster in isolation, not in the network on this CPU)
        h = self.normalize(x).view(self.m, b, c, hh, ww).transpose(0, 1).reshape(b, self.m * c, hh, ww)
        for layer in self.layers:
            h = layer(h)
        return h.reshape(self.m * b, -1)             # (M, B, K) -> (M*B, K), member-major

    def member_state(self, i: int, template: nn.Module) -> dict[str, torch.Tensor]:
        """Member ``i``'s state dict, in ``template``'s (the plain model's) keys."""
        state = {k: v.clone() for k, v in template.state_dict().items()}
        for prefix, layer in self._names:
            for k, v in layer.member(i).items():
                state[f"{prefix}.{k}"] = v.detach().clone().contiguous()
        return state


# -- what can be batched -----------------------------------------------------------------

def batch_problem(cfg) -> str | None:
    """Why jobs of recipe ``cfg`` cannot train as a batched ensemble (None if they can)."""
    from ..models.small import SmallCNN8, SmallCNN28
    from ..registry import get

    if cfg.defense not in SUPPORTED_DEFENSES:
        return f"defense {cfg.defense!r} is not one of {', '.join(SUPPORTED_DEFENSES)}"
    cls = get("defense", cfg.defense)
    version = SUPPORTED_DEFENSES[cfg.defense]
    if not cls.__module__.startswith("cfbench_baselines") or getattr(cls, "version", None) != version:
        return f"defense {cfg.defense!r} is not the built-in version {version}"
    if cfg.model not in SUPPORTED_MODELS:
        return f"model {cfg.model!r} is not one of {', '.join(SUPPORTED_MODELS)}"
    model_cls = get("model", cfg.model)
    if model_cls not in (SmallCNN8, SmallCNN28):
        return f"model {cfg.model!r} is not the built-in {', '.join(SUPPORTED_MODELS)}"
    if cfg.train.optimizer != "sgd":
        # measured: Adam turns a rounding-level difference of a near-zero gradient into a step of
        # up to lr (TRADES, 2 epochs: weights 2e-2 apart), so it would break the stated tolerance
        return f"optimizer {cfg.train.optimizer!r} amplifies rounding differences (only sgd is batched)"
    return None


# -- the batched loop ------------------------------------------------------------------

@dataclass
class Member:
    """One pool member: its training data and seed (what one ``fit_recipe`` call receives)."""

    x: torch.Tensor
    y: torch.Tensor
    seed: int
    pool_positions: Any = None
    desc: str = "train"


def _batched_loss(defense, net: StackedNet, xb, yb, batch: Batch, gens: Sequence[torch.Generator], m: int):
    """Per-member mean losses (M,) and the logits the serial loss hook returns, for one step."""
    from ..attacks.pgd import default_step_size, pgd, random_start

    ctx = batch.ctx
    name = type(defense).name
    p = defense.params
    b = xb.shape[0] // m
    if name == "erm":
        logits = net(xb)
        per = F.cross_entropy(logits, yb, label_smoothing=p.label_smoothing, reduction="none")
        return per.view(m, b).mean(1), logits
    eps, norm = ctx.threat.eps, ctx.threat.norm
    was = net.training
    net.eval()                                          # Batch.attack's eval mode (no effect here: no BN/dropout)
    try:
        if name == "pgd-at":
            x_init = None
            if p.rand_init and eps != 0 and p.steps != 0:
                starts = [random_start(xb[i * b:(i + 1) * b], norm, eps, generator=gens[i]) for i in range(m)]
                x_init = xb + torch.cat(starts)
            x_adv = pgd(net, xb, yb, eps=eps, step_size=defense.step_size(eps), steps=p.steps, norm=norm,
                        rand_init=p.rand_init, x_init=x_init)
        elif name == "trades":
            with torch.no_grad():
                clean_probs = F.softmax(net(xb), dim=1)
            noise = torch.cat([torch.randn(xb[i * b:(i + 1) * b].shape, generator=gens[i], device=xb.device)
                               for i in range(m)])
            x_init = (xb + 0.001 * noise).clamp(0, 1)
            def kl_sum(logits, _y):  # TRADES' kl_sum: sum_i KL(p_clean_i || p_adv_i)
                return F.kl_div(F.log_softmax(logits, dim=1), clean_probs, reduction="sum")

            x_adv = pgd(net, xb, yb, eps=eps, step_size=default_step_size(eps, p.steps, p.step_size), steps=p.steps,
                        norm=norm, x_init=x_init, loss_fn=kl_sum)
        else:  # pragma: no cover - batch_problem refuses it first
            raise ValueError(name)
    finally:
        net.train(was)
    per, logits = defense.per_sample_loss(net, xb, yb, batch, x_adv=x_adv)
    return per.view(m, b).mean(1), logits


class _Generators:
    """The members' generators as a checkpoint's ``state`` (``state_tensors`` / ``load_state_tensors``)."""

    def __init__(self, gens: Sequence[torch.Generator]):
        self.gens = gens

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"gen.{j}": g.get_state() for j, g in enumerate(self.gens)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for j, g in enumerate(self.gens):
            g.set_state(tensors[f"gen.{j}"])


def group_checkpoint_matches(path, member_ids: Sequence[str]) -> bool:
    """Whether the checkpoint file ``path`` exists and belongs to exactly these members."""
    from .checkpoint import checkpoint_meta

    path = Path(path)
    if not path.is_file():
        return False
    meta, _ = checkpoint_meta(path)
    return meta is not None and list(meta.get("extra", {}).get("members", [])) == list(member_ids)


def train_stacked(cfg, data, members: Sequence[Member], *, checkpoint=None,
                  member_ids: Sequence[str] | None = None) -> list[tuple[nn.Module, FitContext]]:
    """Train ``members`` (equal-size subsets) of recipe ``cfg`` at once; per member, the plain
    model (eval mode) and a :class:`FitContext` with its history, as ``fit_recipe`` returns them.
    Raises :class:`Diverged` when a member's loss becomes non-finite.  ``checkpoint``: a file
    written after every epoch and resumed from when it holds the same ``member_ids`` (default:
    the members' seeds and descriptions)."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from ..registry import get
    from .recipe import build_model_for, threat_of

    problem = batch_problem(cfg)
    if problem:
        raise ValueError(f"recipe cannot be batched: {problem}")
    m = len(members)
    n = len(members[0].x)
    if any(len(mm.x) != n for mm in members):
        raise ValueError("batched members need training subsets of equal size")
    tp = cfg.train
    device = torch.device(cfg.device)
    defense = get("defense", cfg.defense)(cfg.defense_params)
    plain = [build_model_for(cfg, data, mm.seed) for mm in members]   # the serial initialisation
    net = StackedNet(plain).to(device)
    ctxs = [FitContext(threat=threat_of(cfg), train=tp, device=device, seed=mm.seed,
                       num_classes=data.dataset.num_classes, augmentation=cfg.dataset_info["augmentation"],
                       progress=False, desc=mm.desc, config=cfg, data=data, pool_positions=mm.pool_positions)
            for mm in members]
    xs = [mm.x.to(device) for mm in members]
    ys = [mm.y.to(device) for mm in members]
    optimizer = make_optimizer(net, tp)
    steps_per_epoch = math.ceil(n / tp.batch_size)
    total = steps_per_epoch * tp.epochs
    # the serial loop's torch.manual_seed(seed): one generator per member, on the device it draws on
    gens = [torch.Generator(device=device).manual_seed(int(mm.seed)) for mm in members]
    histories: list[list[dict]] = [[] for _ in members]
    ids = list(member_ids) if member_ids is not None else [f"{mm.seed}:{mm.desc}" for mm in members]
    start_epoch = 0
    if checkpoint is not None and group_checkpoint_matches(checkpoint, ids):
        # load_checkpoint restores torch's global generators, which are not the group's state
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        meta = load_checkpoint(Path(checkpoint), net, optimizer, _Generators(gens))
        torch.set_rng_state(rng)
        if cuda_rng is not None:  # pragma: no cover - no GPU here
            torch.cuda.set_rng_state_all(cuda_rng)
        start_epoch, histories = meta["epoch"] + 1, [list(h) for h in meta["history"]]
        for ctx in ctxs:
            ctx.notes["resumed_from_epoch"] = start_epoch
    net.train()
    for epoch in range(start_epoch, tp.epochs):
        t0 = time.perf_counter()
        epoch_gens = [_epoch_generator(mm.seed, epoch) for mm in members]
        orders = [torch.randperm(n, generator=g).split(tp.batch_size) for g in epoch_gens]
        losses, corrects, counts = [], [], 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(tp.lr, tp.schedule, step, total)
            xbs, ybs = [], []
            for j in range(m):
                idx = orders[j][i].to(device)
                xb = xs[j][idx]
                if tp.augment:
                    xb = augment(xb, ctxs[j].augmentation, epoch_gens[j])
                xbs.append(xb)
                ybs.append(ys[j][idx])
            xb, yb = torch.cat(xbs), torch.cat(ybs)
            per, logits = _batched_loss(defense, net, xb, yb, Batch(epoch, step, orders[0][i], ctxs[0]), gens, m)
            if not bool(torch.isfinite(per).all()):
                raise Diverged(f"member loss became non-finite at epoch {epoch + 1}, step {i + 1}")
            optimizer.zero_grad(set_to_none=True)
            per.sum().backward()
            optimizer.step()
            b = len(orders[0][i])
            losses.append(per.detach().double() * b)
            corrects.append((logits.detach().argmax(1) == yb).view(m, b).sum(1))
            counts += b
        tot_loss = torch.stack(losses).sum(0) / max(counts, 1)
        tot_correct = torch.stack(corrects).sum(0)
        seconds = (time.perf_counter() - t0) / m
        for j in range(m):
            row = {"epoch": epoch + 1, "loss": float(tot_loss[j]), "lr": optimizer.param_groups[0]["lr"],
                   "seconds": seconds}
            if int(tot_correct[j]):
                row["train_accuracy"] = int(tot_correct[j]) / max(counts, 1)
            histories[j].append(row)
        if checkpoint is not None:
            save_checkpoint(Path(checkpoint), net, optimizer, epoch, histories, _Generators(gens),
                            extra={"members": ids})
    net.eval()
    # leave torch's global generator where one-at-a-time training of the same members leaves it
    # (after the last member's draws), so code after the pool draws the same numbers either way
    if device.type == "cpu":
        torch.set_rng_state(gens[-1].get_state())
    elif device.type == "cuda":  # pragma: no cover - no GPU here
        torch.cuda.set_rng_state(gens[-1].get_state(), device)
    out = []
    for j, (model, ctx) in enumerate(zip(plain, ctxs)):
        model.load_state_dict(net.member_state(j, model))
        model.to(device).eval()
        ctx.history[:] = histories[j]
        ctx.notes["train_mode"] = "batched"
        ctx.notes["batch_members"] = m
        out.append((model, ctx))
    return out
