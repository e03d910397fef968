"""Train a model: `python train.py --stage ddpm` runs a stage's demo preset on the built-in plumes data.

Stages: ddpm (pixel diffusion), vae (the KL autoencoder of latent diffusion), ldm (latent
diffusion; it trains the default VAE first when that has no checkpoint yet), classify (ResNet-18
on real, synthetic or mixed images, judged on held-out real ones), invert (one learned
conditioning vector per real image against a frozen ddpm or ldm model, given with --model).
Everything a run writes lives in its run directory: config.json, checkpoint.pt, metrics.jsonl,
samples/. This help lists every stage's options; with a stage given (--stage NAME --help), only
that stage's. Launch with `torchrun --nproc_per_node N train.py ...` to train on N GPUs with
DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import kernels
from core import cli
from core.checkpoint import load_checkpoint, require_keys
from core.config import add_config_arguments, apply_arguments, from_dict, given_arguments, to_dict
from core.lock import FolderLock
from core.runtime import Runtime
from core.stages import StageSpec
from data import check_spec
from stages import DEFAULT_STAGE, STAGES, get_stage
from training import distributed
from training.loop import RunExists, Trainer


def _common_parser(spec: StageSpec, **kwargs: Any) -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument("--stage", choices=tuple(STAGES), default=DEFAULT_STAGE,
                        help=f"what to train (default: {DEFAULT_STAGE})")
    parser.add_argument("--preset", choices=tuple(spec.presets), default=spec.default_preset,
                        help=f"starting configuration of the stage; the options below override it "
                             f"(default: {spec.default_preset})")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the run is written (default: runs/PRESET)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its checkpoint (default: off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {cli.DEBUG_ENV}=1) (default: off)")
    return parser


def _add_sections(parser: argparse.ArgumentParser, spec: StageSpec) -> None:
    shown = spec.presets[spec.default_preset]()
    for section in spec.sections:
        add_config_arguments(parser, section.name, section.cls, getattr(shown, section.name), skip=section.skip,
                             help_overrides=dict(section.help))


def stage_parser(spec: StageSpec) -> argparse.ArgumentParser:
    parser = _common_parser(spec)
    _add_sections(parser, spec)
    return parser


def full_help() -> str:
    """The common options once, then every stage's own options with their defaults."""
    parts = [_common_parser(STAGES[DEFAULT_STAGE]).format_help()]
    for spec in STAGES.values():
        sections = cli.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
        _add_sections(sections, spec)
        parts.append(f"\nOptions of --stage {spec.name}: {spec.summary} "
                     f"(presets: {', '.join(spec.presets)}; defaults shown are {spec.default_preset}'s)\n\n"
                     + sections.format_help())
    return "".join(parts)


def parse_args(argv: list[str] | None = None) -> tuple[StageSpec, argparse.Namespace]:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=tuple(STAGES), default=DEFAULT_STAGE)
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    stage_given = any(a == "--stage" or a.startswith("--stage=") for a in argv)
    if known.help and not stage_given:
        print(full_help())
        raise SystemExit(0)
    spec = get_stage(known.stage)
    return spec, stage_parser(spec).parse_args(argv)


def with_options(spec: StageSpec, config: Any, args: argparse.Namespace) -> Any:
    """`config` with the options the user typed applied, section by section."""
    for section in spec.sections:
        config = apply_arguments(config, args, section.name)
    return config


def resolve_config(spec: StageSpec, args: argparse.Namespace, run_dir: Path) -> tuple[Any, dict | None]:
    """The run's config: its checkpoint's when resuming (only options in `spec.resumable` may change),
    else the preset's, with the user's options applied either way; then every check that needs no data."""
    saved = None
    checkpoint = run_dir / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to resume; drop --resume to start a new run there.")
        saved = load_checkpoint(checkpoint, spec.name)
        require_keys(saved, ("config", "data_info", "step", "models", "ema", "optimizers", "scaler", "rng"), checkpoint)
        fixed = sorted(set(given_arguments(args)) - spec.resumable)
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot change when resuming (the checkpoint fixes them); "
                             f"drop them or start a new --run-dir.")
        config = from_dict(spec.config_class, saved["config"])
    else:
        if checkpoint.exists():
            raise RunExists(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir.")
        if (run_dir / "metrics.jsonl").exists():
            raise RunExists(f"{run_dir} holds metrics.jsonl from a run that never saved a checkpoint; delete that folder "
                            f"to start over there, or choose another --run-dir.")
        config = spec.presets[args.preset]()
    config = with_options(spec, config, args)
    check_spec(config.data.dataset)
    if spec.check is not None:
        spec.check(config)
    return config, saved


def _check_same_run(spec: StageSpec, config: Any, data_info: dict, saved: dict, run_dir: Path) -> None:
    """Refuse to resume on data that no longer is what the checkpoint was trained on."""
    def normal(x: Any) -> Any:
        return json.loads(json.dumps(x))

    was, now = normal(saved["data_info"]), normal(data_info)
    changed = [k for k in was if k in now and was[k] != now[k]]  # older checkpoints lack some keys
    if changed:
        key = changed[0]
        what = ("the images, labels or parameters themselves (content fingerprint)" if key == "fingerprint"
                else f"{key} was {was[key]!r}, now {now[key]!r}")
        raise ValueError(f"The data changed since {run_dir} was checkpointed ({what}); restore it, or start a new "
                         f"--run-dir.")
    resumable = {name.split(".", 1)[1] for name in spec.resumable if name.startswith("train.")}
    now, was = normal(to_dict(config)), normal(saved["config"])
    for cfg in (now, was):
        cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in resumable}
    if now != was:
        raise ValueError(f"The run in {run_dir} no longer resolves to the config it was trained with; restore its "
                         f"data and settings, or start a new --run-dir.")


def train(spec: StageSpec, args: argparse.Namespace, runtime: Runtime) -> dict:
    """Run one stage's training as the parsed `args` say, after any run it needs first."""
    run_dir = args.run_dir or Path("runs") / args.preset
    # The main process holds the run directory for the whole run: a second run into it is refused.
    with FolderLock(run_dir) if runtime.is_main else contextlib.nullcontext():
        config, saved = resolve_config(spec, args, run_dir)
        kernels.use(config.train.kernels, runtime.device)  # refuses a backend this device cannot run, before any work
        if config.train.batch_size % runtime.world_size:
            raise ValueError(f"--batch-size {config.train.batch_size} must split evenly across the "
                             f"{runtime.world_size} processes; use a multiple of {runtime.world_size}.")
        if spec.prerequisite is not None and saved is None:  # a resumed run has everything in its checkpoint
            need = spec.prerequisite(config, args.device)
            if need is not None:
                if runtime.is_main:
                    print(need.message, flush=True)
                need_spec, need_args = parse_args(list(need.argv))
                train(need_spec, need_args, runtime)
        config, stage = spec.build(config, runtime, saved)
        if saved is not None:
            _check_same_run(spec, config, stage.data_info, saved, run_dir)
        summary = Trainer(stage, config.train, run_dir, runtime, resume_from=saved,
                          num_workers=config.data.num_workers).run()
    if runtime.is_main:
        where = f"Samples: {summary['final_grid']}  " if summary["final_grid"] else ""
        print(f"Done ({spec.name}): step {summary['step']}, loss {summary['loss']:.4f}, {summary['seconds']:.0f} s. "
              f"{where}Checkpoint: {summary['checkpoint']}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict:
    spec, args = parse_args(argv)
    runtime = distributed.setup(args.device)
    try:
        return train(spec, args, runtime)
    finally:
        distributed.teardown(runtime)


if __name__ == "__main__":
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)
    sys.exit(cli.run(main))
