"""Diffusion inversion as a stage: one vector per real image, learned in a frozen model's conditioning
slot with the model's own DDPM objective, through the same loop, run directory, checkpoints and exact
resume as every other stage.

The only trainable is the table of vectors (`EmbeddingStore`); the network is closed over by the
loss, frozen (eval mode, no gradients), so its weights are never duplicated or written, and a batch
costs one forward and one backward pass through it (the backward computes activation gradients only,
down to the conditioning vector). Checkpoints record each vector's source image, label and
parameters, and the frozen model's path (absolute, and from the run folder where the stage is told
it) and weight fingerprint.

Quality signal (metrics.jsonl, split "inversion"): on a fixed subset of images, at fixed timesteps
and noises, the denoising loss with each image's learned vector against the loss with the vector it
started from (its class or parameter embedding) and with the null embedding, so values are
comparable from step to step and across runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from core.checkpoint import not_a_checkpoint_file, peek_checkpoint
from core.config import from_dict, to_dict
from core.contract import MAIN, Outputs, Section, StageSpec, Trainable, TrainingStage, sections_of
from core.errors import MissingFileError, UserError
from core.runtime import Runtime, autocast, autocast_dtype, check_fits_memory, derive_seed, training_bytes
from data import ImageDataset, dataset_size, load_dataset
from data.dataset import subset_indices
from data.imageio import from_uint8
from ddpm.config import SamplingConfig, check_within_timesteps
from ddpm.generate import image_seed, sample_images
from ddpm.objective import diffusion_loss
from invert.config import DATA_UNUSED, PRESETS, TRAIN_UNUSED, InvertConfig
from invert.embeddings import DIVERGED_RMS, EmbeddingStore, rms_limit, starting_condition, starting_vectors
from invert.frozen import (DIFFUSION_MODELS, FrozenModel, check_resolution, denoised_data, find_frozen, fit_images,
                           load_frozen, lone_place)
from invert.variations import InversionSource, Variations, check_inversion, load_inverted

NAME = "invert"
EVAL_KEY = 7_919  # seeds the quality signal's noises: a stream of its own, the same at every step
EVAL_BATCH = 256  # (image, timestep) pairs per forward pass of the quality signal


class Inversion:
    """The loss, quality signal, preview and checkpoint records of one inversion run."""

    def __init__(self, config: InvertConfig, model: FrozenModel, images: ImageDataset, dataset: Dataset,
                 x0: Callable[[Any, torch.Generator | None], Tensor], start: str, initial: Tensor,
                 device: torch.device, run_dir: Path | None = None):
        self.config, self.model, self.images, self.x0 = config, model, images, x0
        self.start, self.device = start, device
        self.run_dir = run_dir  # where the checkpoints go (None: unknown), to record the model's path from there
        self.net = model.sampler.net
        self.train_net = torch.compile(self.net) if config.train.compile else self.net
        self.schedule = model.sampler.schedule
        self.amp_dtype = autocast_dtype(config.train.amp, device)
        # The quality signal: a fixed subset of images (their posterior means for a latent model),
        # timesteps spread evenly over [0, T), and one fixed noise per (image, timestep).
        self.eval_index = _eval_subset(len(images), config.invert.eval_images)
        T, K = self.schedule.num_timesteps, config.invert.eval_timesteps
        self.eval_t = ((torch.arange(K, dtype=torch.float64) + 0.5) * T / K).long().clamp(max=T - 1).to(device)
        self.eval_x0 = x0(default_collate([dataset[int(i)] for i in self.eval_index]), None).to(device)
        self.initial = initial[self.eval_index].to(device)
        self.rms_limit = rms_limit(initial)

    def loss(self, models, batch, generator, step):
        vectors = models[MAIN](batch.index)
        x0 = self.x0(batch, generator)
        losses = diffusion_loss(self.train_net, self.schedule, x0, generator, prediction=self.model.sampler.prediction,
                                cond_emb=vectors)
        return losses.mean(), {}

    @torch.no_grad()
    def per_image_loss(self, vectors: Tensor | None) -> Tensor:
        """Mean denoising loss (M,) of each quality-signal image over the fixed timesteps and noises,
        conditioned on `vectors` (M, E), or on the null embedding (None)."""
        K = len(self.eval_t)
        out = []
        for rows in torch.arange(len(self.eval_index)).split(max(1, EVAL_BATCH // K)):
            # Image i's noises are seeded by i alone: the same whatever the subset or chunk.
            noise = torch.cat([torch.randn((K, *self.eval_x0.shape[1:]),
                                           generator=torch.Generator().manual_seed(derive_seed(EVAL_KEY, int(i))))
                               for i in self.eval_index[rows]]).to(self.device)
            rows = rows.to(self.device)
            emb = None if vectors is None else vectors[rows].repeat_interleave(K, dim=0)

            def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
                with autocast(self.device, self.amp_dtype):
                    return self.net(x_t, t, cond_emb=emb).float()

            losses = self.schedule.training_losses(model_fn, self.eval_x0[rows].repeat_interleave(K, dim=0),
                                                   self.eval_t.repeat(len(rows)), noise, self.model.sampler.prediction)
            out.append(losses.view(len(rows), K).mean(dim=1))
        return torch.cat(out)

    def evaluate(self, models) -> dict[str, Any]:
        learned = models[MAIN].weight.detach()[self.eval_index.to(self.device)]
        ours = self.per_image_loss(learned)
        null = self.per_image_loss(None)
        start = null if self.start == "null" else self.per_image_loss(self.initial)
        return {"split": "inversion", "images": len(ours), "start": self.start,
                "loss_learned": ours.mean().item(), "loss_start": start.mean().item(), "loss_null": null.mean().item(),
                "improved": (ours < start).float().mean().item(),
                "shift": (learned - self.initial).norm(dim=1).mean().item()}

    def diverged(self, models, means) -> str | None:
        """The loss stays finite however far the vectors fly (the network saturates), so the vectors say it."""
        rms = models[MAIN].largest_rms()
        if rms <= self.rms_limit:
            return None
        return (f"the largest learned vector's RMS became {rms:.3g}, over {DIVERGED_RMS:g} times that of the model's "
                f"own embeddings (limit {self.rms_limit:.3g})")

    def preview(self, models) -> Tensor:
        """Real images beside samples drawn from their learned vectors (same seeds at every preview)."""
        n = min(self.config.train.preview_images, len(self.eval_index))
        index = self.eval_index[:n]
        vectors = models[MAIN].weight.detach()[index.to(self.device)]
        sampling = SamplingConfig(sampler="ddim", steps=self.config.train.preview_steps)  # at most T: see `check`
        drawn = sample_images(self.model.sampler, sampling, [image_seed(self.config.train.seed, k) for k in range(n)],
                              cond_emb=vectors).cpu()
        real = from_uint8(self.images.images[index])
        return torch.stack([real, drawn], dim=1).flatten(0, 1)  # real, drawn, real, drawn, ...

    def payload(self, models) -> dict[str, Any]:
        images = self.images
        return {"inversion": {"model": self.model.record(self.run_dir), "start": self.start,
                              "sources": [images.source(i) for i in range(len(images))],
                              "labels": images.labels.clone(), "params": images.params.clone()}}


def _eval_subset(n: int, count: int) -> Tensor:
    """The quality signal's images: a seeded subset of `count` (0: all), the same in every run on the data."""
    return subset_indices(n, min(count or n, n), 0, "the inversion's quality signal").sort().values


def inversion_stage(config: InvertConfig, model: FrozenModel, images: ImageDataset, dataset: Dataset,
                    x0: Callable[[Any, torch.Generator | None], Tensor], device: torch.device,
                    announce: bool = False, run_dir: Path | None = None) -> TrainingStage:
    """The training stage that inverts `images` (denoised as `dataset` items through `x0`) into `model`, its
    checkpoints written into `run_dir` (when known: they record the model's path from there too)."""
    start = starting_condition(model.sampler.net, model.sampler.info, images.info, config.invert.init)
    initial = starting_vectors(model.sampler.net, model.sampler.info, images.info, images.labels, images.params, start)
    if announce:
        print(f"Inverting {len(images)} images of {images.info.name} into the {initial.shape[1]}-wide conditioning "
              f"space of {model.path} ({model.stage}, {model.weights} weights {model.fingerprint}); vectors start "
              f"from the {'null embedding' if start == 'null' else start + ' embeddings'}.", flush=True)
        if config.train.batch_size > len(images):  # accepted, as every stage accepts it (training.loop.StepBatches)
            print(f"Note: --batch-size {config.train.batch_size} is larger than the {len(images)} images to invert, so "
                  f"a batch holds some of them more than once and a vector takes one step for all its copies; pass "
                  f"--batch-size {len(images)} or fewer to visit each image at most once a step.", flush=True)
    run = Inversion(config, model, images, dataset, x0, start, initial, device, run_dir)
    n = min(config.train.preview_images, len(run.eval_index))
    trainable = Trainable(EmbeddingStore(initial), lr=config.train.lr, optimizer="lazy_adamw",
                          weight_decay=config.train.weight_decay)
    return TrainingStage(name=NAME, trainables={MAIN: trainable}, loss=run.loss, dataset=dataset,
                         config=to_dict(config), data_info=images.description(),
                         outputs=Outputs(preview=run.preview, preview_nrow=2 * math.ceil(math.sqrt(n)),
                                         evaluate=run.evaluate, payload=run.payload),
                         diverged=run.diverged)


def build(config: InvertConfig, runtime: Runtime, resume_from: dict | None, run_dir: Path | None = None
          ) -> tuple[InvertConfig, TrainingStage]:
    """The stage; `run_dir`, the run folder where known, is where a resume also looks for the model (at its
    recorded place relative to the run) and what new checkpoints record the model's path from."""
    data, device = config.data, runtime.device
    model = (load_frozen(config.invert.model, device, config.invert.weights) if resume_from is None
             else resumed_model(config, resume_from, run_dir, device))
    check_resolution(model, data.resolution)  # before the images are loaded (or simulated)
    images = load_dataset(data.dataset, data.resolution, cache_dir=data.cache_dir, num_samples=data.num_samples or None)
    images = fit_images(model, images, announce=runtime.is_main)
    dataset, x0 = denoised_data(model, images, cache_dir=data.cache_dir, runtime=runtime)
    return config, inversion_stage(config, model, images, dataset, x0, device, announce=runtime.is_main,
                                   run_dir=run_dir)


def check(config: InvertConfig, resume_from: dict | None, device: torch.device, run_dir: Path | None = None) -> None:
    """Before any image is read: the model must be named and exist (a resumed run's be found, `resumed_model`), the
    preview's and the quality signal's timesteps be within its T, and the vectors with the model fit the device;
    build checks the image size against it before the images are loaded, and the images themselves once they are."""
    path = config.invert.model
    if not path:
        raise UserError("--model is required: pass the checkpoint.pt of a conditional diffusion run to invert "
                        "against (e.g. train.py --stage ddpm --cond params).")
    if resume_from is None:
        model = Path(path).expanduser()
        if not model.is_file():
            raise MissingFileError(f"--model {path} {not_a_checkpoint_file(model, 'a conditional ddpm or ldm run')}.")
    else:
        model = resumed_file(config, resume_from, run_dir)
    frozen = frozen_shape(model)
    if frozen is None:
        return
    check_within_timesteps("--preview-steps", config.train.preview_steps, frozen.timesteps)
    check_within_timesteps("--eval-timesteps", config.invert.eval_timesteps, frozen.timesteps)
    check_inversion_fits(config, frozen, device)


def resumed_model(config: InvertConfig, resume_from: dict, run_dir: Path | None, device: torch.device) -> FrozenModel:
    """The frozen model a resumed run goes on against: the first of its --model and the places its checkpoint
    records (from the run folder `run_dir`, where known) that holds the recorded weights (`find_frozen`), the
    checkpoint's record checked before it is trusted."""
    check_inversion(resume_from, Path("the checkpoint to resume"))
    whose = f"the embeddings in {Path(run_dir) / 'checkpoint.pt'}" if run_dir is not None else "the embeddings to resume"
    return find_frozen(resume_from["inversion"]["model"], run_dir, device, given=config.invert.model, whose=whose)


def resumed_file(config: InvertConfig, resume_from: dict, run_dir: Path | None) -> Path:
    """The file `resumed_model` will load, found without loading the model where one place alone holds a file (the
    project was not moved: `build` then loads it once); where several do, their fingerprints decide, so they are
    read (on the CPU), and where none does, `find_frozen` refuses."""
    check_inversion(resume_from, Path("the checkpoint to resume"))
    place = lone_place(resume_from["inversion"]["model"], run_dir, config.invert.model)
    return place if place is not None else resumed_model(config, resume_from, run_dir, torch.device("cpu")).path


class FrozenShape(NamedTuple):
    """What the checks need of a frozen model, read from its checkpoint with its weights left unread."""
    timesteps: int      # T
    width: int          # of its conditioning slot, so of each learned vector
    values: int         # of the weights an inversion holds: the U-Net's, and a latent model's autoencoder's


def frozen_shape(path: Path) -> FrozenShape | None:
    """The `FrozenShape` of the diffusion model at `path`, its weights memory-mapped, not read; None for a file that
    is no diffusion model's checkpoint, which `build` refuses with the reason, before any image is read."""
    payload = peek_checkpoint(path)
    spec = DIFFUSION_MODELS.get(str((payload or {}).get("stage")))
    if spec is None or not isinstance(payload.get("config"), dict):
        return None
    config = from_dict(spec.config_class, payload["config"], source=path)

    def weights(part: Any) -> int:
        """Values of a checkpoint's network (one set: its two weight entries hold the same shapes); 0 where absent."""
        models = part.get("models") if isinstance(part, dict) else None
        state = models.get("model") if isinstance(models, dict) else None
        return sum(t.numel() for t in state.values() if isinstance(t, Tensor)) if isinstance(state, dict) else 0
    # A latent model carries its autoencoder in the layout of a VAE checkpoint.
    return FrozenShape(config.diffusion.num_timesteps, config.unet.embedding_dim,
                       weights(payload) + weights(payload.get("vae")))


def check_inversion_fits(config: InvertConfig, frozen: FrozenShape, device: torch.device) -> None:
    """Refuse, before any image is read, an inversion whose vectors (trained with AdamW: weights, gradients and two
    moments, no average) and frozen model (its weights alone, fp32) outgrow `device`. The images are counted
    without decoding one (a folder is only listed)."""
    data = config.data
    images = data.num_samples or dataset_size(data.dataset, cache_dir=data.cache_dir)
    need = training_bytes(images * frozen.width, averaged=False) + 4 * frozen.values
    check_fits_memory(need, device, f"The {images:,} learned vectors of {frozen.width} values (trained with AdamW in "
                                    f"fp32) and the frozen model's {frozen.values:,} weights",
                      "invert fewer images (--num-samples), or against a smaller model")


def load_source(payload: dict[str, Any], device: torch.device, weights: str, path: Path) -> InversionSource:
    """Images drawn from variations of the learned vectors, with the model they were learned against (its
    weights are the ones the inversion used, whatever `weights` asks)."""
    return InversionSource(load_inverted(payload, device, path))


SPEC = StageSpec(
    name=NAME,
    summary="diffusion inversion: one learned conditioning vector per real image against a frozen model",
    config_class=InvertConfig,
    presets=PRESETS,
    sections=sections_of(
        InvertConfig,
        data=dict(skip=DATA_UNUSED, help={"dataset": "real images to invert: plumes (built in) | folder:PATH | cifar10",
                                          "resolution": "image side in pixels; must be the model's"}),
        train=dict(skip=TRAIN_UNUSED,
                   help={"lr": "AdamW learning rate of the vectors (Zhou et al. 2023: 3e-2)",
                         "weight_decay": "AdamW decoupled weight decay of the vectors",
                         "compile": "torch.compile the frozen model (faster on CUDA after a warm-up)",
                         "sample_every": "steps between previews and quality-signal evaluations (0: only at the end)",
                         "preview_images": "real images shown beside samples from their vectors",
                         "preview_steps": "DDIM steps of the preview samples"})),
    build=build,
    check=check,
    load_source=load_source,
    sample_options=(Section("variations", Variations,
                            help={name: f"(inversion checkpoints) {field.metadata['help']}"
                                  for name, field in Variations.__dataclass_fields__.items()}),),
)
