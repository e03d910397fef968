"""The quality sweep: which way of sampling a model makes the best training data?

    python -m evaluate.sweep --ckpt DIFFUSION --judge CLASSIFIER --real folder:R --test folder:T \\
        --guidance 1,1.5,2,3,5 --steps 25,50 [--sampler ddim] [--spacing uniform,trailing] [--train] \
        [--out runs/sweep] [-- TRAIN OPTIONS]

For every setting (each sampler x step count x guidance scale x timestep spacing) it writes a synthetic
set of the same size into OUT/sets/SETTING (the images `sample.py --dataset-out` writes with those
options: image k has the seed and condition of image k of every other setting) and measures it against
held-out real images (--test), in the features of the judge, a classifier trained on real images:

- conditioning: the share of images the judge puts in the class they were drawn for (a parameter
  regressor as judge: each parameter's mean absolute error, and their mean in units of the test
  images' standard deviation);
- domain FID and KID to the --test images, in the judge's penultimate features (`fid.domain`), FID with
  its sampling noise: its standard deviation over seeded bootstrap resamples of the set;
- per-class diversity: the mean distance between two images of one class in those features, as a
  share of the same for the --test images (1: as varied as real images; below 1: too alike);
- with --train, the accuracy of a classifier trained on the set alone and tested on --test, one run
  per --train-seeds seed (the runner of `evaluate.experiment`, with the options after `--`).

A first row, `real`, measures as many --real images the same way (its FID is the floor a set can
reach at this size; its trained classifier, the accuracy to match). The table (OUT/sweep.md,
sweep.json) names the best setting by --criterion (default: the trained classifier's accuracy with
--train, else domain FID), OUT/sweep.png draws each measure against the settings, and where the
table holds DDIM, PNDM and DDPM it says whether the orderings the DDIM and PNDM papers report hold (or
whether the two FIDs lie within that noise of each other).
--write-best DIR then writes a full dataset with the best setting.

Choose on images you will not report: pass a validation split of real images as --test, and judge
the chosen set on the final test set (`evaluate.experiment`); a best-of-N on the test set flatters.

Run the same command again after an interruption: finished sets, measures and classifiers are kept
and interrupted ones continued. A set made with other options, or a kept classifier made from other
inputs, is refused before anything is drawn or trained; measures are recomputed whenever the images,
the judge or the test set they came from have changed (or were kept by a sweep that did not yet measure
FID's noise).
"""

from __future__ import annotations

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import kernels
from classify.config import PRESETS
from classify.model import Classifier
from classify.plots import bar_chart, line_chart, side_by_side
from classify.stage import SPEC as CLASSIFY, check_held_out
from core.checkpoint import peek_checkpoint
from core.config import in_options
from core.errors import UserError
from core.lock import FolderLock, check_folder_path, check_own_folder, holds_files
from core.runtime import atomic_write, autocast_dtype, resolve_device, write_json
from core.speed import speed_up
from data import check_output_outside, check_spec, dataset_size, folder_of, load_dataset, trained_datasets
from data.dataset import ImageDataset
from data.folder import decoding_once
from data.imageio import atomic_save_image
from data.writer import MAX_BINS, REQUEST, binning_option, parse_binning
from ddpm.config import SPACINGS, SamplingConfig
from ddpm.samplers import SAMPLERS, make_timesteps
from ddpm.schedule import Schedule
from ddpm.source import ImageSource, Request
from ddpm.synthetic import check_image_count
from evaluate.judging import check_pair, judge_dataset
from evaluate.runs import (ReusedRuns, Row, Sizes, check_first_runs, check_passed, check_seed_count,
                           note_test_samples, requested_config, train_plan)
from fid.domain import FEATURES_OPTION, ClassifierFeatures
from fid.frechet import factor_of_features, frechet_distance
from fid.kid import kid
from core.progress import progress
from sampling.command import add_drawing_options, check_drawing_batch
from sampling.draw import Drawer, dataset_writer, draw_dataset, fill_dataset
from stages import open_source
from training.run import parse_stage_args, with_options

CRITERIA = ("auto", "accuracy", "fid", "kid", "conditioning")
# What the sweep writes in --out.
SWEEP_FILES = ("sets", "measures", "runs", "sweep.md", "sweep.json", "sweep.png", "size.json")
DEFAULT_NUM, DEFAULT_PER_CLASS = 500, 100  # images per set
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # subsets of at most 1000 images (Binkowski et al. 2018), fewer if a set is smaller
FID_RESAMPLES = 20  # bootstrap resamples of a set's features that give the spread of its FID
NOISE_MARGIN = 2    # two FIDs closer than this many combined standard deviations are within noise of each other


@dataclass(frozen=True)
class Setting:
    """One way of sampling the model: a row of the table."""
    sampler: str
    steps: int
    guidance: float
    spacing: str = SamplingConfig.spacing

    @property
    def name(self) -> str:
        # The default spacing is left out of the name, so sets written before --spacing existed keep theirs.
        spacing = "" if self.spacing == SamplingConfig.spacing else f"-{self.spacing}"
        return f"{self.sampler}-{self.steps}-g{self.guidance:g}{spacing}"

    def sampling(self, schedule: Schedule | None = None) -> SamplingConfig:
        """This setting as sample.py's config, refused in the sweep's option words where no sampler takes it, or
        where it asks for more steps than `schedule` (the model's) has."""
        with in_options(SamplingConfig, {"guidance_scale": "--guidance"}):
            sampling = SamplingConfig(sampler=self.sampler, steps=self.steps, guidance_scale=self.guidance,
                                      spacing=self.spacing)
            if schedule is not None:
                sampling.check_against(schedule)
        return sampling


def _list(kind: type, option: str):
    """argparse type of a comma-separated list (`--steps 25,50`), each item a `kind`."""
    def parse(text: str) -> tuple:
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise argparse.ArgumentTypeError(f"{option} {text!r} has an empty item; separate values by single "
                                             f"commas, e.g. {option} 25,50")
        try:
            values = tuple(kind(item.strip()) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes a comma-separated list, e.g. {option} 25,50") from None
        if not values or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{option} needs one or more different values, got {text!r}")
        return values
    return parse


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = cli.ArgumentParser(prog="python -m evaluate.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=cli.path_option, required=True, help="checkpoint of the diffusion model to sample (required)")
    parser.add_argument("--judge", type=cli.path_option, required=True,
                        help="checkpoint of a classifier or parameter regressor trained on real images: it judges the "
                             "conditioning and its penultimate features measure FID, KID and diversity (required)")
    parser.add_argument("--real", required=True,
                        help="real training images (folder:PATH | plumes | cifar10): the reference row (required)")
    parser.add_argument("--test", required=True,
                        help="held-out real images every set is measured against, and every classifier tested on "
                             "(required; a validation split, see above)")
    parser.add_argument("--sampler", type=_list(str, "--sampler"), default=("ddim",),
                        help=f"samplers, comma-separated, of {', '.join(SAMPLERS)} (default: ddim)")
    parser.add_argument("--steps", type=_list(cli.int_option, "--steps"), default=(50,),
                        help="sampling step counts, comma-separated (default: 50)")
    parser.add_argument("--spacing", type=_list(str, "--spacing"), default=(SamplingConfig.spacing,),
                        help=f"timestep spacings, comma-separated, of {', '.join(SPACINGS)} (sample.py --spacing says "
                             f"what each is) (default: {SamplingConfig.spacing})")
    parser.add_argument("--guidance", type=_list(float, "--guidance"), default=None,
                        help="classifier-free guidance scales, comma-separated (default: the model's own default, 1 "
                             "for most)")
    parser.add_argument("--num", type=cli.int_option, default=None,
                        help="images per set for parameter and unconditional models (default: 500)")
    parser.add_argument("--per-class", type=cli.int_option, default=None, help="images per class per set for class models "
                                                                   "(default: 100)")
    parser.add_argument("--classes", type=binning_option, default=None, metavar="NAME:K[:LOW:HIGH]",
                        help=f"parameter models: label images by K bins (2 to {MAX_BINS}) of one parameter (as "
                             f"sample.py --classes), which a classifier as --judge needs (default: none)")
    parser.add_argument("--seed", type=cli.seed_option, default=0, help="image k of every set uses a seed derived from (seed, k) "
                                                           "(default: 0)")
    parser.add_argument("--train", action="store_true",
                        help="also train a classifier on each set and on as many real images, tested on --test "
                             "(default: off)")
    parser.add_argument("--train-seeds", type=cli.int_option, default=1, help="with --train: runs per row (default: 1)")
    parser.add_argument("--preset", default="classify-demo", choices=tuple(PRESETS),
                        help="with --train: the classify preset every run starts from (default: classify-demo)")
    parser.add_argument("--criterion", default="auto", choices=CRITERIA,
                        help="what names the best setting: accuracy (of the trained classifiers; top-1, or the mean "
                             "absolute error of a parameter target), fid, kid, conditioning; auto: accuracy with "
                             "--train, else fid (default: auto)")
    parser.add_argument("--write-best", type=cli.path_option, default=None, metavar="DIR",
                        help="afterwards, write a dataset with the best setting into DIR (default: off)")
    parser.add_argument("--write-num", type=cli.int_option, default=None, help="with --write-best: images (parameter and "
                                                                    "unconditional models)")
    parser.add_argument("--write-per-class", type=cli.int_option, default=None, help="with --write-best: images per class "
                                                                          "(class models)")
    parser.add_argument("--out", type=cli.path_option, default=Path("runs/sweep"), help="output folder (default: runs/sweep)")
    add_drawing_options(parser)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    return parser.parse_args(own), passed


def check_args(args: argparse.Namespace, passed: list[str]) -> None:
    """Refuse impossible values and options that mean nothing without another, before any work."""
    for option, value in (("--num", args.num), ("--per-class", args.per_class), ("--train-seeds", args.train_seeds),
                          ("--batch-size", args.batch_size), ("--write-num", args.write_num),
                          ("--write-per-class", args.write_per_class)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}.")
    for option, value in (("--num", args.num), ("--per-class", args.per_class), ("--write-num", args.write_num),
                          ("--write-per-class", args.write_per_class)):
        if value is not None:
            check_image_count(value, option)
    check_seed_count(args.train_seeds, "--train-seeds")
    bad = [g for g in args.guidance or () if not math.isfinite(g)]
    if bad:  # (SamplingConfig would name sample.py's --guidance-scale)
        raise UserError(f"--guidance takes finite scales, got {bad[0]}.")
    named: dict[str, Setting] = {}
    for setting in settings_of(args, default_guidance=1.0):
        setting.sampling()  # refuses impossible values (an unknown sampler, PNDM with fewer than 4 steps)
        twin = named.setdefault(setting.name, setting)
        if twin != setting:  # one name, one set folder: e.g. guidance 1.5 and 1.5000001 (shown to 6 digits)
            raise UserError(f"--guidance {twin.guidance!r} and {setting.guidance!r} both give the set {setting.name}; "
                            f"pass guidance scales that differ in their first 6 significant digits.")
    if args.criterion == "accuracy" and not args.train:
        raise UserError("--criterion accuracy needs the trained classifiers; add --train, or choose fid, kid or "
                        "conditioning.")
    check_folder_path(args.out, "--out")
    check_own_folder(args.out, SWEEP_FILES, "--out")
    for option, folder in (("--out", args.out), ("--write-best", args.write_best)):
        if folder is not None:
            check_output_outside(folder, option, {"--real": args.real, "--test": args.test})
    check_real_outside(args)
    if args.write_best is not None:
        check_folder_path(args.write_best, "--write-best")
        check_apart(args.out, args.write_best)
    if args.write_best is not None and holds_files(args.write_best) and not (args.write_best / "dataset.json").is_file():
        raise UserError(f"{args.write_best} already holds files that are not a dataset of ours; choose an empty or new "
                        f"folder for --write-best.")
    if not args.train and (passed or args.train_seeds != 1 or args.preset != "classify-demo"):
        raise UserError("Training options (--train-seeds, --preset, options after --) apply with --train only; add "
                        "--train or drop them.")
    if args.write_best is None and (args.write_num or args.write_per_class):
        raise UserError("--write-num and --write-per-class size the set of --write-best; add --write-best DIR or drop "
                        "them.")
    if args.write_best is not None and not (args.write_num or args.write_per_class):
        raise UserError("--write-best needs its size: --write-per-class N for a class model, --write-num N otherwise.")
    check_spec(args.real, "--real")
    check_spec(args.test, "--test")
    check_passed(passed, mixed=False)  # the sweep trains on each set alone


def check_apart(out: Path, write_best: Path) -> None:
    """Refuse a --write-best that is --out, or lies inside it or around it: the dataset would sit among the
    sweep's files (a rerun refuses --out for the folder it does not know) or hold the sweep (whose sets would be
    read as one more class of the dataset)."""
    a, b = out.expanduser().resolve(), write_best.expanduser().resolve()
    if a == b or a in b.parents or b in a.parents:
        where = "is" if a == b else "lies inside" if a in b.parents else "holds"
        raise UserError(f"--write-best {write_best} {where} --out {out}; give the dataset a folder of its own, beside "
                        f"the sweep's.")


def check_real_outside(args: argparse.Namespace) -> None:
    """Refuse a --real or --test folder inside --out or --write-best, which this sweep fills with synthetic images
    (OUT/sets/SETTING): a set would be measured against itself, or a rerun read other images than the first."""
    for option, spec in (("--real", args.real), ("--test", args.test)):
        folder = folder_of(spec)
        for output, written in (("--out", args.out), ("--write-best", args.write_best)):
            if folder is None or written is None:
                continue
            if written.expanduser().resolve() in folder.resolve().parents:  # (the folder itself: check_output_outside)
                raise UserError(f"{option} {spec} lies inside {output} {written}, which this sweep fills with "
                                f"synthetic images, so it would measure them against themselves; pass real images "
                                f"from outside it.")


def check_outputs_outside_inputs(args: argparse.Namespace, source: ImageSource) -> None:
    """Refuse, before anything is written, an --out or --write-best inside the images the diffusion model or the
    judge were trained (or the judge tested) on, as sample.py refuses its --dataset-out there: the sets would be
    read as images of those folders by every later command."""
    read = dict(source.trained_on)
    read.update({f"the judge's {option}": spec
                 for option, spec in trained_datasets(peek_checkpoint(args.judge) or {}).items()})
    for option, folder in (("--out", args.out), ("--write-best", args.write_best)):
        if folder is not None:
            check_output_outside(folder, option, read)


def load_judge(path: Path, device: torch.device) -> ClassifierFeatures:
    """The judge's penultimate features (and the judge, `.classifier`); its errors name --judge, the option
    that gave the file (`fid.domain` names its own command's --features)."""
    try:
        return ClassifierFeatures(path, device)
    except UserError as err:
        raise UserError(str(err).replace(FEATURES_OPTION, "--judge")) from None


def settings_of(args: argparse.Namespace, default_guidance: float) -> list[Setting]:
    return [Setting(s, n, g, spacing) for spacing in args.spacing for s in args.sampler for n in args.steps
            for g in (args.guidance or (default_guidance,))]


# ---------------------------------------------------------------------------------------------
# what each set is measured by


@dataclass
class Measured:
    """An image set seen by the judge: its features and what each image should show."""
    features: np.ndarray           # (N, D) penultimate features, float64
    groups: dict[str, np.ndarray]  # class name -> indices of its images ("all" for a set without classes)


def features_of(dataset: ImageDataset, features: ClassifierFeatures, batch_size: int, desc: str) -> np.ndarray:
    chunks = [features(chunk.float() / 255) for chunk in progress(dataset.images.split(batch_size), desc=desc,
                                                                  unit="batch")]
    return torch.cat(chunks).double().numpy()


def measured(dataset: ImageDataset, features: ClassifierFeatures, batch_size: int, desc: str) -> Measured:
    names = dataset.info.class_names
    groups = ({name: np.flatnonzero(dataset.labels.numpy() == k) for k, name in enumerate(names)} if names
              else {"all": np.arange(len(dataset))})
    return Measured(features_of(dataset, features, batch_size, desc), {k: v for k, v in groups.items() if len(v)})


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of distinct rows of `x` (n >= 2)."""
    n = x.shape[0]
    squared = (x * x).sum(1)
    d2 = np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())


def diversity(images: Measured, real: Measured) -> dict[str, Any]:
    """Per class, the mean distance between two of its images over the same for real images of that class
    (classes with fewer than two images on either side are left out), and the mean of those ratios."""
    ours, theirs = images.groups, real.groups
    if not set(ours) <= set(theirs):  # classes the real images do not share: compare the whole sets
        ours, theirs = {"all": np.concatenate(list(ours.values()))}, {"all": np.concatenate(list(theirs.values()))}
    per_class = {}
    for name, members in ours.items():
        reference = theirs[name]
        if len(members) < 2 or len(reference) < 2:
            continue
        per_class[name] = (mean_pairwise_distance(images.features[members])
                           / mean_pairwise_distance(real.features[reference]))
    return {"diversity": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
            "diversity_per_class": per_class}


def distances(images: Measured, real: Measured, seed: int) -> dict[str, float]:
    """Domain FID (and its bootstrap std, `fid_spread`) and KID (mean and std over subsets) of `images` to `real`."""
    a, b = images.features, real.features
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    size = min(KID_SUBSET_SIZE, a.shape[0], b.shape[0])
    # Sets of one size up to 1000: every subset would be both whole sets, so KID is their one estimate, and
    # a spread over subsets (then 0) would claim a certainty it does not have (fid/kid.py): none is given.
    whole = size == a.shape[0] == b.shape[0]
    kid_mean, kid_std = kid(a, b, num_subsets=1 if whole else KID_SUBSETS, subset_size=size, seed=seed)
    return {"fid": float(fid), "fid_std": fid_spread(a, b, seed), "kid": kid_mean,
            "kid_std": None if whole else kid_std, "kid_subset_size": size}


def fid_spread(features: np.ndarray, real: np.ndarray, seed: int, resamples: int = FID_RESAMPLES) -> float:
    """The sampling noise of the FID of a set's `features` (N, D) to `real`: its standard deviation over
    `resamples` seeded bootstrap draws of the set (N rows with replacement), each against the fixed statistics
    of `real` (Efron 1979). The draws repeat images, which raises each FID a little; only their spread is used.
    The covariances enter through their factors (`factor_of_features`), an N x D SVD per draw."""
    assert features.ndim == 2 and features.shape[0] >= 2, f"need (N >= 2, D) features, got {features.shape}"
    mu, sigma, factor = real.mean(0), np.cov(real, rowvar=False), factor_of_features(real)
    rng = np.random.default_rng(seed)
    fids = []
    for _ in range(resamples):
        draw = features[rng.integers(0, len(features), len(features))]
        fids.append(frechet_distance(draw.mean(0), np.cov(draw, rowvar=False), mu, sigma,
                                     factor1=factor_of_features(draw), factor2=factor))
    return float(np.std(fids, ddof=1))


def conditioning(dataset: ImageDataset, judge: Classifier, test: ImageDataset, batch_size: int) -> dict[str, Any]:
    """How well the images show what they were drawn for, by the judge; 'conditioning' is the figure the
    criterion ranks: the agreement (higher is better), or a regressor's mean error in units of each
    parameter's spread over the test images (lower is better)."""
    if not (dataset.info.class_names if judge.config.target == "class" else dataset.info.param_names):
        return {"conditioning": float("nan")}  # an unconditional model's images ask for nothing
    report = judge_dataset(dataset, judge, batch_size)["report"]
    if "agreement" in report:
        return {"conditioning": report["agreement"], "agreement_per_class": report["per_class"]}
    spread = {p: float(test.params[:, j].std()) for j, p in enumerate(test.info.param_names)}
    relative = [report["mae"][p] / spread[p] for p in report["mae"] if spread.get(p, 0) > 0]
    return {"conditioning": float(np.mean(relative)) if relative else float("nan"), "mae": report["mae"]}


# ---------------------------------------------------------------------------------------------
# ranking and the papers' orderings


def criterion_of(args: argparse.Namespace) -> str:
    return ("accuracy" if args.train else "fid") if args.criterion == "auto" else args.criterion


def higher_is_better(criterion: str, target: str, judge_target: str) -> bool:
    if criterion == "accuracy":
        return target == "class"
    if criterion == "conditioning":
        return judge_target == "class"
    return False  # fid, kid


def best_setting(rows: dict[str, dict[str, Any]], criterion: str, higher: bool) -> str | None:
    """The name of the row with the best finite value of `criterion` (the real row never counts); ties go
    to the first in table order."""
    scored = [(name, row[criterion]) for name, row in rows.items()
              if name != "real" and row.get(criterion) is not None and math.isfinite(row[criterion])]
    if not scored:
        return None
    return (max if higher else min)(scored, key=lambda item: item[1])[0]


def paper_orderings(rows: dict[str, dict[str, Any]], settings: Sequence[Setting],
                    schedule: Schedule | None = None) -> list[str]:
    """Whether the domain FIDs reproduce what the DDIM paper (Song et al. 2021, Table 1: DDIM far better
    than DDPM at few steps) and the PNDM paper (Liu et al. 2022, Table 1: PNDM better than DDIM at 50
    steps) report, at each guidance scale and timestep spacing where the table has both sides: each order
    holds, does not hold, or lies within the FIDs' noise (`_compared`). Given the model's `schedule`, a failed
    DDIM order whose first step starts short of pure noise says so."""
    lines = []
    spacings = list(dict.fromkeys(s.spacing for s in settings))
    for spacing in spacings:
        chosen = [s for s in settings if s.spacing == spacing]
        start = None if schedule is None or spacing == "trailing" else functools.partial(_first_step, schedule, spacing)
        lines += _orderings({(s.sampler, s.steps, s.guidance): (rows[s.name]["fid"], rows[s.name]["fid_std"])
                             for s in chosen},
                            sorted({s.guidance for s in chosen}), len({s.guidance for s in settings}) > 1,
                            f"{spacing} spacing" if len(spacings) > 1 else "", start)
    return lines


def _first_step(schedule: Schedule, spacing: str, steps: int) -> tuple[int, float]:
    """The first timestep a sampler of `steps` steps visits (it starts there from pure noise), and abar there."""
    first = int(make_timesteps(schedule.num_timesteps, steps, spacing)[-1])
    return first, float(schedule.alphas_cumprod[first])


# Above this abar at the first visited timestep, x_T ~ N(0, I) is visibly not what the model expects there.
START_ABAR_NOTICEABLE = 1e-3


def _compared(a: tuple[float, float], b: tuple[float, float]) -> tuple[bool | None, str]:
    """Whether FID `a` lies below FID `b`, each (FID, bootstrap std): None where they differ by less than
    `NOISE_MARGIN` combined standard deviations, and the figures that say so."""
    (fid_a, std_a), (fid_b, std_b) = a, b
    margin = NOISE_MARGIN * math.hypot(std_a, std_b)
    lower = None if abs(fid_a - fid_b) < margin else fid_a < fid_b
    return lower, (f"FID {fid_a:.3g} ± {std_a:.2g} against {fid_b:.3g} ± {std_b:.2g}: they differ by "
                   f"{abs(fid_a - fid_b):.2g}, {'within' if lower is None else 'beyond'} the noise margin of "
                   f"{margin:.2g}, {NOISE_MARGIN} combined standard deviations")


def _orderings(found: dict[tuple[str, int, float], tuple[float, float]], guidances: list[float], name_guidance: bool,
               spacing: str, start: Callable[[int], tuple[int, float]] | None = None) -> list[str]:
    """The papers' orderings among the FIDs `found` (FID, bootstrap std) by (sampler, steps, guidance)."""
    lines = []
    for g in guidances:
        at = ", ".join(filter(None, [f"guidance {g:g}" if name_guidance else "", spacing]))
        at = f" ({at})" if at else ""
        for pndm, paper_name in (("pndm", "PNDM"), ("spndm", "S-PNDM")):  # (as Liu et al. 2022 name them)
            if (pndm, 50, g) in found and ("ddim", 50, g) in found:
                lower, figures = _compared(found[(pndm, 50, g)], found[("ddim", 50, g)])
                verdict = "within noise" if lower is None else "holds" if lower else "does not hold"
                lines.append(f"{paper_name} better than DDIM at 50 steps{at}: {verdict} ({figures}).")
        few = sorted(n for (s, n, h) in found if s == "ddim" and h == g and ("ddpm", n, g) in found)
        if few:
            n = few[0]
            ddim, ddpm = found[("ddim", n, g)], found[("ddpm", n, g)]
            lower, figures = _compared(ddim, ddpm)
            ratio = ddpm[0] / ddim[0] if ddim[0] > 0 else 0.0
            verdict = ("within noise" if lower is None else "does not hold" if not lower
                       else f"holds, {ratio:.1f}x lower" if ratio >= 1.5 else "holds, but not by far")
            line = f"DDIM far better than DDPM at {n} steps{at}: {verdict} ({figures})."
            first, abar = start(n) if lower is False and start is not None else (0, 0.0)
            if abar > START_ABAR_NOTICEABLE:
                line += (f" Its first step is at t = {first}, where this schedule keeps abar = {abar:.2g}, yet it "
                         f"starts from pure noise, which DDIM never corrects; try --spacing trailing (docs/sampling.md).")
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# the table and the chart


COLUMNS = (("conditioning", "conditioning", 3), ("fid", "domain FID", 3), ("kid", "KID", 4),
           ("diversity", "diversity (x real)", 3))


def markdown(summary: dict[str, Any]) -> str:
    trained = summary["trained_metric"]
    head = ["setting", *[title for _, title, _ in COLUMNS]] + ([trained] if trained else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary["rows"].items():
        cells = [f"**{name}** (best)" if name == summary["best"] else name]
        cells += [_cell(row, key, digits) for key, _, digits in COLUMNS]
        if trained:  # top-1 in percent to 2 decimals; a mean absolute error to 4 significant digits
            shown = "{:.2f}" if trained.startswith("trained top-1") else "{:.4g}"
            spread = f" ± {shown.format(row['accuracy_std'])}" if len(row["accuracy_per_seed"]) > 1 else ""
            cells.append(f"{shown.format(row['accuracy'])}{spread}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{summary['images']} images per set; measured against {summary['test']} in the features of "
             f"{summary['judge']}; conditioning: {summary['conditioning_metric']}; domain FID ± its standard "
             f"deviation over {FID_RESAMPLES} bootstrap resamples of the set.",
             f"Best by {trained if summary['criterion'] == 'accuracy' and trained else summary['criterion']}: "
             f"{summary['best'] or 'none (no finite value)'}."]
    return "\n".join(lines) + "\n\n" + "\n".join(notes + summary["orderings"]) + "\n"


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    """One measure as the table shows it: to `digits` significant digits, FID with its bootstrap std."""
    if not math.isfinite(row[key]):
        return "–"
    spread = f" ± {row['fid_std']:.2g}" if key == "fid" else ""
    return f"{row[key]:.{digits}g}{spread}"


def chart(summary: dict[str, Any], settings: Sequence[Setting]) -> Any:
    """A panel per measure: against guidance (or steps), a line per remaining axis, and the real row as a
    line of its own; a bar chart per measure when the settings differ in sampler only."""
    rows, real = summary["rows"], summary["rows"]["real"]
    keys = [(key, title) for key, title, _ in COLUMNS] + ([("accuracy", summary["trained_metric"])]
                                                           if summary["trained_metric"] else [])
    guidances, steps = sorted({s.guidance for s in settings}), sorted({s.steps for s in settings})
    panels = []
    for key, title in keys:
        if not any(math.isfinite(rows[s.name][key]) for s in settings):
            continue
        if len(guidances) > 1 or len(steps) > 1:
            axis, xs = ("guidance", guidances) if len(guidances) > 1 else ("steps", steps)
            lines: dict[str, list[float]] = {}
            several_spacings = len({s.spacing for s in settings}) > 1
            for s in settings:
                label = f"{s.sampler} {s.steps}" if axis == "guidance" else f"{s.sampler} g{s.guidance:g}"
                label += f" {s.spacing}" if several_spacings else ""
                lines.setdefault(label, [float("nan")] * len(xs))[xs.index(getattr(s, axis))] = rows[s.name][key]
            if math.isfinite(real[key]):
                lines["real"] = [real[key]] * len(xs)
            panels.append(line_chart(xs, lines, title=title, xlabel=axis))
        else:
            names = [s.name for s in settings] + (["real"] if math.isfinite(real[key]) else [])
            values = [rows[n][key] for n in names]
            panels.append(bar_chart(names, [v if math.isfinite(v) else 0.0 for v in values], title=title))
    return side_by_side(panels)


# ---------------------------------------------------------------------------------------------
# the command


def set_size(args: argparse.Namespace, source: ImageSource) -> tuple[int, Callable[[int], str]]:
    """The images of every set: --per-class N of each class of a class model (default 100), else --num; and
    how a set size is asked for, as a user would give it."""
    if source.kind == "class":
        classes = len(source.model.info.class_names)
        return (args.per_class or DEFAULT_PER_CLASS) * classes, lambda images: f"--per-class {images // classes}"
    return args.num or DEFAULT_NUM, lambda images: f"--num {images}"


SIZE_FILE = "size.json"  # OUT's images per set: every set, and the real row, of one sweep folder have as many


def check_set_size(out: Path, images: int, option: Callable[[int], str]) -> None:
    """Refuse a sweep folder whose sets were made at another size (OUT/size.json, or the finished table of a
    folder from before that file): its sets, measures and trained classifiers would mix sizes (a smaller
    request would keep the larger sets, a larger one extend them)."""
    path = out / SIZE_FILE if (out / SIZE_FILE).is_file() else out / "sweep.json"
    try:
        made = int(json.loads(path.read_bytes())["images"])
    except FileNotFoundError:
        return  # a new folder
    except (ValueError, KeyError, TypeError):
        if path.name != SIZE_FILE:
            return  # a damaged table says nothing of the sets (and is written anew at the end)
        raise UserError(f"{path} does not say the size of the sets in {out}; delete it and rerun with the options "
                        f"that made the sets.") from None
    if made != images:
        raise UserError(f"{out} holds a sweep whose sets have {made} images ({option(made)}); rerun with {option(made)} "
                        f"to continue it, or choose another --out for sets of {images} ({option(images)}).")


def dataset_request(args: argparse.Namespace, setting: Setting, folder: Path, kind: str, *, num: int | None = None,
                    per_class: int | None = None) -> Request:
    """What sample.py's --dataset-out command that writes `setting`'s set (by default the sweep's size: --num or
    --per-class) into `folder` asks of the model."""
    if kind == "class":
        return Request(seed=args.seed, dataset_out=folder, classes=args.classes, guidance_scale=setting.guidance,
                       per_class=per_class or args.per_class or DEFAULT_PER_CLASS)
    return Request(seed=args.seed, dataset_out=folder, classes=args.classes, guidance_scale=setting.guidance,
                   num=num or args.num or DEFAULT_NUM)


def check_judge(kind: str, source_info, judge: Classifier, classes: str | None) -> None:
    """Refuse a judge that cannot read what this model's images are drawn for, before anything is drawn."""
    if kind == "params" and judge.config.target == "class":
        if classes is None:
            raise UserError("A classifier judges class folders, and this model is conditioned on parameters; add "
                            "--classes NAME:K[:LOW:HIGH] to bin its images by a parameter, or pass a parameter "
                            "regressor as --judge.")
        names = parse_binning(classes, source_info).class_names
        missing = [n for n in names if n not in judge.output_names]
        if missing:
            raise UserError(f"The --judge classifier does not know the classes {', '.join(missing)} that --classes "
                            f"{classes} makes (it knows {', '.join(judge.output_names)}); pass one trained on real "
                            f"images binned the same way.")
    elif kind != "none":
        check_pair(kind, source_info, judge)


def check_labels(option: str, data: ImageDataset, judge: Classifier) -> None:
    """Refuse real images labelled with classes or parameters the judge does not know (images without
    labels are measured without conditioning)."""
    names = data.info.class_names if judge.config.target == "class" else data.info.param_names
    missing = [n for n in names if n not in judge.output_names]
    if missing:
        raise UserError(f"The --judge {'classifier' if judge.config.target == 'class' else 'regressor'} does not know "
                        f"{', '.join(missing)} of the {option} images (it knows {', '.join(judge.output_names)}); pass "
                        f"real images labelled as it was trained, or a judge trained on them.")


def check_trained_labels(args: argparse.Namespace, source: ImageSource, real: ImageDataset, test: ImageDataset,
                         target: str, setting: Setting) -> None:
    """With --train, refuse before anything is drawn a training target (train.py's --target, after --) that the
    real images, the sets about to be drawn or the test images carry no labels for, or whose classes or
    parameters differ between them: every run would be refused when it starts, after all the sets were drawn.
    The sets' class folders are read off the plan of `setting`'s set (every set has the same seeds and
    conditions), so bins of --classes that no image falls in are found too."""
    info, kind = source.model.info, source.kind
    if target == "class":
        plan, _ = source.dataset(dataset_request(args, setting, args.out / "sets" / setting.name, kind))
        drawn = tuple(dict.fromkeys(item.folder for item in plan.items if item.folder))
        labels = {"--real": real.info.class_names, "the sets": drawn, "--test": test.info.class_names}
        what, lacking = "classes", {name: len(names) < 2 for name, names in labels.items()}
        advice = ("a class model, or --classes NAME:K to bin a parameter model's images" if kind != "class" else
                  "class folders in --real and --test")
    else:
        labels = {"--real": real.info.param_names, "the sets": info.param_names if kind == "params" else (),
                  "--test": test.info.param_names}
        what, lacking = "parameters", {name: not names for name, names in labels.items()}
        advice = "a parameter model, and params.csv in --real and --test"
    for name, names in labels.items():
        if lacking[name]:
            raise UserError(f"--target {target} (train.py's, after --) trains on {what}, and {name} would have "
                            f"{'only ' + names[0] if names else 'none'}; it needs {advice}, or pass --target "
                            f"{'params' if target == 'class' else 'class'}.")
    # (Class folders are listed in sorted order, as the runs load them; parameters in their params.csv order.)
    ordered = {name: sorted(names) if target == "class" else list(names) for name, names in labels.items()}
    for name in ("--real", "the sets"):
        if ordered[name] == ordered["--test"]:
            continue
        empty = [c for c in ordered["--test"] if c not in ordered[name]]
        if name == "the sets" and kind == "params" and empty and set(ordered[name]) < set(ordered["--test"]):
            raise UserError(f"No image of a set falls in the bins {', '.join(empty)} of --classes {args.classes}, so "
                            f"its classifier could not be tested on the --test images of those classes; raise --num, "
                            f"or bin by fewer --classes.")
        raise UserError(f"The {what} of {name} ({', '.join(ordered[name])}) differ from those of --test "
                        f"({', '.join(ordered['--test'])}), so its classifiers could not be tested there; give "
                        f"both the same {what}.")


def check_model(args: argparse.Namespace, source: ImageSource, judge: Classifier) -> None:
    """Refuse options this model cannot use, and a judge that cannot read its images."""
    if not source.draws_requests:
        raise UserError(f"{args.ckpt} does not draw images of requested classes or parameters (an inversion draws "
                        f"variations of learned vectors); sweep the diffusion model it was learned against.")
    kind = source.kind
    if kind == "none" and args.guidance not in (None, (1.0,)):
        raise UserError("This model was trained without conditioning, so --guidance has nothing to guide; drop it.")
    if kind == "none" and args.criterion == "conditioning":
        raise UserError("This model was trained without conditioning, so no set has a conditioning to rank by; "
                        "choose --criterion fid, kid or accuracy (with --train).")
    if kind == "class" and args.num is not None:
        raise UserError("A class-conditional model's sets hold --per-class N images of each class; use --per-class.")
    if kind != "class" and args.per_class is not None:
        raise UserError("--per-class needs a class-conditional model; use --num N for this one.")
    if args.write_best is not None and (kind == "class") != (args.write_per_class is not None):
        raise UserError("--write-best takes --write-per-class N for a class model and --write-num N otherwise.")
    check_judge(kind, source.model.info, judge, args.classes)
    check_drawing_batch(args.batch_size, set_size(args, source)[0], source.model)


def draw_sets(args: argparse.Namespace, source: ImageSource, settings: Sequence[Setting], amp: torch.dtype | None,
              out: Path) -> None:
    """Write (or finish) the set of every setting into OUT/sets/SETTING; every folder is checked against its
    request before any image is drawn, and a finished set is left as it is."""
    unfinished = []
    for setting in settings:
        request = dataset_request(args, setting, out / "sets" / setting.name, source.kind)
        source.check(request)
        draw = Drawer(source.model, setting.sampling(), amp, args.batch_size)
        plan, writer = dataset_writer(draw, request, source, args.weights, args.ckpt)
        writer.open(plan.items)
        if not all(item.index in writer.rows and (writer.root / item.file).is_file() for item in plan.items):
            unfinished.append((setting.name, draw, plan, writer))
    for name, draw, plan, writer in unfinished:
        print(f"Drawing the set of {name}", flush=True)
        fill_dataset(draw, plan, writer)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, passed = parse_args(list(sys.argv[1:] if argv is None else argv))
    # (The real row's checks, measures and runs, and each set's, decode its images, and hash them, once.)
    with decoding_once():
        return run_sweep(args, passed)


def run_sweep(args: argparse.Namespace, passed: list[str]) -> dict[str, Any]:
    """The sweep that `main`'s parsed command line asks for (see the module docstring); returns its summary."""
    check_args(args, passed)
    device = resolve_device(args.device)
    kernels.use(args.kernels, device)
    judge_features = load_judge(args.judge, device)
    judge = judge_features.classifier
    source = open_source(args.ckpt, device, args.weights)
    check_outputs_outside_inputs(args, source)
    check_model(args, source, judge)
    settings = settings_of(args, source.default_guidance or SamplingConfig().guidance_scale)
    for setting in settings:
        setting.sampling(source.model.schedule)
    check_write_best(args, source, settings)
    speed_up(source.model.net, device)
    amp = autocast_dtype(args.amp, device)
    target = with_options(CLASSIFY, CLASSIFY.presets[args.preset](),  # the training options, parsed now
                          parse_stage_args(CLASSIFY, ["--preset", args.preset, *passed])).model.target
    images, size_option = set_size(args, source)
    check_set_size(args.out, images, size_option)
    # The real images are read, and checked to be judgeable, before anything is drawn.
    resolution, channels = judge.info.resolution, judge.info.channels
    test = load_dataset(args.test, resolution, channels=channels, train=False)  # plumes, cifar10: their test split
    # The real row: as many real images as a set holds (a seeded subset, the only ones decoded), or all there are.
    real = load_dataset(args.real, resolution, channels=channels,
                        num_samples=images if dataset_size(args.real) > images else None)
    if len(real) < images:
        print(f"--real holds {len(real)} images, fewer than the {images} of each set: the real row measures and "
              f"trains on all of them.", flush=True)
    for option, data in (("--test", test), ("--real", real)):
        check_labels(option, data, judge)
    check_held_out(real, test, "--test", "--real")
    if args.train:
        check_trained_labels(args, source, real, test, target, settings[0])
        # The options after -- as the runs will take them (the sets' runs differ only in their images).
        real_row, first_run = Row("real", args.real), args.out / "runs" / "real" / "seed0"
        check_first_runs([(real_row, first_run)], args, passed, device)
        note_test_samples(requested_config(real_row, 0, first_run, args, passed, Sizes()), len(test))

    out = args.out
    with FolderLock(out):
        check_set_size(out, images, size_option)  # again, now that no other sweep writes here
        reused = ReusedRuns()  # (it keeps what it read of the real row's data for the second check)
        if args.train:  # kept classifiers are checked against the training options before anything is drawn
            train_rows(args, passed, settings, images, len(real), {}, out, reused, check_only=True)
        if not (out / SIZE_FILE).is_file():  # the size of the sets about to be drawn
            write_json({"images": images}, out / SIZE_FILE)
        draw_sets(args, source, settings, amp, out)
        real_test = functools.cache(lambda: measured(test, judge_features, args.batch_size, "features of --test"))
        sets = {"real": real, **{s.name: load_dataset(f"folder:{out / 'sets' / s.name}", resolution, channels=channels)
                                 for s in settings}}
        rows = {name: measure(name, dataset, judge_features, test, real_test, out, args)
                for name, dataset in sets.items()}
        trained_metric = (train_rows(args, passed, settings, images, len(real), rows, out, reused) if args.train
                          else None)
        criterion = criterion_of(args)
        best = best_setting(rows, criterion, higher_is_better(criterion, target, judge.config.target))
        summary = {"rows": rows, "best": best, "criterion": criterion, "images": images, "real_images": len(real),
                   "test": args.test,
                   "real": args.real, "judge": judge_features.name, "judge_checkpoint": str(args.judge),
                   "ckpt": str(args.ckpt), "seed": args.seed, "trained_metric": trained_metric,
                   "conditioning_metric": ("share judged the class drawn for" if judge.config.target == "class" else
                                           "mean absolute error / test std, over parameters"),
                   "settings": {s.name: {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                                         "spacing": s.spacing} for s in settings},
                   "orderings": paper_orderings(rows, settings, source.model.schedule), "train_options": passed}
        table = markdown(summary)
        atomic_write(out / "sweep.md", lambda f: f.write(table.encode()))
        write_json(summary, out / "sweep.json")
        atomic_save_image(chart(summary, settings), out / "sweep.png")
    print(table)
    print(f"Wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    if args.write_best is not None:
        if best is None:
            raise UserError(f"No setting has a finite {criterion}, so there is no best one to write into "
                            f"--write-best {args.write_best}; choose another --criterion.")
        write_best(args, source, next(s for s in settings if s.name == best))
    return summary


def measure(name: str, dataset: ImageDataset, features: ClassifierFeatures, test: ImageDataset,
            real_test: Callable[[], Measured], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The measures of one set, kept in OUT/measures/NAME.json and recomputed when its images, the judge
    or the test images are not those they were computed from, or when an older sweep kept them without
    FID's noise; `real_test()` gives the test images' features (computed once, when a set first needs them)."""
    path = out / "measures" / f"{name}.json"
    # (A fingerprint counts labels by their index: the names too, as the measures match classes by name.)
    inputs = {"images": dataset.fingerprint(), "judge": features.fingerprint, "test": test.fingerprint(),
              "labels": {"images": [list(dataset.info.class_names), list(dataset.info.param_names)],
                         "test": [list(test.info.class_names), list(test.info.param_names)]}}
    if path.is_file():
        try:
            saved = json.loads(path.read_bytes())
        except ValueError:  # (UnicodeDecodeError included)
            saved = None
        kept = saved.get("measures") if isinstance(saved, dict) else None
        if not (isinstance(kept, dict) and all(key in kept for key, _, _ in COLUMNS)):
            print(f"{path} is damaged or incomplete; measuring again.", flush=True)
        elif saved.get("inputs") != inputs:
            print(f"{path} was measured on other images, judge or test set; measuring again.", flush=True)
        elif "fid_std" not in kept:
            print(f"{path} was measured before the sweep estimated the noise of FID; measuring again.", flush=True)
        else:
            return kept
    images = measured(dataset, features, args.batch_size, f"features of {name}")
    row = {**conditioning(dataset, features.classifier, test, args.batch_size), **distances(images, real_test(), args.seed),
           **diversity(images, real_test())}
    write_json({"inputs": inputs, "measures": row}, path)
    return row


def train_rows(args: argparse.Namespace, passed: list[str], settings: Sequence[Setting], images: int, real: int,
               rows: dict[str, dict[str, Any]], out: Path, reused: ReusedRuns, check_only: bool = False) -> str:
    """Train the classifiers of every row (as `evaluate.experiment` trains a table's rows), each checked
    first against the request if kept: a set's on its `images`, the real row's on `real` real images (as
    many, or all there are). Adds 'accuracy' and its std to each row and returns its name.
    `check_only`: check the kept runs before the sets they train on are written (the sets' runs by their
    options only); `reused` checks them, and is given to both calls so that the real row's data is read once."""
    # The sets' runs record the folder itself, not --out as it was typed: the same sweep run again from another
    # folder, or with its path written otherwise, finds the runs its own.
    sets = out.expanduser().resolve() / "sets"
    groups = [(Sizes(match=real), [Row("real", args.real)]),
              (Sizes(match=images), [Row(s.name, f"folder:{sets / s.name}", synthetic=s.name,
                                         named_by=f"the set of {s.name}") for s in settings])]
    plans = [(size, [(row, seed, out / "runs" / row.name / f"seed{seed}") for row in table_rows
                     for seed in range(args.train_seeds)]) for size, table_rows in groups]
    for size, plan in plans:
        for row, seed, run_dir in plan:
            # (With `check_only`, the real row's data too: a changed --real or --test is refused before any drawing.)
            reused.check(row, run_dir, requested_config(row, seed, run_dir, args, passed, size),
                         data=not (check_only and row.synthetic))
    if check_only:
        return ""
    results = {name: runs for size, plan in plans for name, runs in train_plan(plan, args, passed, size).items()}
    first = next(iter(results.values()))[0]
    metric = "top1" if "top1" in first else "mae"
    for name, runs in results.items():
        values = [r[metric] * (100 if metric == "top1" else 1) for r in runs]
        rows[name].update(accuracy=float(np.mean(values)),
                          accuracy_std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                          accuracy_per_seed=values)
    return "trained top-1 (%)" if metric == "top1" else "trained mean absolute error"


def check_write_best(args: argparse.Namespace, source: ImageSource, settings: Sequence[Setting]) -> None:
    """Refuse, before anything is drawn, a --write-best folder that holds a set no setting of this sweep would
    continue (it was refused only when the best setting came to be written, after the whole sweep)."""
    if args.write_best is None or not (args.write_best / REQUEST).is_file():
        return
    found = []
    for setting in settings:
        request = dataset_request(args, setting, args.write_best, source.kind, num=args.write_num,
                                  per_class=args.write_per_class)
        draw = Drawer(source.model, setting.sampling(), autocast_dtype(args.amp, source.model.device), args.batch_size)
        found.append(dataset_writer(draw, request, source, args.weights, args.ckpt)[1].differences())
    if all(found):
        raise UserError(f"--write-best {args.write_best} holds a dataset made with other options than any setting "
                        f"of this sweep would write ({found[0]}); choose another folder, or rerun the sweep that "
                        f"wrote it.")


def write_best(args: argparse.Namespace, source: ImageSource, setting: Setting) -> None:
    """--write-best: the full dataset with the best setting (resumable as any --dataset-out folder)."""
    request = dataset_request(args, setting, args.write_best, source.kind, num=args.write_num,
                              per_class=args.write_per_class)
    # sample.py's options that draw these images (a --dataset-out of the same size writes the same set)
    options = f"--sampler {setting.sampler} --steps {setting.steps} --guidance-scale {setting.guidance:g}"
    options += f" --spacing {setting.spacing}" if setting.spacing != SamplingConfig.spacing else ""
    options += f" --seed {args.seed}" if args.seed != 0 else ""
    print(f"Writing {args.write_best} with {setting.name} (sample.py {options})", flush=True)
    with FolderLock(args.write_best):
        draw = Drawer(source.model, setting.sampling(), autocast_dtype(args.amp, source.model.device), args.batch_size)
        draw_dataset(draw, request, source, args.weights, args.ckpt)
    print(f"Wrote {args.write_best}")


if __name__ == "__main__":
    cli.main(main)
