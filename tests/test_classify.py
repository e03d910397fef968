"""The classifier stage: torchvision's ResNet-18 with the small-image stem, trained through the shared
loop (SGD + Nesterov, one-cycle, label smoothing, crops), its held-out report checked against the
loaded classifier's own predictions, exact resume, mixed training sets, and the results table."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

import train
from training.run import resolve_config
from evaluate import experiment, runs
from classify.model import ClassifierConfig, build_resnet18, load_classifier
from classify.stage import final_results
from core.checkpoint import load_checkpoint
from core.cli import RunInterrupted
from data import Batch, load_dataset
from data.augment import random_crop, random_noise
from data.imageio import from_uint8
from helpers import COLOURS, RES, colour_folder



def params_folder(root: Path, count: int, seed: int) -> Path:
    """Grey images whose brightness is parameter `level` (and a constant second parameter), each with a little
    noise of its own (two sets of flat images would share some exactly)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for k in range(count):
        level = float(rng.uniform(0, 1))
        pixels = 40 + 180 * level + rng.uniform(-2, 2, (RES, RES, 1))
        Image.fromarray(np.repeat(pixels, 3, axis=2).astype(np.uint8)).save(root / f"{k}.png")
        rows.append(f"{k}.png,{level!r},3.5")
    (root / "params.csv").write_text("path,level,constant\n" + "\n".join(rows) + "\n")
    return root


def args(run_dir: Path, dataset: Path, test: Path, *extra: str) -> list[str]:
    return ["--stage", "classify", "--run-dir", str(run_dir), "--device", "cpu", "--dataset", f"folder:{dataset}",
            "--test-dataset", f"folder:{test}", "--resolution", str(RES), "--num-samples", "0", "--test-samples", "0",
            "--batch-size", "12", "--log-every", "1", "--ckpt-every", "100", "--target", "class", "--warmup-steps", "1",
            *extra]


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("colours")
    return colour_folder(root / "train", 8, seed=0), colour_folder(root / "test", 5, seed=1)


# ---------------------------------------------------------------------------------------------
# the network


def test_resnet18_is_torchvisions_with_the_cifar_stem_for_small_images():
    small = build_resnet18(ClassifierConfig(num_outputs=10), resolution=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    # torchvision's ImageNet ResNet-18 has 11,689,512 parameters; the CIFAR stem swaps the 7x7x3x64 conv
    # for a 3x3x3x64 one and the 1000-way head for a 10-way one.
    imagenet = sum(p.numel() for p in resnet18().parameters())
    assert imagenet == 11_689_512
    expected = imagenet - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - (512 + 1) * 1000 + (512 + 1) * 10
    assert sum(p.numel() for p in small.parameters()) == expected
    large = build_resnet18(ClassifierConfig(num_outputs=10), resolution=128)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    grey = build_resnet18(ClassifierConfig(num_outputs=2, in_channels=1, stem="imagenet"), resolution=32)
    assert grey.conv1.in_channels == 1 and grey(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_random_crop_shifts_each_image_by_at_most_the_padding_with_reflected_borders():
    torch.manual_seed(0)
    image = torch.randn(6, 3, 8, 8)
    batch = Batch(image, torch.zeros(6, dtype=torch.long), torch.zeros(6, 0), torch.arange(6))
    out = random_crop(batch, torch.Generator().manual_seed(1), padding=2).image
    padded = torch.nn.functional.pad(image, (2,) * 4, mode="reflect")
    offsets = []
    for b in range(6):
        match = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[b], padded[b, :, dy:dy + 8, dx:dx + 8])]
        assert len(match) == 1
        offsets.append(match[0])
    assert len(set(offsets)) > 1                                   # drawn per image
    assert random_crop(batch, torch.Generator(), padding=0).image is image


def test_random_noise_has_a_per_image_std_up_to_the_limit_and_stays_in_range():
    grey = torch.zeros(400, 1, 16, 16)                             # mid-grey: nothing is clamped
    batch = Batch(grey, torch.zeros(400, dtype=torch.long), torch.zeros(400, 0), torch.arange(400))
    out = random_noise(batch, torch.Generator().manual_seed(0), max_std=0.3).image
    stds = out.flatten(1).std(dim=1)
    assert stds.max() <= 0.3 * 1.15 and stds.min() < 0.03                      # uniform over [0, 0.3] per image
    assert (stds ** 2).mean() == pytest.approx(0.3 ** 2 / 3, rel=0.1)          # E[U(0, s)^2] = s^2 / 3
    black = batch._replace(image=torch.full_like(grey, -1.0))
    dark = random_noise(black, torch.Generator().manual_seed(0), max_std=0.3).image
    assert dark.min() >= -1 and dark.mean() > -1                               # clamped: a faint noise floor
    again = random_noise(batch, torch.Generator().manual_seed(0), max_std=0.3).image
    assert torch.equal(out, again)                                             # the step's generator decides


# ---------------------------------------------------------------------------------------------
# training and the held-out report


@pytest.fixture(scope="module")
def colour_run(colours, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("colour-run")
    train.main(args(run_dir, *colours, "--steps", "24", "--warmup-steps", "6", "--lr", "0.05"))
    return run_dir


def test_a_classifier_learns_separable_classes_and_its_report_matches_its_own_predictions(colour_run, colours):
    result = final_results(colour_run)
    assert result["split"] == "heldout" and result["images"] == 15
    assert result["top1"] == 1.0                                   # noisy solid colours are trivially separable
    classifier = load_classifier(colour_run / "checkpoint.pt")
    assert classifier.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the CPU's faster layout
    test = load_dataset(f"folder:{colours[1]}", RES)
    predicted = classifier.predict(test.images.float() / 127.5 - 1)
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for y, p in zip(test.labels, predicted):
        confusion[y, p] += 1
    assert result["confusion"] == confusion.tolist()
    assert result["top1"] == pytest.approx((predicted == test.labels).float().mean().item())
    for k, name in enumerate(classifier.output_names):
        assert result[f"accuracy/{name}"] == pytest.approx(confusion[k, k].item() / confusion[k].sum().item())
    assert (colour_run / "confusion.png").is_file()
    payload = load_checkpoint(colour_run / "checkpoint.pt", "classify")
    sgd = payload["optimizers"]["model"]["param_groups"][0]
    assert sgd["nesterov"] and sgd["momentum"] == 0.9               # SGD with Nesterov momentum, as asked


def test_resume_continues_exactly(colours, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("--warmup-steps", "1", "--lr", "0.02", "--ckpt-every", "2")
    train.main(args(whole, *colours, "--steps", "4", *common))
    train.main(args(split, *colours, "--steps", "2", *common))
    train.main(["--stage", "classify", "--run-dir", str(split), "--device", "cpu", "--resume", "--steps", "4"])
    a, b = (load_checkpoint(d / "checkpoint.pt", "classify") for d in (whole, split))
    for key, value in a["models"]["model"].items():
        assert torch.equal(value, b["models"]["model"][key]), key     # weights and batch-norm statistics
    momentum = [s["momentum_buffer"] for s in a["optimizers"]["model"]["state"].values()]
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momentum, b["optimizers"]["model"]["state"].values()))


def test_test_images_that_are_training_images_are_refused_or_counted(colours, tmp_path, capsys):
    """The same folder as --dataset and --test-dataset (or a subset of it) would report training accuracy as
    held out: refused before the run writes anything. A test set sharing some images trains, with a warning."""
    import shutil
    train_folder, test_folder = colours
    for test, subset in ((train_folder, "0"), (train_folder, "6"), (test_folder, "0")):
        dataset = train_folder if test is train_folder else test_folder
        with pytest.raises(ValueError, match=r"^The test images are not held out: every image of "):
            train.main(args(tmp_path / "never", dataset, test, "--steps", "2", "--num-samples", subset))
        assert not (tmp_path / "never").exists()
    mixed = tmp_path / "mixed"
    shutil.copytree(test_folder, mixed)
    shutil.copy(train_folder / "red" / "0.png", mixed / "red" / "copied.png")
    with pytest.warns(UserWarning, match=r"^1 of the 16 images of --test-dataset are exact copies of images of "
                                         r"--dataset, .*; remove them"):
        train.main(args(tmp_path / "run", train_folder, mixed, "--steps", "2"))
    assert final_results(tmp_path / "run")["images"] == 16
    # The results table checks every training set against --test before its first run trains (a copy: one folder
    # given as both is refused sooner, by its path).
    copy = shutil.copytree(train_folder, tmp_path / "copy")
    argv = ["--real", f"folder:{test_folder}", "--synthetic", f"gen=folder:{train_folder}", "--test",
            f"folder:{copy}", "--out", str(tmp_path / "table"), "--device", "cpu", "--", "--target", "class",
            "--resolution", str(RES), "--steps", "2", "--warmup-steps", "1", "--batch-size", "6"]
    with pytest.raises(ValueError, match=r"^The test images are not held out: every image of --test .* is also one "
                                         r"of --synthetic gen "):
        experiment.main(argv)
    assert not (tmp_path / "table" / "runs").exists()


def test_a_class_without_test_images_has_no_accuracy_rather_than_zero(colours, tmp_path):
    train.main(args(tmp_path / "run", *colours, "--steps", "2", "--test-samples", "2"))
    result = final_results(tmp_path / "run")
    tested = [name for name, row in zip(sorted(COLOURS), result["confusion"]) if sum(row)]
    assert 1 <= len(tested) <= 2                                    # 2 test images: a class at least has none
    assert sorted(key for key in result if key.startswith("accuracy/")) == [f"accuracy/{name}" for name in tested]


def test_params_target_reports_the_mean_absolute_error_of_each_parameter(tmp_path):
    data, test = params_folder(tmp_path / "train", 24, 0), params_folder(tmp_path / "test", 10, 1)
    run_dir = tmp_path / "run"
    train.main(args(run_dir, data, test, "--target", "params", "--steps", "6", "--warmup-steps", "2", "--lr", "0.01",
                    "--grad-clip", "1"))
    result = final_results(run_dir)
    regressor = load_classifier(run_dir / "checkpoint.pt")
    assert regressor.output_names == ("level", "constant")
    dataset = load_dataset(f"folder:{test}", RES)
    predicted = regressor.predict(dataset.images.float() / 127.5 - 1)
    error = (predicted - dataset.params).abs().mean(dim=0)
    assert result["mae/level"] == pytest.approx(error[0].item(), rel=1e-4)
    assert result["mae/constant"] == pytest.approx(error[1].item(), abs=1e-6)
    assert predicted[:, 1].eq(3.5).all()                           # a constant parameter is predicted exactly


def test_an_extra_dataset_joins_the_training_set_at_a_fixed_share(colours, tmp_path):
    from core.runtime import Runtime
    synthetic = colour_folder(tmp_path / "synth", 4, seed=3)
    spec, parsed = train.parse_args(args(tmp_path / "run", *colours, "--extra-dataset", f"folder:{synthetic}",
                                         "--extra-fraction", "0.25"))
    config, _ = resolve_config(spec, parsed, tmp_path / "run")
    _, stage = spec.build(config, Runtime(torch.device("cpu")), None)
    assert len(stage.dataset) == 24 + 12 and stage.mix == ((24, 9), (12, 3))
    assert stage.trainables["model"].model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # faster
    assert [p["num_samples"] for p in stage.data_info["parts"]] == [24, 12]
    # The held-out images are recorded too, so a resume on a changed test folder is refused (tests/test_reuse.py).
    assert stage.data_info["test_fingerprint"] == load_dataset(f"folder:{colours[1]}", RES).fingerprint()


def test_a_class_target_joins_sets_with_and_without_parameters(colours, tmp_path):
    """Real plumes carry params.csv, a class model's set has none: a class target trains on both."""
    from core.runtime import Runtime
    with_params = colour_folder(tmp_path / "real", 4, seed=4)
    files = sorted(p.relative_to(with_params).as_posix() for p in with_params.rglob("*.png"))
    (with_params / "params.csv").write_text("path,wind\n" + "".join(f"{f},{k / 10}\n" for k, f in enumerate(files)))
    spec, parsed = train.parse_args(args(tmp_path / "run", with_params, colours[1], "--extra-dataset",
                                         f"folder:{colours[0]}"))
    config, _ = resolve_config(spec, parsed, tmp_path / "run")
    _, stage = spec.build(config, Runtime(torch.device("cpu")), None)
    assert len(stage.dataset) == 12 + 24 and stage.dataset.params.shape == (36, 0)
    assert stage.dataset.info.param_names == () and stage.data_info["parts"][0]["param_names"] == ("wind",)
    assert torch.equal(stage.dataset.labels[:12], load_dataset(f"folder:{with_params}", RES).labels)


def test_relative_test_and_extra_folders_are_recorded_absolute_and_found_from_any_directory(colours, tmp_path,
                                                                                          monkeypatch):
    """Tools that read a judge's datasets from its checkpoint (evaluate.gradcam, .consistency, .sweep) run from
    another directory than its training did; a resume typing the same relative folders again is the same run."""
    import shutil
    from data import folder_of, trained_datasets
    work, elsewhere, run_dir = tmp_path / "work", tmp_path / "elsewhere", tmp_path / "run"
    shutil.copytree(colours[1], work / "held-out")
    colour_folder(work / "more", 2, seed=7)
    elsewhere.mkdir()
    relative = ("--extra-dataset", "folder:more")
    monkeypatch.chdir(work)
    train.main(args(run_dir, colours[0], Path("held-out"), "--steps", "2", "--lr-schedule", "constant", *relative))
    absolute = {"--dataset": f"folder:{colours[0].resolve()}",
                "--test-dataset": f"folder:{work.resolve() / 'held-out'}",
                "--extra-dataset": f"folder:{work.resolve() / 'more'}"}
    payload = load_checkpoint(run_dir / "checkpoint.pt", "classify")
    saved = json.loads((run_dir / "config.json").read_text())
    for config in (payload["config"], saved):
        assert (config["data"]["test_dataset"], config["classify"]["extra_dataset"]) == (
            absolute["--test-dataset"], absolute["--extra-dataset"])

    monkeypatch.chdir(elsewhere)
    assert trained_datasets(payload) == absolute       # the training folder, not "folder:A+folder:B", beside them
    assert all(folder_of(spec).is_dir() for spec in trained_datasets(payload).values())
    train.main(["--stage", "classify", "--run-dir", str(run_dir), "--device", "cpu", "--resume", "--steps", "3"])
    with pytest.raises(ValueError, match=r"--extra-dataset \(the run's: folder:.*\), --test-dataset \(the run's: "
                                         r"folder:.*\) cannot change when resuming"):
        train.main(args(run_dir, colours[0], Path("held-out"), "--steps", "4", "--resume", *relative))  # other folders

    monkeypatch.chdir(work)  # where it started: the same relative folders are the same run
    train.main(args(run_dir, colours[0], Path("held-out"), "--steps", "4", "--resume", *relative))
    # A checkpoint written before its folders were recorded absolute still resumes, from where it started, and its
    # next checkpoint names them absolute.
    old = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    old["config"]["data"]["test_dataset"], old["config"]["classify"]["extra_dataset"] = "folder:held-out", "folder:more"
    torch.save(old, run_dir / "checkpoint.pt")
    train.main(["--stage", "classify", "--run-dir", str(run_dir), "--device", "cpu", "--resume", "--steps", "5"])
    resumed = load_checkpoint(run_dir / "checkpoint.pt", "classify")
    assert resumed["step"] == 5 and trained_datasets(resumed) == absolute


@pytest.mark.parametrize("option", ["--test-dataset", "--extra-dataset"])
def test_cifar10_as_a_second_set_offline_is_refused_before_the_training_folder_is_decoded(colours, tmp_path,
                                                                                         monkeypatch, option):
    import urllib.error
    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr("data.folder.load_image", lambda *a: pytest.fail("an image of --dataset was decoded"))
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=rf"^{option} cifar10: CIFAR-10 is not in {cache} and could not be "
                                                rf"downloaded \(URLError: .*\); put cifar-10-python\.tar\.gz .* in "
                                                rf"{cache}, or run once with internet access\.$"):
        train.main(args(run_dir, *colours, "--steps", "2", option, "cifar10", "--cache-dir", str(cache)))
    assert not run_dir.exists() and not cache.exists()


def test_init_from_starts_from_another_runs_weights_and_a_resume_needs_it_no_more(colour_run, colours, tmp_path):
    """Fine-tuning: the network starts as the --init-from run ended (weights and batch-norm statistics), the
    optimizer and step start anew, the checkpoint records where it started, and a resume replays the
    uninterrupted run exactly even once that file is gone."""
    from core.checkpoint import state_fingerprint
    from core.runtime import Runtime
    source = tmp_path / "source.pt"
    source.write_bytes((colour_run / "checkpoint.pt").read_bytes())
    start = load_checkpoint(source, "classify")["models"]["model"]
    spec, parsed = train.parse_args(args(tmp_path / "built", *colours, "--init-from", str(source)))
    config, _ = resolve_config(spec, parsed, tmp_path / "built")
    _, stage = spec.build(config, Runtime(torch.device("cpu")), None)
    built = stage.trainables["model"].model.state_dict()
    assert all(torch.equal(built[k], v) for k, v in start.items())
    assert stage.data_info["init_from"] == {"path": str(source), "fingerprint": state_fingerprint(start)}

    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ("--init-from", str(source), "--warmup-steps", "1", "--lr", "0.02", "--ckpt-every", "2")
    train.main(args(whole, *colours, "--steps", "4", *common))
    assert final_results(whole)["top1"] == 1.0                     # fine-tuned from a run that had learnt them
    train.main(args(split, *colours, "--steps", "2", *common))
    assert load_checkpoint(split / "checkpoint.pt", "classify")["step"] == 2   # its own steps, not the source's
    source.unlink()
    train.main(["--stage", "classify", "--run-dir", str(split), "--device", "cpu", "--resume", "--steps", "4"])
    a, b = (load_checkpoint(d / "checkpoint.pt", "classify") for d in (whole, split))
    for key, value in a["models"]["model"].items():
        assert torch.equal(value, b["models"]["model"][key]), key


def test_init_from_a_colour_network_fine_tunes_on_greyscale_images_computing_what_it_computed_on_them_as_rgb(
        colour_run, colours, tmp_path):
    from classify.stage import adapt_first_conv
    from core.runtime import Runtime
    grey = []
    for folder in colours:
        for image in sorted(folder.rglob("*.png")):
            target = tmp_path / folder.name / image.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(image).convert("L").save(target)
        grey.append(tmp_path / folder.name)
    source = colour_run / "checkpoint.pt"
    spec, parsed = train.parse_args(args(tmp_path / "built", *grey, "--init-from", str(source)))
    config, _ = resolve_config(spec, parsed, tmp_path / "built")
    _, stage = spec.build(config, Runtime(torch.device("cpu")), None)
    tuned = stage.trainables["model"].model.eval()
    original = load_classifier(source, torch.device("cpu")).net.eval()
    x = torch.rand(4, 1, RES, RES) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), original(x.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)
    train.main(args(tmp_path / "trained", *grey, "--init-from", str(source), "--steps", "2"))

    # The other way: equal channels give the grey network's output, and a colour image its output on the image's
    # luma (Pillow's "L", by which the grey network's images were loaded; exact but for Pillow's rounding).
    conv = torch.nn.Conv2d(1, 8, 3, bias=False)
    spread = torch.nn.Conv2d(3, 8, 3, bias=False)
    spread.weight.data = adapt_first_conv(conv.weight.data, 3)
    colour = torch.randint(0, 256, (2, RES, RES, 3), dtype=torch.uint8)
    luma = torch.stack([torch.from_numpy(np.array(Image.fromarray(c.numpy()).convert("L"))) for c in colour])
    with torch.no_grad():
        torch.testing.assert_close(spread(x.expand(-1, 3, -1, -1)), conv(x))
        torch.testing.assert_close(spread(from_uint8(colour.permute(0, 3, 1, 2))), conv(from_uint8(luma[:, None])),
                                   rtol=0, atol=conv.weight.abs().sum(dim=(1, 2, 3)).max().item() / 255 + 1e-6)


def test_init_from_refuses_a_checkpoint_that_predicts_something_else(colour_run, colours, tmp_path):
    from core.checkpoint import save_checkpoint
    two = {"blue": COLOURS["blue"], "red": COLOURS["red"]}
    data, test = colour_folder(tmp_path / "two", 4, 5, two), colour_folder(tmp_path / "two-test", 2, 6, two)
    diffusion = tmp_path / "ddpm.pt"
    save_checkpoint({"stage": "ddpm", "config": {}, "data_info": {}, "models": {}}, diffusion)
    source = str(colour_run / "checkpoint.pt")
    for run_dir, argv, message in [
            ("classes", args(tmp_path / "classes", data, test, "--init-from", source),
             r"was trained with classes blue, green, red, and this run has classes blue, red; .* add --new-head"),
            ("size", args(tmp_path / "size", *colours, "--init-from", source, "--resolution", "24"),
             r"was trained with 16 px images, and this run has 24 px images"),
            ("stem", args(tmp_path / "stem", *colours, "--init-from", source, "--stem", "imagenet"),
             r"the small stem, and this run has the imagenet stem"),
            ("stage", args(tmp_path / "stage", *colours, "--init-from", str(diffusion)), r"needs 'classify'"),
            ("missing", args(tmp_path / "missing", *colours, "--init-from", str(tmp_path / "no.pt")),
             r"--init-from .*no.pt does not exist")]:
        with pytest.raises(ValueError, match=message):
            train.main(argv)
        assert not (tmp_path / run_dir / "checkpoint.pt").exists() and not (tmp_path / run_dir / "metrics.jsonl").exists()


def test_new_head_copies_the_trunk_and_trains_a_fresh_output_layer_for_other_classes_or_targets(colour_run,
                                                                                                 colours, tmp_path):
    """Transfer learning: --new-head takes every layer but fc from the source, fc as this run's seed builds it,
    so a 3-class source starts a 2-class classifier or a parameter regressor; the images must still match."""
    from core.checkpoint import state_fingerprint
    from core.runtime import Runtime
    two = {"blue": COLOURS["blue"], "red": COLOURS["red"]}
    data, test = colour_folder(tmp_path / "two", 4, 5, two), colour_folder(tmp_path / "two-test", 2, 6, two)
    source = str(colour_run / "checkpoint.pt")
    start = load_checkpoint(source, "classify")["models"]["model"]

    def built(run_dir, *options):
        spec, parsed = train.parse_args(args(run_dir, *options))
        config, _ = resolve_config(spec, parsed, run_dir)
        _, stage = spec.build(config, Runtime(torch.device("cpu")), None)
        return stage, stage.trainables["model"].model.state_dict()

    fresh = built(tmp_path / "fresh", data, test)[1]
    stage, tuned = built(tmp_path / "tuned", data, test, "--init-from", source, "--new-head")
    assert tuned["fc.weight"].shape == (2, 512) and start["fc.weight"].shape == (3, 512)
    assert torch.equal(tuned["fc.weight"], fresh["fc.weight"]) and torch.equal(tuned["fc.bias"], fresh["fc.bias"])
    trunk = [k for k in start if not k.startswith("fc.")]
    assert len(trunk) > 100 and all(torch.equal(tuned[k], start[k]) for k in trunk)
    assert not torch.equal(tuned["conv1.weight"], fresh["conv1.weight"])
    assert stage.data_info["init_from"] == {"path": source, "fingerprint": state_fingerprint(start), "new_head": True}

    regressor = [colour_folder(tmp_path / name, 2, seed=seed) for name, seed in (("params", 7), ("params-test", 8))]
    for folder in regressor:  # colour images with a parameter each
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
        (folder / "params.csv").write_text("path,wind\n" + "".join(f"{f},{k / 10}\n" for k, f in enumerate(files)))
    _, tuned = built(tmp_path / "regress", *regressor, "--target", "params", "--init-from", source, "--new-head")
    assert tuned["fc.weight"].shape[0] == 1 and all(torch.equal(tuned[k], start[k]) for k in trunk)

    train.main(args(tmp_path / "trained", data, test, "--init-from", source, "--new-head", "--steps", "3"))
    assert final_results(tmp_path / "trained") is not None
    for run_dir, options, message in [
            ("size", ("--init-from", source, "--new-head", "--resolution", "24"), r"16 px images, and this run has 24"),
            ("alone", ("--new-head",), r"--new-head replaces the output layer .* add --init-from")]:
        with pytest.raises(ValueError, match=message):
            train.main(args(tmp_path / run_dir, data, test, *options))
        assert not (tmp_path / run_dir / "checkpoint.pt").exists() and not (tmp_path / run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("change, message", [
    (lambda d, t, tmp: ["--test-dataset", f"folder:{colour_folder(tmp / 'other', 2, 5, {'blue': (0, 0, 255), 'cyan': (0, 255, 255), 'red': (255, 0, 0)})}"],
     "classes of --test-dataset"),
    (lambda d, t, tmp: ["--extra-dataset", f"folder:{colour_folder(tmp / 'two', 2, 5, {'blue': (0, 0, 255), 'red': (255, 0, 0)})}"],
     "classes of --extra-dataset"),
    (lambda d, t, tmp: ["--dataset", f"folder:{params_folder(tmp / 'flat', 4, 0)}"], "needs at least two classes"),
    (lambda d, t, tmp: ["--target", "params"], "needs per-image parameters"),
    (lambda d, t, tmp: ["--extra-fraction", "0.5"], "need --extra-dataset"),
    (lambda d, t, tmp: ["--extra-dataset", f"folder:{d}", "--extra-fraction", "0.01"], "less than one image"),
    (lambda d, t, tmp: ["--label-smoothing", "1"], "--label-smoothing"),
    (lambda d, t, tmp: ["--crop-padding", str(RES)], rf"--crop-padding must be smaller than --resolution \({RES} px\)"),
    (lambda d, t, tmp: ["--lr-schedule", "onecycle", "--steps", "10", "--warmup-steps", "10"], "no annealing"),
])
def test_bad_options_are_refused_before_any_file_is_written(colours, tmp_path, change, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train.main(args(run_dir, *colours, "--steps", "2", *change(*colours, tmp_path)))
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.jsonl").exists()


def test_other_classes_in_a_test_folder_are_refused_by_listing_it_before_any_image_is_decoded(colours, tmp_path,
                                                                                              monkeypatch):
    data, test = colours
    monkeypatch.setattr("data.folder.load_image", lambda *a: pytest.fail("an image was decoded"))
    other = colour_folder(tmp_path / "other", 1, 5, {"blue": (0, 0, 255), "cyan": (0, 255, 255)})
    with pytest.raises(ValueError, match=r"The classes of --test-dataset \(blue, cyan\) differ from those of "
                                         r"--dataset \(blue, green, red\)"):
        train.main(args(tmp_path / "run", data, other, "--steps", "2"))
    # A class folder that is there but empty: named as such, not as a difference of names.
    empty = colour_folder(tmp_path / "empty", 1, 5, {"blue": (0, 0, 255), "red": (255, 0, 0)})
    (empty / "green").mkdir()
    with pytest.raises(ValueError, match=r"The class folder \S*empty/green of --test-dataset holds no images"), \
            pytest.warns(UserWarning, match=r"1 subfolder\(s\) of \S*empty hold no images of their own"):
        train.main(args(tmp_path / "run", data, empty, "--steps", "2"))
    assert not (tmp_path / "run").exists()


def test_load_classifier_refuses_a_diffusion_checkpoint(tmp_path):
    from core.checkpoint import save_checkpoint
    save_checkpoint({"stage": "ddpm", "config": {}, "data_info": {}, "models": {}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="needs 'classify'"):
        load_classifier(tmp_path / "c.pt")


# ---------------------------------------------------------------------------------------------
# the results table


def test_experiment_table_trains_every_row_and_seed_once_and_resumes(colours, tmp_path):
    real, test = colours
    synthetic = colour_folder(tmp_path / "synth", 4, seed=7)
    out = tmp_path / "experiment"
    argv = ["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test", f"folder:{test}",
            "--seeds", "2", "--match-size", "--out", str(out), "--device", "cpu",
            "--", "--target", "class", "--resolution", str(RES), "--steps", "2", "--warmup-steps", "1",
            "--batch-size", "6", "--test-samples", "0"]
    summary = experiment.main(argv)
    assert list(summary["rows"]) == ["real", "gen", "real+gen"]
    for name, row in summary["rows"].items():
        runs = [out / "runs" / name / f"seed{s}" for s in range(2)]
        values = [100 * final_results(r)["top1"] for r in runs]
        assert row["values"] == pytest.approx(values)
        assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values, ddof=1))
        configs = [json.loads((r / "config.json").read_text()) for r in runs]
        assert [c["train"]["seed"] for c in configs] == [0, 1]
        # --match-size: 12 images per row (the synthetic set's size), half of each in the mixed row.
        sizes = [(c["data"]["num_samples"], c["classify"]["extra_samples"]) for c in configs]
        assert sizes[0] == ({"real": (12, 0), "gen": (12, 0), "real+gen": (6, 6)}[name])
    assert "| real+gen |" in (out / "results.md").read_text()
    assert (out / "results.md").read_text().endswith(f"Test set: folder:{test}.\nEvery row trains on 12 images "
                                                     f"(--match-size).\n")  # what the rows trained on
    assert json.loads((out / "results.json").read_text())["rows"]["gen"]["values"] == summary["rows"]["gen"]["values"]
    assert (out / "results.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")}
    again = experiment.main(argv)                                  # nothing left to train: the same table
    assert again["rows"] == summary["rows"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")} == stamps


def test_an_interrupted_table_says_how_to_go_on_and_the_same_command_finishes_it(colours, tmp_path, monkeypatch):
    """SIGTERM in the second run: the advice names the experiment command (not the run's own `train.py
    --resume`, which the user never typed), and that command, run again, keeps the finished run and trains
    the rest."""
    real, test = colours
    synthetic = colour_folder(tmp_path / "synth", 4, seed=7)
    out = tmp_path / "experiment"
    argv = ["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test", f"folder:{test}",
            "--seeds", "1", "--match-size", "--out", str(out), "--device", "cpu",
            "--", "--target", "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0",
            "--batch-size", "6", "--test-samples", "0"]
    run, started = runs.run, []

    def stopped_in_the_second(stage, args):
        started.append(args.run_dir)
        if len(started) == 2:
            raise RunInterrupted("stopped by SIGTERM at step 1 of 1 and saved it; resume with: python train.py "
                                 "--stage classify --resume", signal.SIGTERM)
        return run(stage, args)

    monkeypatch.setattr(runs, "run", stopped_in_the_second)
    with pytest.raises(RunInterrupted) as stop:
        experiment.main(argv)
    second = out / "runs" / "gen" / "seed0"
    assert str(stop.value) == (f"stopped by SIGTERM in {second}, which saved its step; run the same command again "
                               f"to resume it and the runs after it.")
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert not (out / "results.md").exists()
    first = out / "runs" / "real" / "seed0" / "checkpoint.pt"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(runs, "run", run)
    summary = experiment.main(argv)
    assert list(summary["rows"]) == ["real", "gen", "real+gen"] and first.stat().st_mtime_ns == stamp
    assert (out / "results.md").is_file()


def test_synthetic_multiple_trains_k_times_the_real_images_and_adds_them_to_all_the_real_ones(colours, tmp_path):
    real, test = colours                                            # 24 real images
    synthetic = colour_folder(tmp_path / "synth", 16, seed=7)        # 48 synthetic images

    def argv(out, *extra):
        return ["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test", f"folder:{test}",
                "--seeds", "1", "--out", str(out), "--device", "cpu", *extra,
                "--", "--target", "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0",
                "--batch-size", "6", "--test-samples", "0"]

    def trained_on(out):
        return {name: (c["data"]["num_samples"], c["classify"]["extra_samples"]) for name in ("real", "gen", "real+gen")
                for c in [json.loads((out / "runs" / name / "seed0" / "config.json").read_text())]}

    summary = experiment.main(argv(tmp_path / "x2", "--synthetic-multiple", "2"))
    assert trained_on(tmp_path / "x2") == {"real": (24, 0), "gen": (48, 0), "real+gen": (24, 48)}
    assert summary["synthetic_multiple"] == 2 and summary["real_images"] == 24
    with pytest.raises(ValueError, match="needs 72 images of every synthetic set and folder:.* holds 48"):
        experiment.main(argv(tmp_path / "x3", "--synthetic-multiple", "3"))
    assert not (tmp_path / "x3" / "runs").exists()                  # refused before anything trained
    experiment.main(argv(tmp_path / "x3m", "--synthetic-multiple", "3", "--match-size"))
    assert trained_on(tmp_path / "x3m") == {"real": (16, 0), "gen": (48, 0), "real+gen": (16, 48)}


def test_extra_fraction_after_the_separator_shapes_the_mixed_rows_batches_only(colours, tmp_path):
    """The real and synthetic rows have no extra set, and their runs refused --extra-fraction ("add
    --extra-dataset"), which the experiment itself forbids."""
    real, test = colours
    synthetic = colour_folder(tmp_path / "synth", 4, seed=7)
    out = tmp_path / "x"
    experiment.main(["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test", f"folder:{test}",
                     "--seeds", "1", "--out", str(out), "--device", "cpu", "--", "--target", "class", "--resolution",
                     str(RES), "--steps", "1", "--warmup-steps", "0", "--batch-size", "6", "--extra-fraction=0.5"])
    fractions = {row: json.loads((out / "runs" / row / "seed0" / "config.json").read_text())["classify"]["extra_fraction"]
                 for row in ("real", "gen", "real+gen")}
    assert fractions["real+gen"] == 0.5 and fractions["real"] == fractions["gen"] != 0.5
    for extra, message in ((["--no-mixed"], "--extra-fraction shapes the batches of mixed rows .* none is trained here"),
                           ([], r"--extra-frac after -- abbreviates --extra-fraction; spell it out")):
        passed = ["--extra-fraction", "0.5"] if extra else ["--extra-frac", "0.5"]
        with pytest.raises(ValueError, match=message):
            experiment.main(["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test",
                             f"folder:{test}", "--out", str(tmp_path / "refused"), *extra, "--", *passed])
        assert not (tmp_path / "refused").exists()


def test_row_sizes_that_round_to_no_image_are_refused_and_matched_counts_survive_float_division(tmp_path):
    """0 images would reach the classifier as --num-samples 0 / --extra-samples 0, which mean every image."""
    import argparse
    from evaluate.experiment import Row, most_matched, plan_sizes
    real = colour_folder(tmp_path / "real", 8, seed=0)             # 24 images
    one = tmp_path / "one"
    (one / "blue").mkdir(parents=True)
    Image.new("RGB", (RES, RES)).save(one / "blue" / "0.png")
    rows = [Row("real", f"folder:{real}"), Row("one", f"folder:{one}", synthetic="one"),
            Row("real+one", f"folder:{real}", extra=f"folder:{one}", synthetic="one")]

    def sizes(multiple, match_size=False, rows=rows):
        args = argparse.Namespace(real=f"folder:{real}", synthetic_multiple=multiple, match_size=match_size)
        return plan_sizes(args, rows, RES, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"--synthetic-multiple 0.01 of 24 real images rounds to no synthetic image per "
                                         r"row; raise it to at least 0.0209\."):  # 0.0208 x 24 = 0.4992 rounds to 0
        sizes(0.01)
    assert sizes(0.0209).multiple == 0.0209
    with pytest.raises(ValueError, match=r"--match-size gives every row 1 image\(s\), and a mixed row needs at least 2"):
        sizes(None, match_size=True)
    assert sizes(None, match_size=True, rows=rows[:2]).match == 1  # no mixed row: one image each is a table
    assert sizes(0.1, match_size=True).real == 10                  # 1 // 0.1 is 9.0
    assert [most_matched(n, k) for n, k in ((1, 0.1), (48, 3), (7, 0.3), (10, 2.5))] == [10, 16, 23, 4]


def test_fine_tune_rows_start_from_the_first_rows_runs_and_train_on_the_real_images(colours, tmp_path, capsys,
                                                                                   monkeypatch):
    from core.checkpoint import save_checkpoint, state_fingerprint
    real, test = colours                                            # 24 real images
    synthetic = colour_folder(tmp_path / "synth", 16, seed=7)        # 48 synthetic images
    out = tmp_path / "x"
    argv = ["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test", f"folder:{test}",
            "--seeds", "2", "--out", str(out), "--device", "cpu", "--synthetic-multiple", "2", "--no-mixed",
            "--fine-tune", "--", "--target", "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0",
            "--batch-size", "6", "--test-samples", "0"]
    summary = experiment.main(argv)
    assert list(summary["rows"]) == ["real", "gen", "real-then-real", "gen-then-real"]
    assert "each synthetic row on 48 synthetic ones (--synthetic-multiple 2)" in capsys.readouterr().out  # no mixed
    for row, first in (("gen-then-real", "gen"), ("real-then-real", "real")):  # and the control, as many steps
        for seed in range(2):
            tuned = out / "runs" / row / f"seed{seed}"
            config = json.loads((tuned / "config.json").read_text())
            source = out / "runs" / first / f"seed{seed}" / "checkpoint.pt"
            assert config["data"]["dataset"] == f"folder:{real}" and config["data"]["num_samples"] == 24
            assert config["classify"]["init_from"] == str(source) and config["train"]["seed"] == seed
            start = load_checkpoint(tuned / "checkpoint.pt", "classify")["data_info"]["init_from"]
            assert start["fingerprint"] == state_fingerprint(load_checkpoint(source, "classify")["models"]["model"])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")}
    assert experiment.main(argv)["rows"] == summary["rows"]         # kept, not trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")} == stamps
    monkeypatch.chdir(tmp_path)  # --out named relative: the fine-tuned runs' --init-from moves with it
    assert experiment.main([a if a != str(out) else "x" for a in argv])["rows"] == summary["rows"]
    monkeypatch.undo()
    # A source whose checkpoint went while its result stays will not train again: deleting the fine-tuned run
    # alone cannot help, so both are named; with it deleted, the refusal still comes before anything trains.
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    copied = [a if a != str(out) else str(copy) for a in argv]
    (copy / "runs" / "real" / "seed0" / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match=r"real-then-real.seed0 was fine-tuned from .*real.seed0.checkpoint.pt, which "
                                         r"is gone while that run's result is kept; delete \S+real.seed0 and "):
        experiment.main(copied)
    shutil.rmtree(copy / "runs" / "real-then-real" / "seed0")
    with pytest.raises(ValueError, match=r"real-then-real.seed0 is to be fine-tuned from \S+real.seed0, whose "
                                         r"checkpoint.pt is gone while its result is kept; delete"):
        experiment.main(copied)
    assert not (copy / "runs" / "real-then-real" / "seed0").exists()
    source = out / "runs" / "gen" / "seed1" / "checkpoint.pt"
    payload = load_checkpoint(source, "classify")                   # trained again, say: other weights
    payload["models"]["model"]["fc.bias"] += 1
    save_checkpoint(payload, source)
    with pytest.raises(ValueError, match=r"gen-then-real.seed1 was fine-tuned from .*gen.seed1.checkpoint.pt, which "
                                         r"holds other weights now; delete"):
        experiment.main(argv)
    tuned = out / "runs" / "gen-then-real" / "seed1" / "checkpoint.pt"
    assert tuned.stat().st_mtime_ns == stamps[tuned]                # refused before anything trained
    source.unlink()
    (source.parent / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"gen-then-real.seed1 was fine-tuned from .*gen.seed1.checkpoint.pt, which "
                                         r"is gone; delete"):
        experiment.main(argv)
    assert not source.exists()                                      # refused before anything trained
    tuned.unlink()  # without its checkpoint, its source is judged by its result: gone, so about to train again
    (out / "runs" / "gen-then-real" / "seed0" / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match=r"gen-then-real.seed1 was fine-tuned from \S+gen.seed1, which was trained "
                                         r"again since or is about to be; delete"):
        experiment.main(argv)


def test_fine_tune_lr_sets_the_learning_rate_of_the_fine_tuned_rows_only(colours, tmp_path):
    real, test = colours
    out = tmp_path / "x"
    synthetic = colour_folder(tmp_path / "gen", 8, seed=2)  # (the real images themselves are refused)

    def argv(*extra):
        return ["--real", f"folder:{real}", "--synthetic", f"gen=folder:{synthetic}", "--test", f"folder:{test}",
                "--seeds", "1", "--out", str(out), "--device", "cpu", "--no-mixed", *extra, "--", "--target",
                "class", "--resolution", str(RES), "--steps", "1", "--warmup-steps", "0", "--batch-size", "6",
                "--test-samples", "0", "--lr", "0.04"]

    summary = experiment.main(argv("--fine-tune", "--fine-tune-lr", "0.004"))
    lr = {row: json.loads((out / "runs" / row / "seed0" / "config.json").read_text())["train"]["lr"]
          for row in summary["rows"]}
    assert lr == {"real": 0.04, "gen": 0.04, "real-then-real": 0.004, "gen-then-real": 0.004}
    assert summary["fine_tune_lr"] == 0.004
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")}
    with pytest.raises(ValueError, match=r"real-then-real.seed0 .*lr.*through --fine-tune-lr"):  # made at another rate
        experiment.main(argv("--fine-tune", "--fine-tune-lr", "0.002"))
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint.pt")} == stamps
    for extra, message in ((("--fine-tune-lr", "0.004"), "add --fine-tune"),
                           (("--fine-tune", "--fine-tune-lr", "0"), "must be a positive number")):
        with pytest.raises(ValueError, match=message):
            experiment.main(argv(*extra))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "blue" / "0.png").write_bytes(b""), r"0\.png"),
    (lambda root: (root / "blue").rename(root / "navy"), r"The classes of --test \(blue, green, red\) differ from "
                                                         r"those of --synthetic bad \(green, navy, red\)"),
])
def test_experiment_refuses_a_bad_synthetic_set_before_any_run_trains(colours, tmp_path, monkeypatch, damage, message):
    """A set's problems surfaced when its first run started, after every real run had trained."""
    real, test = colours
    bad = colour_folder(tmp_path / "bad", 4, seed=7)
    damage(bad)

    def trains(*args, **kwargs):
        raise AssertionError("a run trained before the sets were checked")
    monkeypatch.setattr(runs, "run", trains)
    with pytest.raises(ValueError, match=message):
        experiment.main(["--real", f"folder:{real}", "--synthetic", f"bad=folder:{bad}", "--test", f"folder:{test}",
                         "--out", str(tmp_path / "x"), "--device", "cpu", "--", "--target", "class", "--resolution",
                         str(RES)])
    assert not (tmp_path / "x").exists()


def test_a_damaged_kept_run_of_the_table_is_refused_with_both_ways_out(colours, tmp_path):
    real, test = colours
    out = tmp_path / "x"
    synthetic = colour_folder(tmp_path / "a", 8, seed=2)  # (the real images themselves are refused)
    argv = ["--real", f"folder:{real}", "--synthetic", f"a=folder:{synthetic}", "--test", f"folder:{test}", "--seeds",
            "1", "--no-mixed", "--out", str(out), "--device", "cpu", "--", "--target", "class", "--resolution", str(RES),
            "--steps", "1", "--warmup-steps", "0", "--batch-size", "6"]
    experiment.main(argv)
    checkpoint = out / "runs" / "a" / "seed0" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"checkpoint\.pt .*replace it with an intact checkpoint\.pt, or delete "
                                         r"\S+seed0 to train that run again\.$"):
        experiment.main(argv)


def test_experiment_refuses_options_it_sets_itself(colours, tmp_path):
    real, test = colours
    with pytest.raises(ValueError, match="--seed is set by the experiment"):
        experiment.main(["--real", f"folder:{real}", "--synthetic", f"a=folder:{real}", "--test", f"folder:{test}",
                         "--out", str(tmp_path / "x"), "--", "--seed", "3"])
    assert not (tmp_path / "x").exists()
