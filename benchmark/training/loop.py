"""The one shared training loop.

``train(model, x, y, ctx, loss_hook)`` does the optimizer, the per-step learning-rate
schedule, mini-batches from a seeded per-epoch permutation, optional augmentation, the
progress bar, a NaN guard, and a safetensors checkpoint at the end of every epoch.  When a
checkpoint of the same run exists it resumes from it: model, optimizer, torch RNG state,
defense state and history are restored, and since the batch order and learning rate are
pure functions of (seed, epoch, step), the resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import TrainingDiverged
from .checkpoint import CKPT_NAME, load_checkpoint, save_checkpoint
from .context import Batch, FitContext


def lr_at(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """Learning rate at a global step: cosine to zero, step decay (x0.1 at 50%, 75%) or constant."""
    if schedule == "constant" or total_steps <= 0:
        return base_lr
    frac = step / total_steps
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "step":
        return base_lr * (0.1 if frac >= 0.5 else 1.0) * (0.1 if frac >= 0.75 else 1.0)
    raise ValueError(f"unknown schedule {schedule!r}; valid choices: cosine, step, constant")


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random shift by up to 1/8 of the image side (zero padding), plus horizontal flips for
    ``flip-shift`` (CIFAR).  Deterministic given the generator."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    idx = torch.arange(n, device=x.device).view(n, 1, 1)
    out = xp.permute(0, 2, 3, 1)[idx, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if kind == "flip-shift":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out.contiguous()


def make_optimizer(model: torch.nn.Module, train_params) -> torch.optim.Optimizer:
    p = train_params
    params = [q for q in model.parameters() if q.requires_grad]
    if p.optimizer == "sgd":
        return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# -- the loop ----------------------------------------------------------------------------

LossHook = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Batch], Any]


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: FitContext, loss_hook: LossHook,
          *, state=None, optimizer: torch.optim.Optimizer | None = None, batches=None,
          step_fn: Callable[[torch.optim.Optimizer], None] | None = None) -> list[dict]:
    """Train ``model`` in place on (x, y) with ``loss_hook`` as the per-batch loss.

    ``batches(epoch) -> iterable of index tensors`` replaces the default shuffled
    mini-batches (Opacus' Poisson sampling uses it; its empty batches reach the hook); ``step_fn(optimizer)`` replaces
    ``optimizer.step()``.  Returns the per-epoch history (also kept in ``ctx.history``).
    """
    tp = ctx.train
    device = ctx.device
    model.to(device)
    x, y = x.to(device), y.to(device)
    n = len(x)
    optimizer = optimizer or make_optimizer(model, tp)
    steps_per_epoch = math.ceil(n / tp.batch_size)
    total = steps_per_epoch * tp.epochs
    history: list[dict] = []
    start_epoch = 0
    ckpt = ctx.checkpoint_dir / CKPT_NAME if ctx.checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        meta = load_checkpoint(ckpt, model, optimizer, state)
        start_epoch, history = meta["epoch"] + 1, meta["history"]
        ctx.notes.setdefault("resumed_from_epoch", start_epoch)
    else:
        torch.manual_seed(ctx.seed)

    from ..progress import Progress

    bar = Progress(tp.epochs, ctx.desc, "epoch", initial=start_epoch, enabled=ctx.progress)
    try:
        for epoch in range(start_epoch, tp.epochs):
            t0 = time.perf_counter()
            if state is not None:
                state.on_epoch_start(model, epoch, ctx)
            model.train()
            g = _epoch_generator(ctx.seed, epoch)
            index_batches = batches(epoch) if batches is not None else torch.randperm(n, generator=g).split(tp.batch_size)
            tot_loss, tot_correct, tot_n = 0.0, 0, 0
            for i, idx in enumerate(index_batches):
                if len(idx) == 0 and batches is None:  # a custom sampler's empty batch is still a step (DP)
                    continue
                step = epoch * steps_per_epoch + i
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(tp.lr, tp.schedule, step, total)
                idx_d = idx.to(device)
                xb = x[idx_d]
                if tp.augment:
                    xb = augment(xb, ctx.augmentation, g)
                yb = y[idx_d]
                out = loss_hook(model, xb, yb, Batch(epoch, step, idx, ctx))
                loss, logits = out if isinstance(out, tuple) else (out, None)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"training loss became {loss.item()} at epoch {epoch + 1}, step {i + 1} "
                        f"(lr {optimizer.param_groups[0]['lr']:.4g}); lower the learning rate (--set lr=...)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                (step_fn or (lambda o: o.step()))(optimizer)
                tot_loss += loss.item() * len(idx)
                tot_n += len(idx)
                if logits is not None:
                    tot_correct += (logits.argmax(1) == yb).sum().item()
            row = {"epoch": epoch + 1, "loss": tot_loss / max(tot_n, 1),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if tot_correct:
                row["train_accuracy"] = tot_correct / max(tot_n, 1)
            history.append(row)
            if ckpt is not None:
                save_checkpoint(ckpt, model, optimizer, epoch, history, state)
            bar.update(1, loss=row["loss"])
    finally:
        bar.close()
    model.eval()
    ctx.history[:] = history
    return history
