"""The inversion run config and its presets.

An inversion run learns one vector per image of `--dataset` in the conditioning space of a frozen
diffusion model (`--model`), with AdamW on the vectors alone and the model's own DDPM objective. The
learning rate 3e-2 is Zhou et al.'s (2023); the optimizer moves only the rows a batch touches
(`training.optim.LazyAdamW`), so each image's vector follows the path it would take if inverted
alone, and the schedule below counts visits per image, not dataset size. Each visit's gradient comes
from one timestep and one noise, so a vector random-walks around its optimum; the cosine decay of the
learning rate lets it settle (docs/inversion.md measures how much it helps on the plumes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config import DataConfig, StageConfig, TrainConfig, check_choice, option
from core.errors import FieldError

INITS = ("condition", "null")


@dataclass(frozen=True)
class InvertOptions:
    model: str = option("", "checkpoint.pt of the conditional diffusion run (ddpm or ldm) to invert against; it is "
                            "never written, and a changed file is refused on resume (required)")
    weights: str = option("ema", "which of the model's weights to invert against: ema or model", choices=("ema", "model"))
    init: str = option("condition", "where each vector starts: condition (its image's class or parameter embedding "
                                    "where the model knows them, else null) or null (the model's null embedding)",
                       choices=INITS)
    eval_images: int = option(64, "images in the quality signal: the denoising loss of a fixed subset with learned "
                                  "vs. starting embeddings, at fixed timesteps and noises (0: all)")
    eval_timesteps: int = option(8, "timesteps per image in the quality signal, evenly spread over [0, T)")

    def __post_init__(self) -> None:
        # Each check names the fields it is about: code reads them as fields, train.py as options (FieldError).
        check_choice("weights", self.weights, ("ema", "model"))
        check_choice("init", self.init, INITS)
        if self.eval_images < 0:
            raise FieldError("{eval_images} must be 0 (all) or positive, got {value}.", value=self.eval_images)
        if self.eval_timesteps < 1:
            raise FieldError("{eval_timesteps} must be at least 1, got {value}.", value=self.eval_timesteps)


@dataclass(frozen=True)
class InvertConfig(StageConfig):
    invert: InvertOptions = field(default_factory=InvertOptions)


def invert_demo() -> InvertConfig:
    """Images at 32 px against a model trained on plumes (pass --model): 128,000 image visits, about 40
    per image for 3,000 images (the README walkthrough), 13 for the 10,000 built-in plumes."""
    return InvertConfig(
        data=DataConfig(dataset="plumes", resolution=32, hflip=False),
        train=TrainConfig(steps=2000, batch_size=64, lr=3e-2, lr_schedule="cosine", warmup_steps=0, grad_clip=0.0,
                          log_every=20,
                          sample_every=500, ckpt_every=250, preview_images=16, preview_steps=25),
    )


def invert_cifar10() -> InvertConfig:
    """CIFAR-10's 50,000 training images, batch 128, about 40 visits per image."""
    return InvertConfig(
        data=DataConfig(dataset="cifar10", resolution=32, hflip=False),
        train=TrainConfig(steps=16_000, batch_size=128, lr=3e-2, lr_schedule="cosine", warmup_steps=0, grad_clip=0.0,
                          log_every=100,
                          sample_every=2000, ckpt_every=1000, preview_images=16, preview_steps=50),
    )


PRESETS = {"invert-demo": invert_demo, "invert-cifar10": invert_cifar10}
# Options that mean nothing for inversion: there is no weight average of embeddings, and images are never
# flipped (each vector stands for one image as it is); no held-out split either.
DATA_UNUSED = frozenset({"hflip", "test_dataset", "test_samples"})
TRAIN_UNUSED = frozenset({"ema_decay"})
