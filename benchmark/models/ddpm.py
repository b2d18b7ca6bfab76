"""A per-dataset denoising diffusion model (DDPM; Ho, Jain & Abbeel, NeurIPS 2020), the prior
behind ACE (:mod:`cfbench.attacks.ace`): a diffusers ``UNet2DModel`` that predicts the noise,
with the forward process of a diffusers ``DDPMScheduler`` and a respaced, differentiable
reverse process written here.

Not a classifier: it is not registered under ``cfbench.models``.  Training (progress, cache,
per-epoch checkpoints and resume) is ``cfbench ddpm train`` (:mod:`cfbench.diffusion`).

Network.  ``UNet2DModel`` with ``len(channels)`` resolution levels; the last level does not
downsample, so three levels give 8 -> 4 -> 2 on digits and 28 -> 14 -> 7 on (Fashion-)MNIST.
diffusers' defaults (four levels of 128-512 channels, 32 groups) fail on 28x28 (diffusers
issue #3630: 28 -> 14 -> 7 -> 4 does not upsample back to 7); :meth:`DDPMParams.check_shape`
refuses a side that ``2 ** (levels - 1)`` does not divide, and every channel count must be
divisible by ``norm_num_groups``.  Defaults: channels (32, 64, 64), one ResNet block per
level, self-attention in the lowest-resolution block (ACE's guided-diffusion UNet attends at
its three lowest resolutions) -- 1.1M parameters, 4.5 MB in float32.

Forward process.  ``timesteps = 500`` (ACE's CelebA model) with guided-diffusion's ``linear``
schedule: beta from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T``; the betas and cumulative
alphas come from diffusers' ``DDPMScheduler`` (float32, used in float64 here), and
``q_sample`` is its ``add_noise``.  Training loss: L_simple, ``|| eps - eps_theta(x_t, t) ||^2``
with t uniform (Ho et al.).

Reverse process (what ACE differentiates through).  ``respace(K)`` keeps K of the T steps
exactly as guided-diffusion's ``space_timesteps(T, [K])`` (steps ``round(i (T - 1) / (K - 1))``)
and derives the respaced betas ``1 - abar_i / abar_prev`` (``SpacedDiffusion``).  One step
predicts eps at the *original* timestep, ``x0 = clip(sqrt(1/abar) x_t - sqrt(1/abar - 1) eps,
-1, 1)``, takes the posterior mean ``c1 x0 + c2 x_t`` and, except at the last step, adds
``exp(log_var / 2) * z``.  Every operation is a differentiable torch op (``clamp`` has zero
gradient outside [-1, 1], as in the reference code), and all noise is drawn from a given
``torch.Generator``, so a filter pass is a deterministic, differentiable function of its input.

Variance.  ACE's DDPM learns sigma (``learn_sigma=True``: an interpolation between beta_t and
the posterior variance, trained with the hybrid loss of Nichol & Dhariwal 2021).  Here the
variance is fixed: ``fixed_small`` (default) is the respaced posterior variance
``beta~_k = beta_k (1 - abar_{k-1}) / (1 - abar_k)`` with guided-diffusion's clipped log
(``log(beta~_1)`` at k = 0); ``fixed_large`` is ``beta_k`` (``beta~_1`` at k = 0).  Nichol &
Dhariwal found ``fixed_small`` the better fixed choice for respaced (few-step) sampling, which
is ACE's regime (5 of 50 respaced steps).  diffusers' own ``"fixed_small"`` in
``DDPMScheduler.step`` clamps the variance at 1e-20 and uses the unclipped log; its
``set_timesteps`` uses "leading" spacing ``range(0, T, T // K)`` -- neither is used here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import nn

from ..errors import UsageError
from ..params import check_value, param

#: optimizer steps of the default training length
DEFAULT_STEPS = 4000


@dataclass(frozen=True)
class DDPMParams:
    timesteps: int = param(500, "diffusion steps T of the forward process (ACE CelebA: 500)", ge=2)
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = param(
        "linear", "noise schedule: guided-diffusion's linear (betas 1e-4..0.02 scaled by 1000/T) or cosine")
    channels: tuple[int, ...] = param((32, 64, 64), "UNet channels per resolution level (comma-separated); "
                                                    "the last level does not downsample")
    layers_per_block: int = param(1, "ResNet blocks per UNet level", ge=1)
    attention: bool = param(True, "self-attention in the lowest-resolution UNet block")
    norm_num_groups: int = param(8, "GroupNorm groups (every channel count must be divisible by it)", ge=1)
    variance: Literal["fixed_small", "fixed_large"] = param(
        "fixed_small", "reverse-process variance: posterior beta~ (fixed_small) or beta (fixed_large); ACE learns it")
    epochs: int | None = param(None, "training epochs over the DDPM's data (default: enough for ~4,000 optimizer "
                                     "steps: 1,000 on digits' 250 images, 51 on Fashion-MNIST's 5,000)", ge=1)
    batch_size: int = param(64, "training mini-batch size", ge=1)
    lr: float = param(5e-4, "Adam learning rate (constant)", gt=0)
    ema_decay: float = param(0.999, "decay of the exponential moving average of the weights that is saved", ge=0, lt=1)
    augmentation: Literal["dataset", "none", "shift", "flip-shift"] = param(
        "dataset", "training augmentation: the dataset's family (digits / MNIST: shift) or a named one")

    def __post_init__(self):
        for f in fields(self):
            check_value(f, getattr(self, f.name), f"ddpm.{f.name}")
        if not self.channels:
            raise UsageError("ddpm.channels: give at least one channel count, e.g. 32,64,64.")
        bad = [c for c in self.channels if c < 1 or c % self.norm_num_groups]
        if bad:
            raise UsageError(f"ddpm.channels={','.join(map(str, self.channels))}: {bad[0]} is not a positive multiple "
                             f"of ddpm.norm_num_groups={self.norm_num_groups}; choose channels divisible by it.")

    def resolved_epochs(self, n_train: int) -> int:
        """``epochs``, or as many as make ~:data:`DEFAULT_STEPS` optimizer steps over ``n_train`` images."""
        if self.epochs is not None:
            return self.epochs
        return max(1, round(DEFAULT_STEPS / max(1, math.ceil(n_train / self.batch_size))))

    def check_shape(self, shape) -> None:
        """Refuse an image side the UNet cannot downsample and upsample back (diffusers #3630)."""
        _, h, w = (int(s) for s in shape)
        f = 2 ** (len(self.channels) - 1)
        if h % f or w % f:
            sides = ", ".join(str(n) for n in range(1, 8) if h % 2 ** (n - 1) == 0 and w % 2 ** (n - 1) == 0)
            raise UsageError(f"ddpm.channels has {len(self.channels)} levels, which halve a {h}x{w} image "
                             f"{len(self.channels) - 1} times; {h}x{w} is not divisible by {f}. Use one of "
                             f"{sides} levels (e.g. 3 levels: 8->4->2, 28->14->7) or pad to 32.")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """guided-diffusion's ``space_timesteps(T, [K])`` for one section: K evenly strided steps."""
    if not 1 <= count <= num_timesteps:
        raise UsageError(f"cannot respace {num_timesteps} diffusion steps into {count}; choose 1..{num_timesteps}.")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


@dataclass(frozen=True)
class Respacing:
    """The float64 coefficients of a K-step reverse process (index k = 0 .. K-1)."""

    timesteps: torch.Tensor         # original timestep of respaced step k (long)
    alphas_cumprod: torch.Tensor
    sqrt_recip_ac: torch.Tensor
    sqrt_recipm1_ac: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    log_variance: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)


def _at(v: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
    return v[k].to(dtype=x.dtype, device=x.device)


def randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise from ``generator`` (on the generator's device), moved next to ``like``."""
    dev = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=dev, dtype=like.dtype).to(like.device)


class DDPM(nn.Module):
    """UNet noise predictor + DDPM schedule for images of ``shape`` (C, H, W) in [-1, 1]."""

    def __init__(self, shape, params: DDPMParams | None = None):
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        p = params if params is not None else DDPMParams()
        p.check_shape(shape)
        self.params, self.shape = p, tuple(int(s) for s in shape)
        c, h, _ = self.shape
        n = len(p.channels)
        down = ["DownBlock2D"] * n
        if p.attention:
            down[-1] = "AttnDownBlock2D"
        up = [b.replace("Down", "Up") for b in reversed(down)]
        self.unet = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, block_out_channels=tuple(p.channels),
                                layers_per_block=p.layers_per_block, down_block_types=tuple(down),
                                up_block_types=tuple(up), norm_num_groups=p.norm_num_groups,
                                attention_head_dim=min(8, p.channels[-1]))
        scale = 1000 / p.timesteps
        self.scheduler = DDPMScheduler(num_train_timesteps=p.timesteps, beta_schedule=p.beta_schedule,
                                       beta_start=1e-4 * scale, beta_end=0.02 * scale, prediction_type="epsilon",
                                       variance_type=p.variance, clip_sample=True)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()   # float64, not a parameter or buffer
        self._spacings: dict[int, Respacing] = {}

    # -- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` at original timesteps ``t`` (diffusers' add_noise)."""
        if not torch.is_tensor(t):
            t = torch.full((len(x0),), int(t), dtype=torch.long, device=x0.device)
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((len(x_t),), int(t), dtype=torch.long, device=x_t.device)
        return self.unet(x_t, t.to(x_t.device)).sample

    def training_loss(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple on a batch ``x0`` in [-1, 1]: t ~ U{0..T-1}, noise ~ N(0, I) from ``generator``."""
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.params.timesteps, (len(x0),), generator=generator, device=dev).to(x0.device)
        noise = randn(x0.shape, generator, x0)
        return torch.nn.functional.mse_loss(self.eps(self.q_sample(x0, t, noise), t), noise)

    # -- respaced reverse process -------------------------------------------------------------------
    def respace(self, count: int) -> Respacing:
        """Coefficients of the ``count``-step respaced reverse process (cached)."""
        if count in self._spacings:
            return self._spacings[count]
        use = space_timesteps(self.params.timesteps, count)
        ac = self.alphas_cumprod[use]
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        betas = 1 - ac / ac_prev
        post_var = betas * (1 - ac_prev) / (1 - ac)
        if self.params.variance == "fixed_small":
            var = torch.cat([post_var[1:2], post_var[1:]]) if len(use) > 1 else post_var.clamp_min(1e-20)
        else:
            var = torch.cat([post_var[1:2], betas[1:]]) if len(use) > 1 else betas
        r = Respacing(timesteps=torch.tensor(use, dtype=torch.long), alphas_cumprod=ac,
                      sqrt_recip_ac=torch.sqrt(1 / ac), sqrt_recipm1_ac=torch.sqrt(1 / ac - 1),
                      coef_x0=betas * torch.sqrt(ac_prev) / (1 - ac),
                      coef_xt=(1 - ac_prev) * torch.sqrt(1 - betas) / (1 - ac), log_variance=torch.log(var))
        self._spacings[count] = r
        return r

    def q_sample_respaced(self, x0: torch.Tensor, k: int, r: Respacing, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` noised to respaced step ``k`` (= original timestep ``r.timesteps[k]``)."""
        return self.q_sample(x0, int(r.timesteps[k]), noise)

    def p_step(self, x: torch.Tensor, k: int, r: Respacing, noise: torch.Tensor | None) -> torch.Tensor:
        """One reverse step from respaced step ``k`` to ``k - 1`` (``noise`` None: the mean only)."""
        eps = self.eps(x, int(r.timesteps[k]))
        x0 = (_at(r.sqrt_recip_ac, k, x) * x - _at(r.sqrt_recipm1_ac, k, x) * eps).clamp(-1, 1)
        mean = _at(r.coef_x0, k, x) * x0 + _at(r.coef_xt, k, x) * x
        if noise is None or k == 0:
            return mean
        return mean + torch.exp(0.5 * _at(r.log_variance, k, x)) * noise

    def filter(self, x01: torch.Tensor, steps: int, r: Respacing, generator: torch.Generator | None = None,
               stochastic: bool = True, draw: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """ACE's F_tau on images in [0, 1]: map to [-1, 1], noise to respaced step ``steps - 1``,
        denoise over ``steps`` steps, map back to [0, 1].  Noise comes from ``draw(like)`` if
        given, else from ``generator``; ``stochastic=False`` uses zero noise.  Differentiable in
        ``x01`` end to end."""
        if not 1 <= steps <= len(r):
            raise UsageError(f"ACE filter: {steps} denoising steps is outside 1..{len(r)} (the respacing).")
        if not stochastic:
            draw = torch.zeros_like
        elif draw is None:
            draw = lambda like: randn(like.shape, generator, like)
        x = x01 * 2 - 1
        x = self.q_sample_respaced(x, steps - 1, r, draw(x))
        for k in range(steps - 1, -1, -1):
            x = self.p_step(x, k, r, draw(x) if k > 0 else None)
        return (x + 1) / 2

def tau_steps(tau: float, respacing: int) -> int:
    """ACE's number of filter steps: ``int(tau * respacing)`` (main.py ``respaced_steps``)."""
    steps = int(tau * respacing + 1e-9)
    if steps < 1:
        raise UsageError(f"ace.tau={tau} of ace.respacing={respacing} steps is {tau * respacing:g} < 1 step; "
                         "raise tau or the respacing.")
    return steps


def count_parameters(model: nn.Module) -> int:
    return sum(q.numel() for q in model.parameters())


def ddpm_megabytes(model: DDPM) -> float:
    return count_parameters(model.unet) * 4 / 2 ** 20


__all__ = ["DDPM", "DDPMParams", "Respacing", "randn", "space_timesteps", "tau_steps"]
