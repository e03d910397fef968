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

from core import cli

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    cli.catch_early_sigterm()

import argparse
import sys

from core.contract import StageSpec
from core.errors import UserError
from stages import DEFAULT_STAGE, STAGES, get_stage
from training.run import add_sections, common_parser, run, stage_parser


def full_help() -> str:
    """The common options once, then every stage's own options with their defaults."""
    parts = [common_parser(STAGES[DEFAULT_STAGE], tuple(STAGES), __doc__).format_help()]
    for spec in STAGES.values():
        sections = cli.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
        add_sections(sections, spec)
        parts.append(f"\nOptions of --stage {spec.name}: {spec.summary} "
                     f"(presets: {', '.join(spec.presets)}; defaults shown are {spec.default_preset}'s)\n\n"
                     + sections.format_help())
    return "".join(parts)


def parse_args(argv: list[str] | None = None) -> tuple[StageSpec, argparse.Namespace]:
    """The stage named by --stage (ddpm when none is), and the command line parsed with its options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = cli.ArgumentParser(prog="train.py", add_help=False)  # a bad --stage is one line too
    pre.add_argument("--stage", choices=tuple(STAGES), default=DEFAULT_STAGE)
    pre.add_argument("-h", "--help", action="store_true")
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.help and not any(a == "--stage" or a.startswith("--stage=") for a in argv):
        print(full_help())
        raise SystemExit(0)
    spec = get_stage(known.stage)
    owner = next((other.name for other in STAGES.values() if known.preset in other.presets), None)
    if known.preset not in (None, *spec.presets) and owner is not None:  # a preset of another stage: say which
        refused = UserError(f"--preset {known.preset} is a preset of --stage {owner}, and this is --stage {spec.name}; "
                            f"pass --stage {owner}.")
        refused.every_process = True  # every torchrun process parses the same command line: rank 0 says it
        raise refused
    args = stage_parser(spec, tuple(STAGES), __doc__).parse_args(argv)
    args.preset_given = known.preset is not None  # (a resume keeps its checkpoint's config: it says so)
    return spec, args


def main(argv: list[str] | None = None) -> dict:
    return run(*parse_args(argv))


if __name__ == "__main__":
    cli.main(main)
