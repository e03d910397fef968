"""Command line: `python -m fid A B` prints FID between two image folders or .npz statistics files
(and KID when both are folders); `python -m fid --save-stats FOLDER OUT.npz` saves a folder's
statistics once for later comparisons."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .compare import fid_between, is_statistics_source
from .features import compute_statistics, default_device
from .stats import save_statistics
from .weights import WEIGHTS_FILENAME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fid", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("paths", nargs=2, metavar="PATH",
                        help="two image folders or .npz statistics files; with --save-stats: FOLDER OUT.npz")
    parser.add_argument("--save-stats", action="store_true",
                        help="save the statistics of the first PATH (a folder) to the second PATH instead")
    parser.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding processes")
    parser.add_argument("--device", default=default_device(), help="torch device, e.g. cuda, cuda:1, cpu")
    parser.add_argument("--weights", default=None,
                        help=f"path of {WEIGHTS_FILENAME}; by default downloaded once into the torch hub cache")
    parser.add_argument("--no-kid", action="store_true", help="skip KID even when both PATHs are folders")
    parser.add_argument("--kid-subsets", type=int, default=100, help="number of random subsets for KID")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="samples per KID subset (clipped to the smaller set)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the KID subset draws")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = dict(weights=args.weights, device=args.device, batch_size=args.batch_size, num_workers=args.num_workers)
    a, b = args.paths
    try:
        if args.save_stats:
            if not Path(a).is_dir():
                raise ValueError(f"--save-stats needs an image folder first but got {a}; run --save-stats FOLDER OUT.npz.")
            save_statistics(compute_statistics(a, **common), b)
            print(f"Saved statistics of {a} to {b}")
            return 0
        with_kid = not args.no_kid and not (is_statistics_source(a) or is_statistics_source(b))
        result = fid_between(a, b, with_kid=with_kid, kid_subsets=args.kid_subsets,
                             kid_subset_size=args.kid_subset_size, seed=args.seed, **common)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"FID: {result.fid:.6f}")
    if result.kid_mean is not None:
        print(f"KID: {result.kid_mean:.8f} +/- {result.kid_std:.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
