"""The classifier runs behind a results table (`evaluate.experiment`) and a quality sweep's trained rows
(`evaluate.sweep`): what each row trains on (`Row`, `Sizes`), the `train.py --stage classify` arguments of
each of its runs and the options they are given checked before any work (`check_first_runs`), which finished
or interrupted runs can be kept (`ReusedRuns`: only those made from the same request), and training the rest in
turn (`train_plan`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from classify.config import MODEL_FROM_DATA, ClassifyConfig
from classify.stage import SPEC as CLASSIFY, final_results, run_data
from core.checkpoint import load_checkpoint, require_keys, state_fingerprint
from core.cli import RunInterrupted
from core.config import flat_fields, from_dict, option_name, to_dict
from core.contract import MAIN, RESUMABLE
from core.errors import UserError
from core.runtime import check_num_workers
from data import SPLITS_WITH_TEST, folder_of
from evaluate import note_capped
from training.run import check_on_device, option_strings, parse_stage_args, resolve_config, run, with_options

# Options the runner sets for each run itself; passing them after `--` would contradict it.
RUNNER_OPTIONS = ("--stage", "--dataset", "--test-dataset", "--extra-dataset", "--run-dir", "--seed", "--resume",
                  "--num-samples", "--extra-samples", "--device", "--preset", "--init-from")
# The most seeds (runs per row) a table or a sweep trains: each is a classifier run of its own.
MAX_SEEDS = 1000
MIXED_ONLY = "--extra-fraction"  # an option after -- that only the mixed rows' runs take
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


def check_seed_count(seeds: int, option: str) -> None:
    """Refuse more than `MAX_SEEDS` runs per row (`option` asked for them) before anything is planned."""
    if seeds > MAX_SEEDS:
        raise UserError(f"{option} must be at most {MAX_SEEDS} (each seed trains a classifier per row), got {seeds}.")


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


def same_folder(a: str, b: str) -> bool:
    """Whether two dataset specs name one folder, however its path is written (relative, with ~, a link)."""
    folder_a, folder_b = folder_of(a), folder_of(b)
    return folder_a is not None and folder_b is not None and folder_a.resolve() == folder_b.resolve()


def note_test_samples(request: ClassifyConfig, holds: int) -> None:
    """Say, before any run trains, where the runs' --test-samples (after --) asks for more images than their test
    set holds (`holds`): each run tests on all of them (`data.load_test_set` takes at most what there is). The
    plumes test split is simulated, as many images as asked for."""
    data = request.data
    if data.test_dataset != "plumes":
        note_capped("--test-samples", data.test_samples, f"--test {data.test_dataset}", holds)


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


def check_first_runs(plan: list[tuple[Row, Path]], args: argparse.Namespace, passed: list[str],
                     device: torch.device) -> None:
    """Refuse, before any image is read or any run trains, options after -- that a run of these (row, run folder)
    pairs would refuse only as it starts, after the runs before it trained. Each row's new run is resolved as
    `train.py` resolves it (`training.run.resolve_config`: the stage's options and checks), then checked against
    `device` as `training.run.train` checks it: --kernels, --compile, --amp, --batch-size against memory and
    --num-workers. Seeds differ in nothing checked here; a run already in its folder goes on with its checkpoint's
    options (`ReusedRuns` checks them), and a fine-tuned row's --init-from is written by the run it starts from, so
    those are left to their own start."""
    new = [(row, run_dir) for row, run_dir in plan if not row.pretrained_on]
    resolved = [resolve_config(CLASSIFY, parse_stage_args(CLASSIFY, new_run_arguments(row, 0, run_dir, args, passed,
                                                                                      Sizes())), run_dir)[0]
                for row, run_dir in new if not (run_dir / "checkpoint.pt").exists()]
    if not new:
        return
    # Any row's config will do (only datasets and the mixed rows' --extra-fraction differ); a kept run's too.
    row, run_dir = new[0]
    config = resolved[0] if resolved else requested_config(row, 0, run_dir, args, passed, Sizes())
    check_on_device(config, device)
    check_num_workers(config.data.num_workers)


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
        # A dataset folder counts by where it is, not by how its path was written (a sweep's sets move with --out).
        changed = [key for key in now if key not in ignored and now[key] != was[key]
                   and not (key in DATASETS and same_folder(now[key], was[key]))]
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
