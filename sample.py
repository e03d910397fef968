"""Draw images from a trained model: `python sample.py --ckpt runs/ddpm-demo/checkpoint.pt --sampler ddim --steps 50`.

Works alike for pixel and latent models (the checkpoint says which stage made it). Writes to --out:
  grid.png, images/NNNNNN.png (image k is reproducible alone: --first-index k --num 1),
  manifest.csv (seed, class and parameters of each image), and with --gif reverse.gif;
  with --sweep NAME=START:STOP:N (or --sweep class): sweep.png and sweep.gif, one row per image
  and one column per value, the noise of each row held fixed;
  with --interpolate: interpolate-noise.png/.gif (spherical interpolation between the starting
  noise of images k and k+1) and, for conditional models, interpolate-condition.png/.gif (linear
  interpolation from image k's condition to --interpolate-to).
With --dataset-out DIR: a labelled dataset instead, DIR/CLASS/NNNNNN.png (torchvision's ImageFolder
  layout; flat for models without classes), manifest.csv, dataset.json and, for parameter models,
  params.csv (loadable as --dataset folder:DIR): --per-class N for class models, --num N for others
  (--classes NAME:K bins a parameter into class folders). Rerun the same command after an
  interruption to continue it, or with a larger count to extend the set (see data/writer.py).
From an inversion checkpoint (train.py --stage invert): images drawn from variations of the learned
  vectors (--emb-noise, --interp) with guidance against their mean (--reference), 2 by default;
  with --dataset-out, --per-image K images of every inverted image, in its class folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import signal
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

import kernels
from core import cli
from core.checkpoint import load_checkpoint, state_fingerprint
from core.config import add_config_arguments, given_in, override, to_dict
from core.lock import FolderLock, check_output_folder
from core.runtime import AMP_HELP, AMP_MODES, atomic_write, autocast_dtype, resolve_device
from core.speed import check_cuda_graphs, speed_up
from data.imageio import save_gif, save_grid, save_images
from data.writer import DatasetWriter, parse_binning
from ddpm.conditioning import (Conditions, check_request, interpolate_conditions, interpolation_end, requested,
                               slerp, sweep_columns)
from ddpm.config import SamplingConfig
from ddpm.generate import DiffusionSampler, image_seed, sample_images
from ddpm.samplers import per_sample_noise
from ddpm.synthetic import plan_dataset
from invert.variations import Inverted, Variations
from stages import get_stage

INVERSION_GUIDANCE = 2.0  # Zhou et al. 2023's guidance scale for images drawn from learned vectors
GIF_FRAMES = 60  # at most this many frames of the reverse process, whatever the step count
# Options that only mean something with another one: parsed as None, so giving them alone can be refused.
OPTIONAL_DEFAULTS = {"frames": 8, "gif_images": 16, "gif_frames": "auto"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint.pt of a training run (required)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN_DIR/samples/SAMPLER-STEPS-seedSEED[-MODE] next to the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out (default: off)")
    parser.add_argument("--num", type=int, default=None,
                        help="number of images; with --sweep or --interpolate, the number of rows (default: 64; 4 rows)")
    parser.add_argument("--first-index", type=int, default=0, help="index of the first image, to redraw image k alone (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; image k uses a seed derived from (seed, k) (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--class", dest="label", default=None,
                        help="class name or index for a class-conditional model (default: cycle through the classes)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter value in the data's units for a parameter-conditional model; repeat per "
                             "parameter (default: drawn uniformly from the training range, per image)")
    parser.add_argument("--sweep", default=None, metavar="NAME=START:STOP:N",
                        help="draw a grid whose columns step through a parameter (or 'class' / 'class=A,B,...' "
                             "through classes) with each row's noise held fixed (default: off)")
    parser.add_argument("--interpolate", action="store_true",
                        help="draw strips interpolating the starting noise between two seeds and the condition "
                             "between two conditions (default: off)")
    parser.add_argument("--interpolate-to", action="append", default=[], metavar="CLASS|NAME=VALUE",
                        help="the condition at the far end of --interpolate: a class, or parameter values (repeat per "
                             "parameter) (default: the next class; each parameter mirrored within its range)")
    parser.add_argument("--frames", type=int, default=None, help="images along each --interpolate strip (default: 8)")
    parser.add_argument("--dataset-out", type=Path, default=None, metavar="DIR",
                        help="write a labelled dataset into DIR instead of a grid: class folders, manifest.csv, "
                             "params.csv; resumable (default: off)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="with --dataset-out, images per class of a class-conditional model (default: 100)")
    parser.add_argument("--per-image", type=int, default=None,
                        help="with --dataset-out and an inversion checkpoint, images per inverted image (default: 1)")
    parser.add_argument("--classes", default=None, metavar="NAME:K[:LOW:HIGH]",
                        help="with --dataset-out for a parameter model: class folders from K equal bins of parameter "
                             "NAME over [LOW, HIGH] or its training range (default: one flat folder)")
    parser.add_argument("--gif", action="store_true", help="also write reverse.gif of the first batch's reverse process (default: off)")
    parser.add_argument("--gif-images", type=int, default=None, help="images shown in the GIF (default: 16)")
    parser.add_argument("--gif-frames", choices=("auto", "x_t", "x0"), default=None,
                        help="what each GIF frame shows: the noisy sample x_t or the step's x0 prediction, decoded for "
                             "latent models (default: auto: x_t for pixel models, x0 for latent models)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="EMA or raw weights; an inversion uses those it was learned against (default: ema)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help=f"{AMP_HELP} (default: auto)")
    parser.add_argument("--kernels", default="auto", choices=kernels.BACKENDS, help=f"{kernels.HELP} (default: auto)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (a warm-up of a minute or so, then faster steps) (default: off)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each step's network call as a recorded CUDA graph, so small batches are not "
                             "bound by Python and kernel launches; CUDA only (default: off)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    add_config_arguments(parser, "sampling", SamplingConfig, SamplingConfig(),
                         help_overrides={"guidance_scale": SamplingConfig.__dataclass_fields__["guidance_scale"]
                                         .metadata["help"] + f"; {INVERSION_GUIDANCE:g} for an inversion checkpoint"})
    add_config_arguments(parser, "variations", Variations, Variations(),
                         help_overrides={name: f"(inversion checkpoints) {field.metadata['help']}"
                                         for name, field in Variations.__dataclass_fields__.items()})
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse impossible option values before any work."""
    for name, value, low in (("--num", args.num, 1), ("--first-index", args.first_index, 0), ("--seed", args.seed, 0),
                             ("--batch-size", args.batch_size, 1), ("--gif-images", args.gif_images, 1),
                             ("--frames", args.frames, 2), ("--per-class", args.per_class, 1),
                             ("--per-image", args.per_image, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}.")
    for option, needs in (("interpolate_to", "interpolate"), ("frames", "interpolate"), ("gif_images", "gif"),
                          ("gif_frames", "gif")):
        if getattr(args, option) and not getattr(args, needs):
            raise ValueError(f"--{option.replace('_', '-')} has no effect without --{needs}; add --{needs} or drop it.")
    if args.dataset_out is not None:
        for option, given in (("--sweep", args.sweep), ("--interpolate", args.interpolate), ("--gif", args.gif),
                              ("--out", args.out), ("--overwrite", args.overwrite), ("--first-index", args.first_index)):
            if given:
                raise ValueError(f"{option} does not apply to --dataset-out (a dataset is numbered from 0 and never "
                                 f"overwritten); drop it.")
    for option in ("per_class", "per_image", "classes"):
        if getattr(args, option) is not None and args.dataset_out is None:
            raise ValueError(f"--{option.replace('_', '-')} applies to --dataset-out only; add --dataset-out DIR or "
                             f"drop it.")
    for option, default in OPTIONAL_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    sampling = given_in(args, "sampling")
    sampler = sampling.get("sampler", SamplingConfig().sampler)
    for option, owner in (("eta", "ddim"), ("variance", "ddpm")):
        if option in sampling and sampler != owner:
            raise ValueError(f"--{option} applies to --sampler {owner} only, and this is --sampler {sampler}; drop it.")


def check_against_model(args: argparse.Namespace, model: DiffusionSampler, inverted: Inverted | None) -> None:
    """Refuse options the loaded model cannot use, instead of ignoring them."""
    kind = model.net.config.cond
    sampling = given_in(args, "sampling")
    if inverted is not None:
        check_against_inversion(args)
    else:
        variations = [f"--{name.replace('_', '-')}" for name in given_in(args, "variations")]
        if args.per_image is not None:
            variations.append("--per-image")
        if variations:
            raise ValueError(f"{', '.join(variations)} applies to inversion checkpoints (train.py --stage invert) "
                             f"only; drop it.")
        check_request(kind, args.label, args.param)
    if kind == "none":
        if sampling.get("guidance_scale", 1.0) != 1.0:
            raise ValueError("This model was trained without conditioning, so --guidance-scale has nothing to guide; "
                             "drop it.")
        if args.interpolate_to:
            raise ValueError("This model was trained without conditioning, so there is no condition to interpolate "
                             "to; drop --interpolate-to.")
    if args.dataset_out is not None and inverted is None:
        if kind == "class" and args.num is not None:
            raise ValueError("A class-conditional model writes --per-class N images of each class; use --per-class "
                             "instead of --num.")
        if kind != "class" and args.per_class is not None:
            raise ValueError("--per-class needs a class-conditional model; use --num N for this one.")
        if args.classes is not None and kind != "params":
            raise ValueError("--classes bins a parameter into class folders, and this model is not conditioned on "
                             "parameters; drop it.")
    if model.latent and sampling.get("clip_x0"):
        raise ValueError("--clip-x0 applies to pixel models only: latent models are never clipped (their decoded "
                         "images are clamped); drop it.")


def check_against_inversion(args: argparse.Namespace) -> None:
    """An inversion's images take their conditions from the learned vectors, not from a class, a parameter
    or a sweep."""
    for option, given in (("--class", args.label), ("--param", args.param), ("--sweep", args.sweep),
                          ("--interpolate", args.interpolate), ("--classes", args.classes),
                          ("--per-class", args.per_class)):
        if given:
            raise ValueError(f"{option} does not apply to an inversion checkpoint, whose images are conditioned on "
                             f"the learned vectors (their classes come from the inverted images); drop it.")
    if args.dataset_out is not None and args.num is not None:
        raise ValueError("An inversion writes --per-image K images of every inverted image; use --per-image instead "
                         "of --num.")


def load_model(path: Path, device: torch.device, weights: str) -> tuple[DiffusionSampler, Inverted | None]:
    """The sampler of any generative stage's checkpoint (the checkpoint names its stage), and for an
    inversion checkpoint its learned vectors too."""
    payload = load_checkpoint(path)
    spec = get_stage(str(payload.get("stage")))
    if spec.load_inversion is not None:
        inverted = spec.load_inversion(payload, device, path)
        return inverted.model, inverted
    if spec.load_sampler is None:
        raise ValueError(f"{path} is a checkpoint of stage '{spec.name}', which does not generate images; pass the "
                         f"checkpoint of a diffusion or inversion run (ddpm, ldm or invert).")
    return spec.load_sampler(payload, device, weights, path), None


def output_dir(args: argparse.Namespace, sampling: SamplingConfig) -> Path:
    mode = "-sweep" if args.sweep else "-interpolate" if args.interpolate else ""
    out = args.out or args.ckpt.parent / "samples" / f"{sampling.sampler}-{sampling.steps}-seed{args.seed}{mode}"
    check_output_folder(out, args.overwrite)
    return out


class Drawer:
    """Draws batches of images with one model, sampling config and precision."""

    def __init__(self, model: DiffusionSampler, sampling: SamplingConfig, amp: torch.dtype | None, batch_size: int):
        self.model, self.sampling, self.amp, self.batch_size = model, sampling, amp, batch_size

    def __call__(self, seeds: list[int], conditions: Conditions, x_T: torch.Tensor | None = None,
                 callback=None, desc: str = "sample") -> torch.Tensor:
        images = []
        for start in tqdm(range(0, len(seeds), self.batch_size), desc=desc, unit="batch"):
            rows = slice(start, start + self.batch_size)
            images.append(self.batch(seeds[rows], conditions[rows], None if x_T is None else x_T[rows],
                                     callback=callback if start == 0 else None))
        return torch.cat(images)

    def batch(self, seeds: list[int], conditions: Conditions, x_T: torch.Tensor | None = None,
              callback=None) -> torch.Tensor:
        """One forward batch: images in [-1, 1] on the CPU, one per seed."""
        conditions = conditions.to(self.model.device)
        return sample_images(self.model, self.sampling, seeds, cond=conditions.cond, cond_emb=conditions.cond_emb,
                             reference=conditions.reference, x_T=x_T, amp_dtype=self.amp, callback=callback).cpu()


def write_manifest(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def draw_images(draw: Drawer, args, model: DiffusionSampler, indices: list[int], out: Path,
                inverted: Inverted | None, variations: Variations) -> None:
    """The default mode: numbered images, a grid, a manifest and optionally the reverse process as a GIF."""
    if inverted is not None:
        conditions = inverted.conditions(indices, args.seed, variations)
    else:
        conditions = requested(model.net.config.cond, model.info, indices, args.seed, label=args.label,
                               params=args.param)
    frames = []
    every = max(1, draw.sampling.steps // GIF_FRAMES)
    show_x0 = args.gif_frames == "x0" or (args.gif_frames == "auto" and model.latent)

    def keep_frame(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i % every == 0:
            frames.append(model.to_images((x0 if show_x0 else x_t)[: args.gif_images]).float().cpu())

    seeds = [image_seed(args.seed, k) for k in indices]
    images = draw(seeds, conditions, callback=keep_frame if args.gif else None, desc=f"sample {draw.sampling.sampler}")
    names = [f"{k:06d}.png" for k in indices]
    save_images(images, out / "images", names)
    save_grid(images, out / "grid.png")
    if args.gif:
        save_gif(frames + [images[: args.gif_images]], out / "reverse.gif")
    write_manifest(out / "manifest.csv", [{"index": k, "file": f"images/{name}", "seed": seed, **record}
                                          for k, name, seed, record in zip(indices, names, seeds, conditions.records)])


def draw_sweep(draw: Drawer, args, model: DiffusionSampler, indices: list[int], out: Path) -> None:
    """Rows are images (each with its own noise), columns step through the swept condition."""
    kind, info = model.net.config.cond, model.info
    base = requested(kind, info, indices, args.seed, label=args.label, params=args.param)
    columns, labels = sweep_columns(args.sweep, kind, info, base)
    seeds = [image_seed(args.seed, k) for k in indices]
    per_column = [draw(seeds, c, desc=f"sweep {label}") for c, label in zip(columns, labels)]
    grid = torch.stack(per_column, dim=1).flatten(0, 1)  # row-major: image k at every column value
    save_grid(grid, out / "sweep.png", nrow=len(columns))
    save_gif(per_column, out / "sweep.gif", nrow=len(indices), duration_ms=400, hold_last_ms=800)
    write_manifest(out / "sweep.csv", [{"row": r, "column": c, "index": k, "seed": seeds[r], **columns[c].records[r]}
                                       for r, k in enumerate(indices) for c in range(len(columns))])
    print(f"Sweep over {args.sweep}: columns {', '.join(labels)}")


def draw_interpolations(draw: Drawer, args, model: DiffusionSampler, indices: list[int], out: Path) -> None:
    """Per row k: noise slerped from image k's to image k+1's under k's condition; and, for conditional
    models, k's noise under conditions moving linearly from k's condition to --interpolate-to."""
    kind, info = model.net.config.cond, model.info
    weights = torch.linspace(0, 1, args.frames)
    starts = [requested(kind, info, [k], args.seed, label=args.label, params=args.param) for k in indices]
    # Every condition is worked out (and every --interpolate-to checked) before any image is drawn.
    ends = [interpolation_end(kind, info, start, args.interpolate_to) for start in starts] if kind != "none" else []
    embed = (lambda c: model.net.embed_condition(c.to(model.device)).cpu())
    noise_rows, cond_rows = [], []
    for row, (k, start) in enumerate(zip(indices, starts)):
        (x_a, _), (x_b, _) = (per_sample_noise([image_seed(args.seed, j)], (1, *model.shape), "cpu") for j in (k, k + 1))
        seeds = [image_seed(args.seed, k)] * args.frames
        same = Conditions(*(None if c is None else c.expand(args.frames, *c.shape[1:])
                            for c in (start.cond, start.cond_emb)), records=start.records * args.frames)
        noise_rows.append(draw(seeds, same, x_T=slerp(x_a[0], x_b[0], weights), desc=f"interpolate noise {k}"))
        if ends:
            line = interpolate_conditions(start, ends[row], weights, embed)
            cond_rows.append(draw(seeds, line, desc=f"interpolate condition {k}"))
    for name, rows in (("noise", noise_rows), ("condition", cond_rows)):
        if rows:
            save_grid(torch.cat(rows), out / f"interpolate-{name}.png", nrow=args.frames)
            frames = list(torch.stack(rows, dim=1))  # frame j: every row at weight j
            save_gif(frames + frames[::-1][1:-1], out / f"interpolate-{name}.gif", nrow=len(indices),
                     duration_ms=150, hold_last_ms=150)


def draw_dataset(draw: Drawer, args, model: DiffusionSampler, sampling: SamplingConfig,
                 inverted: Inverted | None, variations: Variations) -> None:
    """--dataset-out: the planned images not on disk yet, batch by batch, each batch saved before the next."""
    # What makes image k: changing any of it would give other images, so a folder holds one request.
    request = {"model": state_fingerprint(model.net.state_dict()), "weights": args.weights, "seed": args.seed,
               "sampling": to_dict(sampling), "amp": args.amp}
    if inverted is not None:
        plan = inverted.plan(args.per_image or 1, args.seed, variations)
        request.update(weights=inverted.record["weights"], embeddings=inverted.fingerprint(),
                       variations=to_dict(variations), per_image=args.per_image or 1)
    else:
        binning = parse_binning(args.classes, model.info) if args.classes else None
        plan = plan_dataset(model, args.seed, per_class=args.per_class or 100 if model.net.config.cond == "class" else None,
                            num=args.num or 64, label=args.label, params=args.param, binning=binning)
        request.update({"class": args.label, "param": sorted(args.param),
                        "classes": binning.describe() if binning else None})
    request["param_names"] = list(plan.param_names)
    writer = DatasetWriter(args.dataset_out, request, about={"checkpoint": str(args.ckpt)})
    writer.open()
    pending = writer.pending(plan.items)
    bar = tqdm(total=len(plan.items), initial=len(plan.items) - len(pending), desc=f"dataset {args.dataset_out}",
               unit="img")
    with bar:
        for start in range(0, max(len(pending), 1), draw.batch_size):
            part = pending[start:start + draw.batch_size]
            if part:
                images = draw.batch([item.record["seed"] for item in part], plan.conditions([i.index for i in part]))
            else:  # nothing left to draw: bring the tables up to date with the images on disk
                images = torch.zeros(0, *model.shape)
            writer.write(part, images, every_item=plan.items if start == 0 else ())
            bar.update(len(part))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_args(args)
    sampling = override(SamplingConfig(), args, "sampling")
    variations = override(Variations(), args, "variations")
    device = resolve_device(args.device)
    amp = autocast_dtype(args.amp, device)
    kernels.use(args.kernels, device)
    check_cuda_graphs(args.cuda_graphs, device)
    model, inverted = load_model(args.ckpt, device, args.weights)
    speed_up(model.net, device, compile=args.compile, cuda_graphs=args.cuda_graphs)
    check_against_model(args, model, inverted)
    if inverted is not None and "guidance_scale" not in given_in(args, "sampling"):
        sampling = dataclasses.replace(sampling, guidance_scale=INVERSION_GUIDANCE)
    sampling.check_against(model.schedule)
    if args.dataset_out is not None:
        if args.classes:
            parse_binning(args.classes, model.info)  # checked before the folder is touched
        with FolderLock(args.dataset_out):  # two writers never share a folder
            draw_dataset(Drawer(model, sampling, amp, args.batch_size), args, model, sampling, inverted, variations)
        print(f"Wrote {args.dataset_out}")
        return args.dataset_out
    out = output_dir(args, sampling)

    special = args.sweep or args.interpolate
    num = args.num or (4 if special else 64)
    indices = list(range(args.first_index, args.first_index + num))
    draw = Drawer(model, sampling, amp, args.batch_size)
    with FolderLock(out):  # two samplers never write one folder
        if args.sweep:
            draw_sweep(draw, args, model, indices, out)
        if args.interpolate:
            draw_interpolations(draw, args, model, indices, out)
        if not special:
            draw_images(draw, args, model, indices, out, inverted, variations)
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)
    sys.exit(cli.run(main))
