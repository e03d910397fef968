"""Draw images from a trained model: `python sample.py --ckpt runs/ddpm-demo/checkpoint.pt --sampler ddim --steps 50`.

Works alike for pixel and latent models (the checkpoint says which stage made it). Writes to --out:
  grid.png, images/NNNNNN.png (image k is reproducible alone: --first-index k --num 1 --out DIR),
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

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
from pathlib import Path

from core.config import add_config_arguments
from core.runtime import AMP_HELP, KERNELS_HELP
from ddpm.config import SamplingConfig
from data.writer import MAX_BINS, binning_option
from sampling.command import add_drawing_options, latest_checkpoint, run
from stages import GENERATIVE, open_source

SAMPLE_OPTIONS = [(section, spec.name) for spec in GENERATIVE.values() for section in spec.sample_options]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=cli.path_option, default=None,
                        help="checkpoint.pt of a training run (default: the most recently saved run under runs/ that "
                             "draws images)")
    parser.add_argument("--out", type=cli.path_option, default=None,
                        help="output folder (default: RUN_DIR/samples/SAMPLER-STEPS-seedSEED[-MODE] next to the checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty --out, replacing what an earlier drawing wrote there "
                             "(images, grids, GIFs, tables) (default: off)")
    parser.add_argument("--num", type=cli.int_option, default=None,
                        help="number of images; with --sweep or --interpolate, the number of rows (default: 64; 4 rows)")
    parser.add_argument("--first-index", type=cli.int_option, default=0, help="index of the first image, to redraw image k alone (default: 0)")
    parser.add_argument("--seed", type=cli.seed_option, default=0, help="run seed; image k uses a seed derived from (seed, k) (default: 0)")
    parser.add_argument("--class", dest="label", type=cli.text_option, default=None,
                        help="class name or index for a class-conditional model (default: cycle through the classes)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter value in the data's units for a parameter-conditional model; repeat per "
                             "parameter (default: drawn uniformly from the training range, per image)")
    parser.add_argument("--sweep", type=cli.text_option, default=None, metavar="NAME=START:STOP:N",
                        help="draw a grid whose columns step through a parameter (or 'class' / 'class=A,B,...' "
                             "through classes) with each row's noise held fixed (default: off)")
    parser.add_argument("--interpolate", action="store_true",
                        help="draw strips interpolating the starting noise between two seeds and the condition "
                             "between two conditions (default: off)")
    parser.add_argument("--interpolate-to", action="append", default=[], metavar="CLASS|NAME=VALUE",
                        help="the condition at the far end of --interpolate: a class, or parameter values (repeat per "
                             "parameter) (default: the next class; each parameter mirrored within its range)")
    parser.add_argument("--frames", type=cli.int_option, default=None, help="images along each --interpolate strip (default: 8)")
    parser.add_argument("--dataset-out", type=cli.path_option, default=None, metavar="DIR",
                        help="write a labelled dataset into DIR instead of a grid: class folders, manifest.csv, "
                             "params.csv; resumable (default: off)")
    parser.add_argument("--per-class", type=cli.int_option, default=None,
                        help="with --dataset-out, images per class of a class-conditional model (default: 100)")
    parser.add_argument("--per-image", type=cli.int_option, default=None,
                        help="with --dataset-out and an inversion checkpoint, images per inverted image (default: 1)")
    parser.add_argument("--classes", type=binning_option, default=None, metavar="NAME:K[:LOW:HIGH]",
                        help=f"with --dataset-out for a parameter model: class folders from K equal bins (2 to "
                             f"{MAX_BINS}) of parameter NAME over [LOW, HIGH] or its training range (default: one flat "
                             f"folder)")
    parser.add_argument("--gif", action="store_true", help="also write reverse.gif of the first batch's reverse process (default: off)")
    parser.add_argument("--gif-images", type=cli.int_option, default=None,
                        help="images shown in the GIF, the first ones of the first batch (so at most --batch-size) "
                             "(default: 16)")
    parser.add_argument("--gif-frames", choices=("auto", "x_t", "x0"), default=None,
                        help="what each GIF frame shows: the noisy sample x_t or the step's x0 prediction, decoded for "
                             "latent models (default: auto: x_t for pixel models, x0 for latent models)")
    add_drawing_options(parser, weights="EMA or raw weights; an inversion uses those it was learned against",
                        amp=AMP_HELP, kernels=KERNELS_HELP)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network (a warm-up of a minute or so, then faster steps) (default: off)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay each step's network call as a recorded CUDA graph, so small batches are not "
                             "bound by Python and kernel launches; CUDA only (default: off)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    add_config_arguments(parser, "sampling", SamplingConfig, SamplingConfig(),
                         help_overrides={"guidance_scale": SamplingConfig.__dataclass_fields__["guidance_scale"]
                                         .metadata["help"] + "; some kinds of checkpoint set their own (an inversion: "
                                         "2)"})
    for section, _ in SAMPLE_OPTIONS:  # option groups of one kind of checkpoint
        add_config_arguments(parser, section.name, section.cls, section.cls(), help_overrides=dict(section.help))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.ckpt is None:
        args.ckpt = latest_checkpoint(GENERATIVE)
        print(f"No --ckpt given: drawing from {args.ckpt}, the most recently saved run that draws images.", flush=True)
    return run(args, open_source, {section.name: stage for section, stage in SAMPLE_OPTIONS})


if __name__ == "__main__":
    cli.main(main)
