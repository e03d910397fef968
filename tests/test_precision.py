"""Numerics of the networks and the diffusion math in low precision (bf16/fp16 autocast, bf16 tensors) and in
float64, against closed forms evaluated in float64 on the same inputs."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm.schedule import Schedule
from ddpm.unet import UNet, UNetConfig, timestep_embedding
from vae.autoencoder import DiagonalGaussian


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    fields = dict(image_size=16, in_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, dropout=0.0)
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # move the zero-initialised layers, so the output depends on every block
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def closed_form_embedding(t: list[float], dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = [10000.0 ** (-i / (half - 1)) for i in range(half)]
    return torch.tensor([[math.sin(v * f) for f in freqs] + [math.cos(v * f) for f in freqs] for v in t],
                        dtype=torch.float64)


# ---- the U-Net's time embedding -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_timestep_embedding_under_autocast_is_float32_and_tells_neighbouring_steps_apart(dtype):
    # In bf16, t = 999 is known only to within 4 (and t * f to within its 8 bits): computed there, the
    # sinusoids of 998 and 999 would be off by O(1).
    t = torch.tensor([996, 997, 998, 999])
    with torch.autocast("cpu", dtype=dtype):
        emb = timestep_embedding(t, 64)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.double(), closed_form_embedding([996, 997, 998, 999], 64), rtol=0, atol=2e-4)


def test_the_unet_runs_in_the_dtype_of_its_weights():
    """The time embedding was always float32, so a U-Net converted to float64 (a reference for precision checks)
    or to bf16 (half-precision inference without autocast) failed at its first layer: "mat1 and mat2 must have
    the same dtype". It is now computed in float32 (float64 for a float64 network) and handed over in the
    dtype of the time MLP."""
    model = tiny_unet(scale_shift_norm=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([3, 999])
    with torch.no_grad():
        ref = model(x, t)
        wide = model.double()(x.double(), t)
        narrow = model.bfloat16()(x.bfloat16(), t)
    assert wide.dtype == torch.float64 and narrow.dtype == torch.bfloat16
    torch.testing.assert_close(wide.float(), ref, rtol=1e-4, atol=1e-5)
    assert (narrow.float() - ref).norm() < 0.05 * ref.norm()
    # The float64 network's embedding is the closed form to float64 precision (t * f for t = 999).
    emb = timestep_embedding(t, 32, dtype=torch.float64)
    assert emb.dtype == torch.float64
    torch.testing.assert_close(emb, closed_form_embedding([3, 999], 32), rtol=0, atol=1e-12)


# ---- the schedule's conversions on low-precision tensors ------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_and_conversions_of_bf16_tensors_use_float32_coefficients(kind):
    """extract cast each table to x's dtype: for a bf16 x0, sqrt(abar_0) = 0.99995 read 1 and every coefficient
    and product was rounded to 8 bits, so x_t at small t was off by a sizable part of its noise. The float64
    tables are now read in at least float32, and the result is the closed form on the same (bf16) values."""
    schedule = Schedule.from_name(kind, 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g).mul(2).sub(1).bfloat16()
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    exact = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    x_t = schedule.q_sample(x0, t, noise)
    assert x_t.dtype == torch.float32
    # Relative to the noise actually added at each t (sqrt(1 - abar_0) = 0.01 for the linear schedule).
    err = ((x_t.double() - exact).abs() / (1 - abar).sqrt()).amax(dim=(1, 2, 3))
    assert err.max() < 1e-4, err

    x_t16 = exact.bfloat16()  # a bf16 x_t and eps, converted to x0: the float64 formula on the same values
    eps16 = noise.bfloat16()
    x0_exact = abar.rsqrt() * x_t16.double() - (1 / abar - 1).sqrt() * eps16.double()
    x0_got = schedule.x0_from_eps(x_t16, t, eps16)
    assert x0_got.dtype == torch.float32
    # Relative to the two terms, which cancel near pure noise (both about 20,000 x_t at the cosine's t = 999).
    terms = (abar.rsqrt() * x_t16.double().abs() + (1 / abar - 1).sqrt() * eps16.double().abs()).amax(dim=(1, 2, 3))
    assert ((x0_got.double() - x0_exact).abs().amax(dim=(1, 2, 3)) / terms).max() < 1e-6


def test_training_target_and_loss_of_float32_data_are_unchanged():
    # Float32 and float64 inputs keep their dtype: only narrower ones are widened.
    schedule = Schedule.from_name("linear", 1000)
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0, 999])
    assert schedule.training_target(x0, t, noise, "v").dtype == torch.float32
    assert schedule.training_target(x0.double(), t, noise.double(), "v").dtype == torch.float64


# ---- the autoencoder's KL -------------------------------------------------------------------------


def test_kl_near_the_prior_does_not_cancel_in_float32():
    """var - 1 - logvar as exp(logvar) - 1 - logvar in float32 loses the 1e-3 logvar's square to exp's rounding:
    a posterior near the prior (collapsed latent channels) had its KL 2% off. expm1(logvar) - logvar keeps it."""
    torch.manual_seed(0)
    moments = torch.cat([1e-4 * torch.randn(2, 4, 8, 8), 1e-3 * torch.randn(2, 4, 8, 8)], dim=1)
    mean, logvar = moments.double().chunk(2, dim=1)
    exact = 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar).sum(dim=(1, 2, 3))
    kl = DiagonalGaussian(moments).kl()
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), exact, rtol=1e-4, atol=0)


def test_kl_of_float64_moments_stays_float64():
    torch.manual_seed(0)
    moments = torch.cat([0.3 * torch.randn(2, 4, 8, 8), 1e-3 * torch.randn(2, 4, 8, 8)], dim=1).double()
    mean, logvar = moments.chunk(2, dim=1)
    exact = 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar).sum(dim=(1, 2, 3))
    kl = DiagonalGaussian(moments).kl()
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, exact, rtol=1e-12, atol=0)
