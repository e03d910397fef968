"""What `python sample.py` does once its command line is parsed: check every option before any work,
open the checkpoint as an `ImageSource`, and draw into one locked output folder.

`run` takes the opener of checkpoints from sample.py, which holds the registry of stages, so nothing
here knows which stages exist.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, Collection, Mapping

import torch

from core.errors import ExistsError, MissingFileError, UserError
import kernels
from core import cli
from core.checkpoint import checkpoint_stage
from core.config import given_in, in_options, override
from core.lock import UNFINISHED, FolderLock, OutputFolder, check_output_folder
from core.runtime import AMP_MODES, KERNEL_BACKENDS, KERNELS_HELP, autocast_dtype, check_batch_fits, resolve_device
from core.speed import check_compile, check_cuda_graphs, speed_up
from data import check_output_outside
from data.writer import IMAGE_FILE, REQUEST
from ddpm.conditioning import MAX_COLUMNS
from ddpm.config import SamplingConfig
from ddpm.generate import DiffusionSampler
from ddpm.source import ImageSource, Request
from ddpm.synthetic import check_image_count
from sampling.draw import (Drawer, dataset_writer, draw_images, draw_interpolations, draw_sweep, fill_dataset,
                           source_request, sweep_plan)

# Options that only mean something with another one: parsed as None, so giving them alone can be refused.
OPTIONAL_DEFAULTS = {"frames": 8, "gif_images": 16, "gif_frames": "auto"}
RUNS = Path("runs")  # where train.py puts runs by default, searched when no --ckpt is given

OpenSource = Callable[[Path, torch.device, str], ImageSource]  # (checkpoint, device, weights) -> source


def add_drawing_options(parser: argparse.ArgumentParser, weights: str = "EMA or raw weights",
                        amp: str = "mixed precision for sampling", kernels: str = f"{KERNELS_HELP}, for sampling") -> None:
    """The options of every tool that draws from a checkpoint (sample.py, the consistency check, the sweep):
    --batch-size, --weights, --device, --amp and --kernels; `weights`, `amp` and `kernels` are their help."""
    parser.add_argument("--batch-size", type=cli.int_option, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help=f"{weights} (default: ema)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help=f"{amp} (default: auto)")
    parser.add_argument("--kernels", default="auto", choices=KERNEL_BACKENDS, help=f"{kernels} (default: auto)")


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible option values and options that mean nothing without another, before any work."""
    for name, value, low in (("--num", args.num, 1), ("--first-index", args.first_index, 0), ("--seed", args.seed, 0),
                             ("--batch-size", args.batch_size, 1), ("--gif-images", args.gif_images, 1),
                             ("--frames", args.frames, 2), ("--per-class", args.per_class, 1),
                             ("--per-image", args.per_image, 1)):
        if value is not None and value < low:
            raise UserError(f"{name} must be at least {low}, got {value}.")
    for name, value in (("--num", args.num), ("--per-class", args.per_class), ("--per-image", args.per_image)):
        if value is not None:
            check_image_count(value, name)  # (the classes or source images multiply a count later: checked again)
    if args.frames is not None and args.frames > MAX_COLUMNS:
        raise UserError(f"--frames must be at most {MAX_COLUMNS} (the columns of one grid), got {args.frames}.")
    for option, needs in (("interpolate_to", "interpolate"), ("frames", "interpolate"), ("gif_images", "gif"),
                          ("gif_frames", "gif")):
        if getattr(args, option) and not getattr(args, needs):
            raise UserError(f"--{option.replace('_', '-')} has no effect without --{needs}; add --{needs} or drop it.")
    if args.gif and (args.sweep or args.interpolate):
        raise UserError(f"--gif writes the reverse process of plain samples; --{'sweep' if args.sweep else 'interpolate'} "
                        f"writes GIFs of its own; drop --gif.")
    if args.dataset_out is not None:
        for option, given in (("--sweep", args.sweep), ("--interpolate", args.interpolate), ("--gif", args.gif),
                              ("--out", args.out), ("--overwrite", args.overwrite), ("--first-index", args.first_index)):
            if given:
                raise UserError(f"{option} does not apply to --dataset-out (a dataset is numbered from 0 and never "
                                f"overwritten); drop it.")
    for option in ("per_class", "per_image", "classes"):
        if getattr(args, option) is not None and args.dataset_out is None:
            raise UserError(f"--{option.replace('_', '-')} applies to --dataset-out only; add --dataset-out DIR or "
                            f"drop it.")
    check_sampler_options(args)
    for option, default in OPTIONAL_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)


# Sampler options that one sampler alone reads (ddpm/generate.py passes them to it): option -> that sampler.
SAMPLER_OWN_OPTIONS = {"eta": "ddim", "variance": "ddpm"}


def check_sampler_options(args: argparse.Namespace) -> None:
    """Refuse an option of one sampler given with another, which would ignore it: from the command line alone,
    so before any checkpoint is read."""
    sampling = given_in(args, "sampling")
    sampler = sampling.get("sampler", SamplingConfig().sampler)
    for option, owner in SAMPLER_OWN_OPTIONS.items():
        if option in sampling and sampler != owner:
            raise UserError(f"--{option} applies to --sampler {owner} only, and this is --sampler {sampler}; drop it.")


def check_sampling_options(args: argparse.Namespace, model: DiffusionSampler) -> None:
    """Refuse sampler options that the chosen sampler or `model` would ignore: sample.py and every tool that draws
    as it does (the consistency check) refuse the same, so what a tool records as used was used. sample.py has
    refused the sampler's own (`check_sampler_options`) before opening the checkpoint; asked again here for the
    tools that call only this."""
    check_sampler_options(args)
    if model.latent and given_in(args, "sampling").get("clip_x0"):
        raise UserError("--clip-x0 applies to pixel models only: latent models are never clipped (their decoded "
                        "images are clamped); drop it.")


def check_against_source(args: argparse.Namespace, request: Request, source: ImageSource,
                         option_sections: Mapping[str, str]) -> None:
    """Refuse options the loaded model cannot use: another kind of source's own options, sampler options it or
    the sampler would ignore, then its own checks."""
    for section, owner in option_sections.items():
        foreign = [f"--{name.replace('_', '-')}" for name in given_in(args, section)]
        if foreign and section not in source.option_sections:
            raise UserError(f"{', '.join(foreign)} applies to {owner} checkpoints only, and {args.ckpt} is not one; "
                            f"drop it.")
    check_sampling_options(args, source.model)
    source.check(request)


def latest_checkpoint(generative: Collection[str], runs: Path = RUNS) -> Path:
    """The checkpoint of the most recently saved run under `runs` whose stage draws images."""
    for path in sorted(runs.glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime, reverse=True):
        # Only the stage is read: the tensors of every run looked at stay on disk. A broken checkpoint is
        # not the one meant; its own run reports it when resumed.
        if checkpoint_stage(path) in generative:
            return path
    raise MissingFileError(f"No --ckpt given and no run under {runs}/ that draws images ({', '.join(generative)}); "
                           f"train one (python train.py --stage ddpm) or pass --ckpt.")


def output_dir(args: argparse.Namespace, sampling: SamplingConfig, check: bool = True) -> Path:
    """The grid's folder: --out, or one named for the sampling under the checkpoint's run; `check`: refuse
    one that holds another command's finished output (without --overwrite)."""
    mode = "-sweep" if args.sweep else "-interpolate" if args.interpolate else ""
    out = args.out or args.ckpt.parent / "samples" / f"{sampling.sampler}-{sampling.steps}-seed{args.seed}{mode}"
    if check:
        if (out / REQUEST).is_file():  # --overwrite would clear its manifest and leave grids among its images
            raise ExistsError(f"--out {out} is a dataset folder (it holds {REQUEST}), not one for sample.py's grids; "
                              f"choose another --out, or --dataset-out {out} to continue that set.")
        check_output_folder(out, args.overwrite)
    return out


# Every file a drawing of sample.py writes into --out (sampling/draw.py), as patterns.
OUTPUTS = ("grid.png", "manifest.csv", "reverse.gif", "sweep.png", "sweep.gif", "sweep.csv", "interpolate-*.png",
           "interpolate-*.gif", "images/*.png")
# Files only a drawing writes, one of which every drawing leaves: a folder without any holds no drawing.
SIGNS_OF_A_DRAWING = (UNFINISHED, "grid.png", "sweep.csv", "interpolate-noise.png")


def holds_a_drawing(out: Path) -> bool:
    """Whether `out` holds what a drawing wrote (or a stopped one began), not, say, the user's own images."""
    return any((out / name).is_file() for name in SIGNS_OF_A_DRAWING)


def clear_earlier_output(out: Path) -> None:
    """Remove what an earlier drawing wrote into `out` (kept with --overwrite, or left by a stopped one), so that
    the folder never mixes two commands' images; files of other names are left alone."""
    for pattern in OUTPUTS:
        for path in out.glob(pattern):
            if path.is_file() and (path.parent == out or IMAGE_FILE.fullmatch(path.name)):
                path.unlink()
    images = out / "images"
    if images.is_dir() and not any(images.iterdir()):
        images.rmdir()


def check_drawing_batch(batch_size: int, drawn: int | None, model: DiffusionSampler) -> None:
    """Refuse a --batch-size whose images alone outgrow `model`'s device; a batch never holds more than the
    `drawn` images (None: not known in advance)."""
    batch = min(batch_size, drawn or batch_size)
    check_batch_fits(batch, model.info.resolution, "--batch-size", model.device, model.info.channels)


def run(args: argparse.Namespace, open_source: OpenSource, option_sections: Mapping[str, str] | None = None) -> Path:
    """Draw what `args` ask for from the checkpoint `args.ckpt`; returns the folder written.

    `option_sections`: the option groups of every kind of source (sample.py's --help lists them all), each
    with the stage it belongs to, so that one given for another kind of checkpoint is refused, not ignored.
    """
    check_args(args)
    sampling = override(SamplingConfig(), args, "sampling")
    device = resolve_device(args.device)
    amp = autocast_dtype(args.amp, device)
    kernels.use(args.kernels, device)
    check_cuda_graphs(args.cuda_graphs, device)
    check_compile(args.compile, device)
    source = open_source(args.ckpt, device, args.weights)
    output = args.dataset_out if args.dataset_out is not None else output_dir(args, sampling, check=False)
    check_output_outside(output, "--dataset-out" if args.dataset_out is not None else "--out", source.trained_on)
    model = source.model
    speed_up(model.net, device, compile=args.compile, cuda_graphs=args.cuda_graphs)
    request = source_request(args)
    check_against_source(args, request, source, option_sections or {})
    if source.default_guidance is not None and "guidance_scale" not in given_in(args, "sampling"):
        sampling = dataclasses.replace(sampling, guidance_scale=source.default_guidance)
    with in_options(SamplingConfig):
        sampling.check_against(model.schedule)
    draw = Drawer(model, sampling, amp, args.batch_size)
    if args.dataset_out is not None:
        plan, writer = dataset_writer(draw, request, source, args.weights, args.ckpt)
        check_drawing_batch(args.batch_size, len(plan.items), model)
        with FolderLock(args.dataset_out):  # two writers never share a folder
            writer.open(plan.items)
            fill_dataset(draw, plan, writer)
        print(f"Wrote {args.dataset_out}")
        return args.dataset_out
    special = args.sweep or args.interpolate
    num = args.num or (4 if special else 64)
    # A batch holds at most the images of one call to `draw`: an interpolation draws each strip by itself.
    check_drawing_batch(args.batch_size, args.frames if args.interpolate else num, model)
    indices = list(range(args.first_index, args.first_index + num))
    sweep = sweep_plan(args, model, indices) if args.sweep else None
    out = output_dir(args, sampling)
    # Asked before the folder is marked as ours. One that holds no drawing (--overwrite into the user's own
    # images) is written into as it is: only files of the names this drawing writes are replaced.
    earlier = holds_a_drawing(out)
    with OutputFolder(out):  # two samplers never write one folder
        if earlier:
            clear_earlier_output(out)
        if sweep is not None:
            draw_sweep(draw, args, indices, *sweep, out)
        if args.interpolate:
            draw_interpolations(draw, args, model, indices, out)
        if not special:
            draw_images(draw, args, request, source, indices, out)
    print(f"Wrote {out}")
    return out
