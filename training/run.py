"""One training run from the command line: the options of a stage, the config they resolve to (a new
run's, or a resumed run's checked against its checkpoint), any run that must exist first, and the
loop. `train.py` picks the stage from the registry and calls `run`; tools that start training runs
of their own (the experiment table, benchmarks) call `run` with the stage they mean.

    parse_stage_args(spec, argv) -> args     the stage's options, typed as on the command line
    resolve_config(spec, args, run_dir)      preset or checkpoint config + options, checked without data
    train(spec, args, runtime)               prerequisites, build, resume checks, Trainer(...).run()
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from core.errors import FieldError, MissingFileError, UserError
import kernels
from core import cli
from core.checkpoint import load_checkpoint, require_keys
from core.config import (add_config_arguments, apply_arguments, from_dict, given_arguments, option_name,
                         option_names, to_dict)
from core.contract import RESUMABLE, StageSpec
from core.lock import FolderLock, check_folder_path, check_own_folder
from core.runtime import Runtime, autocast_dtype, check_batch_fits, check_num_workers, resolve_device
from core.speed import check_compile
from data import SPLITS_WITH_TEST, check_output_outside, check_spec, config_datasets
from core import distributed
from training.loop import (RunExists, Trainer, check_schedule_kept, check_steps_ahead, finished_run, missing_outputs,
                           warn_unfinished_warmup)

CHECKPOINT_KEYS = ("config", "data_info", "step", "models", "ema", "optimizers", "scaler", "rng")
# What a run killed before its first checkpoint leaves in its folder: a new run may start there. Besides these, the
# latest copy of each figure an evaluation wrote (`unstarted_run_files`).
UNSTARTED_RUN = ("config.json", "metrics.jsonl", "samples", "figures")
FIGURE = re.compile(r"^(?P<name>.+)-step-\d{7,}\.png$")  # figures/NAME-step-NNNNNNN.png, as the loop writes them


def unstarted_run_files(run_dir: Path) -> tuple[str, ...]:
    """The names a run stopped before its first checkpoint may have left in `run_dir`: `UNSTARTED_RUN`, and NAME.png
    beside each figure figures/NAME-step-NNNNNNN.png that its evaluations wrote (a classifier's confusion.png)."""
    figures = run_dir / "figures"
    found = [FIGURE.match(p.name) for p in figures.iterdir()] if figures.is_dir() else []
    return UNSTARTED_RUN + tuple(sorted({f"{m['name']}.png" for m in found if m}))


def common_parser(spec: StageSpec, stage_names: Sequence[str], description: str | None = None,
                  **kwargs: Any) -> argparse.ArgumentParser:
    """The options every stage has: which stage and preset, where the run lives, the device."""
    parser = cli.ArgumentParser(prog="train.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument("--stage", choices=tuple(stage_names), default=spec.name,
                        help=f"what to train (default: {spec.name})")
    parser.add_argument("--preset", choices=tuple(spec.presets), default=spec.default_preset,
                        help=f"starting configuration of the stage; the options below override it "
                             f"(default: {spec.default_preset})")
    parser.add_argument("--run-dir", type=cli.path_option, default=None, help="where the run is written (default: runs/PRESET)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its checkpoint (default: off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    return parser


def add_sections(parser: argparse.ArgumentParser, spec: StageSpec) -> None:
    """The stage's own options, one group per config section, defaults shown from its default preset."""
    shown = spec.presets[spec.default_preset]()
    for section in spec.sections:
        add_config_arguments(parser, section.name, section.cls, getattr(shown, section.name), skip=section.skip,
                             help_overrides=dict(section.help))


def stage_parser(spec: StageSpec, stage_names: Sequence[str] = (), description: str | None = None
                 ) -> argparse.ArgumentParser:
    parser = common_parser(spec, stage_names or (spec.name,), description)
    add_sections(parser, spec)
    return parser


def option_strings(spec: StageSpec) -> set[str]:
    """Every spelling of an option `train.py --stage SPEC.NAME` takes (--flag and --no-flag alike)."""
    return {option for action in stage_parser(spec)._actions for option in action.option_strings}


def parse_stage_args(spec: StageSpec, argv: Sequence[str]) -> argparse.Namespace:
    """`argv` as `train.py --stage SPEC.NAME ...` would parse it."""
    return stage_parser(spec).parse_args(list(argv))


def with_options(spec: StageSpec, config: Any, args: argparse.Namespace) -> Any:
    """`config` with the options the user typed applied, section by section (data first). The checks name the
    fields they refuse (a `FieldError`: code and checkpoints build these configs too); here they read in the words
    of the options that set them: a section's own checks by `apply_arguments`, a check across the stage's sections
    (a `core.errors.FieldError`, which names fields by dotted keys such as "train.batch_size") here."""
    options = {key: name for section in spec.sections
               for key, name in option_names(section.cls, section.skip, section.name).items()}
    for section in spec.sections:
        try:
            try:
                config = apply_arguments(config, args, section.name, section.skip)
            except UserError:
                # A network whose image size the data decides (the autoencoder's `resolution`) checks its options
                # when built: judge them at the data's size (--resolution), not at the preset's, before refusing.
                part = _at_data_size(getattr(config, section.name), section, config.data.resolution)
                if part is None:
                    raise
                config = apply_arguments(dataclasses.replace(config, **{section.name: part}), args, section.name,
                                         section.skip)
        except FieldError as err:
            raise UserError(err.naming(options)) from None
    return config


def _at_data_size(part: Any, section: Any, resolution: int) -> Any | None:
    """The config section `part` at the data's image size, where the data decides its size and that differs
    from the preset's; None otherwise, or where the preset's network does not fit that size either."""
    if "resolution" not in section.skip or part.resolution == resolution:
        return None
    try:
        return dataclasses.replace(part, resolution=resolution)
    except UserError:
        return None


def _changed_fixed_options(spec: StageSpec, args: argparse.Namespace, saved_config: Any) -> list[str]:
    """The options given on a resume that would change what the checkpoint fixes (those outside
    `RESUMABLE` whose value differs from the saved config's), each with the value the run has."""
    repeated = with_options(spec, saved_config, args)
    was, now = json.loads(json.dumps(to_dict(saved_config))), json.loads(json.dumps(to_dict(repeated)))
    changed = []
    for name in sorted(set(given_arguments(args)) - RESUMABLE):
        section, field = name.split(".", 1)
        if was[section][field] != now[section][field]:
            changed.append(f"{option_name(name)} (the run's: {_as_typed(was[section][field])})")
    return changed


def _as_typed(value: Any) -> str:
    """A saved config value as the option that sets it takes it: lists space-separated, text as it is."""
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return '""' if value == "" else str(value)


def resolve_config(spec: StageSpec, args: argparse.Namespace, run_dir: Path) -> tuple[Any, dict | None]:
    """The run's config: its checkpoint's when resuming (an option outside `RESUMABLE` may be
    repeated, but not changed), else the preset's, with the user's options applied either way; then
    every check that needs no data."""
    saved = None
    checkpoint = run_dir / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise MissingFileError(f"{run_dir} holds no checkpoint to resume; drop --resume to start a new run there"
                                   f"{' (the run there stopped before its first checkpoint)' if run_dir.is_dir() else ''}.")
        saved = load_checkpoint(checkpoint, spec.name, option="--resume")
        require_keys(saved, CHECKPOINT_KEYS, checkpoint, option="--resume")
        config = from_dict(spec.config_class, saved["config"], checkpoint)
        saved_train = config.train
        fixed = _changed_fixed_options(spec, args, config)
        if fixed:
            raise UserError(f"{', '.join(fixed)} cannot change when resuming (the checkpoint fixes them); "
                            f"give the values the run was started with, drop them, or start a new --run-dir.")
    else:
        if checkpoint.exists():
            raise RunExists(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir.")
        check_own_folder(run_dir, unstarted_run_files(run_dir), "--run-dir")
        config = spec.presets[args.preset]()
    config = with_options(spec, config, args)
    check_idle_options(config, args)
    if saved is not None:  # before any data is read (the trainer checks it too, for callers that start there)
        check_steps_ahead(run_dir, saved["step"], config.train.steps)
        check_schedule_kept(saved["step"], saved_train, config.train)
    warn_unfinished_warmup(config.train)
    check_spec(config.data.dataset)
    check_folder_path(Path(config.data.cache_dir).expanduser(), "--cache-dir")  # (this machine's, not the config's)
    if saved is None:  # (a run already there is not moved by refusing to resume it)
        check_output_outside(run_dir, "--run-dir", config_datasets(to_dict(config)))
    if spec.check is not None:
        spec.check(config, saved, resolve_device(args.device), run_dir)  # (the networks' size against its memory)
    return config, saved


def check_idle_options(config: Any, args: argparse.Namespace) -> None:
    """Refuse an option the user gave that can have no effect on this run (the config's `idle_options`): a run
    that silently ignores what was asked for looks like it did it."""
    idle = config.idle_options()
    given = sorted(set(given_arguments(args)) & set(idle))
    if given:
        raise UserError(idle[given[0]])


PREVIEW = re.compile(r"^(step-\d{7,}|final)\.png$")  # samples/step-NNNNNNN.png and final.png, as the loop writes them


def unstarted_outputs(run_dir: Path) -> list[Path]:
    """What a run stopped before its first checkpoint wrote into `run_dir` and a new run there would not replace:
    its log, preview grids and figures (each NAME.png beside figures/NAME-step-NNNNNNN.png too). Only names the
    loop writes: anything else in samples/ or figures/ is someone else's and stays."""
    def ours(folder: Path, pattern: re.Pattern) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and pattern.match(p.name)) if folder.is_dir() else []

    figures = ours(run_dir / "figures", FIGURE)
    latest = sorted({run_dir / f"{FIGURE.match(p.name)['name']}.png" for p in figures})
    log = [run_dir / "metrics.jsonl"] if (run_dir / "metrics.jsonl").is_file() else []
    return log + ours(run_dir / "samples", PREVIEW) + figures + [p for p in latest if p.is_file()]


def start_over_if_killed(run_dir: Path) -> None:
    """A new run into a folder that holds a log, previews or figures but no checkpoint: a run stopped (kill -9, a
    crash) before its first checkpoint. Nothing of it can be resumed, so it starts over, as a rerun after a kill
    must: its log would otherwise hold steps twice, and its previews would pass for the new run's. Called once the
    new run is built, just before it trains, so a refused command, or one whose data fails to load, removes
    nothing."""
    old = unstarted_outputs(run_dir)
    if not old:
        return
    log = run_dir / "metrics.jsonl"
    images = len([p for p in old if p != log])
    held = " and ".join((["the log"] if log in old else []) + ([f"{images} image(s)"] if images else []))
    print(f"{run_dir} holds {held} of a run that stopped before its first checkpoint; starting it over.", flush=True)
    for path in old:
        path.unlink()
    for folder in (run_dir / "samples", run_dir / "figures"):  # emptied: as a new run finds its folder
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a run folder the run cannot write to: itself, the subfolders it writes previews and
    figures into, or the log it appends to (a resumed run found out at its first preview, after loading its data
    and training up to it). Files it replaces whole (checkpoint, config) need only their folder."""
    paths = [run_dir, run_dir / "samples", run_dir / "figures", run_dir / "metrics.jsonl"]
    for path in paths:
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise UserError(f"{path} is read-only, and this run writes {'into it' if path.is_dir() else 'to it'}; "
                            f"make it writable (chmod u+w {path}) and run the same command again.")


def check_same_run(spec: StageSpec, config: Any, data_info: dict, saved: dict, run_dir: Path) -> None:
    """Refuse to resume on data that no longer is what the checkpoint was trained on."""
    def normal(x: Any) -> Any:
        return json.loads(json.dumps(x))

    was, now = normal(saved["data_info"]), normal(data_info)
    changed = [k for k in was if k in now and was[k] != now[k]]  # older checkpoints lack some keys
    if changed:
        key = changed[0]
        what = ("the images, labels or parameters themselves (content fingerprint)" if key == "fingerprint"
                else "the held-out test images (content fingerprint)" if key == "test_fingerprint"
                else f"{key} was {was[key]!r}, now {now[key]!r}")
        if key == "test_fingerprint" and config.data.test_dataset in SPLITS_WITH_TEST:
            raise UserError(f"--test-dataset {config.data.test_dataset} now reads its test split (a run made before "
                            f"read its training split under that name), so {run_dir} cannot resume on the same test "
                            f"images; start a new --run-dir.")
        raise UserError(f"The data changed since {run_dir} was checkpointed ({what}); restore it, or start a new "
                        f"--run-dir.")
    # Through from_dict, so keys an older toolkit wrote and this one retired do not count as a change.
    now, was = normal(to_dict(config)), normal(to_dict(from_dict(spec.config_class, saved["config"])))
    for cfg in (now, was):
        for name in RESUMABLE:
            section, field = name.split(".", 1)
            cfg[section].pop(field, None)
    if now != was:
        raise UserError(f"The run in {run_dir} no longer resolves to the config it was trained with; restore its "
                        f"data and settings, or start a new --run-dir.")


def check_on_device(config: Any, device: torch.device, world_size: int = 1) -> None:
    """Refuse options `device` cannot run, before any work: a --kernels backend it lacks, --compile where that
    cannot work, an --amp it has no arithmetic for, and batches (split over `world_size` processes) or preview grids
    whose images alone outgrow its memory. (--num-workers is checked against the machine by the caller, which
    knows whether the value came from a checkpoint.)"""
    train = config.train
    kernels.resolve(train.kernels, device)
    check_compile(train.compile, device)
    autocast_dtype(train.amp, device)
    if train.batch_size % world_size:
        raise UserError(f"--batch-size {train.batch_size} must split evenly across the {world_size} processes; use "
                        f"a multiple of {world_size}.")
    check_batch_fits(train.batch_size // world_size, config.data.resolution, "--batch-size", device)
    check_batch_fits(train.preview_images, config.data.resolution, "--preview-images", device)


def train(spec: StageSpec, args: argparse.Namespace, runtime: Runtime) -> dict:
    """Run one stage's training as the parsed `args` say, after any run it needs first."""
    run_dir = args.run_dir or Path("runs") / args.preset
    with contextlib.ExitStack() as held:
        # Every check before any work; under torchrun one process reports a failure, the others stop quietly.
        with distributed.together(runtime):
            if runtime.is_main:  # it holds the run directory for the whole run: a second run into it is refused
                held.enter_context(FolderLock(run_dir))
            config, saved = resolve_config(spec, args, run_dir)
            if saved is not None and getattr(args, "preset_given", False) and runtime.is_main:
                print(f"Note: --preset {args.preset} is not read when resuming: the run in {run_dir} goes on with the "
                      f"configuration its checkpoint holds.", flush=True)
            check_on_device(config, runtime.device, runtime.world_size)
            kernels.use(config.train.kernels, runtime.device)
            # Here, not in the config: a run resumes on a machine with fewer cores, given a --num-workers of its own.
            recorded = saved is not None and "data.num_workers" not in given_arguments(args)
            check_num_workers(config.data.num_workers, run_dir / "checkpoint.pt" if recorded else None)
            if runtime.is_main:
                check_writable(run_dir)
        if spec.prerequisite is not None and saved is None:  # a resumed run has everything in its checkpoint
            need = spec.prerequisite(config, args.device)
            if need is not None:
                if runtime.is_main:
                    print(need.message, flush=True)
                first = parse_stage_args(need.spec, need.argv)
                try:
                    train(need.spec, first, runtime)
                except cli.RunInterrupted as stop:
                    raise stop.told_from(f"in the {need.spec.name} run {first.run_dir} that --stage {spec.name} "
                                         f"trains first", "run the same command again to go on from where it "
                                         "stopped.") from stop
        if (saved is not None and saved["step"] == config.train.steps  # a resubmitted job that had finished
                # ... and wrote what its last checkpoint owed (else the trainer writes it); every process agrees
                and not distributed.any_process(bool(missing_outputs(run_dir, saved, config.train.steps)), runtime)):
            summary = finished_run(run_dir, config.train.steps, runtime)
        else:
            with distributed.together(runtime):  # a bad image or cache: told once, not by every process
                config, stage = spec.build(config, runtime, saved, run_dir)
                if saved is not None:
                    check_same_run(spec, config, stage.data_info, saved, run_dir)
            if saved is None and runtime.is_main:
                start_over_if_killed(run_dir)
            summary = Trainer(stage, config.train, run_dir, runtime, resume_from=saved,
                              num_workers=config.data.num_workers, advice=config.divergence_advice).run()
    if runtime.is_main:
        where = f"Samples: {summary['final_grid']}  " if summary["final_grid"] else ""
        # No loss before a first step (--steps 0: the initial weights, their preview and checkpoint).
        loss = "none yet" if math.isnan(summary["loss"]) else f"{summary['loss']:.4f}"
        print(f"Done ({spec.name}): step {summary['step']}, loss {loss}, {summary['seconds']:.0f} s. "
              f"{where}Checkpoint: {summary['checkpoint']}", flush=True)
    return summary


def run(spec: StageSpec, args: argparse.Namespace) -> dict:
    """`train` in a process group of its own (one process, or each of torchrun's), torn down at the end."""
    runtime = distributed.setup(args.device)
    try:
        return train(spec, args, runtime)
    finally:
        distributed.teardown(runtime)
