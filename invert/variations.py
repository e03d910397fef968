"""An inversion checkpoint as a source of new images (Zhou et al. 2023, section 3.2): each image is
drawn from a variation of one learned vector, with classifier-free guidance against a reference.

Image k of a set comes from source image i = k mod N (so K images per source are images 0 .. K*N - 1,
and a larger K keeps the earlier ones) and from draws seeded by (seed, k) alone:

    e_k = (1 - w) e_i + w e_j + sigma * rms(E) * n      w ~ U(0, interp), j ~ another image of i's class,
                                                         n ~ N(0, I)

where rms(E) is the root mean square entry of all N learned vectors, so `emb_noise` is relative to
their size whatever the model. Zhou et al.'s released code interpolates with one fixed weight (0.1)
and adds noise of a fixed absolute size; drawing w and scaling the noise are our variants. The
images are sampled with guidance scale s against a reference r, eps = eps(r) + s (eps(e_k) - eps(r)),
r being the mean learned vector (the paper's choice) or the model's null embedding. With interp = 0 and emb_noise = 0, e_k = e_i exactly and image k is the plain
sample from image i's learned vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from core.checkpoint import advice, require_keys, state_fingerprint
from core.config import check_choice, in_option_words, option, to_dict
from core.errors import FieldError, UserError
from core.runtime import derive_seed
from data import DatasetInfo, trained_datasets
from data.writer import Item
from ddpm.conditioning import Conditions
from ddpm.generate import DiffusionSampler, image_seed
from ddpm.source import ImageSource, Request
from ddpm.synthetic import DatasetPlan, check_image_count
from invert.frozen import find_frozen

REFERENCES = ("mean", "null")
GUIDANCE = 2.0  # Zhou et al. 2023's guidance scale for images drawn from learned vectors
VARIATION_KEY = 2  # (seed, k, VARIATION_KEY) seeds image k's partner, weight and noise


@dataclass(frozen=True)
class Variations:
    emb_noise: float = option(0.1, "Gaussian noise added to each learned vector, as a multiple of the vectors' root "
                                   "mean square entry (0: off; Zhou et al.'s released code adds noise of a fixed "
                                   "standard deviation instead, none in its dataset script)")
    interp: float = option(0.1, "interpolate towards another image of the same class with a weight drawn uniformly "
                                "from [0, this] (0: off; Zhou et al.'s released code uses one fixed weight, 0.1)")
    reference: str = option("mean", "what guidance pushes away from: mean (of all learned vectors, as in Zhou et al. "
                                    "2023) or null (the model's null embedding, plain classifier-free guidance)",
                            choices=REFERENCES)

    def __post_init__(self) -> None:
        # Each check names the fields it is about: code reads them as fields, sample.py as the options that set
        # them (`requested_variations`; core.errors.FieldError).
        if not 0 <= self.emb_noise < float("inf"):
            raise FieldError("{emb_noise} must be 0 or a positive number, got {value}.", value=self.emb_noise)
        if not 0 <= self.interp <= 1:
            raise FieldError("{interp} must be in [0, 1], got {value}.", value=self.interp)
        check_choice("reference", self.reference, REFERENCES)


def requested_variations(request: Request) -> Variations:
    """The variations sample.py's options ask for (its --emb-noise, --interp and --reference), refused in the words
    of those options."""
    try:
        return Variations(**request.section("variations"))
    except FieldError as err:
        raise UserError(in_option_words(err, Variations)) from None


@dataclass
class Inverted:
    """Learned vectors with what they stand for, and the frozen model they condition."""
    model: DiffusionSampler         # the frozen model (its info describes the model's own training data)
    vectors: Tensor                 # (N, E) float32, on the CPU
    labels: Tensor                  # (N,) class of each source image, in `info`'s classes
    params: Tensor                  # (N, P) raw parameters of each source image
    sources: tuple[str, ...]        # where each source image came from
    info: DatasetInfo               # the real images: classes and parameter names
    record: dict[str, Any]          # what the checkpoint says of the frozen model (path, fingerprint, ...)
    model_datasets: dict[str, str]  # the frozen model's training datasets, by option (`data.trained_datasets`)

    def __post_init__(self) -> None:
        self.members = {int(y): (self.labels == y).nonzero().squeeze(1) for y in self.labels.unique()}

    def fingerprint(self) -> str:
        return state_fingerprint({"vectors": self.vectors})

    def reference(self, which: str) -> Tensor | None:
        """The guidance reference: the mean learned vector, or None for the null embedding."""
        return self.vectors.mean(dim=0) if which == "mean" else None

    def conditions(self, indices: Sequence[int], seed: int, variations: Variations) -> Conditions:
        """The vector of image k for each k in `indices` (see the module docstring), with manifest records."""
        n = len(self.vectors)
        scale = variations.emb_noise * self.vectors.square().mean().sqrt()
        rows, records = [], []
        for k in indices:
            i = k % n
            generator = torch.Generator().manual_seed(derive_seed(seed, k, VARIATION_KEY))
            same = self.members[int(self.labels[i])]
            others = same[same != i]
            j = int(others[torch.randint(len(others), (1,), generator=generator)]) if len(others) else i
            w = variations.interp * float(torch.rand((), generator=generator, dtype=torch.float64))
            noise = torch.randn(self.vectors.shape[1], generator=generator)
            rows.append((1 - w) * self.vectors[i] + w * self.vectors[j] + scale * noise)
            record = {"source": self.sources[i], "source_index": i, "partner": self.sources[j], "partner_index": j,
                      "weight": w}
            if self.info.class_names:
                record["class"] = self.info.class_names[int(self.labels[i])]
            records.append(record)
        return Conditions(cond_emb=torch.stack(rows) if rows else torch.zeros(0, self.vectors.shape[1]),
                          records=tuple(records), reference=self.reference(variations.reference))

    def plan(self, per_image: int, seed: int, variations: Variations) -> DatasetPlan:
        """`per_image` images of every source image, labelled with its class (a flat set without classes);
        parameters are the source's, interpolated with the same weight as the vectors."""
        check_image_count(per_image * len(self.vectors), "--per-image")
        indices = list(range(per_image * len(self.vectors)))
        conditions = (lambda idx: self.conditions(list(idx), seed, variations))
        items = []
        for k, record in zip(indices, conditions(indices).records):
            i, j, w = record["source_index"], record["partner_index"], record["weight"]
            values = (1 - w) * self.params[i].double() + w * self.params[j].double()
            items.append(Item(k, record.get("class", ""), params=dict(zip(self.info.param_names, map(float, values))),
                              record={"seed": image_seed(seed, k), **record}))
        return DatasetPlan(items, conditions, param_names=self.info.param_names)


def check_inversion(payload: dict[str, Any], path: Path) -> None:
    """Refuse an invert checkpoint whose "inversion" record (see invert/stage.py) does not describe its
    vectors: the frozen model's path (and its path from the run folder, where recorded), weights and
    fingerprint as text, and per vector a source image, a label among the classes and the source's
    parameters."""
    require_keys(payload, ("models", "data_info", "inversion"), path)
    info, inversion = payload["data_info"], payload["inversion"]
    inversion = inversion if isinstance(inversion, dict) else {}
    main = payload["models"].get("model")
    vectors = main.get("weight") if isinstance(main, dict) else None
    model, labels, params, sources = (inversion.get(k) for k in ("model", "labels", "params", "sources"))
    if not (isinstance(vectors, torch.Tensor) and vectors.dim() == 2 and vectors.is_floating_point()):
        problem = "no learned vectors (models.model.weight, one row per image)"
    elif not (isinstance(model, dict) and all(isinstance(model.get(k), str) for k in ("path", "weights", "fingerprint"))
              and isinstance(model.get("relative", ""), str)):
        problem = "no path, weights and fingerprint of the frozen model (inversion.model)"
    elif not (isinstance(labels, torch.Tensor) and labels.shape == (len(vectors),) and not labels.is_floating_point()
              and all(0 <= int(y) < max(1, len(info["class_names"])) for y in labels.unique())):
        problem = "no label among its classes for every vector (inversion.labels)"
    elif not (isinstance(params, torch.Tensor) and params.shape == (len(vectors), len(info["param_names"]))):
        problem = "no parameters for every vector (inversion.params)"
    elif not (isinstance(sources, (list, tuple)) and len(sources) == len(vectors)
              and all(isinstance(s, str) for s in sources)):
        problem = "no source image for every vector (inversion.sources)"
    else:
        return
    raise UserError(f"Checkpoint {path} holds {problem}; it is damaged or was edited, so {advice(None)}.")


def load_inverted(payload: dict[str, Any], device: torch.device, path: Path) -> Inverted:
    """The vectors of an invert checkpoint and the frozen model (the first of its recorded places, from the
    checkpoint `path`'s folder, that holds the recorded weights: `find_frozen`), refused if the checkpoint is
    damaged (`check_inversion`) or no place holds that model."""
    check_inversion(payload, path)
    inversion = payload["inversion"]
    model = inversion["model"]
    frozen = find_frozen(model, Path(path).parent, device, whose=f"the embeddings in {path}")
    vectors = payload["models"]["model"]["weight"].float().cpu()
    if not torch.isfinite(vectors).all():
        raise UserError(f"The embeddings in {path} hold NaN or infinite values; the inversion diverged, so learn them "
                        f"again (train.py --stage invert) with a lower --lr.")
    return Inverted(frozen.sampler, vectors, inversion["labels"].long(), inversion["params"].float(),
                    tuple(inversion["sources"]), DatasetInfo.from_dict(payload["data_info"]), model,
                    trained_datasets(frozen.payload))


class InversionSource(ImageSource):
    """An inversion checkpoint as sample.py draws from it: image k from a variation of the learned vector
    of source image k mod N (see the module docstring), guided against the reference."""
    default_guidance = GUIDANCE
    option_sections = ("variations",)
    draws_requests = False

    def __init__(self, inverted: Inverted):
        super().__init__(inverted.model)
        self.inverted = inverted
        self.drawn_through = inverted.model_datasets

    def check(self, request: Request) -> None:
        """The conditions come from the learned vectors (their classes from the inverted images), so no class,
        parameter or sweep can be asked for."""
        for flag, given in (("--class", request.label), ("--param", request.params), ("--sweep", request.sweep),
                            ("--interpolate", request.interpolate), ("--classes", request.classes),
                            ("--per-class", request.per_class)):
            if given:
                raise UserError(f"{flag} does not apply to an inversion checkpoint, whose images are conditioned on "
                                f"the learned vectors (their classes come from the inverted images); drop it.")
        if request.dataset_out is not None and request.num is not None:
            raise UserError("An inversion writes --per-image K images of every inverted image; use --per-image "
                            "instead of --num.")

    def conditions(self, indices: Sequence[int], request: Request) -> Conditions:
        return self.inverted.conditions(indices, request.seed, requested_variations(request))

    def dataset(self, request: Request) -> tuple[DatasetPlan, dict[str, Any]]:
        variations = requested_variations(request)
        plan = self.inverted.plan(request.per_image or 1, request.seed, variations)
        # --per-image is the set's size, not part of its request: image k is the same at any count, so a larger
        # count extends a set and a smaller one keeps it (as --num and --per-class do).
        return plan, {"weights": self.inverted.record["weights"], "embeddings": self.inverted.fingerprint(),
                      "variations": to_dict(variations)}
