"""``cfbench ddpm train --dataset D``: train the per-dataset DDPM that ACE
(:mod:`cfbench.attacks.ace`) polishes counterfactuals with.

Data: the **second half of the dataset's test split** (:func:`cfbench.attacks.ace.ddpm_split`;
250 images on digits, 5,000 on Fashion-MNIST), disjoint from every run's pool -- members and
non-members are drawn from the training split -- and from the first half of the test split,
where the ``counterfactual`` evaluator explains images.  (The training split minus a run's
pool would depend on the run's pool size and split seed, and is empty at digits' default
pool; one DDPM per dataset serves every run.)  A run that evaluates on the whole test split
(``data.test_size`` unset) still shares the second half with the DDPM: ``cf-at`` with
``generator=ace`` warns about it.

Training (:func:`train_ddpm`): L_simple (:meth:`cfbench.models.ddpm.DDPM.training_loss`), Adam
at a constant learning rate, mini-batches from a per-epoch permutation, the dataset's
augmentation family (``shift`` on digits and MNIST: the training loop's ``augment``), images
mapped to [-1, 1]; batch order, augmentation, timesteps and noise all come from one generator
seeded by ``(seed, epoch)``.  An exponential moving average of the weights
(``torch.optim.swa_utils.AveragedModel``, decay ``ema_decay``) is what is saved.

Cache and resume: the result is ``<out>/_cache/ddpm/ddpm-<dataset>-<hash>.safetensors``,
``hash`` = ``canonical_hash`` of :func:`cfbench.attacks.ace.ddpm_recipe` (dataset and its
sha256, split, every DDPM setting, seed), with the recipe and the per-epoch loss history in
its metadata.  During training a checkpoint (UNet, EMA, Adam state, epoch, history; the
training loop's ``save_checkpoint``) is written beside it at the end of an epoch when
``--checkpoint-seconds`` (default 30) have passed since the last one, and at the last epoch;
the same command resumes from it.  Since every random draw of an epoch comes from the
epoch's own generator, a resumed training is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:  # building the command line must not import torch
    import torch

    from .models.ddpm import DDPM, DDPMParams


def _seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _ckpt_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", ".ckpt.safetensors"))


def train_ddpm(x01: torch.Tensor, params: DDPMParams, recipe: dict[str, Any], path: Path, *, seed: int = 0,
               augmentation: str = "none", device: torch.device | str = "cpu", progress: bool = True,
               checkpoint_seconds: float = 30.0, on_epoch: Callable[[int], None] | None = None,
               log: Callable[[str], None] = print) -> tuple[DDPM, dict[str, Any]]:
    """Train a DDPM on ``x01`` (N, C, H, W in [0, 1]) and save its EMA weights to ``path``
    (resuming from ``path``'s checkpoint when one exists).  ``on_epoch(epoch)`` is called after
    each finished (and, if due, checkpointed) epoch.  Returns the EMA model and the metadata."""
    import torch
    from torch import nn
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from .models.ddpm import DDPM, count_parameters
    from .store.io import save_tensors_atomic
    from .training.checkpoint import load_checkpoint, save_checkpoint
    from .training.loop import augment

    device = torch.device(device)
    n = len(x01)
    if n == 0:
        raise UsageError("the DDPM's training split is empty.")
    epochs = params.resolved_epochs(n)
    torch.manual_seed(seed)
    model = DDPM(x01.shape[1:], params).to(device)
    ema = AveragedModel(model.unet, multi_avg_fn=get_ema_multi_avg_fn(params.ema_decay))
    state = nn.ModuleDict({"unet": model.unet, "ema": ema})
    opt = torch.optim.Adam(model.unet.parameters(), lr=params.lr)
    ckpt = _ckpt_path(path)
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt.exists():
        meta = load_checkpoint(ckpt, state, opt)
        if meta.get("extra", {}).get("recipe") != recipe:
            raise UsageError(f"checkpoint {ckpt} belongs to another DDPM recipe; delete it and run again.")
        start, history = int(meta["epoch"]) + 1, list(meta["history"])
        log(f"resuming the DDPM from epoch {start} of {epochs} ({ckpt})")
    x = x01.to(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, initial=start, desc=f"ddpm {recipe['dataset']}", unit="epoch", dynamic_ncols=True)
    last_ckpt = time.monotonic()
    model.unet.train()
    try:
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(_seed(seed, epoch))
            perm = torch.randperm(n, generator=g)
            total, steps = 0.0, 0
            for s in range(0, n, params.batch_size):
                xb = augment(x[perm[s:s + params.batch_size].to(device)], augmentation, g) * 2 - 1
                loss = model.training_loss(xb, g)
                if not torch.isfinite(loss):
                    raise UsageError(f"DDPM training diverged at epoch {epoch} (loss {float(loss)}); "
                                     "lower ddpm.lr and run again.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update_parameters(model.unet)
                total, steps = total + loss.item(), steps + 1
            history.append({"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0})
            if epoch == epochs - 1 or time.monotonic() - last_ckpt >= checkpoint_seconds:
                save_checkpoint(ckpt, state, opt, epoch, history, extra={"recipe": recipe})
                last_ckpt = time.monotonic()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / steps:.4f}")
            if on_epoch is not None:
                on_epoch(epoch)
    finally:
        if bar is not None:
            bar.close()
    model.unet.load_state_dict(ema.module.state_dict())
    model.eval()
    meta = {"recipe": recipe, "history": history, "epochs": epochs, "n_train": n,
            "parameters": count_parameters(model.unet),
            "train_seconds": sum(h["seconds"] for h in history)}
    save_tensors_atomic(path, model.unet.state_dict(), meta)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ckpt)
    return model, meta


def prepare(dataset: str, *, out: str | Path = "runs", seed: int = 0, sets: dict[str, Any] | None = None,
            data_dir: str | None = None, download: bool = False):
    """The dataset, its DDPM training images, settings, recipe and cache path for ``cfbench ddpm train``."""
    import torch

    from . import params as P
    from .attacks.ace import ddpm_path, ddpm_recipe, ddpm_split
    from .models.ddpm import DDPMParams
    from .registry import get

    spec = get("dataset", dataset)()
    ds = spec.load(data_dir, download=download)
    params = P.build(DDPMParams, sets or {}, where="ddpm.")
    params.check_shape(ds.shape)
    recipe = ddpm_recipe(ds, params, seed, spec.augmentation)
    x = torch.from_numpy(ds.x_test[ddpm_split(ds)])
    return ds, x, params, recipe, ddpm_path(Path(out) / "_cache", recipe)


def cmd_ddpm_train(args) -> int:
    import torch

    from .config import parse_sets

    if args.threads < 1:
        raise UsageError(f"--threads {args.threads} is not valid: give a positive number of threads.")
    torch.set_num_threads(args.threads)
    ds, x, params, recipe, path = prepare(args.dataset, out=args.out, seed=args.seed,
                                          sets=dict(parse_sets(args.set)), data_dir=args.data_dir,
                                          download=args.download)
    idx = recipe["indices"]
    print(f"DDPM for {ds.name}: {len(x)} images (test split [{idx[0]}, {idx[1]}), disjoint from every run's pool), "
          f"{params.resolved_epochs(len(x))} epochs, batch {params.batch_size}, augmentation {recipe['augmentation']}")
    if path.exists() and not args.force:
        print(f"already trained (same recipe): {path}")
        return 0
    if args.force:
        for f in (path, path.with_name(path.name.replace(".safetensors", ".ckpt.safetensors"))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
    _, meta = train_ddpm(x, params, recipe, path, seed=args.seed, augmentation=recipe["augmentation"],
                         device=args.device, progress=not args.quiet, checkpoint_seconds=args.checkpoint_seconds,
                         log=lambda m: print(m, file=sys.stderr))
    print(f"DDPM: {meta['parameters']:,} parameters, final loss {meta['history'][-1]['loss']:.4f}, "
          f"{meta['train_seconds']:.0f} s of training")
    print(f"saved  {path}  ({path.stat().st_size / 2 ** 20:.1f} MB)")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("ddpm", help="the per-dataset DDPM behind ACE counterfactuals",
                              description="Per-dataset denoising diffusion models (the prior of the `ace` "
                                          "counterfactual generator).")
    sub = p.add_subparsers(dest="ddpm_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train (or resume) the DDPM of a dataset into <out>/_cache/ddpm",
                       description="Train the DDPM of DATASET on the second half of its test split (disjoint from "
                                   "every run's members and non-members); cached by recipe, resumable.")
    t.add_argument("--dataset", required=True, help="dataset name (see `cfbench list dataset`)")
    t.add_argument("--out", default="runs", help="the store whose _cache/ddpm receives the model; default runs/")
    t.add_argument("--seed", type=int, default=0, help="training seed; default 0 (the recipe ACE looks up)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a DDPM setting, e.g. --set epochs=200 --set channels=32,64,64 (changes the recipe: point "
                        "ACE at the file with ace.ddpm=<file>)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N; default cpu")
    t.add_argument("--data-dir", default=None, help="directory with dataset files (IDX, cifar-10-batches-py)")
    t.add_argument("--download", action="store_true", help="download the dataset through torchvision if installed")
    t.add_argument("--threads", type=int, default=1, metavar="N", help="torch intra-op CPU threads; default 1")
    t.add_argument("--checkpoint-seconds", type=float, default=30.0, metavar="S",
                   help="write a resume checkpoint after an epoch when S seconds passed since the last; default 30")
    t.add_argument("--force", action="store_true", help="train again even if the model exists")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_ddpm_train)


__all__ = ["add_subparser", "cmd_ddpm_train", "prepare", "train_ddpm"]
