"""Classifiers as a stage: ResNet-18 trained on real, synthetic or mixed images and judged on held-out
real ones, through the same loop, run directory, checkpoints and exact resume as every other stage.

`--target class` trains with label-smoothed cross-entropy and reports top-1 and per-class accuracy
and a confusion matrix (RUN_DIR/confusion.png); `--target params` regresses the data's numeric
parameters (normalised to [-1, 1] over the training range, mean squared error) and reports the mean
absolute error of each in the data's units. `--extra-dataset` adds images (a synthetic set) to the
training data, optionally at a fixed share of every batch (`--extra-fraction`). `--init-from` starts
from another classify run's weights instead of random ones: pretrained on synthetic images, say, and
fine-tuned here on real ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from classify.config import MODEL_FROM_DATA, PRESETS, TRAIN_UNUSED, ClassifyConfig
from classify.model import NAME, build_resnet18, small_stem
from classify.plots import confusion_matrix_image
from core.checkpoint import load_checkpoint, load_weights, require_keys, state_fingerprint
from core.config import from_dict, to_dict
from core.contract import MAIN, Outputs, StageSpec, Trainable, TrainingStage, sections_of
from core.errors import UserError, warn_once
from core.runtime import Runtime, check_fits_memory, read_metrics
from data import (DatasetInfo, ImageDataset, check_same_classes, check_spec, classes_differ, dataset_size,
                  fetch_missing, folder_classes, folder_of, label_counts, load_dataset, load_test_set, shared_images)
from data.augment import compose, random_crop, random_hflip, random_noise
from data.dataset import LUMA, param_ranges
from data.imageio import from_uint8
from data.plumes import PARAM_NAMES as PLUME_PARAMETERS

EVAL_BATCH = 256


def same_targets(train: DatasetInfo, other: DatasetInfo, option: str, target: str, train_option: str = "--dataset"
                 ) -> None:
    """Refuse a second dataset (extra training images, test images) whose classes or parameters differ."""
    if target == "class" and other.class_names != train.class_names:
        raise UserError(classes_differ(option, other.class_names, train_option, train.class_names, folder_of(other.name)))
    if target == "params" and other.param_names != train.param_names:
        raise UserError(f"The parameters of {option} ({', '.join(other.param_names) or 'none'}) differ from those of "
                        f"{train_option} ({', '.join(train.param_names) or 'none'}); give both the same params.csv "
                        f"columns.")


def check_held_out(train: ImageDataset, test: ImageDataset, option: str, train_option: str = "--dataset") -> None:
    """Refuse test images that hold the training images or are held by them (one folder given twice, or a
    subset of it), whose numbers a results table would report as held out; warn where some test images are
    training images too (exact copies: splits that share files)."""
    shared = shared_images(train, test)
    if shared and (shared == len(test) or shared >= len(train)):
        inside = (f"every image of {option} ({test.info.name}) is also one of {train_option} ({train.info.name})"
                  if shared == len(test) else f"every image of {train_option} ({train.info.name}) is also one of "
                  f"{option} ({test.info.name}: {shared} of its {len(test)})")
        raise UserError(f"The test images are not held out: {inside}; test on images the classifier does not "
                        f"train on.")
    if shared:
        warn_once(f"held out {option} {train_option}", f"{shared} of the {len(test)} images of {option} are exact "
                  f"copies of images of {train_option}, and its held-out numbers count them; remove them from one "
                  f"of the two for a clean split.")


def _check_targets(name: str, classes: int, has_params: bool, target: str) -> None:
    """Refuse a target the dataset `name` has no labels for (`data.label_counts` tells before loading)."""
    if target == "class" and classes < 2:
        held = " (subfolders that hold images)" if name.startswith("folder:") else ""
        raise UserError(f"--target class needs at least two classes, and {name} has "
                        f"{'only one class' if classes == 1 else 'no classes'}{held}; use class subfolders (e.g. "
                        f"`python -m data.export plumes DIR --classes wind:3`) or --target params.")
    if target == "params" and not has_params:
        raise UserError(f"--target params needs per-image parameters, and {name} has none; add a params.csv "
                        f"or use --target class.")


def concatenate(first: ImageDataset, second: ImageDataset) -> ImageDataset:
    """One dataset holding `first`'s items, then `second`'s (same resolution, channels and targets). Sets
    with other parameters (real plumes with their params.csv, a class model's set without one) join
    without parameters: only a class target can train on them, and it reads none."""
    names = first.info.param_names if first.info.param_names == second.info.param_names else ()
    params = (torch.cat([first.params, second.params]) if names else
              torch.zeros(len(first) + len(second), 0, dtype=first.params.dtype))
    info = dataclasses.replace(first.info, name=f"{first.info.name}+{second.info.name}", param_names=names,
                               param_ranges=param_ranges(params), num_samples=len(first) + len(second))
    known = first.content_key is not None and second.content_key is not None
    return ImageDataset(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]), params,
                        info, content_key=(first.content_key, second.content_key, names) if known else None)


def training_data(config: ClassifyConfig) -> tuple[ImageDataset, dict[str, Any], tuple[tuple[int, int], ...] | None]:
    """The training images (real, then any extra ones), what checkpoints record of them, and the batch mix."""
    data, options, target = config.data, config.classify, config.model.target
    real = load_dataset(data.dataset, data.resolution, cache_dir=data.cache_dir, num_samples=data.num_samples or None)
    _check_targets(real.info.name, len(real.info.class_names), bool(real.info.param_names), target)
    if not options.extra_dataset:
        return real, real.description(), None
    try:
        extra = load_dataset(options.extra_dataset, data.resolution, cache_dir=data.cache_dir,
                             num_samples=options.extra_samples or None, channels=real.info.channels)
    except UserError as err:  # the loaders name the count of --dataset, whose option they take it for
        reworded = str(err).replace("--num-samples", "--extra-samples")
        if reworded == str(err):
            raise
        raise UserError(reworded) from None
    same_targets(real.info, extra.info, "--extra-dataset", target)
    union = concatenate(real, extra)
    described = {**union.description(), "parts": [real.description(), extra.description()]}
    mix = None
    if options.extra_fraction >= 0:
        count = round(options.extra_fraction * config.train.batch_size)
        mix = ((len(real), config.train.batch_size - count), (len(extra), count))
    return union, described, mix


class RunData(NamedTuple):
    """The images of one classifier run, and what its checkpoint records of them."""
    dataset: ImageDataset                           # the training images: real, then any extra ones
    mix: tuple[tuple[int, int], ...] | None         # the batch mix of those two parts (None: uniform)
    test_set: ImageDataset                          # the images every evaluation uses
    split: str                                      # "heldout", or "trainset" for a subset of the training images
    data_info: dict[str, Any]                       # the training data's description, its parts, and test_fingerprint


def run_data(config: ClassifyConfig) -> RunData:
    """The training and test images `config` names, loaded and checked against each other."""
    data = config.data
    dataset, described, mix = training_data(config)
    # The test images do not depend on the training seed, so runs that differ only in it are compared
    # on the same images.
    test_set, split = load_test_set(dataset, data.dataset, data.test_dataset, data.test_samples,
                                    cache_dir=data.cache_dir, seed=0)
    same_targets(dataset.info, test_set.info, "--test-dataset", config.model.target)
    if split == "heldout":
        check_held_out(dataset, test_set, "--test-dataset" if data.test_dataset else f"the test split of {data.dataset}",
                       "--dataset or --extra-dataset" if config.classify.extra_dataset else "--dataset")
    # The test images' fingerprint too: a resumed run (or a finished one the results table keeps) whose
    # test folder changed would otherwise report held-out numbers from two test sets as one.
    return RunData(dataset, mix, test_set, split, {**described, "test_fingerprint": test_set.fingerprint()})


# A logged loss this many times that of uninformed outputs stops the run as diverged (see `diverged`).
DIVERGED_LOSS = 100.0


class ClassifierTraining:
    """The loss and held-out evaluation of one classifier run."""

    def __init__(self, config: ClassifyConfig, info: DatasetInfo, test_set: ImageDataset, split: str,
                 device: torch.device):
        self.config, self.info, self.test_set, self.split, self.device = config, info, test_set, split, device
        self.target = config.model.target

    def loss(self, models, batch, generator, step) -> tuple[Tensor, dict[str, Tensor]]:
        out = models[MAIN](batch.image).float()
        if self.target == "class":
            loss = F.cross_entropy(out, batch.label, label_smoothing=self.config.classify.label_smoothing)
            return loss, {"accuracy": (out.argmax(dim=1) == batch.label).float().mean()}
        loss = F.mse_loss(out, self.info.normalize_params(batch.params))
        error = (self.info.denormalize_params(out) - batch.params).abs().mean(dim=0)
        return loss, {f"mae/{name}": e for name, e in zip(self.info.param_names, error.detach())}

    def diverged(self, models, means) -> str | None:
        """A loss far beyond what knowing nothing costs (ln C for C classes: uniform outputs; 1 for parameters
        scaled to [-1, 1]: predicting 0 costs at most that) means the weights were thrown far off, though they stay
        finite."""
        baseline = math.log(len(self.info.class_names)) if self.target == "class" else 1.0
        loss = means.get("loss", 0.0)
        if loss <= DIVERGED_LOSS * max(baseline, 1.0):
            return None
        return f"the loss became {loss:.3g}, over {DIVERGED_LOSS:g} times that of a network that knows nothing"

    @torch.no_grad()
    def outputs(self, net: torch.nn.Module) -> Tensor:
        """The network's outputs on every test image, in eval mode (batch-norm running statistics).

        In full precision, whatever --amp trains with: the held-out numbers are what `Classifier.predict`
        gives for the checkpoint, and evaluation is too rare a step to be worth bf16's rounding.
        """
        was_training = net.training
        net.eval()
        try:
            parts = []
            for start in range(0, len(self.test_set), EVAL_BATCH):
                x = from_uint8(self.test_set.images[start:start + EVAL_BATCH].to(self.device))
                parts.append(net(x).float().cpu())
            return torch.cat(parts)
        finally:
            net.train(was_training)

    def evaluate(self, models) -> dict[str, Any]:
        out = self.outputs(models[MAIN])
        record: dict[str, Any] = {"split": self.split, "images": len(self.test_set)}
        if self.target == "class":
            labels, names = self.test_set.labels, self.info.class_names
            predicted = out.argmax(dim=1)
            confusion = torch.bincount(labels * len(names) + predicted, minlength=len(names) ** 2).view(len(names), -1)
            per_class, tested = confusion.diag() / confusion.sum(dim=1).clamp(min=1), confusion.sum(dim=1) > 0
            record["loss"] = F.cross_entropy(out, labels).item()
            record["top1"] = (predicted == labels).float().mean().item()
            # A class without test images has no accuracy (not 0%): its key is left out.
            record.update({f"accuracy/{name}": float(a) for name, a, t in zip(names, per_class, tested) if t})
            record["confusion"] = confusion.tolist()
            title = f"{self.split} top-1 {100 * record['top1']:.1f}% ({len(labels)} images)"
            record["figures"] = {"confusion": confusion_matrix_image(confusion, names, title=title)}
            return record
        predicted = self.info.denormalize_params(out)
        error = (predicted - self.test_set.params).abs().mean(dim=0)
        record["loss"] = F.mse_loss(out, self.info.normalize_params(self.test_set.params)).item()
        record["mae"] = error.mean().item()
        record.update({f"mae/{name}": float(e) for name, e in zip(self.info.param_names, error)})
        return record


INIT_OPTION = "--init-from"
HEAD = "fc."  # the output layer's parameters (torchvision's name), which --new-head does not copy


def start_from(net: torch.nn.Module, config: ClassifyConfig, info: DatasetInfo, announce: bool = True
               ) -> dict[str, str]:
    """Copy the weights of the checkpoint `--init-from` names into `net` (built for `config` and the training
    data `info`), after checking that it reads images of the same size and stem and, unless `--new-head`
    keeps `net`'s own randomly initialised output layer, predicts the same targets; returns what the run's
    checkpoint records of it (path, weight fingerprint, and whether the head is new).

    A network trained on colour images fine-tunes on greyscale ones (or the reverse) through its first
    convolution adapted (`adapt_first_conv`), as pretrained networks usually are.
    """
    path = Path(config.classify.init_from)
    payload, theirs, their_info = read_init_from(path)
    check_init_fits(path, theirs, their_info, config, info.resolution, label_names(info, config.model.target))
    new_head = config.classify.new_head
    source = payload["models"].get(MAIN)
    start = source
    if new_head and isinstance(source, dict):
        # The trunk as the source ended; the output layer as this run's seed initialised it.
        head = {key: value for key, value in net.state_dict().items() if key.startswith(HEAD)}
        start = {**{key: value for key, value in source.items() if not key.startswith(HEAD)}, **head}
    if their_info.channels != info.channels and isinstance(start, dict) and FIRST_CONV in start:
        start = {**start, FIRST_CONV: adapt_first_conv(start[FIRST_CONV], info.channels)}
        if announce:
            kinds = {1: "greyscale", 3: "colour"}
            print(f"Note: {INIT_OPTION} {path} was trained on {kinds[their_info.channels]} images and this run has "
                  f"{kinds[info.channels]} ones; its first convolution is adapted to them.", flush=True)
    load_weights(net, start, path, "ResNet-18", option=INIT_OPTION)
    record = {"path": str(path), "fingerprint": state_fingerprint(source)}
    return {**record, "new_head": True} if new_head else record


def read_init_from(path: Path) -> tuple[dict[str, Any], ClassifyConfig, DatasetInfo]:
    """The classify checkpoint at `path` (--init-from), its config and the description of the data it trained on;
    one sentence naming the file where it is missing, of another stage, incomplete or damaged."""
    payload = load_checkpoint(path, NAME, option=INIT_OPTION)
    require_keys(payload, ("config", "data_info", "models"), path, option=INIT_OPTION)
    config = from_dict(ClassifyConfig, payload["config"], source=path)
    return payload, config, DatasetInfo.from_dict(payload["data_info"])


def label_names(info: DatasetInfo, target: str) -> tuple[str, ...]:
    """What a network trained on `info` for `target` predicts: its classes, or its parameters."""
    return info.class_names if target == "class" else info.param_names


def check_init_fits(path: Path, theirs: ClassifyConfig, their_info: DatasetInfo, config: ClassifyConfig,
                    resolution: int, labels: tuple[str, ...] | None) -> None:
    """Refuse the --init-from network at `path` (trained as `theirs` on `their_info`) for this run (`config`, on images
    of `resolution` px): it must read images of the same size through the same stem and, unless --new-head gives
    this run an output layer of its own, predict the same target and `labels` (this run's classes or parameters;
    None where they are not known before the data is loaded)."""
    def stem(model: Any, size: int) -> str:
        return f"the {'small' if small_stem(model, size) else 'imagenet'} stem"

    def predicts(target: str, names: tuple[str, ...]) -> str:
        return f"{'classes' if target == 'class' else 'parameters'} {', '.join(names) or 'none'}"

    def require_same(pairs: list[tuple[str, str]], advice: str) -> None:
        for was, now in pairs:
            if was != now:
                raise UserError(f"{INIT_OPTION} {path} was trained with {was}, and this run has {now}; fine-tune on "
                                f"data and options that match it, or {advice}.")

    require_same([(f"{their_info.resolution} px images", f"{resolution} px images"),
                  (stem(theirs.model, their_info.resolution), stem(config.model, resolution))],
                 "train from random weights")
    if config.classify.new_head:
        return
    # The output layer is copied too, so it must predict what this run trains.
    theirs_to, ours_to = theirs.model.target, config.model.target
    pairs = [(f"--target {theirs_to}", f"--target {ours_to}")]
    if labels is not None:
        pairs.append((predicts(theirs_to, label_names(their_info, theirs_to)), predicts(ours_to, labels)))
    require_same(pairs, "add --new-head to train a new output layer on the copied trunk, or train from random weights")


def labels_before_loading(config: ClassifyConfig) -> tuple[str, ...] | None:
    """The classes or parameters the training data will have, where they are known without decoding an image: a
    folder's classes (by listing it), the plumes' parameters; None for the rest (a CIFAR-10 not yet downloaded,
    a params.csv not yet read), which `start_from` checks once the data is loaded."""
    spec, target = config.data.dataset, config.model.target
    if target == "class" and folder_of(spec) is not None:
        return folder_classes(spec)
    if target == "params" and spec == "plumes":
        return PLUME_PARAMETERS
    return None


FIRST_CONV = "conv1.weight"  # the stem's convolution (torchvision's name), the one layer that sees the channels


def adapt_first_conv(weight: Tensor, channels: int) -> Tensor:
    """First-layer weights (out, C, k, k) for images of `channels` channels, 1 or 3.

    Colour to grey sums the weights over colour: on a grey image the network then computes exactly what it
    computed on that image as RGB with three equal channels. Grey to colour weights the three channels by
    their share of the luma (ITU-R 601, which sum to 1): the network computes on a colour image what it
    computed on its grey version as the grey loader makes it (unrounded), and on a grey image given as RGB
    exactly what it computed on it.
    """
    if weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    return weight * torch.tensor(LUMA, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)


def augmentation(config: ClassifyConfig):
    padding = config.classify.crop_padding
    padding = config.data.resolution // 8 if padding == -1 else padding
    crop = (lambda batch, generator: random_crop(batch, generator, padding)) if padding else None
    std = config.classify.noise_std
    noise = (lambda batch, generator: random_noise(batch, generator, std)) if std else None
    return compose(crop, random_hflip if config.data.hflip else None, noise)


def build(config: ClassifyConfig, runtime: Runtime, resume_from: dict | None, run_dir: Path | None = None
          ) -> tuple[ClassifyConfig, TrainingStage]:
    data, train = config.data, config.train
    dataset, mix, test_set, split, data_info = run_data(config)
    info = dataset.info
    if runtime.is_main and split != "heldout":
        print(f"Evaluating on {len(test_set)} training images: {data.dataset} has no test split; pass --test-dataset "
              f"for held-out numbers.", flush=True)
    outputs = len(info.class_names) if config.model.target == "class" else len(info.param_names)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, in_channels=info.channels,
                                                                   num_outputs=outputs))
    torch.manual_seed(train.seed)  # the initial weights
    net = build_resnet18(config.model, info.resolution)
    if config.classify.init_from:
        # A resumed run's weights come from its own checkpoint: the starting point is only recorded, so that
        # the data_info a resume compares stays the same even if that file has gone since.
        start = resume_from["data_info"].get("init_from") if resume_from is not None else None
        data_info = {**data_info, "init_from": start or start_from(net, config, info, announce=runtime.is_main)}
    # cuDNN's fast layout for convolutions under AMP, and oneDNN's on the CPU: a ResNet-18 training step at 32 px,
    # batch 64, alternating in one process on a 2-core Intel Xeon with AMX, 1.07x (fp32) and 1.17x (bf16) faster.
    net = net.to(memory_format=torch.channels_last)
    run = ClassifierTraining(config, info, test_set, split, runtime.device)
    options = config.classify
    trainable = Trainable(net, lr=train.lr, optimizer="sgd", momentum=options.momentum, nesterov=options.nesterov,
                          weight_decay=train.weight_decay)
    stage = TrainingStage(name=NAME, trainables={MAIN: trainable}, loss=run.loss, dataset=dataset,
                          config=to_dict(config), data_info=data_info, augment=augmentation(config), mix=mix,
                          outputs=Outputs(evaluate=run.evaluate), diverged=run.diverged)
    return config, stage


def check(config: ClassifyConfig, resume_from: dict | None = None, device: torch.device | None = None,
          run_dir: Path | None = None) -> None:
    """Options that must agree with each other, and datasets that must exist, before any work (the same for
    a new run and a resumed one, `resume_from`, except --init-from: a resumed run no longer reads it)."""
    options = config.classify
    _check_targets(config.data.dataset, *label_counts(config.data.dataset), config.model.target)
    if options.extra_dataset:
        check_spec(options.extra_dataset, "--extra-dataset")
        check_extra_samples(options.extra_dataset, options.extra_samples, config.data.resolution)
    elif options.extra_fraction != -1 or options.extra_samples:
        raise UserError("--extra-fraction and --extra-samples need --extra-dataset; add it or drop them.")
    if config.data.test_dataset:
        check_spec(config.data.test_dataset, "--test-dataset")
    if config.model.target == "class":  # folders' classes, by listing them: no image is decoded to refuse them
        for spec, option in ((options.extra_dataset, "--extra-dataset"), (config.data.test_dataset, "--test-dataset")):
            check_same_classes(spec, option, config.data.dataset, "--dataset")
    if options.new_head and not options.init_from:
        raise UserError("--new-head replaces the output layer of the --init-from network; add --init-from CKPT, or "
                        "drop --new-head.")
    if options.init_from and resume_from is None:  # all `start_from` checks that need no data, before it is read
        path = Path(options.init_from)
        _, theirs, their_info = read_init_from(path)
        check_init_fits(path, theirs, their_info, config, config.data.resolution, labels_before_loading(config))
    count = round(options.extra_fraction * config.train.batch_size)
    if options.extra_fraction > 0 and count == 0:
        raise UserError(f"--extra-fraction {options.extra_fraction} of --batch-size {config.train.batch_size} is "
                        f"less than one image; raise either.")
    # Last, as it may download: a second set that cannot be had (CIFAR-10 offline) is refused before --dataset,
    # which is loaded first, is decoded or simulated.
    fetch_missing(options.extra_dataset, "--extra-dataset", cache_dir=config.data.cache_dir)
    fetch_missing(config.data.test_dataset, "--test-dataset", cache_dir=config.data.cache_dir, train=False)


def check_extra_samples(spec: str, count: int, resolution: int) -> None:
    """Refuse an --extra-samples that --extra-dataset `spec` cannot give, where that is known without decoding an
    image: more than a folder holds (it is listed), or more plumes than memory holds (they are simulated to order)."""
    if not count:
        return
    if folder_of(spec) is not None:
        total = dataset_size(spec)
        if count > total:
            raise UserError(f"--extra-samples {count} asks for more images than the {total} of --extra-dataset "
                            f"{spec}; pass at most {total}, or 0 for all of them.")
    elif spec == "plumes":
        check_fits_memory(count * 3 * resolution**2, torch.device("cpu"),  # as the plumes loader counts them
                          f"--extra-samples {count:,} plumes at {resolution}x{resolution} as a dataset",
                          "ask for fewer (--extra-samples)")


def final_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The last held-out evaluation of a finished classify run (its final step), or None if it has none."""
    run_dir = Path(run_dir)
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    if not (config_path.is_file() and metrics_path.is_file()):
        return None
    try:
        saved = json.loads(config_path.read_bytes().decode("utf-8"))
    except ValueError:  # not UTF-8, or not JSON
        raise UserError(f"{config_path} is not the JSON config a run writes; restore it, or delete the run folder "
                        f"{run_dir} to train it again.") from None
    steps = from_dict(ClassifyConfig, saved, source=config_path).train.steps
    last = None
    for _, record in read_metrics(metrics_path):
        if record["step"] == steps and record.get("split") != "train":
            last = record
    return last


SPEC = StageSpec(
    name=NAME,
    summary="ResNet-18 classifier or parameter regressor on real, synthetic or mixed images",
    config_class=ClassifyConfig,
    presets=PRESETS,
    sections=sections_of(
        ClassifyConfig,
        data=dict(help={"hflip": "random horizontal flips (off for labels that mirroring changes, e.g. a plume's wind)"}),
        model=dict(skip=MODEL_FROM_DATA),
        train=dict(skip=TRAIN_UNUSED, help={"sample_every": "steps between held-out evaluations (0: only at the end)",
                                            "lr": "peak learning rate of SGD", "weight_decay": "SGD weight decay (L2)"})),
    build=build,
    check=check,
)
