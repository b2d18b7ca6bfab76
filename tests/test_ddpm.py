"""The per-dataset DDPM (cfbench.models.ddpm) and its trainer (cfbench.diffusion): schedule and
respacing against float64 transcriptions of guided-diffusion, F_tau differentiable end to end
(gradcheck), shape checks, deterministic resume, the cache and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cfbench.errors import UsageError
from cfbench.models.ddpm import DDPM, DDPMParams, space_timesteps, tau_steps

TINY = DDPMParams(channels=(4, 8), norm_num_groups=4, attention=False, epochs=2, batch_size=32)


def _gd_space_timesteps(num_timesteps, section_counts):
    """guided-diffusion respace.space_timesteps, transcribed (float accumulation of the stride)."""
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken = 0.0, []
        for _ in range(section_count):
            taken.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken
        start_idx += size
    return sorted(set(all_steps))


@pytest.mark.parametrize("T,K", [(500, 50), (1000, 25), (100, 7), (10, 10), (50, 1)])
def test_respacing_matches_guided_diffusion(T, K):
    assert space_timesteps(T, K) == _gd_space_timesteps(T, [K])
    assert space_timesteps(500, 50)[4] == 41   # ACE's tau = 0.1 of 50: noise to original step 41
    assert tau_steps(0.1, 50) == 5 and tau_steps(0.2, 25) == 5


def _linear_abar(T):
    scale = 1000 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    return np.cumprod(1 - betas)


def test_schedule_and_reverse_step_match_a_float64_transcription():
    torch.manual_seed(0)
    m = DDPM((1, 8, 8), TINY).double().eval()
    abar = _linear_abar(500)
    np.testing.assert_allclose(m.alphas_cumprod.numpy(), abar, rtol=1e-5)   # diffusers' float32 betas
    x0, noise = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.randn(3, 1, 8, 8, dtype=torch.float64)
    ac = m.alphas_cumprod.numpy()
    np.testing.assert_allclose(m.q_sample(x0, 41, noise).numpy(),
                               np.sqrt(ac[41]) * x0.numpy() + np.sqrt(1 - ac[41]) * noise.numpy(), rtol=1e-6)
    # one respaced reverse step (SpacedDiffusion + p_mean_variance, eps prediction, clipped x0)
    r = m.respace(50)
    use = _gd_space_timesteps(500, [50])
    a = ac[use]
    a_prev = np.append(1.0, a[:-1])
    b = 1 - a / a_prev
    post_var = b * (1 - a_prev) / (1 - a)
    k, xt = 4, m.q_sample(x0, use[4], noise)
    with torch.no_grad():
        eps = m.eps(xt, use[k]).numpy()
        z = torch.randn_like(xt)
        got = m.p_step(xt, k, r, z).numpy()
    x0_hat = np.clip(np.sqrt(1 / a[k]) * xt.numpy() - np.sqrt(1 / a[k] - 1) * eps, -1, 1)
    mean = (b[k] * np.sqrt(a_prev[k]) / (1 - a[k]) * x0_hat
            + (1 - a_prev[k]) * np.sqrt(1 - b[k]) / (1 - a[k]) * xt.numpy())
    log_var = np.log(np.append(post_var[1], post_var[1:]))[k]            # fixed_small, clipped log
    np.testing.assert_allclose(got, mean + np.exp(0.5 * log_var) * z.numpy(), rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        assert torch.equal(m.p_step(xt, 0, r, z), m.p_step(xt, 0, r, None))   # no noise at the last step
    large = DDPM((1, 8, 8), DDPMParams(**{**TINY.__dict__, "variance": "fixed_large"})).double()
    np.testing.assert_allclose(large.respace(50).log_variance.numpy(), np.log(np.append(post_var[1], b[1:])))


def test_filter_is_differentiable_end_to_end_gradcheck():
    torch.manual_seed(0)
    m = DDPM((1, 8, 8), TINY).double().eval()
    r = m.respace(50)
    x = (torch.rand(1, 1, 8, 8, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)

    def f(inp):   # a deterministic function: the same noise on every call
        return m.filter(inp, 5, r, torch.Generator().manual_seed(1))

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, rtol=1e-3)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    assert g.abs().sum() > 0   # the gradient reaches the input through 5 UNet calls
    same = f(x)
    assert torch.equal(same, f(x))
    assert not torch.equal(same, m.filter(x, 5, r, torch.Generator().manual_seed(2)))
    det = m.filter(x, 5, r, None, stochastic=False)
    assert torch.equal(det, m.filter(x, 5, r, torch.Generator().manual_seed(3), stochastic=False))


def test_shape_and_channel_checks_name_the_fix():
    with pytest.raises(UsageError, match=r"28x28 is not divisible by 8.*28->14->7"):
        DDPMParams(channels=(32, 64, 64, 64)).check_shape((1, 28, 28))
    DDPMParams().check_shape((1, 28, 28))
    DDPMParams().check_shape((1, 8, 8))
    with pytest.raises(UsageError, match="48 is not a positive multiple of ddpm.norm_num_groups=32"):
        DDPMParams(channels=(64, 48), norm_num_groups=32)
    with pytest.raises(UsageError, match="cannot respace 500 diffusion steps into 600"):
        space_timesteps(500, 600)
    with pytest.raises(UsageError, match="< 1 step"):
        tau_steps(0.01, 50)
    m = DDPM((1, 28, 28), DDPMParams(channels=(8, 8, 8), attention=False))    # 28 -> 14 -> 7 and back
    assert m.eps(torch.zeros(2, 1, 28, 28), 3).shape == (2, 1, 28, 28)


def _train(tmp_path, *, interrupt_after=None, name="m"):
    from cfbench.diffusion import train_ddpm

    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    params = DDPMParams(**{**TINY.__dict__, "epochs": 3, "batch_size": 16})
    recipe = {"kind": "cfbench ddpm", "test": name, "dataset": "digits"}
    path = tmp_path / f"{name}.safetensors"

    def stop(epoch):
        if interrupt_after is not None and epoch == interrupt_after:
            raise KeyboardInterrupt

    return train_ddpm(x, params, recipe, path, seed=3, augmentation="shift", progress=False,
                      checkpoint_seconds=0, on_epoch=stop, log=lambda m: None), path


def test_training_resumes_bit_identically(tmp_path):
    from cfbench.store.io import load_tensors

    (_, meta), path = _train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", interrupt_after=0)
    assert not (tmp_path / "b" / "m.safetensors").exists()
    assert (tmp_path / "b" / "m.ckpt.safetensors").exists()
    (_, meta_b), path_b = _train(tmp_path / "b")
    assert not (tmp_path / "b" / "m.ckpt.safetensors").exists()        # the checkpoint is gone when done
    a, b = load_tensors(path)[0], load_tensors(path_b)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in meta["history"]] == [h["loss"] for h in meta_b["history"]]
    assert load_tensors(path)[1]["recipe"]["test"] == "m" and len(meta["history"]) == 3


def test_ddpm_train_command_caches_by_recipe(tmp_path, capsys):
    from cfbench.attacks.ace import load_ddpm
    from cfbench.cli import main

    args = ["ddpm", "train", "--dataset", "digits", "--out", str(tmp_path), "--quiet", "--set", "epochs=1",
            "--set", "channels=4,8", "--set", "norm_num_groups=4", "--set", "attention=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "250 images (test split [250, 500)" in out
    files = list((tmp_path / "_cache" / "ddpm").glob("ddpm-digits-*.safetensors"))
    assert len(files) == 1
    model, meta = load_ddpm(files[0])
    assert meta["recipe"]["split"] == "test-second-half" and meta["recipe"]["indices"] == [250, 500]
    assert model.params.channels == (4, 8)
    assert main(args) == 0 and "already trained" in capsys.readouterr().out
    assert main(["ddpm", "train", "--dataset", "digits", "--out", str(tmp_path), "--set", "channels=4,6",
                 "--set", "norm_num_groups=4"]) == 2
    assert "6 is not a positive multiple" in capsys.readouterr().err
