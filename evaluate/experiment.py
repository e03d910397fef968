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
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classify.config import MODEL_FROM_DATA, PRESETS, ClassifyConfig
from classify.plots import bar_chart
from classify.stage import SPEC as CLASSIFY, check_held_out, final_results, run_data, same_targets
from core.checkpoint import load_checkpoint, require_keys, state_fingerprint
from core.cli import RunInterrupted
from core.config import flat_fields, from_dict, option_name, to_dict
from core.contract import MAIN, RESUMABLE
from core.errors import UserError
from core.lock import FolderLock, check_own_folder
from core.runtime import atomic_write, resolve_device, write_json
from data import SPLITS_WITH_TEST, check_output_outside, check_spec, folder_of, load_dataset
from data.imageio import atomic_save_image, list_images
from training.run import option_strings, parse_stage_args, run, with_options

# Options the runner sets for each run itself; passing them after `--` would contradict it.
RUNNER_OPTIONS = ("--stage", "--dataset", "--test-dataset", "--extra-dataset", "--run-dir", "--seed", "--resume",
                  "--num-samples", "--extra-samples", "--device", "--preset", "--init-from")
MIXED_ONLY = "--extra-fraction"  # an option after -- that only the mixed rows' runs take
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# --fine-tune's control row: the real row's runs trained again on the real images, as many steps in all as
# the rows pretrained on synthetic images.
FINE_TUNED_CONTROL = "real-then-real"
# What the table writes in --out.
TABLE_FILES = ("runs", "results.md", "results.json", "results.png")
# The config fields that name a run's datasets, each set by one of the experiment's own options.
DATASETS = ("data.dataset", "classify.extra_dataset", "data.test_dataset")
# Config fields a kept run may differ in: the shape the data gives the network, and how often a run logs,
# evaluates, checkpoints or how fast it steps, where its data is kept and how many processes load it, none of
# which changes its final weights.
NOT_COMPARED = ({f"model.{name}" for name in MODEL_FROM_DATA}
                | RESUMABLE - {"train.steps"})


@dataclass(frozen=True)
class Row:
    """One line of the table: what it trains on."""
    name: str
    dataset: str
    extra: str = ""          # a second training set (mixed rows)
    synthetic: str = ""      # the name of its synthetic set (--synthetic NAME=SPEC), if it has one
    named_by: str = ""       # what messages call its synthetic set, when no --synthetic option names it (the
                             # sweep's own sets); such a set cannot take another row name
    pretrained_on: str = ""  # fine-tuned rows: the row whose run of the same seed gives the starting weights


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


def check_passed(passed: list[str], mixed: bool) -> None:
    """Refuse options for the training runs that the runner sets itself, abbreviated ones (which would slip past
    that check), and the mixed rows' own option where no row is mixed (`mixed`)."""
    options = option_strings(CLASSIFY)
    for given in (a.split("=")[0] for a in passed if a.startswith("--")):
        full = [o for o in options if o.startswith(given)]
        if given not in options and full:
            raise UserError(f"{given} after -- abbreviates {' or '.join(sorted(full))}; spell it out.")
    clash = [a for a in passed if a.split("=")[0] in RUNNER_OPTIONS]
    if clash:
        raise UserError(f"{clash[0]} is set by the experiment for each run; drop it from the options after --.")
    if not mixed and any(a.split("=")[0] == MIXED_ONLY for a in passed):
        raise UserError(f"{MIXED_ONLY} shapes the batches of mixed rows (real + synthetic), and none is trained here; "
                        f"drop it.")


def count_images(spec: str, resolution: int, cache_dir: str) -> int:
    """How many images a dataset spec holds (folders are counted without decoding)."""
    folder = folder_of(spec)
    if folder is not None:
        return len(list_images(folder))
    return len(load_dataset(spec, resolution, cache_dir=cache_dir))


@dataclass(frozen=True)
class Sizes:
    """How many images each row trains on: every image of its sets (the default), the same number for every
    row (--match-size; a mixed row half and half), or N real and K*N synthetic (--synthetic-multiple)."""
    match: int | None = None       # --match-size alone: images per row
    real: int | None = None        # --synthetic-multiple: N, the real images of the real and mixed rows
    multiple: float | None = None  # --synthetic-multiple: K

    def of(self, row: Row) -> tuple[int, int] | None:
        """(images of the row's dataset, images of its extra dataset), or None for every image of both."""
        if self.multiple is not None:
            synthetic = round(self.multiple * self.real)
            if row.extra:
                return self.real, synthetic
            return (synthetic, 0) if row.synthetic and not row.pretrained_on else (self.real, 0)
        if self.match is None:
            return None
        return (self.match // 2, self.match - self.match // 2) if row.extra else (self.match, 0)

    def describe(self, mixed: bool = True) -> str:
        """One line for the table's log; `mixed`: whether the table has mixed rows (not under --no-mixed)."""
        if self.multiple is not None:
            n, k = self.real, self.multiple
            rows = " and each mixed row on both" if mixed else ""
            return (f"The real row trains on {n} real images, each synthetic row on {round(k * n)} synthetic ones"
                    f"{rows} (--synthetic-multiple {k:g}).")
        return f"Every row trains on {self.match} images (--match-size)."


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


def check_sets(args: argparse.Namespace, rows: list[Row], config: ClassifyConfig) -> None:
    """Decode every training set and the test images once, before any run trains, and check each set against
    the test images as its runs will: a damaged image, a bad params.csv, or other classes than --test's are
    refused now, not when the set's first run starts after the rows before it have trained."""
    data = config.data
    test = load_dataset(args.test, data.resolution, cache_dir=data.cache_dir, train=False)  # plumes: its test split
    for option, spec in training_sets(args, rows).items():
        train = load_dataset(spec, data.resolution, cache_dir=data.cache_dir)
        same_targets(train.info, test.info, "--test", config.model.target, train_option=option)
        check_held_out(train, test, "--test", option)


def without_option(passed: list[str], option: str) -> list[str]:
    """`passed` without `option` and its value (given as "OPTION VALUE" or "OPTION=VALUE")."""
    kept, skip = [], False
    for a in passed:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            kept.append(a)
    return kept


def run_arguments(row: Row, seed: int, run_dir: Path, args: argparse.Namespace, passed: list[str],
                  size: Sizes) -> list[str]:
    """train.py arguments of one run: a new run, or the resumption of an interrupted one."""
    if (run_dir / "checkpoint.pt").exists():
        return ["--stage", "classify", "--run-dir", str(run_dir), "--device", args.device, "--resume"]
    return new_run_arguments(row, seed, run_dir, args, passed, size)


def _check_source_kept(run_dir: Path, source: Path) -> None:
    """Refuse, before anything trains, a run to be fine-tuned from a source run whose result is kept (so it will
    not train again) but whose checkpoint, the starting weights, was deleted."""
    if final_results(source) is not None and not (source / "checkpoint.pt").is_file():
        raise UserError(f"{run_dir} is to be fine-tuned from {source}, whose checkpoint.pt is gone while its result "
                        f"is kept; delete {source} to train it again, or choose another --out.")


def sibling_run(run_dir: Path, row_name: str) -> Path:
    """The folder of the same seed's run of row `row_name`, beside `run_dir` (OUT/runs/ROW/seedS)."""
    return run_dir.parent.parent / row_name / run_dir.name


def new_run_arguments(row: Row, seed: int, run_dir: Path, args: argparse.Namespace, passed: list[str],
                      size: Sizes) -> list[str]:
    """train.py arguments that start the run of `row` and `seed` afresh."""
    common = ["--stage", "classify", "--run-dir", str(run_dir), "--device", args.device]
    every_test_image = [] if any(a.split("=")[0] == "--test-samples" for a in passed) else ["--test-samples", "0"]
    if not row.extra:  # a share of every batch from the extra set: the mixed rows' option alone
        passed = without_option(passed, MIXED_ONLY)
    argv = [*common, "--preset", args.preset, *every_test_image, *passed, "--dataset", row.dataset,
            "--test-dataset", args.test, "--seed", str(seed)]
    if row.extra:
        argv += ["--extra-dataset", row.extra]
    if row.pretrained_on:
        argv += ["--init-from", str(sibling_run(run_dir, row.pretrained_on) / "checkpoint.pt")]
        if args.fine_tune_lr is not None:  # after the options of every run, so it is the one that counts
            argv += ["--lr", repr(args.fine_tune_lr)]
    counts = size.of(row)
    if counts is None:
        argv += ["--num-samples", "0"]  # every image of each set
    else:
        argv += ["--num-samples", str(counts[0])]
        if row.extra:
            argv += ["--extra-samples", str(counts[1])]
    return argv


def requested_config(row: Row, seed: int, run_dir: Path, args: argparse.Namespace, passed: list[str],
                     size: Sizes) -> ClassifyConfig:
    """The config a new run of `row` and `seed` starts from (before its data fixes the network's shape)."""
    given = parse_stage_args(CLASSIFY, new_run_arguments(row, seed, run_dir, args, passed, size))
    return with_options(CLASSIFY, CLASSIFY.presets[args.preset](), given)


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class ReusedRuns:
    """The runs already in OUT/runs, each checked to have been made from the request now given."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}  # data_info by the data part of a config, loaded once

    def check(self, row: Row, run_dir: Path, request: ClassifyConfig, data: bool = True) -> None:
        """Refuse a finished or interrupted run in `run_dir` that was not made from `request` (only its options
        and the names of its datasets with `data=False`, when the datasets are still being written)."""
        checkpoint = run_dir / "checkpoint.pt"
        if not checkpoint.is_file():
            if final_results(run_dir) is None:  # not started, or stopped before its first checkpoint: trained afresh
                if row.pretrained_on:
                    _check_source_kept(run_dir, sibling_run(run_dir, row.pretrained_on))
                return
            # Finished, its checkpoint deleted since (to save space, say): config.json still says how it was made.
            config_path = run_dir / "config.json"
            saved_config = from_dict(ClassifyConfig, json.loads(config_path.read_bytes().decode("utf-8")),
                                     source=config_path)
            self._check_config(row, run_dir, request, saved_config)
            source = sibling_run(run_dir, row.pretrained_on) if row.pretrained_on else None
            if source is not None and self._trained_after(source, run_dir):
                raise UserError(f"{run_dir} was fine-tuned from {source}, which was trained again since or is about to "
                                f"be; delete {run_dir} to fine-tune it again from the new run.")
            print(f"{run_dir} has no checkpoint.pt: its result is kept, checked against this request by its options and "
                  f"dataset names only (not by the images' contents{', nor by its starting weights' if source else ''}); "
                  f"delete {run_dir} to train it again.", flush=True)
            return
        try:
            saved = load_checkpoint(checkpoint, CLASSIFY.name)
            require_keys(saved, ("config", "data_info"), checkpoint)
        except UserError as err:  # damaged: the advice to replace it, and the simpler way out
            raise UserError(f"{str(err).rstrip('.')}, or delete {run_dir} to train that run again.") from None
        self._check_config(row, run_dir, request, from_dict(ClassifyConfig, saved["config"]))
        if data:
            self._check_data(row, run_dir, request, saved["data_info"])
        if row.pretrained_on:
            self._check_start(run_dir, Path(request.classify.init_from), saved["data_info"].get("init_from"))

    @staticmethod
    def _trained_after(source: Path, run_dir: Path) -> bool:
        """Whether the run in `source` will train (it has no result) or has trained since `run_dir` finished,
        which leaves a run fine-tuned from it without its checkpoint no way to tell its starting weights."""
        if final_results(source) is None:
            return True
        checkpoint = source / "checkpoint.pt"
        return checkpoint.is_file() and checkpoint.stat().st_mtime_ns > (run_dir / "metrics.jsonl").stat().st_mtime_ns

    @staticmethod
    def _check_start(run_dir: Path, source: Path, recorded: dict[str, str] | None) -> None:
        """Refuse a fine-tuned run whose starting weights are no longer those of its source run (trained again,
        or gone and about to be)."""
        now = None
        if source.is_file():
            now = state_fingerprint(load_checkpoint(source, CLASSIFY.name).get("models", {}).get(MAIN, {}))
        if recorded is None or now != recorded.get("fingerprint"):
            if now is None and final_results(source.parent) is not None:  # its result kept: it will not train again
                raise UserError(f"{run_dir} was fine-tuned from {source}, which is gone while that run's result is "
                                f"kept; delete {source.parent} and {run_dir} to train both again, or choose another "
                                f"--out.")
            what = "is gone" if now is None else "holds other weights now"
            raise UserError(f"{run_dir} was fine-tuned from {source}, which {what}; delete {run_dir} to fine-tune it "
                            f"again from the new run, or choose another --out.")

    def _check_config(self, row: Row, run_dir: Path, request: ClassifyConfig, saved: ClassifyConfig) -> None:
        now, was = flat_fields(to_dict(request)), flat_fields(to_dict(saved))
        # A fine-tuned run's starting weights are checked by their fingerprint (`_check_start`), not by the path
        # of its source's checkpoint, which moves with --out (given relative, then absolute; or copied).
        ignored = NOT_COMPARED | ({"classify.init_from"} if row.pretrained_on else set())
        changed = [key for key in now if key not in ignored and now[key] != was[key]]
        if not changed:
            return
        key = changed[0]
        if key in DATASETS:
            raise UserError(f"{_option(row, key)} now names {now[key]} but {run_dir} was trained on {was[key]}; "
                            f"{_remedy(row, key)}.")
        if key in ("data.num_samples", "classify.extra_samples"):
            spec = request.classify.extra_dataset if key == "classify.extra_samples" else request.data.dataset
            raise UserError(f"{run_dir} was trained on {was[key] or 'all'} images of {spec} but this request trains "
                            f"on {now[key] or 'all'} (--match-size, --synthetic-multiple); choose another --out, or repeat the request it "
                            f"was made with.")
        option = option_name(key)
        through = ("--fine-tune-lr, or the options after --" if row.pretrained_on and key == "train.lr" else
                   "--preset or the options after --")
        raise UserError(f"{run_dir} was trained with {option} {_shown(was[key])} but this request gives {option} "
                        f"{_shown(now[key])} (through {through}); choose another --out, or repeat the options it was "
                        f"made with.")

    def _check_data(self, row: Row, run_dir: Path, request: ClassifyConfig, recorded: dict[str, Any]) -> None:
        was, now = json.loads(json.dumps(recorded)), json.loads(json.dumps(self._data_info(request)))
        # (option, recorded description, current description) of each set of images the run used.
        sets = (list(zip(("data.dataset", "classify.extra_dataset"), was["parts"], now["parts"]))
                if "parts" in was and "parts" in now else [("data.dataset", was, now)])
        if "test_fingerprint" in was:  # older checkpoints lack it
            sets.append(("data.test_dataset", {"fingerprint": was["test_fingerprint"]},
                         {"fingerprint": now["test_fingerprint"]}))
        specs = flat_fields(to_dict(request))
        for key, before, after in sets:
            if any(before[k] != after[k] for k in before if k in after and k not in ("parts", "test_fingerprint")):
                if key == "data.test_dataset" and specs[key] in SPLITS_WITH_TEST:
                    raise UserError(f"--test {specs[key]} now reads its test split (runs made before read its training "
                                    f"split under that name), so {run_dir} was tested on other images; choose another "
                                    f"--out.")
                raise UserError(f"The images of {_option(row, key)} ({specs[key]}) changed since {run_dir} was made "
                                f"with them; restore them, or {_remedy(row, key)}.")

    def _data_info(self, request: ClassifyConfig) -> dict[str, Any]:
        """What a run of `request` records of its data; the runs of one row share it whatever their seed."""
        key = json.dumps({**to_dict(request), "train": None}, sort_keys=True)
        if key not in self._data:
            self._data[key] = run_data(request).data_info
        return self._data[key]


def _option(row: Row, key: str) -> str:
    """The option (or the description) that sets the dataset field `key` of `row`'s runs."""
    synthetic = row.named_by or f"--synthetic {row.synthetic}"
    if key == "data.dataset":
        return "--real" if row.extra or row.pretrained_on or not row.synthetic else synthetic
    return synthetic if key == "classify.extra_dataset" else "--test"


def _remedy(row: Row, key: str) -> str:
    """What to do when the data `key` of `row` is not what its kept runs were made with: a synthetic set
    can also take another name, which gives its rows new runs."""
    if _option(row, key).startswith("--synthetic"):
        return "choose another --out or another row name"
    return "choose another --out"


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


def train_plan(plan: list[tuple[Row, int, Path]], args: argparse.Namespace, passed: list[str],
               size: Sizes) -> dict[str, list[dict]]:
    """Train (or resume, or keep) the run of every (row, seed, run folder) of `plan`, each checked before by
    `ReusedRuns`; returns each row's held-out results, one per seed. `args` gives the runs' --device,
    --preset and --test."""
    results: dict[str, list[dict]] = {}
    for row, seed, run_dir in plan:
        result = final_results(run_dir)
        if result is None:
            print(f"Training on {row.name}, seed {seed} ({run_dir})", flush=True)
            try:
                run(CLASSIFY, parse_stage_args(CLASSIFY, run_arguments(row, seed, run_dir, args, passed, size)))
            except RunInterrupted as err:
                raise err.told_from(f"in {run_dir}, which saved its step",
                                    "run the same command again to resume it and the runs after it.") from err
            result = final_results(run_dir)
            assert result is not None, f"{run_dir} finished without a held-out evaluation"
        results.setdefault(row.name, []).append(result)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, passed = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}.")
    if args.synthetic_multiple is not None and not 0 < args.synthetic_multiple < float("inf"):
        raise UserError(f"--synthetic-multiple must be a positive number, got {args.synthetic_multiple:g}.")
    if args.fine_tune_lr is not None and not (args.fine_tune and 0 < args.fine_tune_lr < float("inf")):
        raise UserError(f"--fine-tune-lr must be a positive number, got {args.fine_tune_lr:g}." if args.fine_tune else
                        "--fine-tune-lr sets the learning rate of the fine-tuned rows; add --fine-tune or drop it.")
    rows = plan_rows(args)
    check_spec(args.real, "--real")
    check_spec(args.test, "--test")
    check_passed(passed, mixed=any(row.extra for row in rows))
    resolve_device(args.device)
    given = parse_stage_args(CLASSIFY, ["--preset", args.preset, *passed])
    config = with_options(CLASSIFY, CLASSIFY.presets[args.preset](), given)  # what every run starts from
    target = config.model.target

    out = args.out
    check_own_folder(out, TABLE_FILES, "--out")
    check_output_outside(out, "--out", {**training_sets(args, rows), "--test": args.test})
    with FolderLock(out):
        check_sets(args, rows, config)
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
