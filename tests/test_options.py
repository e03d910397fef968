"""Options do what they say: every option `train.py --stage NAME --help` lists is read by that stage.

Each stage runs once, tiny, end to end (options checked, data loaded, model built, one step trained,
then previewed, evaluated and checkpointed) while every read of a config field is recorded. An option
whose field that run never reads changes nothing for the stage, so listing it is a lie: it must be
hidden with its section's `skip` (as --preview-steps is for the autoencoder, whose previews are
reconstructions, and the weight-average options for stages that keep none). The runs take the
branches that read the most fields (a discriminator from step 0, an extra dataset, a conditional model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from types import CodeType
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

import train
from helpers import RES, tiny_args
from stages import STAGES

# Code that reads every field without using it: the dataclass machinery (asdict, replace and the
# generated __eq__, __repr__ and __init__, whose code has no file), and core/config.py, which turns
# configs into command lines and dicts.
PLUMBING = (str(Path(dataclasses.__file__)), "<string>", str(Path(__file__).parents[1] / "core" / "config.py"))


def a_use(code: CodeType) -> bool:
    """Whether a read from `code` uses the field: validation in __post_init__ and plumbing do not."""
    return code.co_name != "__post_init__" and code.co_filename not in PLUMBING


@contextlib.contextmanager
def fields_read(classes: set[type]) -> Iterator[set[tuple[type, str]]]:
    """The (config class, field) pairs the code run inside reads from instances of `classes`."""
    read: set[tuple[type, str]] = set()
    patched = []
    for cls in classes:
        names = frozenset(f.name for f in dataclasses.fields(cls))

        def spy(self, name, cls=cls, names=names, original=cls.__getattribute__):
            if name in names and a_use(sys._getframe(1).f_code):
                read.add((cls, name))
            return original(self, name)

        patched.append((cls, cls.__dict__.get("__getattribute__")))
        cls.__getattribute__ = spy
    try:
        yield read
    finally:
        for cls, own in patched:
            if own is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = own


def listed_options(stage: str) -> dict[str, tuple[type, str]]:
    """The options `train.py --stage STAGE --help` lists, each with the config class and field it sets."""
    spec = STAGES[stage]
    classes = {section.name: section.cls for section in spec.sections}
    _, args = train.parse_args(["--stage", stage])
    options = {}
    for dest in vars(args):
        if "." in dest:
            section, name = dest.split(".", 1)
            options[f"--{name.replace('_', '-')}"] = (classes[section], name)
    return options


def stage_argv(stage: str, root: Path, folder: Path) -> list[str]:
    """A run of `stage` that takes a second or two, on the labelled folder `folder`."""
    run_dir, data = root / stage, ["--dataset", f"folder:{folder}", "--resolution", str(RES)]
    # Two steps: after the last one the loop checkpoints, logs and previews whatever --*-every say.
    common = ["--stage", stage, "--run-dir", str(run_dir), "--device", "cpu", "--steps", "2", "--warmup-steps", "1",
              "--batch-size", "4", "--log-every", "1", "--sample-every", "0", "--cache-dir", str(root / "cache")]
    if stage == "ddpm":
        return ["--stage", "ddpm", *tiny_args(run_dir, folder, "--cond", "class", steps=2)]
    if stage == "vae":
        return [*common, *data, "--base-channels", "8", "--channel-mult", "1", "2", "--num-res-blocks", "1",
                "--latent-channels", "2", "--perceptual", "random", "--perceptual-taps", "1", "--disc-start", "0",
                "--disc-layers", "1", "--test-samples", "2", "--scale-samples", "4", "--preview-images", "2"]
    if stage == "ldm":
        return [*common, *data, "--vae-ckpt", str(root / "vae" / "checkpoint.pt"), "--base-channels", "32",
                "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions", "4",
                "--num-timesteps", "10", "--preview-images", "2", "--preview-steps", "2", "--cond", "class"]
    if stage == "classify":
        return [*common, *data, "--target", "class", "--extra-dataset", f"folder:{folder}", "--extra-fraction", "0.5",
                "--test-samples", "2"]
    assert stage == "invert"
    return [*common, *data, "--model", str(root / "ddpm" / "checkpoint.pt"), "--preview-images", "2",
            "--preview-steps", "2", "--eval-images", "2", "--eval-timesteps", "2"]


@pytest.fixture(scope="module")
def reads(tmp_path_factory) -> dict[str, set[tuple[type, str]]]:
    """The config fields each stage's tiny run reads (ldm encodes with the vae run's autoencoder, invert
    learns against the ddpm run's model, so the order matters)."""
    root = tmp_path_factory.mktemp("options")
    folder = root / "images"
    rng = np.random.default_rng(0)
    for k in range(6):
        (folder / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(folder / f"class{k % 2}" / f"{k}.png")
    found = {}
    for stage in ("ddpm", "vae", "ldm", "classify", "invert"):
        classes = {cls for cls, _ in listed_options(stage).values()}
        with fields_read(classes) as read:
            train.main(stage_argv(stage, root, folder))
        found[stage] = read
    return found


def test_the_recorder_sees_uses_and_ignores_plumbing():
    @dataclasses.dataclass(frozen=True)
    class Options:
        used: int = 1
        checked: int = 2
        unused: int = 3

        def __post_init__(self):
            assert self.checked > 0

    with fields_read({Options}) as read:
        options = dataclasses.replace(Options(), unused=4)
        dataclasses.asdict(options), repr(options), options == Options()
        options.used
    assert read == {(Options, "used")}
    assert "__getattribute__" not in Options.__dict__


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_listed_option_is_read_by_its_stage(reads, stage):
    idle = [option for option, field in listed_options(stage).items() if field not in reads[stage]]
    assert not idle, (f"train.py --stage {stage} --help lists {', '.join(idle)}, which the stage never reads; hide "
                      f"them with their Section's skip, or make them do what they say")


def test_every_command_line_builds_under_the_boolean_options_of_python_3_14(monkeypatch, capsys):
    """Python 3.14 removed BooleanOptionalAction's type, choices and metavar (deprecated since 3.12): passing any
    of them, even as None, is a TypeError there, which would stop every command before it parsed a word."""
    import argparse
    import sample
    from evaluate import consistency
    made = argparse.BooleanOptionalAction.__init__

    def as_in_python_3_14(self, option_strings, dest, **kwargs):
        removed = sorted({"type", "choices", "metavar"} & set(kwargs))
        if removed:
            raise TypeError(f"BooleanOptionalAction got unexpected keyword arguments {removed}")
        made(self, option_strings, dest, **kwargs)

    monkeypatch.setattr(argparse.BooleanOptionalAction, "__init__", as_in_python_3_14)
    assert "--hflip, --no-hflip" in train.full_help()  # every stage's options
    for parse in (sample.parse_args, consistency.main):
        with pytest.raises(SystemExit) as ended:
            parse(["--help"])
        assert ended.value.code == 0
    assert "--clip-x0, --no-clip-x0" in capsys.readouterr().out
