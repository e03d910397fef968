"""A run that cannot work is refused at start-up, and a run that goes wrong stops before it saves.

Every network's needs from the image size, channel counts and depth are checked before any data is
loaded (the arithmetic each check uses is held against the networks themselves, on the meta device);
and in every stage a learning rate large enough to diverge ends the run with the same advice, leaving
the last good checkpoint as it was."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import train
from core import cli
from core.runtime import Runtime
from helpers import RES, noise_folder, tiny_args
from training.loop import Trainer, TrainingDiverged
from training.run import resolve_config

CPU = torch.device("cpu")


def the_error(stderr: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Six RES px RGB images in two classes."""
    return noise_folder(tmp_path_factory.mktemp("images"), 6, classes=2)


# ---------------------------------------------------------------------------------------------
# options no network can take: one line, before any data is loaded, nothing written


def stage_args(stage: str, folder: Path, *extra: str) -> list[str]:
    return ["--stage", stage, "--device", "cpu", "--dataset", f"folder:{folder}", "--resolution", str(RES), *extra]


IMPOSSIBLE = [
    # ddpm: the U-Net (an empty --channel-mult was an IndexError in the middle of building it)
    ("ddpm", ("--channel-mult", "--attention-resolutions"), "--channel-mult needs at least one level"),
    ("ddpm", ("--channel-mult", "1", "0"), "--channel-mult needs at least one level, each a positive multiplier"),
    ("ddpm", ("--num-res-blocks", "0"), "--num-res-blocks must be at least 1"),
    ("ddpm", ("--dropout", "1"), "--dropout must be in [0, 1)"),
    ("ddpm", ("--channel-mult", "1", "1", "1", "1", "1", "1", "--attention-resolutions"),
     "16x16 images (--resolution 16) do not fit the U-Net: image_size 16 must be divisible by"),
    ("ddpm", ("--attention-resolutions", "3"), "do not fit the U-Net: --attention-resolutions (3,) must be among"),
    # vae: the discriminator (a raw convolution error at the step it started), the perceptual network, the autoencoder
    ("vae", ("--disc-start", "0"), "--disc-layers 3 needs images of at least 24 px"),
    ("vae", ("--disc-start", "5", "--disc-layers", "2", "--resolution", "8"), "--disc-layers 2 needs images of at "
                                                                              "least 12 px"),
    ("vae", ("--resolution", "8", "--perceptual-taps", "5"), "--perceptual-taps 5 needs images of at least 16 px"),
    ("vae", ("--resolution", "12", "--channel-mult", "1", "2", "2", "2"),
     "12x12 images (--resolution 12) do not fit the autoencoder: resolution 12 must be divisible by the "
     "downsampling factor 8"),
    # ldm: the latents of the default autoencoder (vae-demo, f = 4), refused before that is trained
    ("ldm", ("--cond", "none", "--resolution", "18"), "--resolution 18 is not divisible by the autoencoder's downsampling factor 4"),
    ("ldm", ("--cond", "none"), "The autoencoder's latents (3x4x4) do not fit the U-Net: --attention-resolutions (8,)"),
    ("ldm", ("--cond", "none", "--attention-resolutions", "--channel-mult", "1", "1", "1", "1"),
     "latents (3x4x4) do not fit the U-Net: image_size 4 must be divisible by 8: the 4 levels of "
     "--channel-mult halve it 3 times"),
    # classify: batch norm of one image shrunk to 1x1
    ("classify", ("--target", "class", "--batch-size", "1", "--resolution", "8"),
     "ResNet-18 shrinks 8 px images to 1x1 in its last stage"),
    ("classify", ("--target", "class", "--batch-size", "1", "--resolution", "32", "--stem", "imagenet"),
     "--batch-size 1 cannot train it; pass --batch-size 2 or more, or --stem small"),
    # any stage: a batch whose images alone outgrow the machine (a typo; it stalled the machine, or failed minutes in)
    ("ddpm", ("--batch-size", "2000000000"), "--batch-size 2000000000 asks for 16x16 images whose pixels alone take "
                                             "5,722.0 GiB, more than the"),
    ("ddpm", ("--preview-images", "2000000000"), "--preview-images 2000000000 asks for 16x16 images"),
    ("classify", ("--target", "class", "--batch-size", "2000000000"), "--batch-size 2000000000 asks for 16x16 images"),
    ("vae", ("--num-workers", "100000000"), "--num-workers must be from 0 (decode in this process) to"),
]


@pytest.mark.parametrize("stage, extra, message", IMPOSSIBLE, ids=[f"{c[0]} {' '.join(c[1])}" for c in IMPOSSIBLE])
def test_options_no_network_can_take_are_refused_before_any_data_is_loaded(tmp_path, folder, monkeypatch, capsys,
                                                                         stage, extra, message):
    import classify.stage
    import ddpm.stage
    import ldm.stage
    import vae.stage

    def loading(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")
    for module in (ddpm.stage, vae.stage, ldm.stage, classify.stage):
        monkeypatch.setattr(module, "load_dataset", loading)
    monkeypatch.chdir(tmp_path)  # no default autoencoder run: the latent stage would train it first
    run_dir = tmp_path / "run"
    assert cli.run(train.main, [*stage_args(stage, folder, *extra), "--run-dir", str(run_dir)]) == 1
    assert message in the_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, and no autoencoder run either


def test_an_autoencoder_s_offline_cifar10_test_set_is_refused_before_its_data_is_loaded(tmp_path, folder, monkeypatch,
                                                                                        capsys):
    import urllib.error
    import torchvision
    import vae.stage

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    def loading(*args, **kwargs):
        raise AssertionError("data was loaded before the test set was fetched")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(vae.stage, "load_dataset", loading)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    assert cli.run(train.main, [*stage_args("vae", folder, "--test-dataset", "cifar10", "--cache-dir", str(cache)),
                                "--run-dir", str(run_dir)]) == 1
    assert the_error(capsys.readouterr().err).startswith(f"error: --test-dataset cifar10: CIFAR-10 is not in {cache}")
    assert not run_dir.exists() and not cache.exists()


def no_compiler(*args, **kwargs):
    from torch._inductor.exc import InvalidCxxCompiler
    raise InvalidCxxCompiler()


@pytest.fixture
def fresh_compiler_probe():
    """The probe's answer is kept for the process: forget it before and after a test that fakes it."""
    from core.speed import _cpp_compiler_missing
    _cpp_compiler_missing.cache_clear()
    yield
    _cpp_compiler_missing.cache_clear()


@pytest.mark.parametrize("command", ["train", "sample", "fid"])
def test_compile_without_a_cpp_compiler_is_refused_before_any_work(tmp_path, folder, class_ckpt, monkeypatch,
                                                                   capsys, command, fresh_compiler_probe):
    import torch._inductor.cpp_builder
    import ddpm.stage
    import fid.__main__
    import sample

    def loading(*args, **kwargs):
        raise AssertionError("work began before --compile was checked")
    monkeypatch.setattr(torch._inductor.cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(ddpm.stage, "load_dataset", loading)
    monkeypatch.setattr("sampling.command.Drawer", loading)
    out = tmp_path / "out"
    entry, args = {
        "train": (train.main, [*stage_args("ddpm", folder), "--run-dir", str(out), "--compile"]),
        "sample": (sample.main, ["--ckpt", str(class_ckpt), "--out", str(out), "--device", "cpu", "--compile"]),
        "fid": (fid.__main__.main, [str(folder), str(folder), "--files", "all", "--weights", "random", "--device",
                                    "cpu", "--compile"]),
    }[command]
    assert cli.run(entry, args) == 1
    assert "--compile needs a working C++ compiler" in the_error(capsys.readouterr().err) and not out.exists()


def test_a_sampling_batch_larger_than_the_machine_is_refused_before_any_work(tmp_path, class_ckpt, monkeypatch, capsys):
    import sample

    def drawing(*args, **kwargs):
        raise AssertionError("drawing began before --batch-size was checked")
    monkeypatch.setattr("sampling.draw.Drawer.__call__", drawing)
    memory = 2**30  # a machine of 1 GiB: 3x16x16 fp32 images are 3 KiB each, 349,525 fill it
    monkeypatch.setattr("core.runtime.device_memory", lambda device: memory)
    out = tmp_path / "out"
    base = ["--ckpt", str(class_ckpt), "--out", str(out), "--device", "cpu"]
    assert cli.run(sample.main, [*base, "--batch-size", "400000", "--num", "400000"]) == 1
    assert ("--batch-size 400000 asks for 16x16 images whose pixels alone take 1.1 GiB, more than the 1.0 GiB of "
            "memory this machine has; give a smaller --batch-size.") in the_error(capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(AssertionError, match="drawing began"):  # a batch capped by --num is no more than it draws
        sample.main([*base, "--batch-size", "400000", "--num", "300000"])


@pytest.mark.parametrize("command", ["sweep", "consistency"])
def test_the_judging_tools_refuse_a_drawing_batch_larger_than_the_machine(tmp_path, class_ckpt, monkeypatch, capsys,
                                                                          command):
    """As sample.py: a --batch-size whose images alone outgrow the machine, counting no more than a set draws."""
    import evaluate.consistency
    import evaluate.sweep
    from helpers import colour_folder
    from test_gradcam import classifier_checkpoint

    def drawing(*args, **kwargs):
        raise AssertionError("drawing began")
    monkeypatch.setattr(f"evaluate.{'judging' if command == 'consistency' else command}.Drawer", drawing)
    monkeypatch.setattr("core.runtime.device_memory", lambda device: 2**20)  # 341 3x16x16 fp32 images fill it
    judge = classifier_checkpoint(tmp_path / "judge.pt", 0, classes=("blue", "green", "red"))
    out = tmp_path / "out"
    base = ["--ckpt", str(class_ckpt), "--judge", str(judge), "--out", str(out), "--device", "cpu"]
    if command == "sweep":
        real, test = (f"folder:{colour_folder(tmp_path / name, 1, seed=seed)}" for name, seed in (("real", 0), ("test", 1)))
        base += ["--real", real, "--test", test]
    main = getattr(evaluate, command).main
    assert cli.run(main, [*base, "--batch-size", "400", "--per-class", "150"]) == 1  # 450 per set
    told = the_error(capsys.readouterr().err)
    assert "--batch-size 400 asks for 16x16 images whose pixels alone take" in told
    assert told.endswith("memory this machine has; give a smaller --batch-size.") and not out.exists()
    with pytest.raises(AssertionError, match="drawing began"):  # 300 images per set: no batch holds more
        main([*base, "--batch-size", "400", "--per-class", "100"])


HUGE = "2000000000"
ABSURD_COUNTS = [
    ("sample", ["--num", HUGE], r"--num asks for 2,000,000,000 images, more than the 10,000,000 one command draws"),
    ("sample", ["--dataset-out", "{out}", "--per-class", "4000000"],  # 3 classes: 12 million images
     r"--per-class asks for 12,000,000 images"),
    ("sample", ["--interpolate", "--frames", "100000"], r"--frames must be at most 256"),
    ("sweep", ["--per-class", HUGE], r"--per-class asks for 2,000,000,000 images"),
    ("sweep", ["--train", "--train-seeds", HUGE], r"--train-seeds must be at most 1000"),
    ("experiment", ["--seeds", HUGE], r"--seeds must be at most 1000"),
]


@pytest.mark.parametrize("command, extra, message", ABSURD_COUNTS, ids=[" ".join(c[1][:2]) for c in ABSURD_COUNTS])
def test_absurd_counts_are_refused_before_anything_is_planned_or_written(tmp_path, class_ckpt, capsys, command, extra,
                                                                       message):
    """Two billion images were planned in memory until the machine killed the process, with no word (or a
    sweep wrote its size first, and then refused the corrected command); two billion seeds planned for ever."""
    import sample
    from evaluate import experiment, sweep
    from helpers import colour_folder
    out = tmp_path / "out"
    extra = [a.format(out=out) for a in extra]
    real, test = (f"folder:{colour_folder(tmp_path / name, 1, seed=seed)}" for name, seed in (("real", 0), ("test", 1)))
    entry, args = {
        "sample": (sample.main, ["--ckpt", str(class_ckpt), "--device", "cpu", "--steps", "2"]
                   + ([] if "--dataset-out" in extra else ["--out", str(out)])),
        "sweep": (sweep.main, ["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--real", real, "--test", test,
                               "--out", str(out), "--device", "cpu"]),
        "experiment": (experiment.main, ["--real", real, "--synthetic", f"s={test}", "--test", test, "--out",
                                         str(out)]),
    }[command]
    assert cli.run(entry, [*args, *extra]) == 1
    assert re.search(message, the_error(capsys.readouterr().err))
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_cache_dir_at_or_under_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    # It was a FileExistsError traceback, after the run folder was locked and the plumes simulated.
    from data import export
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    out = tmp_path / "out"
    entry, args = {
        "train": (train.main, ["--stage", "ddpm", "--dataset", "plumes", "--steps", "1", "--run-dir", str(out)]),
        "export": (export.main, ["plumes", str(out), "--num-samples", "4", "--resolution", str(RES)]),
    }[command]
    for cache in (file, file / "datasets"):
        assert cli.run(entry, [*args, "--cache-dir", str(cache)]) == 1
        told = the_error(capsys.readouterr().err)
        assert told == f"error: --cache-dir {cache} lies at or under the file {file}, not a folder; choose a folder."
        assert not out.exists()


def test_a_sweep_of_a_condition_takes_at_most_a_grid_of_columns(params_ckpt):
    from core.errors import UserError
    from ddpm.conditioning import MAX_COLUMNS, requested, sweep_columns
    from stages import open_source
    info = open_source(params_ckpt, CPU, "ema").model.info
    base = requested("params", info, [0], seed=0)
    name = info.param_names[0]
    assert len(sweep_columns(f"{name}=-1:1:{MAX_COLUMNS}", "params", info, base)[0]) == MAX_COLUMNS
    with pytest.raises(UserError, match=f"N from 2 to {MAX_COLUMNS}"):
        sweep_columns(f"{name}=-1:1:100000", "params", info, base)


def test_compile_on_cuda_without_a_c_compiler_for_triton_is_refused(monkeypatch):
    from core.errors import UserError
    from core.speed import check_compile
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="--compile needs a C compiler for Triton's kernel launchers"):
        check_compile(True, torch.device("cuda"))
    check_compile(False, torch.device("cuda"))  # nothing to check without --compile
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name in ("gcc", "clang") else None)
    check_compile(True, torch.device("cuda"))
    monkeypatch.setenv("CC", "/opt/no/cc")  # Triton takes CC as given, gcc or not
    with pytest.raises(UserError, match="--compile needs a C compiler"):
        check_compile(True, torch.device("cuda"))


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["train", "export", "experiment", "sweep"])
def test_an_output_folder_inside_an_image_folder_it_reads_is_refused_before_any_work(tmp_path, folder, class_ckpt,
                                                                                   capsys, command):
    """What a command wrote inside an input folder would be read as images of it next time (a consistency
    grid became an image without a params.csv row, and the folder unreadable for every command)."""
    import shutil
    from data import export
    from evaluate import experiment, sweep
    images = tmp_path / "images"
    shutil.copytree(folder, images)
    before = snapshot(images)
    inside = images / "class0" / "out"
    spec = f"folder:{images}"
    entry, args, option = {
        "train": (train.main, [*stage_args("ddpm", images), "--run-dir", str(inside)], "--run-dir"),
        "export": (export.main, [spec, str(inside)], "OUT"),
        "experiment": (experiment.main, ["--real", spec, "--synthetic", f"s={spec}", "--test", spec, "--out",
                                         str(inside)], "--out"),
        "sweep": (sweep.main, ["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--real", spec, "--test",
                               spec, "--out", str(tmp_path / "sweep"), "--write-best", str(images / "best"), "--write-num",
                               "4"], "--write-best"),
    }[command]
    assert cli.run(entry, args) == 1
    assert f"{option} " in (line := the_error(capsys.readouterr().err)) and "lies inside the image folder of" in line
    assert snapshot(images) == before and not (tmp_path / "sweep").exists()


def test_only_an_output_at_or_under_an_input_folder_is_refused(tmp_path):
    from core.errors import UserError
    from data import check_output_outside
    (tmp_path / "data").mkdir()
    # beside, above, elsewhere, and in a hidden folder inside (never read as images)
    for outside in (tmp_path / "data-out", tmp_path, tmp_path / "other" / "data", tmp_path / "data" / ".runs" / "a"):
        check_output_outside(outside, "--out", {"--real": f"folder:{tmp_path / 'data'}", "--test": "plumes"})
    for inside in (tmp_path / "data", tmp_path / "data" / "a" / "b", tmp_path / "data" / ".." / "data" / "x"):
        with pytest.raises(UserError, match=r"--out .* (is|lies inside) the image folder of --real"):
            check_output_outside(inside, "--out", {"--real": f"folder:{tmp_path / 'data'}"})


def test_an_inversion_at_another_size_than_its_model_is_refused_before_the_images_are_loaded(
        tmp_path, class_ckpt, monkeypatch, capsys):
    import invert.stage

    def loading(*args, **kwargs):
        raise AssertionError("the images were loaded before their size was checked")
    monkeypatch.setattr(invert.stage, "load_dataset", loading)
    args = ["--stage", "invert", "--run-dir", str(tmp_path / "run"), "--device", "cpu", "--model", str(class_ckpt),
            "--dataset", "plumes", "--resolution", str(2 * RES)]
    assert cli.run(train.main, args) == 1
    assert f"--resolution {2 * RES} differs from the {RES} px images the model" in the_error(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_the_discriminators_size_arithmetic_is_the_network_s():
    from vae.discriminator import PatchDiscriminator
    for layers in range(1, 5):
        with torch.device("meta"):
            net = PatchDiscriminator(3, base_channels=8, num_layers=layers).train()
        for size in range(8, 60):
            try:
                with torch.device("meta"):
                    side = net(torch.empty(2, 3, size, size)).shape[-1]
                assert side == size // 2**layers - 2, (layers, size)
            except RuntimeError:  # "Kernel size can't be greater than actual input size"
                side = 0
            assert (size >= PatchDiscriminator.min_image_size(layers)) == (side >= 1), (layers, size)


def test_the_classifier_s_size_arithmetic_is_the_network_s():
    from classify.model import ClassifierConfig, build_resnet18, check_batch_norm_fits, last_feature_map
    from core.errors import UserError
    for stem in ("small", "imagenet"):
        config = ClassifierConfig(stem=stem, num_outputs=2)
        with torch.device("meta"):
            net = build_resnet18(config, 32).train()
        sides = []
        net.layer4.register_forward_hook(lambda module, inputs, output: sides.append(output.shape[-1]))
        for size in (8, 9, 16, 17, 32, 33, 40, 65):
            sides.clear()
            for batch in (2, 1):
                try:
                    with torch.device("meta"):
                        net(torch.empty(batch, 3, size, size))
                    runs = True
                except ValueError:  # "Expected more than 1 value per channel when training"
                    runs = False
                try:
                    check_batch_norm_fits(config, size, batch)
                    accepted = True
                except UserError:
                    accepted = False
                assert accepted == runs, (stem, size, batch)
            assert sides[0] == last_feature_map(config, size), (stem, size)  # the batch of two's, at layer4


# ---------------------------------------------------------------------------------------------
# divergence: every stage stops before a diverged state replaces the last good checkpoint


def invert_args(run_dir: Path, model: Path, *extra: str) -> list[str]:
    dataset = json.loads((model.parent / "config.json").read_text())["data"]["dataset"]
    return ["--stage", "invert", "--run-dir", str(run_dir), "--device", "cpu", "--model", str(model), "--dataset",
            dataset, "--resolution", str(RES), "--batch-size", "4", "--log-every", "1", "--sample-every", "0",
            "--preview-images", "2", "--preview-steps", "2", "--eval-images", "3", "--eval-timesteps", "2",
            "--cache-dir", str(run_dir.parent / "cache"), *extra]


def classify_args(run_dir: Path, folder: Path, *extra: str) -> list[str]:
    return [*stage_args("classify", folder, "--target", "class", "--batch-size", "2", "--test-samples", "2",
                        "--warmup-steps", "1", "--log-every", "1", "--sample-every", "0", *extra),
            "--run-dir", str(run_dir)]


# (stage, the command of a healthy run, a learning rate that diverges, checkpoint interval after the resume).
# The inversion's test looks at the weights themselves, so it holds even when a checkpoint is due at the very
# step that blew the vectors up; the loss tests see a blown-up step at the next one.
DIVERGING = {
    "invert": (lambda run_dir, folder, model: invert_args(run_dir, model), 1e6, 1),
    "ddpm": (lambda run_dir, folder, model: tiny_args(run_dir, folder), 1e30, 2),
    "classify": (lambda run_dir, folder, model: classify_args(run_dir, folder), 1e30, 2),
}


@pytest.mark.parametrize("stage", DIVERGING)
def test_a_diverging_run_stops_with_advice_and_keeps_the_last_good_checkpoint(tmp_path, folder, class_ckpt, stage):
    command, lr, ckpt_every = DIVERGING[stage]
    run_dir = tmp_path / "run"
    train.main(command(run_dir, folder, class_ckpt) + ["--steps", "2", "--ckpt-every", "2"])
    good = (run_dir / "checkpoint.pt").read_bytes()
    # The same run continued with the learning rate raised (a resume refuses a changed --lr, so the config is
    # changed here): it diverges within the first steps after the checkpoint.
    spec, args = train.parse_args(["--stage", stage, "--run-dir", str(run_dir), "--resume", "--device", "cpu"])
    config, saved = resolve_config(spec, args, run_dir)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr, steps=8, ckpt_every=ckpt_every))
    config, built = spec.build(config, Runtime(CPU), saved)
    with pytest.raises(TrainingDiverged, match=r"by step [34]; nothing was saved past the last checkpoint "
                                               r"\(.*checkpoint.pt\), so start a new run with a lower --lr"):
        Trainer(built, config.train, run_dir, Runtime(CPU), resume_from=saved).run()
    assert (run_dir / "checkpoint.pt").read_bytes() == good


def test_an_inversion_with_an_absurd_learning_rate_ends_with_one_line_and_no_checkpoint(tmp_path, class_ckpt, capsys):
    """It used to finish "Done", its vectors of size 1e6 and more and no image improved: the loss stays finite
    however far the vectors go, since the network saturates."""
    run_dir = tmp_path / "run"
    assert cli.run(train.main, invert_args(run_dir, class_ckpt, "--steps", "4", "--lr", "1e6")) == 1
    line = the_error(capsys.readouterr().err)
    assert re.search(r"the largest learned vector's RMS became [0-9.e+]+, over 100 times that of the model's own "
                     r"embeddings \(limit [0-9.]+\) by step 1; .* a lower --lr", line), line
    assert not (run_dir / "checkpoint.pt").exists()


def test_gradients_that_overflow_stop_a_run_whose_loss_is_still_finite(tmp_path, folder, capsys):
    """At --lr 1e10 the pixel U-Net's loss grows to 1e23 and stays finite while its gradient norm overflows:
    the run used to finish "Done" with those weights."""
    run_dir = tmp_path / "run"
    assert cli.run(train.main, tiny_args(run_dir, folder, "--lr", "1e10", "--warmup-steps", "0", steps=8)) == 1
    assert re.search(r"the grad_norm became (inf|nan) by step \d", the_error(capsys.readouterr().err))
    assert not (run_dir / "checkpoint.pt").exists()


def test_an_overflowing_gradient_is_divergence_unless_fp16_loss_scaling_skips_its_step(tmp_path):
    from core.config import TrainConfig
    from core.contract import Trainable, TrainingStage
    stage = TrainingStage(name="toy", trainables={"model": Trainable(torch.nn.Linear(2, 1), lr=1e-3)},
                          loss=lambda models, batch, generator, step: (models["model"](batch).mean(), {}),
                          dataset=torch.zeros(4, 2), config={}, data_info={})
    trainer = Trainer(stage, TrainConfig(steps=1), tmp_path / "run", Runtime(CPU))
    means = {"loss": 0.5, "grad_norm": math.inf}
    assert trainer._divergence(means) == "the grad_norm became inf"
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # fp16: such a step is skipped, the scale lowered
    assert trainer._divergence(means) is None
    assert trainer._divergence({**means, "loss": math.nan}) == "the loss became nan"


def test_a_classifier_whose_loss_grows_far_past_knowing_nothing_has_diverged():
    """Finite weights, finite loss, and yet a run gone wrong: at --lr 1e3 a classifier's cross-entropy ends in
    the hundreds, where uniform outputs cost ln C."""
    from classify.stage import DIVERGED_LOSS, ClassifierTraining
    from data import DatasetInfo
    info = DatasetInfo("toy", RES, 3, ("a", "b", "c"), (), (), 12)
    run = ClassifierTraining.__new__(ClassifierTraining)
    run.info, run.target = info, "class"
    limit = DIVERGED_LOSS * math.log(3)
    assert run.diverged({}, {"loss": 0.9 * limit}) is None
    assert run.diverged({}, {"loss": 818.0}).startswith("the loss became 818")
    run.target = "params"
    assert run.diverged({}, {"loss": 50.0}) is None and run.diverged({}, {"loss": 150.0}) is not None


def test_a_checkpoint_from_a_machine_with_more_cores_still_loads_its_worker_count():
    """--num-workers is checked against this machine's cores at start-up, not in the config: the config of a run
    that used more workers elsewhere loads here (the resume itself: the next test)."""
    from core.config import from_dict, to_dict
    from ddpm.config import DDPMConfig, ddpm_demo
    saved = to_dict(ddpm_demo())
    saved["data"]["num_workers"] = 1000 * (os.cpu_count() or 1)
    assert from_dict(DDPMConfig, saved).data.num_workers == saved["data"]["num_workers"]


def test_a_run_from_a_machine_with_more_cores_resumes_here_with_the_workers_given(tmp_path, folder, capsys):
    run = tmp_path / "run"
    train.main(tiny_args(run, folder, steps=2))
    payload = torch.load(run / "checkpoint.pt", weights_only=True)
    many = 1000 * (os.cpu_count() or 1)
    payload["config"]["data"]["num_workers"] = many  # as written on a machine with far more cores
    torch.save(payload, run / "checkpoint.pt")
    resume = ["--run-dir", str(run), "--resume", "--steps", "3", "--device", "cpu"]
    assert cli.run(train.main, resume) == 1  # its own count is refused here, in one sentence, with nothing lost
    most = 4 * (os.cpu_count() or 1)
    assert the_error(capsys.readouterr().err) == (
        f"error: --num-workers must be from 0 (decode in this process) to {most} (4 per CPU core; each worker is a "
        f"process), got {many}, the count {run / 'checkpoint.pt'} was written with; resume here with --num-workers 0 "
        f"to {most}.")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    assert train.main([*resume, "--num-workers", "0"])["step"] == 3
