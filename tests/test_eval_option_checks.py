"""Options of the evaluation tools (FID, the results table, the quality sweep, sample.py's sweeps and bins) that were
accepted without effect, or refused only after long work: each is now refused when the command starts, in one
sentence, before anything is read or written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fid
import sample
from core.errors import UserError
from data import DatasetInfo
from ddpm.conditioning import requested, sweep_columns
from data.writer import MAX_BINS
from evaluate import experiment, sweep
from fid.__main__ import run as fid_main
from helpers import RES, colour_folder
from test_gradcam import classifier_checkpoint

CPU = ["--device", "cpu"]


def the_error(capsys) -> str:
    """The one line a refused command printed (progress bars and warnings aside)."""
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def image_folder(root: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(root / f"{k}.png")
    return root


# ---------------------------------------------------------------------------------------------
# python -m fid


def test_inception_weights_with_a_classifiers_features_are_refused_before_anything_is_read(tmp_path, capsys,
                                                                                            monkeypatch):
    """--weights chooses Inception's weights, which --features replaces: the two together were accepted, and the
    weights silently not read."""
    monkeypatch.setattr("fid.features.build_fid_inception", lambda weights: pytest.fail("Inception was built"))
    monkeypatch.setattr("fid.features.ClassifierFeatures", lambda *args: pytest.fail("the classifier was read"))
    a, b = image_folder(tmp_path / "a", 2, seed=0), image_folder(tmp_path / "b", 2, seed=1)
    (tmp_path / "weights.pth").write_bytes(b"Inception weights")
    assert fid_main([str(a), str(b), "--features", str(tmp_path / "clf.pt"), "--weights", str(tmp_path / "weights.pth"),
                     *CPU]) == 1
    assert re.fullmatch(r"error: --weights names Inception's weights, which --features CKPT replaces .*; drop "
                        r"--weights \(or --features\)\.", the_error(capsys))
    with pytest.raises(UserError, match="drop --weights"):  # the Python API as well
        fid.fid_between(a, b, fid.FeatureOptions(weights="w.pth", features=tmp_path / "clf.pt", device="cpu"))


def test_save_stats_writes_nothing_before_the_statistics_and_makes_missing_folders_with_them(tmp_path, capsys):
    """Like every output of the toolkit (--out, --run-dir, --dataset-out), a missing folder on the way to OUT.npz is
    made; but only once there is something to write in it, not at start-up: a command refused or failing while it
    computes (here an image that cannot be decoded) leaves no empty folders behind."""
    ckpt = classifier_checkpoint(tmp_path / "clf.pt", 0)
    images = image_folder(tmp_path / "images", 3, seed=0)
    (images / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    stats = tmp_path / "new" / "deeper" / "real.npz"
    options = ["--features", str(ckpt), "--num-workers", "0", *CPU]
    assert fid_main(["--save-stats", str(images), str(stats), *options]) == 1
    assert "Cannot read image" in the_error(capsys)
    assert not (tmp_path / "new").exists()
    (images / "3.png").unlink()
    assert fid_main(["--save-stats", str(images), str(stats), *options]) == 0
    assert fid.load_statistics(stats).mu.shape == (512,)


# ---------------------------------------------------------------------------------------------
# a synthetic set that is the real images


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    return {name: colour_folder(tmp_path / name, 2, seed=seed) for seed, name in enumerate(("real", "synth", "test"))}


def table_argv(folders: dict[str, Path], out: Path, synthetic: str, *passed: str) -> list[str]:
    return ["--real", f"folder:{folders['real']}", "--synthetic", f"gen={synthetic}", "--test",
            f"folder:{folders['test']}", "--seeds", "1", "--out", str(out), *CPU, "--", "--target", "class",
            "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0", "--batch-size", "6", *passed]


@pytest.fixture
def nothing_read(monkeypatch):
    """The table fails the test if it reads a single image."""
    monkeypatch.setattr(experiment, "load_dataset", lambda *args, **kwargs: pytest.fail("images were read"))


@pytest.mark.parametrize("which, written", [
    ("real", "{folder}/"),          # one folder, however its path is written
    ("real", "{folder}/../real"),
    ("test", "{folder}"),
])
def test_a_synthetic_set_that_is_the_real_or_test_images_is_refused_at_start(folders, tmp_path, nothing_read, which,
                                                                             written):
    synthetic = "folder:" + written.format(folder=folders[which])
    with pytest.raises(UserError, match=rf"^--synthetic gen {re.escape(synthetic)} names the images of --{which} "):
        experiment.main(table_argv(folders, tmp_path / "out", synthetic))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("classes", [(), ("blue", "green", "red")])
def test_a_synthetic_folder_without_images_is_refused_as_such(folders, tmp_path, nothing_read, classes):
    """It was refused as one whose classes (none) differ from --test's, though its class folders may be there."""
    empty = tmp_path / "empty"
    for name in ("", *classes):
        (empty / name).mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserError, match=rf"^--synthetic gen folder:{re.escape(str(empty))} holds no images \(in class "
                                        r"folders or not\); put images in it"):
        experiment.main(table_argv(folders, tmp_path / "out", f"folder:{empty}"))
    assert not (tmp_path / "out").exists()


def test_a_built_in_source_as_both_real_and_synthetic_is_refused_too(folders, tmp_path, nothing_read):
    argv = table_argv(folders, tmp_path / "out", "plumes")
    argv[argv.index("--real") + 1] = "plumes"
    with pytest.raises(UserError, match=r"^--synthetic gen plumes names the images of --real \(plumes\)"):
        experiment.main(argv)


def test_real_or_test_images_inside_the_folders_a_sweep_fills_are_refused_at_start(folders, tmp_path):
    """The sweep writes its synthetic sets into OUT/sets/SETTING: one given as --test would be measured against
    itself. (Refused with the options, before the model or the judge is read: neither exists here.)"""
    out = tmp_path / "sweep"
    inside = colour_folder(out / "sets" / "ddim-50-g1", 2, seed=5)
    for option in ("--real", "--test"):
        argv = ["--ckpt", str(tmp_path / "model.pt"), "--judge", str(tmp_path / "judge.pt"), "--real",
                f"folder:{folders['real']}", "--test", f"folder:{folders['test']}", "--out", str(out), *CPU]
        argv[argv.index(option) + 1] = f"folder:{inside}"
        with pytest.raises(UserError, match=rf"^{option} folder:\S+ lies inside --out \S+, which this sweep fills "
                                            rf"with synthetic images"):
            sweep.main(argv)
    best = tmp_path / "best"
    argv = ["--ckpt", str(tmp_path / "model.pt"), "--judge", str(tmp_path / "judge.pt"), "--real",
            f"folder:{folders['real']}", "--test", f"folder:{colour_folder(best / 'part', 2, seed=6)}", "--out",
            str(out), "--write-best", str(best), "--write-per-class", "2", *CPU]
    with pytest.raises(UserError, match=r"^--test folder:\S+ lies inside --write-best"):
        sweep.main(argv)


# ---------------------------------------------------------------------------------------------
# sample.py's sweep of classes, and the bins of --classes


INFO = DatasetInfo("folder:x", RES, 3, ("blue", "green", "red"), (), (), 6)


@pytest.mark.parametrize("spec, twice", [("class=red,blue,red", "red"), ("class=green,1", "green")])
def test_a_class_named_twice_in_a_sweep_is_refused_naming_it(spec, twice):
    base = requested("class", INFO, [0, 1], seed=0)
    assert sweep_columns("class=red,blue", "class", INFO, base)[1] == ["red", "blue"]
    with pytest.raises(UserError, match=rf"^--sweep {spec} names the class {twice} twice; name each class once\.$"):
        sweep_columns(spec, "class", INFO, base)


def test_a_sweep_sample_py_refuses_is_refused_before_its_output_folder_is_made(class_ckpt, tmp_path):
    out = tmp_path / "grid"
    with pytest.raises(UserError, match="names the class red twice"):
        sample.main(["--ckpt", str(class_ckpt), "--sweep", "class=red,red", "--num", "1", "--steps", "2",
                     "--out", str(out), *CPU])
    assert not out.exists()


@pytest.mark.parametrize("parse", [
    lambda classes: sample.parse_args(["--dataset-out", "set", "--classes", classes]),
    lambda classes: sweep.parse_args(["--ckpt", "m.pt", "--judge", "j.pt", "--real", "plumes", "--test", "plumes",
                                      "--classes", classes])[0],
], ids=["sample.py", "evaluate.sweep"])
def test_the_bins_of_classes_are_bounded_as_the_command_line_is_parsed(parse, capsys):
    assert parse(f"wind:{MAX_BINS}:0:1").classes == f"wind:{MAX_BINS}:0:1"
    for bins in (MAX_BINS + 1, 2_000_000_000):
        with pytest.raises(SystemExit):
            parse(f"wind:{bins}")
        assert re.fullmatch(rf"error: argument --classes: K of wind:{bins} is {bins:,} but must be at most "
                            rf"{MAX_BINS} \(each bin is a class folder\); see .+ --help\.", the_error(capsys))


# ---------------------------------------------------------------------------------------------
# options after -- for the classifier runs


@pytest.mark.parametrize("passed, message", [
    (["--amp", "fp16"], r"^--amp fp16 needs a CUDA GPU"),                                    # against the device
    (["--batch-size", "100000000"], r"^--batch-size 100000000 asks for 16x16 images whose pixels alone take"),
    (["--new-head"], r"^--new-head replaces the output layer of the --init-from network"),  # the stage's own check
])
def test_training_options_after_the_separator_are_checked_before_any_image_is_read(folders, tmp_path, nothing_read,
                                                                                   passed, message):
    """Checked when the first run started: after every set was decoded and checked, and (for a run further down the
    table) after the runs before it had trained."""
    with pytest.raises(UserError, match=message):
        experiment.main(table_argv(folders, tmp_path / "out", f"folder:{folders['synth']}", *passed))
    assert not (tmp_path / "out").exists()


def test_each_new_rows_run_is_parsed_once_at_start_up(folders, tmp_path, monkeypatch):
    """check_first_runs resolved every new row's config, then parsed the first row's options again for the device
    checks; the config it resolved serves both."""
    import argparse
    import torch
    from evaluate import runs
    parsed, parse = [], runs.parse_stage_args
    monkeypatch.setattr(runs, "parse_stage_args", lambda *a: parsed.append(a) or parse(*a))
    plan = [(runs.Row("real", f"folder:{folders['real']}"), tmp_path / "runs" / "real" / "seed0"),
            (runs.Row("gen", f"folder:{folders['synth']}", synthetic="gen"), tmp_path / "runs" / "gen" / "seed0")]
    args = argparse.Namespace(device="cpu", preset="classify-demo", test=f"folder:{folders['test']}")
    passed = ["--target", "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0"]
    runs.check_first_runs(plan, args, passed, torch.device("cpu"))
    assert len(parsed) == len(plan)
    with pytest.raises(UserError, match=r"^--amp fp16 needs a CUDA GPU"):  # the device is still checked
        runs.check_first_runs(plan, args, [*passed, "--amp", "fp16"], torch.device("cpu"))


def test_the_sweeps_training_options_are_checked_before_anything_is_drawn(class_ckpt, tmp_path, monkeypatch):
    real, test = colour_folder(tmp_path / "real", 2, seed=0), colour_folder(tmp_path / "test", 2, seed=1)
    judge = classifier_checkpoint(tmp_path / "judge.pt", 0, ("blue", "green", "red"))
    monkeypatch.setattr(sweep, "draw_sets", lambda *args: pytest.fail("sets were drawn"))
    argv = ["--ckpt", str(class_ckpt), "--judge", str(judge), "--real", f"folder:{real}", "--test", f"folder:{test}",
            "--steps", "2", "--per-class", "2", "--out", str(tmp_path / "out"), *CPU, "--train", "--", "--target",
            "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0", "--amp", "fp16"]
    with pytest.raises(UserError, match=r"^--amp fp16 needs a CUDA GPU"):
        sweep.main(argv)
    assert not (tmp_path / "out").exists()


def test_test_samples_beyond_the_test_images_are_said_once_before_any_run_trains(tmp_path, capsys, monkeypatch):
    """--test-samples after -- asking for more images than --test holds became all of them in every run, unsaid."""
    class Trained(Exception):
        pass

    def train_plan(*args, **kwargs):
        raise Trained
    monkeypatch.setattr(experiment, "train_plan", train_plan)
    real, synth, test = (colour_folder(tmp_path / name, 2, seed=k) for k, name in enumerate(("real", "synth", "test")))
    argv = ["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synth}", "--test", f"folder:{test}", "--seeds",
            "2", "--out", str(tmp_path / "out"), *CPU, "--", "--target", "class", "--resolution", str(RES)]
    with pytest.raises(Trained):
        experiment.main(argv + ["--test-samples", "50"])
    said = capsys.readouterr().out.splitlines()
    assert said.count(f"--test-samples 50 asks for more images than --test folder:{test} holds (6); using 6.") == 1
    with pytest.raises(Trained):
        experiment.main(argv + ["--test-samples", "6"])
    assert "asks for more" not in capsys.readouterr().out
