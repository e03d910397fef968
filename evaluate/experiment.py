"""The results table: is synthetic data good enough to train on?

    python -m evaluate.experiment --real folder:R --synthetic NAME=folder:S [--synthetic ...] \\
        --test folder:T --seeds 3 [--match-size] [--out runs/experiment] [-- TRAIN OPTIONS]

trains the same classifier (`train.py --stage classify`) on the real images, on each synthetic set,
and on real + each synthetic set, once per seed, tests every run on the same held-out real images,
and writes OUT/results.md (mean and standard deviation over seeds), OUT/results.json and
OUT/results.png. Options after `--` go to every training run (e.g. `-- --target class --steps 2000`).
`--match-size` trains every row on the same number of images (the smallest set's; a mixed row takes
half from each), so rows compare the quality of the data rather than its quantity. `--synthetic-multiple
K` measures the other regime, synthetic data as augmentation: the real row trains on N real images, a
synthetic row on K*N synthetic ones, and a mixed row on all N real plus K*N synthetic (N: every real
image, or with --match-size the most that every synthetic set can supply K times over). `--fine-tune` adds
a third use of each synthetic set, pretraining: a row NAME-then-real whose runs start from the weights the
synthetic row's run of the same seed ended with, and train on the real images (as many as the real row)
with the same options. They have trained twice as many steps in all, so --fine-tune adds their control
too, real-then-real: the real row's runs trained once more on the real images in the same way.
`--fine-tune-lr LR` fine-tunes both at another peak learning rate (a tenth of the first phase's, say).

Every run lives in OUT/runs/ROW/seedS: run the same command again after an interruption and finished
runs are kept, interrupted ones resumed from their checkpoints. A run is kept or resumed only if it was
made from the same request (its datasets and their contents, test set, seed, preset, options and
--match-size count); before anything trains, any that was not is refused with what differs.
"""

from __future__ import annotations

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from classify.config import PRESETS, ClassifyConfig
from classify.plots import bar_chart
from classify.stage import SPEC as CLASSIFY, check_held_out, same_targets
from core.errors import UserError
from core.lock import FolderLock, check_folder_path, check_own_folder
from core.runtime import atomic_write, resolve_device, write_json
from data import check_output_outside, check_same_classes, check_spec, folder_of, load_dataset
from data.folder import decoding_once
from data.imageio import atomic_save_image, list_images
from evaluate.runs import (ReusedRuns, Row, Sizes, check_first_runs, check_passed, check_seed_count,
                           note_test_samples, requested_config, same_folder, train_plan)
from training.run import parse_stage_args, with_options

ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# --fine-tune's control row: the real row's runs trained again on the real images, as many steps in all as
# the rows pretrained on synthetic images.
FINE_TUNED_CONTROL = "real-then-real"
# What the table writes in --out.
TABLE_FILES = ("runs", "results.md", "results.json", "results.png")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = cli.ArgumentParser(prog="python -m evaluate.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, help="the real training images: folder:PATH | plumes | cifar10 (required)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="NAME=SPEC", required=True,
                        help="a synthetic training set and its row name, e.g. ddpm=folder:synth; repeat per set (required)")
    parser.add_argument("--test", required=True, help="held-out real images every run is tested on (required)")
    parser.add_argument("--seeds", type=cli.int_option, default=3, help="training runs per row, seeds 0..N-1 (default: 3)")
    parser.add_argument("--match-size", action="store_true",
                        help="train every row on the same number of images (default: off: each row on all its images)")
    parser.add_argument("--synthetic-multiple", type=float, default=None, metavar="K",
                        help="synthetic rows train on K times as many images as the real row, and mixed rows on all "
                             "the real images plus K times as many synthetic ones (default: off)")
    parser.add_argument("--no-mixed", action="store_true", help="leave out the real + synthetic rows (default: off)")
    parser.add_argument("--fine-tune", action="store_true",
                        help="add a row per synthetic set that starts from its run's weights and trains on the real "
                             "images, NAME-then-real (pretraining on synthetic images), and its control with as many "
                             "steps, real-then-real (default: off)")
    parser.add_argument("--fine-tune-lr", type=float, default=None, metavar="LR",
                        help="with --fine-tune: the peak learning rate of the fine-tuned rows (both NAME-then-real and "
                             "the control), e.g. a tenth of the other runs' (default: theirs)")
    parser.add_argument("--preset", default="classify-demo", choices=tuple(PRESETS), help="classify preset every run starts from (default: classify-demo)")
    parser.add_argument("--out", type=cli.path_option, default=Path("runs/experiment"), help="output folder (default: runs/experiment)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    return parser.parse_args(own), passed


def plan_rows(args: argparse.Namespace) -> list[Row]:
    """Real, each synthetic set, real + each synthetic set, then (--fine-tune) real then real and each
    synthetic set then real; names and specs checked."""
    synthetic = []
    for item in args.synthetic:
        name, _, spec = item.partition("=")
        if not ROW_NAME.match(name) or not spec:
            raise UserError(f"--synthetic {item!r} is not NAME=SPEC with a NAME of letters, digits, '.', '_' or '-'.")
        check_spec(spec, f"--synthetic {name}")
        synthetic.append((name, spec))
    names = [name for name, _ in synthetic]
    if "real" in names or len(set(names)) != len(names):
        raise UserError("Every --synthetic set needs its own name, other than 'real'.")
    if args.fine_tune and any(f"{name}-then-real" in names for name in ("real", *names)):
        raise UserError("With --fine-tune no --synthetic set may be called NAME-then-real after 'real' or another "
                        "set NAME: that is the name of a fine-tuned row; rename it.")
    rows = [Row("real", args.real)] + [Row(name, spec, synthetic=name) for name, spec in synthetic]
    if not args.no_mixed:
        rows += [Row(f"real+{name}", args.real, spec, synthetic=name) for name, spec in synthetic]
    if args.fine_tune:  # after the rows whose runs they start from; the first is the control (as many steps)
        rows += [Row(FINE_TUNED_CONTROL, args.real, pretrained_on="real")]
        rows += [Row(f"{name}-then-real", args.real, synthetic=name, pretrained_on=name) for name, _ in synthetic]
    return rows


def check_synthetic_apart(args: argparse.Namespace, rows: list[Row]) -> None:
    """Refuse, before any work, a synthetic set that is the --real or --test images themselves: its rows would
    compare the real images with themselves (or test on their own training images), which says nothing of
    synthetic data. (A built-in source such as plumes given as --test is its test split, another set.)"""
    for option, spec in training_sets(args, rows).items():
        if option == "--real":
            continue
        for real_option, real in (("--real", args.real), ("--test", args.test)):
            if same_folder(spec, real) or (real_option == "--real" and spec == real):
                why = ("its rows would compare real images with themselves" if real_option == "--real" else
                       "its runs would be tested on the images they train on")
                raise UserError(f"{option} {spec} names the images of {real_option} ({real}), so {why}; pass a set "
                                f"of synthetic images.")


def count_images(spec: str, resolution: int, cache_dir: str) -> int:
    """How many images a dataset spec holds (folders are counted without decoding)."""
    folder = folder_of(spec)
    if folder is not None:
        return len(list_images(folder))
    return len(load_dataset(spec, resolution, cache_dir=cache_dir))


def plan_sizes(args: argparse.Namespace, rows: list[Row], resolution: int, cache_dir: str) -> Sizes:
    """The sizes of the rows, from the sets' image counts (folders are counted without decoding)."""
    if args.synthetic_multiple is None and not args.match_size:
        return Sizes()
    counts = {spec: count_images(spec, resolution, cache_dir)
              for spec in {args.real, *(row.dataset for row in rows), *(row.extra for row in rows if row.extra)}}
    if args.synthetic_multiple is None:
        match = min(counts.values())
        if any(row.extra for row in rows) and match < 2:  # half and half: 0 would read as "every image"
            raise UserError(f"--match-size gives every row {match} image(s), and a mixed row needs at least 2 (half real, "
                            f"half synthetic); add images to the smallest set, or pass --no-mixed.")
        return Sizes(match=match)
    k = args.synthetic_multiple
    synthetic = {spec: counts[spec] for spec in counts if spec != args.real}
    real = counts[args.real]
    if args.match_size:  # the most real images every synthetic set can match k times over
        real = min([real, *(most_matched(n, k) for n in synthetic.values())])
    if real >= 1 and round(k * real) < 1:  # 0 synthetic images would read as "every image"
        least = float(f"{0.5 / real:.3g}")
        while round(least * real) < 1:  # round() takes 0.5 to 0: the next 3-digit value up
            least = float(f"{least + 10 ** (math.floor(math.log10(least)) - 2):.3g}")
        raise UserError(f"--synthetic-multiple {k:g} of {real} real images rounds to no synthetic image per row; raise "
                        f"it to at least {least:g}.")
    short = {spec: n for spec, n in synthetic.items() if n < round(k * real)}
    if short:
        spec, n = next(iter(short.items()))
        raise UserError(f"--synthetic-multiple {k:g} needs {round(k * real)} images of every synthetic set and {spec} "
                        f"holds {n}; write more, lower --synthetic-multiple, or add --match-size to use fewer real "
                        f"images.")
    if real < 1:
        raise UserError(f"--synthetic-multiple {k:g} leaves no real images to train on; lower it.")
    return Sizes(real=real, multiple=k)


def most_matched(n: int, k: float) -> int:
    """The most real images N that a set of n holds k times over (k N <= n), with the float error of n / k
    forgiven (1 // 0.1 is 9.0)."""
    return math.floor(n / k + 1e-9)


def training_sets(args: argparse.Namespace, rows: list[Row]) -> dict[str, str]:
    """The sets the runs train on, by the option that names each: --real, then --synthetic NAME per set."""
    return {"--real": args.real, **{f"--synthetic {row.name}": row.dataset for row in rows
                                    if row.synthetic and not row.extra and not row.pretrained_on}}


def check_sets(args: argparse.Namespace, rows: list[Row], config: ClassifyConfig, request: ClassifyConfig) -> None:
    """Decode every training set and the test images once, before any run trains, and check each set against
    the test images as its runs will: a damaged image, a bad params.csv, or other classes than --test's are
    refused now, not when the set's first run starts after the rows before it have trained. `request`: a run's
    config, whose test images are noted if fewer than it asks for."""
    data = config.data
    test = load_dataset(args.test, data.resolution, cache_dir=data.cache_dir, train=False)  # plumes: its test split
    note_test_samples(request, len(test))
    for option, spec in training_sets(args, rows).items():
        train = load_dataset(spec, data.resolution, cache_dir=data.cache_dir)
        same_targets(train.info, test.info, "--test", config.model.target, train_option=option)
        check_held_out(train, test, "--test", option)


def summarise(rows: list[Row], results: dict[str, list[dict]], target: str) -> dict[str, Any]:
    """Per row: the metric of each seed, its mean and (sample) standard deviation."""
    metric = "top1" if target == "class" else "mae"
    table = {}
    for row in rows:
        values = [r[metric] * (100 if metric == "top1" else 1) for r in results[row.name]]
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        extra = {}
        if metric == "mae":
            names = sorted(k for k in results[row.name][0] if k.startswith("mae/"))
            extra = {k: float(np.mean([r[k] for r in results[row.name]])) for k in names}
        table[row.name] = {"dataset": row.dataset, "extra": row.extra, "values": values,
                           "mean": float(np.mean(values)), "std": std, **extra}
    return {"metric": "top-1 accuracy (%)" if metric == "top1" else "mean absolute error", "rows": table}


def markdown(summary: dict[str, Any], seeds: int, test: str, sizes: str = "") -> str:
    """The results table, then the test set and `sizes` (what each row trained on, where the sizes were set)."""
    lines = [f"| training data | {summary['metric']}, mean ± std over {seeds} seed{'s' * (seeds > 1)} | per seed |",
             "|---|---|---|"]
    for name, row in summary["rows"].items():
        digits = 2 if summary["metric"].startswith("top") else 4
        per_seed = ", ".join(f"{v:.{digits}f}" for v in row["values"])
        lines.append(f"| {name} | {row['mean']:.{digits}f} ± {row['std']:.{digits}f} | {per_seed} |")
    return "\n".join(lines) + f"\n\nTest set: {test}.\n" + (f"{sizes}\n" if sizes else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, passed = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}.")
    check_seed_count(args.seeds, "--seeds")
    if args.synthetic_multiple is not None and not 0 < args.synthetic_multiple < float("inf"):
        raise UserError(f"--synthetic-multiple must be a positive number, got {args.synthetic_multiple:g}.")
    if args.fine_tune_lr is not None and not (args.fine_tune and 0 < args.fine_tune_lr < float("inf")):
        raise UserError(f"--fine-tune-lr must be a positive number, got {args.fine_tune_lr:g}." if args.fine_tune else
                        "--fine-tune-lr sets the learning rate of the fine-tuned rows; add --fine-tune or drop it.")
    rows = plan_rows(args)
    check_spec(args.real, "--real")
    check_spec(args.test, "--test")
    check_passed(passed, mixed=any(row.extra for row in rows))
    device = resolve_device(args.device)
    given = parse_stage_args(CLASSIFY, ["--preset", args.preset, *passed])
    config = with_options(CLASSIFY, CLASSIFY.presets[args.preset](), given)  # what every run starts from
    target = config.model.target

    out = args.out
    check_folder_path(out, "--out")
    check_own_folder(out, TABLE_FILES, "--out")
    check_output_outside(out, "--out", {**training_sets(args, rows), "--test": args.test})
    check_synthetic_apart(args, rows)
    if target == "class":  # by listing the folders, in this command's terms, before the runs' own checks below
        for option, spec in training_sets(args, rows).items():
            check_same_classes(args.test, "--test", spec, option)
    check_first_runs([(row, out / "runs" / row.name / "seed0") for row in rows], args, passed, device)
    # (Every run, seed and check decodes a folder's images, and hashes them for its checkpoint, once.)
    with FolderLock(out), decoding_once():
        check_sets(args, rows, config, requested_config(rows[0], 0, out / "runs" / rows[0].name / "seed0", args,
                                                        passed, Sizes()))
        size = plan_sizes(args, rows, config.data.resolution, config.data.cache_dir)
        sizes = size.describe(mixed=any(row.extra for row in rows)) if size != Sizes() else ""
        if sizes:
            print(sizes, flush=True)
        plan = [(row, seed, out / "runs" / row.name / f"seed{seed}") for row in rows for seed in range(args.seeds)]
        # Every run already there is checked against this request before any run trains.
        reused = ReusedRuns()
        for row, seed, run_dir in plan:
            reused.check(row, run_dir, requested_config(row, seed, run_dir, args, passed, size))
        results = train_plan(plan, args, passed, size)

        summary = summarise(rows, results, target)
        summary.update(test=args.test, seeds=args.seeds, match_size=size.match, synthetic_multiple=size.multiple,
                       real_images=size.real, train_options=passed, preset=args.preset, fine_tune_lr=args.fine_tune_lr)
        table = markdown(summary, args.seeds, args.test, sizes)
        atomic_write(out / "results.md", lambda f: f.write(table.encode()))
        write_json(summary, out / "results.json")
        names = list(summary["rows"])
        chart = bar_chart(names, [summary["rows"][n]["mean"] for n in names],
                          [summary["rows"][n]["std"] for n in names], title=f"Tested on {args.test}",
                          ylabel=summary["metric"])
        atomic_save_image(chart, out / "results.png")
    print(table)
    print(f"Wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")
    return summary


if __name__ == "__main__":
    cli.main(main)
