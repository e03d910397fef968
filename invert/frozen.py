"""The frozen model an inversion learns against: loaded read-only from its checkpoint, identified by
a fingerprint of its weights, and the clean sample x0 it denoises for each real image.

An inversion checkpoint refers to its model by path and fingerprint instead of carrying a copy:
embeddings mean nothing under any other weights, so a model file that changed (trained further,
replaced) or went missing is refused with one sentence rather than silently giving other images.
The path is recorded absolute, and relative to the inversion's run folder where the run knows it, so
that a project folder moved, copied or mounted elsewhere with its runs still finds its model; one
function, `find_frozen`, picks it for sampling and resuming alike: the first place that holds a model
of the recorded fingerprint, so that another model at the old absolute path does not hide the right
one beside the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from core.checkpoint import load_checkpoint, state_fingerprint
from core.errors import MissingFileError, UserError
from core.runtime import Runtime
from data import ImageDataset, grey_as_rgb
from ddpm.generate import DiffusionSampler
from ddpm.stage import SPEC as DDPM
from ldm.config import LatentConfig
from ldm.latents import latent_dataset, scaled_x0
from ldm.stage import SPEC as LDM
from vae.stage import load_autoencoder

# The stages whose models can be inverted (by their checkpoints' "stage"): diffusion models that draw
# images themselves, through their stage's `load_source`.
DIFFUSION_MODELS = {spec.name: spec for spec in (DDPM, LDM)}


@dataclass
class FrozenModel:
    """A trained diffusion model that an inversion conditions but never changes."""
    sampler: DiffusionSampler       # network (eval mode, no gradients), schedule, prediction, data info
    path: Path                      # its checkpoint, absolute (sample.py reads the record from any folder)
    stage: str                      # the stage that trained it (ddpm, ldm)
    weights: str                    # ema or model
    fingerprint: str                # state_fingerprint of the network's weights
    payload: dict[str, Any]         # the checkpoint, for what else it carries (a latent model's autoencoder)

    def record(self, run_dir: Path | None = None) -> dict[str, Any]:
        """What an inversion checkpoint keeps of its model: enough to find it again and to know it. Given the
        inversion's run folder, also the model's path from there ("relative"), where one exists (not between two
        Windows drives)."""
        record = {"path": str(self.path), "stage": self.stage, "weights": self.weights, "fingerprint": self.fingerprint}
        if run_dir is not None:
            try:
                record["relative"] = os.path.relpath(self.path, Path(run_dir).resolve())
            except ValueError:
                pass
        return record


def recorded_places(record: dict[str, Any], run_dir: Path | None) -> tuple[Path, ...]:
    """Where an inversion checkpoint's record of its frozen model (`FrozenModel.record`) says the model is: its
    absolute path, then, where the record holds one and the inversion's run folder `run_dir` is known, its path
    relative to that folder where that is another place (the project folder was moved, copied or mounted elsewhere
    with its runs)."""
    places = [Path(str(record.get("path", "")))]
    relative = record.get("relative")
    if run_dir is not None and isinstance(relative, str):
        # (os.path.realpath, not Path.resolve: a link loop on the way is a place that does not exist, not an error)
        places.append(Path(os.path.realpath(Path(os.path.realpath(run_dir), relative))))
    return tuple(dict.fromkeys(places))


def _places(record: dict[str, Any], run_dir: Path | None, given: str | Path | None) -> dict[Path, str]:
    """Where `find_frozen` looks, in order, each with the words its refusal names it by."""
    places = {Path(os.path.realpath(Path(given).expanduser())): f"the run's --model {given}"} if given else {}
    for k, place in enumerate(recorded_places(record, run_dir)):
        places.setdefault(place, f"{place} (its place from the inversion's run folder)" if k else str(place))
    return places


def lone_place(record: dict[str, Any], run_dir: Path | None, given: str | Path | None = None) -> Path | None:
    """The file `find_frozen` would load, found without loading one, where just one of its places holds a file
    (a project not moved): the model if any is, its fingerprint checked when it is loaded. None where several do,
    which only their fingerprints tell apart, or none does."""
    files = [place for place in _places(record, run_dir, given) if place.is_file()]
    return files[0] if len(files) == 1 else None


def find_frozen(record: dict[str, Any], run_dir: Path | None, device: torch.device, *,
                given: str | Path | None = None, whose: str = "these embeddings") -> FrozenModel:
    """The frozen model an inversion checkpoint's record (`FrozenModel.record`) names, loaded from the first place
    that holds a model of the recorded fingerprint: `given` (a resumed run's --model) first, then its
    `recorded_places` (`run_dir`: the inversion's run folder, where known). Where none does, one sentence names
    every place tried and what was wrong with each; `whose` names the embeddings in it ("the embeddings in CKPT")."""
    expected, weights = record.get("fingerprint"), record.get("weights")
    places = _places(record, run_dir, given)
    what = f"the model that {whose} were learned against"
    if len(places) == 1:  # the one place: `load_frozen` says what is wrong with it
        place = Path(given).expanduser() if given else next(iter(places))
        return load_frozen(place, device, weights, expected=expected, what="--model" if given else what)
    wrong, missing = [], True  # (what is wrong with each place; whether every one is missing)
    for place, name in places.items():
        if not place.exists():
            wrong.append(f"{name} does not exist")
            continue
        missing = False
        try:
            model = _read_frozen(place, device, weights, what)
        except UserError:
            wrong.append(f"{name} is no readable conditional ddpm or ldm checkpoint")
            continue
        if model.fingerprint == expected:
            return model
        wrong.append(f"{name} holds another model (weights {model.fingerprint})")
    raise (MissingFileError if missing else UserError)(
        f"The diffusion model that {whose} were learned against (weights {expected}) is at none of the places "
        f"tried: {', '.join(wrong[:-1])} and {wrong[-1]}; put that model back at one of them, or learn the "
        f"embeddings again against another model.")


def load_frozen(path: str | Path, device: torch.device, weights: str, *, expected: str | None = None,
                what: str = "--model") -> FrozenModel:
    """The diffusion model at `path`, frozen; refused unless conditional, and unless its weights'
    fingerprint is `expected` (when given)."""
    path = Path(path).expanduser()
    if not path.is_file():
        advice = (f"restore it (fingerprint {expected}), or learn the embeddings again against another model"
                  if expected else "pass the checkpoint.pt of a conditional ddpm or ldm run")
        raise MissingFileError(f"The diffusion model {path} ({what}) does not exist; {advice}.")
    model = _read_frozen(path, device, weights, what)
    if expected is not None and model.fingerprint != expected:
        raise UserError(f"The diffusion model {path} changed since these embeddings were learned against it "
                        f"(weights {model.fingerprint}, learned against {expected}); restore that model, or start a "
                        f"new inversion.")
    return model


def _read_frozen(path: Path, device: torch.device, weights: str, what: str) -> FrozenModel:
    """The diffusion model in the file `path`, frozen and fingerprinted; refused unless it is a conditional one."""
    payload = load_checkpoint(path, option=what if what.startswith("--") else None)
    stage = str(payload.get("stage"))
    if stage not in DIFFUSION_MODELS:
        raise UserError(f"{what} {path} is a checkpoint of stage '{stage}', which is not a diffusion model; pass "
                        f"the checkpoint.pt of a conditional ddpm or ldm run.")
    sampler = DIFFUSION_MODELS[stage].load_source(payload, device, weights, path).model
    if sampler.net.config.cond == "none":
        raise UserError(f"The model {path} was trained without conditioning (--cond none), so it has no conditioning "
                        f"slot to invert into; train one with --cond class or --cond params.")
    return FrozenModel(sampler, path.resolve(), stage, weights, state_fingerprint(sampler.net.state_dict()), payload)


def check_resolution(model: FrozenModel, resolution: int) -> None:
    """The frozen network takes images of its training size only."""
    want = model.sampler.info.resolution
    if resolution != want:
        raise UserError(f"--resolution {resolution} differs from the {want} px images the model {model.path} was "
                        f"trained on; pass --resolution {want}.")


def fit_images(model: FrozenModel, images: ImageDataset, announce: bool = True) -> ImageDataset:
    """The real images as the model takes them: greyscale ones as RGB with three equal channels for a colour
    model (which is what a greyscale folder's images are to it, as in latent training). Refused: colour images
    for a greyscale model, or images of another size than the model's own training images."""
    want = model.sampler.info
    images = grey_as_rgb(images, want.channels, f"the model {model.path}", announce)
    have = images.info
    if have.channels != want.channels:
        raise UserError(f"{have.name} has colour images but the model {model.path} was trained on greyscale ones; "
                        f"invert greyscale images with it (convert these to greyscale first), or use a colour model.")
    check_resolution(model, have.resolution)
    return images


def denoised_data(model: FrozenModel, images: ImageDataset, *, cache_dir: str, runtime: Runtime
                  ) -> tuple[Dataset, Callable[[Any, torch.Generator | None], Tensor]]:
    """What the model denoises for each image, as a dataset whose items carry `index`, and
    `x0(batch, generator)`: the images themselves for a pixel model; for a latent model, a draw of
    each image's scaled latent from its posterior (the mean when `generator` is None), encoded once
    by the autoencoder the model carries."""
    if not model.sampler.latent:
        return images, (lambda batch, generator: batch.image)
    autoencoder, scale, fingerprint = load_autoencoder(model.payload["vae"], runtime.device, model.path)
    latents = latent_dataset(autoencoder, fingerprint, images, hflip=False, cache_dir=cache_dir,
                             batch=LatentConfig().encode_batch, runtime=runtime)
    return latents, scaled_x0(scale)
