"""Inversion networks of Zhao, Zhang, Xiao & Lim ("Exploiting Explanations for Model Inversion
in Explainable AI", ICCV 2021, Fig. 2) and their training: an attacker's network that maps
the target's softmax ``y`` (and an explanation ``E`` of it) back to the input image.

All four take ``(pred, expl)`` -- ``pred`` (N, K) the target's softmax, ``expl`` (N, C_e, P,
P) a min-max normalised explanation zero-padded to the working side ``P`` -- and return an
image (N, C, P, P): a linear output, as GNIME's, clipped to [0, 1] by the evaluator before
any metric (``output="sigmoid"`` bounds it instead; on 8x8 digits at Adam 1e-4 it trains
markedly slower: validation MSE 0.055 vs 0.045 after 500 epochs of the prediction-only net).  ``P`` is the smallest power of two >= the image side: 8 for the 8x8 digits
(no padding), 32 for 28x28 Fashion-MNIST (2 pixels of zeros each side, as Zhao et al. and
GNIME pad / resize MNIST to 32x32 for their U-Nets); the loss and every metric use the
central H x W crop (:func:`crop`).

=========== ================ ===================================================================
paper       name             network
=========== ================ ===================================================================
(d)         ``prediction``   ``y`` -> FC -> (c(2), 2, 2) -> transposed-conv decoder (no ``E``)
(e)         ``flatten``      ``[flatten(E), y]`` -> the same FC + decoder
(f)         ``unet``         U-Net over ``E``: conv encoder down to 2x2, decoder with skips
(g)         ``expmi``        ExpMI: the U-Net encoder of ``E`` down to 2x2; bottleneck
                             ``[FC_64(encoding), flatten(E), y]`` -> FC -> (c(2), 2, 2); the
                             U-Net decoder with skips ("combined Flatten and U-Net")
=========== ================ ===================================================================

Layers.  Resolutions ``r = 2, 4, ..., P``; channels ``c(r) = min(width * P / r, 8 * width)``
(more channels at coarser maps, as GNIME's ``bottleneck_size // kernel_size``).  Encoder
level at ``r``: conv3x3(c(r)) - ReLU (the skip), then 2x2 max-pool; the 2x2 bottleneck of
the U-Net is conv3x3(c(2)) - ReLU.  Decoder step ``r -> 2r``: ConvTranspose(4, stride 2,
pad 1) to c(2r) - ReLU, [concatenate the skip at 2r], conv3x3(c(2r)) - ReLU; then conv3x3 to
the image's channels (linear, or a sigmoid).  The FC of (d)/(e) is one ``Linear(in, 4 c(2))`` - ReLU
(GNIME: ``Dense(1024)`` then upsampling).  With the evaluator's ``width = 16`` on 8x8
digits that is two levels (8 -> 4 -> 2) with 16 / 32 / 64 channels (2 encoder convs, 2
decoder steps: one pooling level less than the 8x8 map allows would leave no bottleneck,
one more is impossible); on 32x32 four levels with 16 ... 128 channels.  GNIME's 2048-wide
bottleneck for 32x32 MNIST would dwarf the 1,300 digits and a shared 2-core CPU.

Training (:func:`train_inverter`): MSE, Adam(lr 1e-4, betas (0.5, 0.999)), batch 128 (the
GNIME / Zhao et al. settings), a seeded 80/20 train / validation split of the attacker's data,
early stopping on the validation MSE (``patience`` epochs without improvement, at most
``max_epochs``), and the best validation weights restored (Keras' ``restore_best_weights``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

ARCHITECTURES: dict[str, str] = {
    "prediction": "(d) prediction-only transposed CNN: y -> FC -> upsampling convs",
    "flatten": "(e) flattened explanation concatenated with y -> FC -> upsampling convs",
    "unet": "(f) U-Net over the explanation (encoder to 2x2, decoder with skips)",
    "expmi": "(g) ExpMI: U-Net encoder of E, bottleneck joined with flatten(E) and y, decoder with skips",
}
#: architectures that read an explanation
EXPLANATION_ARCHITECTURES = ("flatten", "unet", "expmi")


def working_size(side: int) -> int:
    """The smallest power of two >= ``side`` (>= 4, so that the encoder reaches 2x2)."""
    if side < 2:
        raise UsageError(f"inversion networks need images of side >= 2, got {side}.")
    return max(4, 1 << math.ceil(math.log2(side)))


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) symmetrically (extra pixel at the bottom / right) to size x size."""
    h, w = x.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top)) if (h, w) != (size, size) else x


def crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The central h x w of (N, C, P, P): the inverse of :func:`pad_to`."""
    ph, pw = x.shape[-2:]
    top, left = (ph - h) // 2, (pw - w) // 2
    return x[..., top:top + h, left:left + w]


def _levels(size: int) -> list[int]:
    """Resolutions from 2 up to ``size``: [2, 4, ..., size]."""
    out, r = [], 2
    while r <= size:
        out.append(r)
        r *= 2
    return out


class _Decoder(nn.Module):
    """(c(2), 2, 2) -> image; with ``skips`` the U-Net decoder (concatenates a skip per level)."""

    def __init__(self, size: int, out_channels: int, ch, skips: bool, output: str = "linear"):
        super().__init__()
        self.output = output
        self.levels = _levels(size)
        self.up = nn.ModuleList()
        self.conv = nn.ModuleList()
        for r in self.levels[1:]:
            self.up.append(nn.ConvTranspose2d(ch(r // 2), ch(r), 4, stride=2, padding=1))
            self.conv.append(nn.Conv2d(ch(r) * (2 if skips else 1), ch(r), 3, padding=1))
        self.out = nn.Conv2d(ch(size), out_channels, 3, padding=1)
        self.skips = skips

    def forward(self, z: torch.Tensor, skips: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        for r, up, conv in zip(self.levels[1:], self.up, self.conv):
            z = F.relu(up(z))
            if self.skips:
                z = torch.cat([z, skips[r]], dim=1)
            z = F.relu(conv(z))
        out = self.out(z)
        return torch.sigmoid(out) if self.output == "sigmoid" else out


class _Encoder(nn.Module):
    """Explanation (C_e, P, P) -> skips {P: ..., ..., 4: ...} and a (c(2), 2, 2) map (pooled)."""

    def __init__(self, size: int, in_channels: int, ch):
        super().__init__()
        self.levels = _levels(size)[::-1][:-1]          # P, P/2, ..., 4
        convs, c_in = [], in_channels
        for r in self.levels:
            convs.append(nn.Conv2d(c_in, ch(r), 3, padding=1))
            c_in = ch(r)
        self.convs = nn.ModuleList(convs)
        self.out_channels = c_in

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        skips = {}
        for r, conv in zip(self.levels, self.convs):
            e = F.relu(conv(e))
            skips[r] = e
            e = F.max_pool2d(e, 2)
        return e, skips


class InversionNet(nn.Module):
    """One of the four inversion networks (module docstring); ``forward(pred, expl)``."""

    def __init__(self, arch: str, *, num_classes: int, image_channels: int, size: int,
                 expl_channels: int = 1, width: int = 32, output: str = "linear"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise UsageError(f"unknown inversion architecture {arch!r}. Valid choices: {', '.join(ARCHITECTURES)}.")
        if size < 4 or size & (size - 1):
            raise UsageError(f"inversion networks work on power-of-two sides >= 4, got {size} (use working_size).")
        if output not in ("linear", "sigmoid"):
            raise UsageError(f"inversion network output must be 'linear' or 'sigmoid', got {output!r}.")
        if width < 1:
            raise UsageError(f"inversion network width must be >= 1, got {width}.")
        self.arch, self.size, self.num_classes = arch, size, num_classes
        self.image_channels, self.expl_channels, self.width = image_channels, expl_channels, width
        self.output = output

        def ch(r: int) -> int:
            return min(width * (size // r), 8 * width)

        c2 = ch(2)
        self.c2 = c2
        flat_e = expl_channels * size * size
        if arch in ("prediction", "flatten"):
            n_in = num_classes + (flat_e if arch == "flatten" else 0)
            self.fc = nn.Linear(n_in, 4 * c2)
            self.decoder = _Decoder(size, image_channels, ch, skips=False, output=output)
        else:
            self.encoder = _Encoder(size, expl_channels, ch)
            if arch == "unet":
                self.bottleneck = nn.Conv2d(self.encoder.out_channels, c2, 3, padding=1)
            else:  # expmi
                self.enc_fc = nn.Linear(self.encoder.out_channels * 4, 64)
                self.fc = nn.Linear(64 + flat_e + num_classes, 4 * c2)
            self.decoder = _Decoder(size, image_channels, ch, skips=True, output=output)

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "num_classes": self.num_classes, "image_channels": self.image_channels,
                "size": self.size, "expl_channels": self.expl_channels, "width": self.width,
                "output": self.output}

    def forward(self, pred: torch.Tensor, expl: torch.Tensor | None = None) -> torch.Tensor:
        n = pred.shape[0]
        if self.arch == "prediction":
            return self.decoder(F.relu(self.fc(pred)).view(n, self.c2, 2, 2))
        if expl is None:
            raise ValueError(f"inversion architecture {self.arch!r} needs an explanation")
        if self.arch == "flatten":
            z = F.relu(self.fc(torch.cat([expl.flatten(1), pred], dim=1)))
            return self.decoder(z.view(n, self.c2, 2, 2))
        enc, skips = self.encoder(expl)
        if self.arch == "unet":
            return self.decoder(F.relu(self.bottleneck(enc)), skips)
        h = F.relu(self.enc_fc(enc.flatten(1)))
        z = F.relu(self.fc(torch.cat([h, expl.flatten(1), pred], dim=1)))
        return self.decoder(z.view(n, self.c2, 2, 2), skips)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded permutation of range(n) cut into (train, validation) index tensors (>= 1 each when n >= 2)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_val = min(max(1, round(val_fraction * n)), n - 1) if n >= 2 else 0
    return perm[n_val:], perm[:n_val]


def train_inverter(net: nn.Module, pred: torch.Tensor, expl: torch.Tensor | None, target: torch.Tensor, *,
                   lr: float = 1e-4, beta1: float = 0.5, batch_size: int = 128, max_epochs: int = 300,
                   patience: int = 20, val_fraction: float = 0.2, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Fit ``net`` to map (pred, expl) to ``target`` (N, C, H, W) in [0, 1] with MSE on the
    central crop; early stopping on a seeded validation split (module docstring).

    ``target`` may be an explanation instead of an image (attention transfer's first stage).
    Returns the network with its best-validation weights, in eval mode, and a summary
    (epochs run, best epoch, best validation MSE, per-epoch train / validation MSE).
    """
    if len(pred) < 2:
        raise UsageError(f"inversion: need at least 2 attacker examples to train and validate, got {len(pred)}.")
    device = torch.device(device)
    h, w = target.shape[-2:]
    tr, va = split_train_val(len(pred), val_fraction, seed)
    pred, target = pred.to(device), target.to(device)
    expl = expl.to(device) if expl is not None else None
    net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(beta1, 0.999))
    g = torch.Generator().manual_seed(int(seed) * 7919 + 1)

    def batches(idx):
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]

    def run(idx) -> torch.Tensor:
        return crop(net(pred[idx], expl[idx] if expl is not None else None), h, w)

    @torch.no_grad()
    def val_mse() -> float:
        net.eval()
        tot = sum(float(F.mse_loss(run(b), target[b], reduction="sum")) for b in batches(va.to(device)))
        return tot / (len(va) * target[0].numel())

    best, best_state, best_epoch, stale = math.inf, None, 0, 0
    hist_train, hist_val = [], []
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        net.train()
        tot, n = 0.0, 0
        for b in batches(tr[torch.randperm(len(tr), generator=g)].to(device)):
            loss = F.mse_loss(run(b), target[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(b)
            n += len(b)
        v = val_mse()
        hist_train.append(tot / max(n, 1))
        hist_val.append(v)
        if v < best:
            best, best_epoch, stale = v, epoch, 0
            best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return net, {"epochs": epoch, "best_epoch": best_epoch, "best_val_mse": best,
                 "stopped_early": epoch < max_epochs, "n_train": len(tr), "n_val": len(va),
                 "train_mse": hist_train, "val_mse": hist_val}


@torch.no_grad()
def reconstruct(net: nn.Module, pred: torch.Tensor, expl: torch.Tensor | None, h: int, w: int, *,
                batch_size: int = 512, device: torch.device | str = "cpu") -> torch.Tensor:
    """The network's outputs (N, C, h, w) on CPU, batched, in eval mode."""
    net.eval()
    device = torch.device(device)
    out = []
    for i in range(0, len(pred), batch_size):
        e = expl[i:i + batch_size].to(device) if expl is not None else None
        out.append(crop(net(pred[i:i + batch_size].to(device), e), h, w).cpu())
    return torch.cat(out) if out else torch.empty(0)
