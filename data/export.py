"""Export any dataset we load as an image folder: `python -m data.export SPEC DIR`.

    python -m data.export plumes runs/real --classes wind:3:-1:1 --num-samples 3000
    python -m data.export plumes runs/test --classes wind:3:-1:1 --split test --num-samples 600

writes DIR/CLASS/NNNNNN.png (the dataset's own classes, or bins of a parameter with `--classes
NAME:K[:LOW:HIGH]`: for plumes, `wind:3` labels plumes blowing left, calm and blowing right as
wind0, wind1, wind2), DIR/params.csv with every numeric parameter, DIR/manifest.csv and
DIR/dataset.json (see data/writer.py). The result loads with `--dataset folder:DIR`, and with class
folders also with torchvision's ImageFolder (which refuses a flat set, written without classes). Give
the bins an explicit range when exporting two splits, so both get the same edges (each split's own
range differs slightly). Rerunning continues an interrupted export.
"""

from __future__ import annotations

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
from pathlib import Path

from tqdm import tqdm

from core.errors import UserError
from core.lock import FolderLock, check_folder_path
from data import check_output_outside, check_spec, load_dataset
from data.imageio import from_uint8
from data.writer import MAX_BINS, DatasetWriter, Item, binning_option, parse_binning

SPLITS = ("train", "test")
BATCH = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m data.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="the dataset: plumes | folder:PATH | cifar10")
    parser.add_argument("out", type=cli.path_option, help="the folder to write")
    parser.add_argument("--classes", type=binning_option, default=None, metavar="NAME:K[:LOW:HIGH]",
                        help=f"label images by K equal bins (2 to {MAX_BINS}) of parameter NAME, over [LOW, HIGH] or the data's own range "
                             "(default: the dataset's own classes, if any)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="plumes and cifar10: which split (default: train)")
    parser.add_argument("--num-samples", type=cli.int_option, default=0,
                        help="plumes to simulate, or a seeded subset of another dataset (default: 0: as for training: "
                             "10000 plumes, all other images)")
    parser.add_argument("--seed", type=cli.seed_option, default=0,
                        help="plumes: the seed of the simulations (another seed, other plumes: a validation set beside "
                             "--split test); other datasets: of the subset --num-samples picks (default: 0)")
    parser.add_argument("--resolution", type=cli.int_option, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--cache-dir", type=cli.path_option, default=".cache/datasets", help="dataset cache (default: .cache/datasets)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_spec(args.spec, "SPEC")
    if args.num_samples < 0:
        raise UserError(f"--num-samples must be 0 (all) or positive, got {args.num_samples}.")
    if args.split == "test" and args.spec.startswith("folder:"):
        raise UserError("A folder has no test split; export the folder that holds your test images instead.")
    check_output_outside(args.out, "OUT", {"SPEC": args.spec})
    check_folder_path(Path(args.cache_dir).expanduser(), "--cache-dir")
    with FolderLock(args.out):
        # The request as far as the options tell it, checked against OUT before the data is read.
        known = {"source": args.spec, "split": args.split, "num_samples": args.num_samples,
                 "resolution": args.resolution,
                 **({"seed": args.seed} if args.seed else {})}  # (folders written before --seed existed: 0)
        DatasetWriter(args.out, known).check_early()
        dataset = load_dataset(args.spec, args.resolution, cache_dir=args.cache_dir, train=args.split == "train",
                               num_samples=args.num_samples or None, seed=args.seed)
        info = dataset.info
        binning = parse_binning(args.classes, info) if args.classes else None
        request = {**known, "param_names": list(info.param_names),
                   "classes": binning.describe() if binning else list(info.class_names),
                   "source_fingerprint": dataset.fingerprint()}  # the images, labels and parameters exported
        items = []
        for k in range(len(dataset)):
            params = {name: float(v) for name, v in zip(info.param_names, dataset.params[k])}
            if binning is not None:
                folder = binning.folder(params[binning.name])
            else:
                folder = info.class_names[int(dataset.labels[k])] if info.class_names else ""
            record = {"class": folder} if folder else {}
            if dataset.seeds is not None:
                record["seed"] = int(dataset.seeds[k])
            if dataset.files is not None:
                record["source"] = dataset.files[k]  # the exported image's file in the folder it came from
            items.append(Item(k, folder, params, record))
        writer = DatasetWriter(args.out, request)
        if writer.differences(only=["source_fingerprint"]) and not writer.differences(ignore=["source_fingerprint"]):
            raise UserError(f"The images of {args.spec} changed since {args.out} was exported from them, so continuing "
                            f"it would mix both; export into a new folder, or delete {args.out} first.")
        writer.open(items)
        pending = writer.pending(items)
        for start in tqdm(range(0, len(pending), BATCH), desc=f"Exporting {len(pending)} images", unit="batch"):
            part = pending[start:start + BATCH]
            index = [item.index for item in part]
            writer.write(part, from_uint8(dataset.images[index]), every_item=items if start == 0 else ())
        if not pending:
            writer.write([], dataset.images[:0].float(), every_item=items)
    print(f"Wrote {len(items)} images to {args.out}" + (f" in classes {', '.join(binning.class_names)} by {binning.name} "
                                                        f"(edges {', '.join(f'{e:.3g}' for e in binning.edges)})"
                                                        if binning else ""))
    return args.out


if __name__ == "__main__":
    cli.main(main)
