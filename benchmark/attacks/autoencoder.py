"""The convolutional autoencoder of the MNIST example of Van Looveren & Klaise's prototype-guided
counterfactuals (alibi's ``cfproto_mnist``), for :mod:`cfbench.attacks.proto_cf`.

Architecture, for any
C x H x W input with even H and W:

    encoder: conv3x3(C -> w) - ReLU - conv3x3(w -> w) - ReLU - maxpool2 - conv3x3(w -> l)
    decoder: conv3x3(l -> w) - ReLU - upsample2 (nearest) - conv3x3(w -> w) - ReLU - conv3x3(w -> C)

``w = width`` (example: 16), ``l = latent_channels`` (example: 1), so the latent code of a 28x28
image is 1 x 14 x 14 (196 numbers) and of an 8x8 digit 1 x 4 x 4.  Encoder and decoder
outputs are linear (no activation), as in the example.  Trained with the mean squared
reconstruction error and Adam (the example's Keras defaults: learning rate 1e-3, batch 128).

Choices (recorded by the callers): the number of epochs (the example trains 4 epochs on
60,000 MNIST images, about 1,900 steps; a defense's training set may be far
smaller, so the default here is stated in epochs over the data it is given), the shuffling and
weight initialisation (PyTorch defaults, drawn from a seeded RNG that leaves the caller's
global RNG untouched), and inputs in [0, 1] (the example scales MNIST to [-0.5, 0.5]; the range
width, hence every distance and the L1 threshold, is the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError


class ConvAutoencoder(nn.Module):
    """Van Looveren & Klaise's convolutional autoencoder (see the module docstring)."""

    def __init__(self, in_channels: int, width: int = 16, latent_channels: int = 1):
        super().__init__()
        if in_channels < 1 or width < 1 or latent_channels < 1:
            raise UsageError(f"autoencoder: in_channels={in_channels}, width={width} and "
                             f"latent_channels={latent_channels} must all be >= 1.")
        self.in_channels, self.width, self.latent_channels = in_channels, width, latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, in_channels, 3, padding=1))

    @staticmethod
    def check_shape(shape) -> None:
        c, h, w = tuple(shape)[-3:]
        if h % 2 or w % 2:
            raise UsageError(f"the prototype autoencoder needs even image sides (one 2x2 pooling), "
                             f"got {h}x{w}.")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def train_autoencoder(x: torch.Tensor, *, width: int = 16, latent_channels: int = 1, epochs: int = 30,
                      batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                      device: torch.device | str = "cpu") -> tuple[ConvAutoencoder, list[float]]:
    """Train a :class:`ConvAutoencoder` on ``x`` (N, C, H, W in [0, 1]) with MSE and Adam.

    Deterministic given ``seed``: initialisation and shuffling come from a forked, seeded RNG
    (the caller's global RNG state is left as it was).  Returns the model (eval mode) and the
    mean training MSE of every epoch.
    """
    if len(x) == 0:
        raise UsageError("cannot train the prototype autoencoder on an empty training set.")
    ConvAutoencoder.check_shape(x.shape)
    device = torch.device(device)
    history: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = ConvAutoencoder(x.shape[1], width, latent_channels).to(device)
        opt = torch.optim.Adam(ae.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        x = x.to(device)
        ae.train()
        for _ in range(epochs):
            tot, n = 0.0, 0
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                xb = x[idx.to(device)]
                loss = F.mse_loss(ae(xb), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.item() * len(idx)
                n += len(idx)
            history.append(tot / n)
    ae.eval()
    return ae, history
