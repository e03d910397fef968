"""Train a model: `python train.py --stage ddpm` runs the demo preset on the built-in plumes data.

Everything a run writes lives in --run-dir: config.json, checkpoint.pt, metrics.jsonl, samples/.
Launch with `torchrun --nproc_per_node N train.py ...` to train on N GPUs with DDP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data import load_dataset
from ddpm.config import PRESETS, UNET_OPTIONS, DDPMConfig, DiffusionConfig, resolve_unet
from ddpm.stage import STAGE, make_stage
from ddpm.unet import UNetConfig
from training import distributed
from training.checkpoint import load_checkpoint
from training.config import (DataConfig, TrainConfig, add_config_arguments, apply_arguments, from_dict,
                             given_arguments, given_in)
from training.loop import fit

STAGES = (STAGE,)  # vae, ldm, classify and invert join as they are built (see ROADMAP.md)
# Options that may change when a run is resumed; everything else is fixed by the checkpoint.
RESUMABLE = {"train.steps", "train.log_every", "train.sample_every", "train.ckpt_every"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default=STAGE, help=f"what to train (default: {STAGE})")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                        help="starting configuration; the options below override it (default: demo)")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the run is written (default: runs/PRESET)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint (default: off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    shown = PRESETS["demo"]()
    add_config_arguments(parser, "data", DataConfig, shown.data)
    add_config_arguments(parser, "unet", UNetConfig, shown.unet, help_overrides=UNET_OPTIONS,
                         skip=set(vars(shown.unet)) - set(UNET_OPTIONS))
    add_config_arguments(parser, "diffusion", DiffusionConfig, shown.diffusion)
    add_config_arguments(parser, "train", TrainConfig, shown.train)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run_dir = args.run_dir or Path("runs") / args.preset
    runtime = distributed.setup(args.device)
    saved = None
    try:
        if args.resume:
            saved = load_checkpoint(run_dir / "checkpoint.pt", STAGE)
            fixed = sorted(set(given_arguments(args)) - RESUMABLE)
            if fixed:
                raise ValueError(f"{', '.join(fixed)} cannot change when resuming (the checkpoint fixes them); "
                                 f"drop them or start a new --run-dir.")
            config = from_dict(DDPMConfig, saved["config"])
        else:
            config = PRESETS[args.preset]()
            config = apply_arguments(apply_arguments(config, args, "diffusion"), args, "data")
        config = apply_arguments(config, args, "train")
        data = config.data
        dataset = load_dataset(data.dataset, data.resolution, cache_dir=data.cache_dir,
                               num_samples=data.num_samples or None)
        info = dataset.info
        if not args.resume:
            config = resolve_unet(config, info, **given_in(args, "unet"))
        stage = make_stage(config, info, runtime.device)
        summary = fit(stage, config.train, dataset, run_dir, runtime, resume_from=saved,
                      num_workers=data.num_workers)
    finally:
        distributed.teardown(runtime)
    if runtime.is_main:
        print(f"Done: step {summary['step']}, loss {summary['loss']:.4f}, {summary['seconds']:.0f} s. "
              f"Samples: {summary['final_grid']}  Checkpoint: {summary['checkpoint']}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
