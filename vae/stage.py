"""The KL autoencoder as a stage: its loss (L1 + perceptual as a negative log-likelihood, KL, optionally
a PatchGAN), held-out metrics, reconstruction previews, and the latent scale factor stored with every
checkpoint (latent models measure their own on their latent cache and keep this one for comparison).

Later stages read a trained autoencoder back with `load_autoencoder`, which returns the weights'
fingerprint too: latent caches and latent models are keyed by it, so a different VAE is never
mistaken for the one they were made with.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.checkpoint import load_weights, require_keys, state_fingerprint
from core.config import from_dict, in_option_words, to_dict
from core.contract import MAIN, Outputs, StageSpec, Trainable, TrainingModels, TrainingStage, sections_of
from core.errors import MissingFileError, UserError
from core.runtime import Runtime, check_training_fits, parameter_count, training_bytes
from core.speed import compile_module, inference_layout
from core.weights import diffusers_weights_file
from data import ImageDataset, check_spec, fetch_missing, grey_as_rgb, load_dataset, load_test_set
from data.augment import random_hflip
from data.imageio import as_rgb, from_uint8
from vae.autoencoder import AutoencoderConfig, AutoencoderKL
from vae.config import (ADAM_BETAS, AUTOENCODER_FROM_DATA, AUTOENCODER_OPTIONS, PRESETS, VAEConfig, VAELossConfig,
                        resolve_autoencoder)
from vae.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from vae.perceptual import TAPS, PerceptualDistance, build_perceptual, check_weight_files
from vae.published import load_published_weights, read_published_weights

NAME = "vae"
EVAL_BATCH = 32


def latent_scale_factor(moments: Tensor, chunk: int = 256) -> float:
    """1 / the standard deviation of z = mean + std * eps over the whole latent dataset `moments`
    (N, V, 2L, h, w) = [mean | std]: latent diffusion's `scale_by_std`, so scaled latents have the unit
    variance the diffusion schedule assumes for x0.

    Every element of every view is one draw of the mixture the training loop samples, so in closed form
        Var(z) = Var(mean) + E[std^2]
    (the law of total variance: the spread of the posterior means plus the average posterior variance),
    with both moments over all N V L h w elements. Latent diffusion instead takes the sample standard
    deviation of one posterior draw of its first training batch; this is the value that estimate scatters
    around, free of the batch's noise. Accumulated in float64, `chunk` images at a time. The autoencoder's run
    measures the same on its own images (`latent_scale`), the latent model's run on its latent cache.
    """
    assert moments.ndim == 5 and moments.shape[2] % 2 == 0, f"expected (N, V, 2L, h, w) moments, got {tuple(moments.shape)}"

    def parts():  # (mean, std) in float64, a few images at a time
        return (part.double().chunk(2, dim=2) for part in moments.split(chunk))

    count = moments.numel() // 2
    average = sum(mean.sum() for mean, _ in parts()) / count
    # Two passes (the mean first), so a large common offset of the latents cannot cancel the variance away.
    variance = sum((mean - average).square().sum() + std.square().sum() for mean, std in parts()) / count
    std = variance.sqrt().item()
    if not math.isfinite(std) or std <= 0:
        raise UserError(f"The latents have standard deviation {std}; the autoencoder's weights are broken, so train "
                        f"it again or load other weights.")
    return 1.0 / std


@torch.no_grad()
def latent_scale(autoencoder: AutoencoderKL, images: Tensor, batch: int = EVAL_BATCH) -> float:
    """`latent_scale_factor` of the posteriors of `images` (uint8 or [-1, 1]), latent diffusion's `scale_by_std`:
    scaled latents have unit variance, the scale the diffusion schedule assumes for x0.

    Stored with the autoencoder as a reference; a latent model measures its own, on the latents it trains on
    (with its flipped views), as latent diffusion does."""
    device = next(autoencoder.parameters()).device
    moments = []
    for part in images.split(batch):
        x = part.to(device)
        posterior = autoencoder.encode(from_uint8(x) if part.dtype == torch.uint8 else x.float())
        moments.append(torch.cat([posterior.mean, posterior.std], dim=1).double().cpu().unsqueeze(1))
    return latent_scale_factor(torch.cat(moments))


def _describe_perceptual(net: PerceptualDistance, cfg: VAELossConfig) -> str:
    taps = ", ".join(TAPS[:net.taps])
    if net.kind == "lpips":
        return f"LPIPS v0.1 (VGG-16 taps {taps}; published weights)"
    why = "" if cfg.perceptual == "random" else " because the VGG-16 and LPIPS weight files are not in the torch hub cache"
    return (f"random-weight VGG-16 (taps {taps}; seeded, uniform heads: a generic perceptual loss, not LPIPS){why}")


class OutputLogVariance(nn.Module):
    """The output log-variance s of the reconstruction likelihood: rec -> rec / exp(s) + s.

    Latent diffusion's LPIPSWithDiscriminator (and generative-models' successor) reads the per-pixel
    reconstruction loss as the negative log-likelihood of a distribution of scale exp(s); its minimum
    over s is at s = log(rec), where the NLL's gradient in s, 1 - rec / exp(s), vanishes.
    """

    def __init__(self, init: float = 0.0):
        super().__init__()
        self.logvar = nn.Parameter(torch.tensor(float(init)))

    def forward(self, rec_loss: Tensor) -> Tensor:
        return rec_loss / self.logvar.exp() + self.logvar


class VAETraining:
    """The loss, evaluation, preview and checkpoint payload of one autoencoder run."""

    def __init__(self, config: VAEConfig, fixed_logvar: OutputLogVariance | None, perceptual: PerceptualDistance,
                 train_set: ImageDataset, test_set: ImageDataset, test_split: str, device: torch.device):
        self.config, self.loss_cfg = config, config.loss
        # Neither is trained: s when it is not learned (a learned one is the trainable "logvar"), and LPIPS.
        self.fixed_logvar = None if fixed_logvar is None else fixed_logvar.to(device)
        self.perceptual = perceptual.to(device)
        self.train_set, self.test_set, self.test_split, self.device = train_set, test_set, test_split, device

    def loss(self, models: TrainingModels, batch, generator: torch.Generator, step: int):
        """LDM's LPIPSWithDiscriminator objective, per pixel (see VAELossConfig)."""
        cfg, x = self.loss_cfg, batch.image
        reconstruction, posterior = models[MAIN](x, generator=generator)
        l1 = (x - reconstruction).abs().flatten(1).mean(dim=1)
        perceptual = self.perceptual(as_rgb(reconstruction), as_rgb(x))
        rec_loss = (l1 + cfg.perceptual_weight * perceptual).mean()
        # The raw module, not through DDP: this term trains only the autoencoder (the "logvar" loss trains s).
        logvar = models.raw["logvar"] if cfg.learn_logvar else self.fixed_logvar
        nll = logvar(rec_loss)
        kl = posterior.kl()
        loss = nll + cfg.kl_weight * kl.mean() / x[0].numel()
        metrics = {"l1": l1.mean().detach(), "perceptual": perceptual.mean().detach(), "kl": kl.mean().detach()}
        losses = {MAIN: loss}
        if cfg.learn_logvar:
            # s's gradient, 1 - rec / exp(s), depends on rec's value only, so s trains on a copy of the NLL
            # with rec detached: the loop backpropagates each trainable's loss on its own graph.
            losses["logvar"] = models["logvar"](rec_loss.detach())
            metrics["logvar"] = logvar.logvar.detach().clone()  # before this step's update
        if "disc" not in models or step < cfg.disc_start:
            return losses, metrics
        # The generator term goes through the raw discriminator: its gradient must reach only the
        # autoencoder, and a DDP-wrapped discriminator would wait for gradients it never gets.
        g_loss = hinge_g_loss(models.raw["disc"](reconstruction))
        d_weight = adaptive_weight(nll, g_loss, models.raw[MAIN].last_layer, cfg.disc_weight, pixels=x[0].numel())
        # Real and reconstructed images in separate passes (one call: one forward through DDP).
        logits_real, logits_fake = models["disc"](x, reconstruction.detach())
        metrics.update(g_loss=g_loss.detach(), d_weight=d_weight.detach(), logits_real=logits_real.mean().detach(),
                       logits_fake=logits_fake.mean().detach())
        losses.update({MAIN: loss + d_weight * g_loss, "disc": hinge_d_loss(logits_real, logits_fake)})
        return losses, metrics

    @torch.no_grad()
    def evaluate(self, models) -> dict[str, Any]:
        """Mean L1 (in [-1, 1] units), PSNR (dB, on [0, 1]), perceptual distance and KL (nats per image) of
        reconstructions from the posterior mean, over the held-out images."""
        autoencoder = models[MAIN]
        totals = {"l1": 0.0, "psnr": 0.0, "perceptual": 0.0, "kl": 0.0}
        for start in range(0, len(self.test_set), EVAL_BATCH):
            x = from_uint8(self.test_set.images[start:start + EVAL_BATCH].to(self.device))
            posterior = autoencoder.encode(x)
            reconstruction = autoencoder.decode(posterior.mode()).clamp(-1, 1)
            mse = ((x - reconstruction) / 2).square().flatten(1).mean(dim=1)
            totals["l1"] += (x - reconstruction).abs().flatten(1).mean(dim=1).sum().item()
            totals["psnr"] += (10 * torch.log10(1 / mse.clamp(min=1e-10))).sum().item()
            totals["perceptual"] += self.perceptual(as_rgb(reconstruction), as_rgb(x)).sum().item()
            totals["kl"] += posterior.kl().sum().item()
        n = len(self.test_set)
        return {"split": self.test_split, "images": n, **{k: v / n for k, v in totals.items()}}

    @torch.no_grad()
    def preview(self, models) -> Tensor:
        """Held-out images above their reconstructions, in pairs of rows of 8."""
        n = min(self.config.train.preview_images, len(self.test_set))
        x = from_uint8(self.test_set.images[:n].to(self.device))
        reconstruction = models[MAIN].decode(models[MAIN].encode(x).mode()).clamp(-1, 1)
        rows = [t for start in range(0, n, 8) for t in (x[start:start + 8], reconstruction[start:start + 8])]
        width = min(8, n)  # a short last pair of rows is padded with black images
        padded = [torch.cat([r, r.new_full((width - len(r), *r.shape[1:]), -1.0)]) for r in rows]
        return torch.cat(padded)

    def payload(self, models) -> dict[str, Any]:
        """The latent scale factor, measured with the weights this checkpoint holds for sampling."""
        n = min(self.config.vae.scale_samples, len(self.train_set))
        pick = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(self.config.train.seed))[:n]
        scale = latent_scale(models[MAIN], self.train_set.images[pick])
        return {"scale_factor": scale, "scale_samples": n}


def build(config: VAEConfig, runtime: Runtime, resume_from: dict | None, run_dir: Path | None = None
          ) -> tuple[VAEConfig, TrainingStage]:
    data, loss_cfg, train = config.data, config.loss, config.train
    dataset = load_dataset(data.dataset, data.resolution, cache_dir=data.cache_dir, num_samples=data.num_samples or None)
    if resume_from is not None:  # the channels it started with (RGB where it started from published weights)
        dataset = grey_as_rgb(dataset, config.autoencoder.in_channels, "this run's autoencoder", runtime.is_main)
    elif config.vae.pretrained:
        channels = published_names(config)["encoder.conv_in.weight"].shape[1]
        dataset = grey_as_rgb(dataset, channels, "the published autoencoder", runtime.is_main)
    info = dataset.info
    config = resolve_autoencoder(config, info.channels, info.resolution)
    test_set, split = load_test_set(dataset, data.dataset, data.test_dataset, data.test_samples, cache_dir=data.cache_dir,
                                    seed=train.seed)
    perceptual = build_perceptual(loss_cfg.perceptual, loss_cfg.perceptual_taps, loss_cfg.vgg_weights,
                                  loss_cfg.lpips_weights)
    # Record what "auto" resolved to, so a resumed run uses (or insists on) the same network.
    config = dataclasses.replace(config, loss=dataclasses.replace(loss_cfg, perceptual=perceptual.kind))
    if runtime.is_main:
        print(f"Perceptual loss: {_describe_perceptual(perceptual, loss_cfg)}.", flush=True)
        if split != "heldout":
            print(f"Evaluating on {len(test_set)} training images: {data.dataset} has no test split; pass "
                  f"--test-dataset for held-out numbers.", flush=True)

    torch.manual_seed(train.seed)  # the initial weights
    autoencoder = AutoencoderKL(config.autoencoder)
    if config.vae.pretrained and resume_from is None:
        load_published_weights(autoencoder, config.vae.pretrained)
    trainables = {MAIN: Trainable(autoencoder, lr=train.lr, betas=ADAM_BETAS, weight_decay=train.weight_decay,
                                     ema=True)}
    if loss_cfg.disc_start >= 0:
        # Not broadcast_buffers: the generator loss calls the discriminator outside its DDP wrapper (see `loss`),
        # and DDP's in-place copy of BatchNorm's statistics at the wrapped call that follows would change tensors
        # that call saved for its backward (PyTorch 2.11 then refuses the backward; 2.14 does not save them).
        # The statistics are used only in eval mode, which training never puts the discriminator in.
        trainables["disc"] = Trainable(PatchDiscriminator(info.channels, num_layers=loss_cfg.disc_layers),
                                       lr=loss_cfg.disc_lr or train.lr, betas=ADAM_BETAS,
                                       weight_decay=train.weight_decay, broadcast_buffers=False)
    logvar = OutputLogVariance(loss_cfg.logvar_init).requires_grad_(loss_cfg.learn_logvar)
    if loss_cfg.learn_logvar:  # the autoencoder's learning rate and betas, as generative-models optimises it
        trainables["logvar"] = Trainable(logvar, lr=train.lr, betas=ADAM_BETAS)
    if train.compile:  # the loop compiles the trainables; the frozen perceptual network is the stage's own
        compile_module(perceptual)
    fixed_logvar = None if loss_cfg.learn_logvar else logvar
    run = VAETraining(config, fixed_logvar, perceptual, dataset, test_set, split, runtime.device)
    stage = TrainingStage(name=NAME, trainables=trainables, loss=run.loss, dataset=dataset, config=to_dict(config),
                          data_info=dataset.description(), augment=random_hflip if data.hflip else None,
                          outputs=Outputs(preview=run.preview, preview_nrow=min(8, train.preview_images, len(test_set)),
                                          evaluate=run.evaluate, payload=run.payload))
    return config, stage


def load_autoencoder(payload: dict[str, Any], device: torch.device, path: Path | str
                     ) -> tuple[AutoencoderKL, float, str]:
    """A trained autoencoder from a `vae` checkpoint's payload: (its EMA weights frozen in eval mode, latent scale
    factor, fingerprint of those weights)."""
    if payload.get("stage") != NAME:
        raise UserError(f"{path} is a checkpoint of stage '{payload.get('stage')}', not an autoencoder; pass the "
                        f"checkpoint.pt of a `train.py --stage vae` run.")
    require_keys(payload, ("config", "models", "ema", "scale_factor"), path)
    config = from_dict(VAEConfig, payload["config"], source=path)
    state = payload["ema"].get("model")
    autoencoder = load_weights(AutoencoderKL(config.autoencoder), state, path, "autoencoder")
    scale = float(payload["scale_factor"])
    if not math.isfinite(scale) or scale <= 0:
        raise UserError(f"{path} records an invalid latent scale factor {scale}; the checkpoint is inconsistent.")
    autoencoder = inference_layout(autoencoder.to(device).eval().requires_grad_(False), device)
    return autoencoder, scale, state_fingerprint(state)


def published_names(config: VAEConfig) -> dict[str, Tensor]:
    """The tensors of --pretrained, checked by their names only against the autoencoder at --resolution: the data
    decides the channels, hence some shapes, later. (Memory-mapped: almost nothing of the file is read.)"""
    autoencoder = dataclasses.replace(config.autoencoder, resolution=config.data.resolution)
    return read_published_weights(config.vae.pretrained, autoencoder, mmap=True, names_only=True)


def check(config: VAEConfig, resume_from: dict | None, device: torch.device, run_dir: Path | None = None) -> None:
    """Before any work starts: the files the options name must exist, and every network of the run must take
    images of the size asked for (the autoencoder, the perceptual network, and the discriminator when on)."""
    files = [("--vgg-weights", config.loss.vgg_weights), ("--lpips-weights", config.loss.lpips_weights)]
    if resume_from is None:  # a resumed run starts from its checkpoint, not from the published weights
        files.append(("--pretrained", config.vae.pretrained))
    for option, value in files:
        if value and option == "--pretrained" and Path(value).expanduser().is_dir():
            value = diffusers_weights_file(value, "vae")  # a diffusers model folder names its weights file
        if value and not Path(value).expanduser().is_file():
            raise MissingFileError(f"{option} {value} does not exist; pass the path of the weights file.")
    if config.data.test_dataset:
        check_spec(config.data.test_dataset, "--test-dataset")
    size, loss = config.data.resolution, config.loss
    try:
        autoencoder = dataclasses.replace(config.autoencoder, resolution=size)  # (its checks: levels that halve it)
    except ValueError as err:
        raise UserError(f"{size}x{size} images (--resolution {size}) do not fit the autoencoder: "
                        f"{in_option_words(err, AutoencoderConfig, AUTOENCODER_FROM_DATA)}") from None
    if loss.disc_start >= 0 and loss.disc_weight == 0:
        raise UserError(f"--disc-weight 0 gives the discriminator that --disc-start {loss.disc_start} trains no say in "
                        f"the autoencoder's loss; pass a positive --disc-weight (latent diffusion: 0.5), or --disc-start "
                        f"-1 for no discriminator.")
    check_networks_fit(autoencoder, loss, device)
    # What the weight files hold, too: a wrong file is refused now, not after the data is decoded (its names:
    # shapes depend on the images' channels, which only the data tells).
    check_weight_files(config.loss.vgg_weights, config.loss.lpips_weights)
    if config.vae.pretrained and resume_from is None:
        published_names(config)
    smallest = 2 ** (loss.perceptual_taps - 1)  # each VGG-16 tap after the first is behind one more 2x2 max-pool
    if size < smallest:
        raise UserError(f"--perceptual-taps {loss.perceptual_taps} needs images of at least {smallest} px (each VGG-16 "
                        f"tap after the first halves them), and --resolution is {size}; pass --perceptual-taps "
                        f"{size.bit_length()} or a larger --resolution.")
    smallest = PatchDiscriminator.min_image_size(loss.disc_layers)
    if loss.disc_start >= 0 and size < smallest:
        fits = max(n for n in range(1, loss.disc_layers) if PatchDiscriminator.min_image_size(n) <= size)
        raise UserError(f"--disc-layers {loss.disc_layers} needs images of at least {smallest} px (its strided 4x4 "
                        f"convolutions leave smaller ones no patch to judge), and --resolution is {size}; pass "
                        f"--disc-layers {fits}, a larger --resolution, or --disc-start -1 for no discriminator.")
    # Last, as it may download: a test set that cannot be had (CIFAR-10 offline) is refused before --dataset loads.
    fetch_missing(config.data.test_dataset, "--test-dataset", cache_dir=config.data.cache_dir, train=False)


def check_networks_fit(autoencoder: AutoencoderConfig, loss: VAELossConfig, device: torch.device) -> None:
    """Refuse networks whose training outgrows `device`, counted on the meta device (no memory): the
    autoencoder with its weight average, and the discriminator when there is one. (The perceptual network is
    frozen: its weights alone, 15M at most.)"""
    with torch.device("meta"):
        count = parameter_count(AutoencoderKL(autoencoder))
        judge = parameter_count(PatchDiscriminator(3, num_layers=loss.disc_layers)) if loss.disc_start >= 0 else 0
    what = f"The autoencoder's {count:,} parameters" + (f" and the discriminator's {judge:,}" if judge else "")
    check_training_fits(training_bytes(count, averaged=True) + training_bytes(judge, averaged=False), device, what,
                        "give a smaller --base-channels, fewer --channel-mult levels or fewer --num-res-blocks")


# Previews are reconstructions of held-out images, so there are no sampling steps to choose.
TRAIN_UNUSED = frozenset({"preview_steps"})

SPEC = StageSpec(
    name=NAME,
    summary="KL autoencoder, the first stage of latent diffusion (L1 + perceptual + KL, optional PatchGAN)",
    config_class=VAEConfig,
    presets=PRESETS,
    sections=sections_of(VAEConfig, autoencoder=dict(skip=AUTOENCODER_FROM_DATA, help=AUTOENCODER_OPTIONS),
                         train=dict(skip=TRAIN_UNUSED)),
    build=build,
    check=check,
)
