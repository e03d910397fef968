"""Command line: `python -m fid A B` prints FID between two image folders or .npz statistics files
(and KID when both are folders); `python -m fid --save-stats FOLDER OUT.npz` saves a folder's
statistics once for later comparisons, with the network and weights that computed them, and a file
computed with other weights than the other side is refused. Folders are read as pytorch-fid reads
them (see docs/fid.md). `--features CKPT` measures both in the penultimate features of a classifier
trained here (the domain's own) instead of Inception's."""

from __future__ import annotations

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
import os
import sys
import warnings
from pathlib import Path

from core.errors import UserError

from .compare import fid_between, is_statistics_source
from .features import FeatureOptions, compute_statistics
from .folder import FILE_SELECTIONS, ImageFolder, check_enough_images
from .kid import KIDOptions
from .stats import Provenance, check_same_features, check_statistics_path, load_statistics, save_statistics
from .weights import WEIGHTS_FILENAME

KID_SUBSET_SIZE = 1000  # the usual size (Binkowski et al. 2018 use 1000); smaller sets need an explicit choice
# The most subsets KID averages over: the usual 100 leave a standard error far below the estimate's own spread, and
# each subset is a kernel matrix of its own.
MAX_KID_SUBSETS = 100_000


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, but not a default of None: there the help says what happens without it
    (argparse's "(default: None)" would say nothing, or contradict it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m fid", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs=2, metavar="PATH",
                        help="two image folders or .npz statistics files; with --save-stats: FOLDER OUT.npz")
    parser.add_argument("--save-stats", action="store_true",
                        help="save the statistics of the first PATH (a folder) to the second PATH instead")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --save-stats: replace an existing OUT.npz (without it, one is never replaced)")
    parser.add_argument("--files", choices=FILE_SELECTIONS, default="pytorch-fid",
                        help="which files of a folder to read: pytorch-fid's selection (top-level *.bmp, jpeg, jpg, "
                             "pgm, png, ppm, tif, tiff, webp, lower-case) or all (subfolders too, any case, .gif)")
    parser.add_argument("--batch-size", type=cli.int_option, default=50, help="images per forward pass")
    parser.add_argument("--num-workers", type=cli.int_option, default=min(8, os.cpu_count() or 1),
                        help="image decoding processes (0: decode in the main process)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA where there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network: the first batch waits a minute or more on a CPU, then "
                             "batches run faster; the features equal eager ones to float rounding")
    parser.add_argument("--weights", type=cli.text_option, default=None,
                        help=f"path of {WEIGHTS_FILENAME}; by default downloaded once into the torch hub cache")
    parser.add_argument("--features", type=cli.path_option, default=None, metavar="CKPT",
                        help="a classify-stage checkpoint: measure FID and KID in its penultimate features (the "
                             "domain's own) instead of Inception's (so --weights is refused with it)")
    parser.add_argument("--no-kid", action="store_true", help="skip KID even when both PATHs are folders")
    parser.add_argument("--kid-subsets", type=cli.int_option, default=100, help="number of random subsets for KID")
    parser.add_argument("--kid-subset-size", type=cli.int_option, default=None,
                        help=f"images per KID subset; each folder needs at least this many (default {KID_SUBSET_SIZE}; "
                             f"left at that, KID is skipped with a warning for smaller folders, while a size you give "
                             f"is an error if a folder is smaller)")
    parser.add_argument("--seed", type=cli.seed_option, default=0, help="seed of the KID subset draws")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1)")
    return parser


def check_reused_statistics(paths: list[str], options: FeatureOptions) -> None:
    """Refuse a statistics file computed with another network or weights than the other side, before
    any features are computed, or than --features / --weights name when both sides are files (which would
    otherwise go unused). This run's own network is built only to compare with a file that records its
    network; `fid_between` checks again, and warns of a file that records none."""
    saved = [(f"statistics file {path}", load_statistics(path).provenance)
             for path in paths if is_statistics_source(path) and Path(path).is_file()]
    named = options.features is not None or options.weights is not None
    if any(provenance is not None for _, provenance in saved) and (len(saved) == 1 or named):
        weights = (f"classifier {options.features}" if options.features else
                   f"weights {options.weights or f'the published {WEIGHTS_FILENAME}'}")
        run = options.extractor()
        # Another network is refused by name, without building (or downloading) this run's network.
        same_network = saved[0][1].network == run.network_name
        saved.append((f"this run's features ({weights})",
                      run.provenance() if same_network else Provenance(run.network_name, "")))
    if saved:
        check_same_features(saved, warn=False)  # fid_between warns of a file that does not say, once


def check_kid_options(args: argparse.Namespace) -> None:
    """Refuse KID settings that can never work, before anything is read (even where KID is then skipped)."""
    if not 1 <= args.kid_subsets <= MAX_KID_SUBSETS:
        raise UserError(f"--kid-subsets is {args.kid_subsets} but must be from 1 to {MAX_KID_SUBSETS:,}; pass 100, the "
                        f"default, or so.")
    if args.kid_subset_size is not None and args.kid_subset_size < 2:
        raise UserError(f"--kid-subset-size is {args.kid_subset_size} but KID's unbiased estimate needs subsets of "
                        f"at least 2 images; pass 2 or more (default {KID_SUBSET_SIZE}).")


def open_folder(path: str, files: str) -> ImageFolder:
    """The image folder `path`, refused with its name if FID cannot use it (no images, or fewer than 2)."""
    folder = ImageFolder(path, files)
    check_enough_images(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_kid_options(args)
    if args.overwrite and not args.save_stats:
        raise UserError("--overwrite applies to --save-stats only (nothing else is written); drop it.")
    options = FeatureOptions(weights=args.weights, features=args.features, device=args.device,
                             batch_size=args.batch_size, num_workers=args.num_workers, files=args.files,
                             compile=args.compile)
    extractor = options.extractor()  # every option of the features checked now; the network is built when used
    if args.features is not None:
        extractor.domain  # a wrong checkpoint is refused before any folder is read
    a, b = args.paths
    with warnings.catch_warnings():
        warnings.showwarning = cli.print_warning  # also when called as a function, not through cli.main
        if args.save_stats:
            # The output path is checked first (nothing is written yet, not even a missing folder on the way).
            check_statistics_path(b, overwrite=args.overwrite)
            if not Path(a).is_dir():
                raise UserError(f"--save-stats needs an image folder first but got {a}; run --save-stats FOLDER OUT.npz.")
            folder = open_folder(a, args.files)
            save_statistics(compute_statistics(folder, options), b, overwrite=args.overwrite)
            print(f"Saved statistics of {a} to {b}")
            return
        # Folders are listed once, here, and both checked (at least 2 images each) before any network is built.
        sources = [path if is_statistics_source(path) else open_folder(path, args.files) for path in (a, b)]
        check_reused_statistics([a, b], options)
        with_kid = not args.no_kid and not (is_statistics_source(a) or is_statistics_source(b))
        kid_given = [f"--{name.replace('_', '-')}" for name in ("kid_subsets", "kid_subset_size", "seed")
                     if getattr(args, name) != parser.get_default(name)]
        if kid_given and not with_kid:
            why = "--no-kid skips it" if args.no_kid else "a statistics file holds no features to draw subsets from"
            raise UserError(f"{', '.join(kid_given)} set{'s' if len(kid_given) == 1 else ''} up KID, but {why}; "
                            f"drop {'it' if len(kid_given) == 1 else 'them'}.")
        subset_size = args.kid_subset_size
        if with_kid and subset_size is None:
            smallest = min(len(source) for source in sources)
            subset_size = KID_SUBSET_SIZE
            if smallest < subset_size:
                with_kid = False
                # Subsets need 2 images or more; every folder here has that many (open_folder).
                sizes = "--kid-subset-size 2" if smallest == 2 else f"a --kid-subset-size from 2 to {smallest}"
                print(f"warning: KID skipped: its default subsets of {subset_size} images need that many per folder "
                      f"and one has {smallest}; pass {sizes} to get it.", file=sys.stderr)
        kid = KIDOptions(subsets=args.kid_subsets, subset_size=subset_size, seed=args.seed) if with_kid else None
        result = fid_between(*sources, options, kid)
    print(f"FID: {result.fid:.6f}")
    if result.kid_mean is not None:
        print(f"KID: {result.kid_mean:.8f} +/- {result.kid_std:.8f}")


def run(argv: list[str] | None = None) -> int:
    """The command as the shell sees it: 0, or 1 (130 for Ctrl-C) after a one-line error."""
    return cli.run(main, argv)


if __name__ == "__main__":
    cli.main(main)
