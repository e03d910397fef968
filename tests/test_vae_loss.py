"""The autoencoder's training loss: the discriminator's separate passes over real and reconstructed
images, the output log-variance s of the reconstruction NLL rec / exp(s) + s, and the adaptive GAN
weight taken from that NLL's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from core.contract import TrainingModels
from data.dataset import Batch
from vae.autoencoder import AutoencoderConfig, AutoencoderKL
from vae.config import PRESETS, VAEConfig, VAELossConfig
from vae.discriminator import PatchDiscriminator
from vae.perceptual import build_perceptual
from vae.stage import OutputLogVariance, VAETraining

CPU = torch.device("cpu")


def make_run(learn_logvar: bool = False, logvar_init: float = 0.0, disc_start: int = 0):
    """A VAETraining on a tiny autoencoder and a 2-layer PatchGAN, and the models the loop would hand its loss."""
    torch.manual_seed(0)
    autoencoder_cfg = AutoencoderConfig(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                        attention_resolutions=(), latent_channels=2, resolution=16)
    loss_cfg = VAELossConfig(perceptual="random", perceptual_taps=1, disc_start=disc_start, disc_layers=2,
                             learn_logvar=learn_logvar, logvar_init=logvar_init)
    config = VAEConfig(autoencoder=autoencoder_cfg, loss=loss_cfg)
    autoencoder = AutoencoderKL(autoencoder_cfg)
    with torch.no_grad():  # wake the zero-initialised residual branches, so every layer matters
        for p in autoencoder.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    discriminator = PatchDiscriminator(3, num_layers=2) if disc_start >= 0 else None
    logvar = OutputLogVariance(logvar_init).requires_grad_(learn_logvar)
    run = VAETraining(config, None if learn_logvar else logvar, build_perceptual("random", 1), None, None,
                      "heldout", CPU)
    models = {"model": autoencoder}
    if discriminator is not None:
        models["disc"] = discriminator
    if learn_logvar:
        models["logvar"] = logvar
    return run, TrainingModels(models, models)  # one process, nothing compiled: the wrapped are the raw


def batch(n: int = 4) -> Batch:
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return Batch(x, torch.zeros(n, dtype=torch.long), torch.zeros(n, 0), torch.arange(n))


def loss_at(run: VAETraining, models, step: int = 0):
    return run.loss(models, batch(), torch.Generator().manual_seed(2), step)


# ---- the discriminator sees real and reconstructed images apart ----------------------------------


def test_discriminator_takes_real_and_reconstructed_images_in_separate_passes():
    """taming-transformers and latent diffusion call the discriminator once per kind of image, so in
    training mode BatchNorm normalises each with its own statistics; a concatenated batch would mix them."""
    run, models = make_run()
    sizes = []
    models.raw["disc"].main.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    losses, metrics = loss_at(run, models)
    assert sizes == [4, 4, 4]  # the generator's term, then real, then reconstructed: never one batch of 8
    assert set(losses) == {"model", "disc"}
    # The real images' logits are those of the real images alone (the discriminator is in training mode).
    with torch.no_grad():
        alone = models.raw["disc"](batch().image)
    assert models.raw["disc"].training
    assert metrics["logits_real"].item() == pytest.approx(alone.mean().item(), rel=1e-6, abs=1e-7)


def test_several_batches_in_one_call_equal_one_call_each():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(3, num_layers=2).train()
    real, fake = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16) + 1.0
    with torch.no_grad():
        together = discriminator(real, fake)
        apart = (discriminator(real), discriminator(fake))
        mixed = discriminator(torch.cat([real, fake])).chunk(2)
    assert isinstance(together, tuple) and len(together) == 2
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
    assert not torch.allclose(mixed[0], apart[0], atol=1e-3)  # what the old concatenated call computed differs


# ---- the output log-variance ---------------------------------------------------------------------


@pytest.mark.parametrize("s", [-2.0, 0.0, 0.75])
def test_nll_gradient_in_the_log_variance_is_one_minus_rec_over_its_exponential(s):
    rec = torch.tensor(0.3, dtype=torch.float64)
    logvar = OutputLogVariance(s).double()
    nll = logvar(rec)
    assert nll.item() == pytest.approx(0.3 / math.exp(s) + s, rel=1e-12)
    grad, = torch.autograd.grad(nll, logvar.logvar)
    assert grad.item() == pytest.approx(1 - 0.3 / math.exp(s), rel=1e-12, abs=1e-15)


def test_the_log_variance_settles_at_the_log_of_the_reconstruction_loss():
    rec = torch.tensor(0.05)
    at_optimum = OutputLogVariance(math.log(0.05))
    grad, = torch.autograd.grad(at_optimum(rec), at_optimum.logvar)
    assert abs(grad.item()) < 1e-6  # the NLL is stationary at s* = log(rec)
    logvar = OutputLogVariance(0.0)
    optimizer = torch.optim.Adam(logvar.parameters(), lr=0.05, betas=(0.5, 0.9))
    for _ in range(600):
        optimizer.zero_grad()
        logvar(rec).backward()
        optimizer.step()
    assert logvar.logvar.item() == pytest.approx(math.log(0.05), abs=0.02)


def test_log_variance_trains_on_the_gradient_the_whole_loss_gives_it():
    """The "logvar" trainable's loss (the NLL of a detached rec) moves s exactly as the autoencoder's
    loss would, and the autoencoder's loss still reads s."""
    run, models = make_run(learn_logvar=True, logvar_init=0.4, disc_start=-1)
    losses, metrics = loss_at(run, models)
    s = models.raw["logvar"].logvar
    assert set(losses) == {"model", "logvar"} and metrics["logvar"].item() == pytest.approx(0.4)
    whole, = torch.autograd.grad(losses["model"], s, retain_graph=True)
    own, = torch.autograd.grad(losses["logvar"], s)
    rec = metrics["l1"] + run.loss_cfg.perceptual_weight * metrics["perceptual"]
    assert own.item() == pytest.approx(whole.item(), rel=1e-6)
    assert own.item() == pytest.approx(1 - rec.item() / math.exp(0.4), rel=1e-5)


def test_fixed_log_variance_at_zero_is_the_plain_reconstruction_loss():
    run, models = make_run(disc_start=-1)
    losses, metrics = loss_at(run, models)
    assert set(losses) == {"model"} and "logvar" not in metrics
    assert not run.fixed_logvar.logvar.requires_grad
    rec = metrics["l1"] + metrics["perceptual"]
    kl = run.loss_cfg.kl_weight * metrics["kl"] / (3 * 16 * 16)
    assert losses["model"].item() == pytest.approx((rec + kl).item(), rel=1e-6)


def test_adaptive_weight_comes_from_the_gradient_of_the_nll():
    """grad NLL = grad rec / exp(s) at the decoder's last layer, so at s the weight is exp(-s) times
    the weight at s = 0 (the generator's gradient does not depend on s)."""
    s = 1.5
    _, metrics_0 = loss_at(*make_run(learn_logvar=True, logvar_init=0.0))
    _, metrics_s = loss_at(*make_run(learn_logvar=True, logvar_init=s))
    assert metrics_0["d_weight"].item() < 1e3  # away from the clamp
    assert metrics_s["d_weight"].item() == pytest.approx(metrics_0["d_weight"].item() * math.exp(-s), rel=1e-4)


def test_the_adaptive_weight_is_clamped_where_latent_diffusion_clamps_its_own(monkeypatch):
    """Their loss sums over an image's C H W values and ours averages, so their clamp at 1e4 is 1e4 / (C H W) in
    our units: with the generator's gradient gone, the weight is that bound (3 x 16 x 16 images here)."""
    import vae.discriminator
    import vae.stage
    run, models = make_run()
    monkeypatch.setattr(vae.stage, "hinge_g_loss", lambda logits: 0.0 * vae.discriminator.hinge_g_loss(logits))
    _, metrics = loss_at(run, models)
    assert metrics["d_weight"].item() == pytest.approx(1e4 / (3 * 16 * 16) * run.loss_cfg.disc_weight)


def test_presets_keep_the_log_variance_fixed_as_published():
    # latent diffusion declares s but its optimizer leaves it out, so it stays at 0.
    for make in PRESETS.values():
        loss = make().loss
        assert loss.learn_logvar is False and loss.logvar_init == 0.0
    with pytest.raises(ValueError, match="^logvar_init must be a finite number"):
        VAELossConfig(logvar_init=math.inf)
