"""Options that could not have their effect are refused (or, where a run is still worth running, warned about)
when a run starts, before any data is read or anything written; and a run folder is made ready for a run
only once that run is sure to start.

Most tests drive `training.run.resolve_config` (every check that needs no data) or `train.main` with the data
loaders replaced by ones that fail, so each takes a fraction of a second."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pickle
import shutil
import stat
import string
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import train
from core.config import DataConfig
from core.contract import Section
from core.errors import UserError
from helpers import RES, noise_folder, tiny_args
from training.run import resolve_config, with_options

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Six RES px RGB images in two classes."""
    return noise_folder(tmp_path_factory.mktemp("images"), 6, classes=2)


def resolved(argv: list[str], run_dir: Path):
    """The config `train.py ARGV` would run with, after every check that needs no data."""
    spec, args = train.parse_args(argv)
    return resolve_config(spec, args, run_dir)[0]


def stage_args(stage: str, folder: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--stage", stage, "--device", "cpu", "--dataset", f"folder:{folder}", "--resolution", str(RES),
            "--cache-dir", str(tmp_path / "cache"), *extra]


@pytest.fixture
def no_data(monkeypatch):
    """Any dataset load fails the test: the refusal must come first."""
    import classify.stage
    import ddpm.stage
    import ldm.stage
    import vae.stage

    def loading(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")
    for module in (ddpm.stage, vae.stage, ldm.stage, classify.stage):
        monkeypatch.setattr(module, "load_dataset", loading)


# ---------------------------------------------------------------------------------------------
# 1. a warm-up longer than the run


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_warmup_longer_than_the_run_warns_of_the_rate_it_reaches(tmp_path, folder, schedule):
    from training.loop import lr_factor
    argv = tiny_args(tmp_path / "run", folder, "--lr-schedule", schedule, "--warmup-steps", "200", steps=3)
    with pytest.warns(UserWarning, match=r"^--warmup-steps 200 outlasts --steps 3, so the learning rate reaches only "
                                         r"1\.5% of --lr \(1\.5e-05\); pass --warmup-steps 3 or fewer"):
        config = resolved(argv, tmp_path / "run")  # warned, not refused: smoke runs are meant to run
    assert max(lr_factor(schedule, s, 3, 200) for s in range(3)) == pytest.approx(0.015)  # what the warning says
    assert config.train.warmup_steps == 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warm-up the run completes is no matter for a warning
        resolved(tiny_args(tmp_path / "run", folder, "--lr-schedule", schedule, "--warmup-steps", "3", steps=3),
                 tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# 2, 3. timestep counts past the model's T: refused alike by every stage, with the bound


def invert_argv(tmp_path: Path, folder: Path, model: Path, *extra: str) -> list[str]:
    return ["--stage", "invert", "--device", "cpu", "--model", str(model), "--dataset", f"folder:{folder}",
            "--resolution", str(RES), "--cache-dir", str(tmp_path / "cache"), "--preview-steps", "2", *extra]


@pytest.mark.parametrize("option", ["--eval-timesteps", "--preview-steps"])
def test_an_inversion_refuses_more_timesteps_than_its_model_has(tmp_path, folder, class_ckpt, option):
    """The model has T = 100: the quality signal's timesteps repeated, the preview's were clamped silently."""
    with pytest.raises(UserError, match=rf"^{option} 101 exceeds the model's T = 100 timesteps; use at most 100\.$"):
        resolved(invert_argv(tmp_path, folder, class_ckpt, option, "101"), tmp_path / "run")
    assert resolved(invert_argv(tmp_path, folder, class_ckpt, option, "100"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_diffusion_stage_refuses_preview_steps_past_t_in_the_same_words(tmp_path, folder, class_ckpt):
    said = []
    for argv in (tiny_args(tmp_path / "run", folder, "--preview-steps", "101"),  # T = 100, as the model's
                 invert_argv(tmp_path, folder, class_ckpt, "--preview-steps", "101")):
        with pytest.raises(UserError) as refused:
            resolved(argv, tmp_path / "run")
        said.append(str(refused.value))
    assert said[0] == said[1] == "--preview-steps 101 exceeds the model's T = 100 timesteps; use at most 100."


# ---------------------------------------------------------------------------------------------
# 4, 5, 6. values and options that cannot act


def test_a_log_variance_start_beyond_float32_s_reach_is_refused(tmp_path, folder):
    from vae.config import VAELossConfig
    with pytest.raises(UserError, match=r"^--logvar-init must be a finite number from -20 to 20 .*got 1e\+10\.$"):
        resolved(stage_args("vae", folder, tmp_path, "--logvar-init", "1e10"), tmp_path / "run")
    with pytest.raises(UserError, match="from -20 to 20"):
        VAELossConfig(logvar_init=-100.0)  # exp(-100) is 0 in float32: rec / exp(s) is inf
    assert VAELossConfig(logvar_init=-20.0).logvar_init == -20.0


@pytest.mark.parametrize("option, value", [("--disc-lr", "1e-4"), ("--disc-weight", "0.8"), ("--disc-layers", "2")])
def test_discriminator_options_without_a_discriminator_are_refused(tmp_path, folder, option, value):
    with pytest.raises(UserError, match=rf"^{option} has no effect without a discriminator, and --disc-start -1 trains "
                                        rf"none; pass --disc-start STEP .* or drop {option}\.$"):
        resolved(stage_args("vae", folder, tmp_path, option, value), tmp_path / "run")
    with_one = stage_args("vae", folder, tmp_path, "--disc-start", "0", "--disc-layers", "1", option, value)
    assert resolved(with_one, tmp_path / "run").loss.disc_start == 0


def test_a_discriminator_whose_term_weighs_nothing_is_refused(tmp_path, folder):
    with pytest.raises(UserError, match=r"^--disc-weight 0 gives the discriminator that --disc-start 0 trains no say"):
        resolved(stage_args("vae", folder, tmp_path, "--disc-start", "0", "--disc-layers", "1", "--disc-weight", "0"),
                 tmp_path / "run")


@pytest.mark.parametrize("stage", ["ddpm", "ldm"])
def test_condition_dropout_given_for_an_unconditional_model_is_refused(tmp_path, folder, monkeypatch, stage):
    monkeypatch.chdir(tmp_path)  # (ldm: no default autoencoder run is looked at)
    # (the latent U-Net without attention: the 4x4 latents of 16 px images have no 8x8 feature maps)
    argv = stage_args(stage, folder, tmp_path, "--cond", "none", "--attention-resolutions", "--cond-drop-prob", "0.2")
    with pytest.raises(UserError, match=r"^--cond-drop-prob drops the condition for classifier-free guidance, and this "
                                        r"model has none \(--cond none\); pass --cond class"):
        resolved(argv, tmp_path / "run")
    # The value every config holds is no option given; and a conditional model reads it.
    assert resolved(stage_args("ddpm", folder, tmp_path, "--cond", "none"), tmp_path / "run").diffusion.cond_drop_prob
    conditional = stage_args("ddpm", folder, tmp_path, "--cond", "class", "--cond-drop-prob", "0.2")
    assert resolved(conditional, tmp_path / "run").diffusion.cond_drop_prob == 0.2


# ---------------------------------------------------------------------------------------------
# 8, 10. the classifier's starting weights and extra images, checked before any image is read


@pytest.fixture(scope="module")
def classify_ckpt(tmp_path_factory, folder) -> Path:
    """A classify run of no steps on `folder` (classes class0 and class1, RES px)."""
    run_dir = tmp_path_factory.mktemp("classify") / "run"
    train.main(stage_args("classify", folder, run_dir.parent, "--target", "class", "--batch-size", "2",
                          "--test-samples", "2", "--steps", "0", "--run-dir", str(run_dir)))
    return run_dir / "checkpoint.pt"


def other_classes(root: Path) -> Path:
    for k, name in enumerate(("cat", "dog", "owl")):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (RES, RES), (40 * k, 80, 120)).save(root / name / "0.png")
    return root


@pytest.mark.parametrize("data, extra, told", [
    ("same", ("--resolution", str(2 * RES)), f"{RES} px images, and this run has {2 * RES} px images"),
    ("same", ("--stem", "imagenet"), "the small stem, and this run has the imagenet stem"),
    ("other classes", (), "classes class0, class1, and this run has classes cat, dog, owl"),
])
def test_a_starting_network_that_does_not_fit_is_refused_before_any_image_is_read(tmp_path, folder, classify_ckpt,
                                                                                  no_data, data, extra, told):
    data = other_classes(tmp_path / "animals") if data == "other classes" else folder
    argv = [*stage_args("classify", data, tmp_path, "--target", "class", "--batch-size", "2", *extra),
            "--init-from", str(classify_ckpt), "--run-dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match=rf"^--init-from \S+ was trained with {told}; fine-tune on data and options that "
                                        rf"match it, or "):
        train.main(argv)
    assert not (tmp_path / "run").exists()
    if not extra:  # other classes: a new output layer on the copied trunk predicts them
        assert resolved([*argv, "--new-head"], tmp_path / "run").classify.new_head


def test_too_many_extra_samples_are_refused_in_their_own_option_s_words(tmp_path, folder, no_data):
    argv = [*stage_args("classify", folder, tmp_path, "--target", "class", "--extra-dataset", f"folder:{folder}",
                        "--extra-samples", "10"), "--run-dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match=r"^--extra-samples 10 asks for more images than the 6 of --extra-dataset "
                                        r"folder:\S+; pass at most 6, or 0 for all of them\.$"):
        train.main(argv)


def test_the_loaders_refusal_of_an_extra_count_names_extra_samples(tmp_path, folder):
    """What the start-up check cannot know without reading the set (CIFAR-10's size) the loader refuses: in the
    words of --extra-samples, not of --dataset's --num-samples."""
    from classify.stage import training_data
    config = resolved(stage_args("classify", folder, tmp_path, "--target", "class", "--extra-dataset",
                                 f"folder:{folder}"), tmp_path / "run")
    config = dataclasses.replace(config, classify=dataclasses.replace(config.classify, extra_samples=10))
    with pytest.raises(UserError) as refused:
        training_data(config)
    assert "(--extra-samples) from 1 to 6" in str(refused.value) and "--num-samples" not in str(refused.value)


# ---------------------------------------------------------------------------------------------
# 11. errors in the words of the options, and divergence advice that names the likely cause


@pytest.mark.parametrize("extra, message", [
    (("--num-res-blocks", "0"), "--num-res-blocks must be at least 1, got 0."),
    (("--dropout", "1"), "--dropout must be in [0, 1), got 1.0."),
    (("--attention-resolutions", "5"), "--attention-resolutions (5,) must be among the feature-map sizes (16, 8)."),
])
def test_the_autoencoder_s_errors_name_its_options(tmp_path, folder, extra, message):
    with pytest.raises(UserError) as refused:
        resolved(stage_args("vae", folder, tmp_path, "--channel-mult", "1", "2", *extra), tmp_path / "run")
    assert str(refused.value) == message


@pytest.mark.parametrize("fields, options, message", [
    ({"num_res_blocks": 0}, ("--num-res-blocks", "0"), "{num_res_blocks} must be at least 1, got 0."),
    ({"channel_mult": ()}, ("--channel-mult",), "{channel_mult} needs at least one level, each a positive multiplier "
                                                "(e.g. 1 2 4 4), got (none)."),
    ({"base_channels": 18}, ("--base-channels", "18"), "{base_channels} times each {channel_mult} must split into "
                                                      "min(32, C // 4) equal GroupNorm groups (any multiple of 4 below "
                                                      "128 does, and any multiple of 32 from 128 on), got 18 x 1 = 18."),
])
def test_one_autoencoder_check_reads_in_fields_to_code_and_in_options_to_train_py(tmp_path, folder, fields, options,
                                                                                message):
    """The check names its fields itself: code that builds the config reads the field names, train.py the options
    that set them, in the same sentence."""
    from vae.autoencoder import AutoencoderConfig
    names = ("num_res_blocks", "channel_mult", "base_channels")
    with pytest.raises(UserError) as refused:
        AutoencoderConfig(**{"channel_mult": (1, 2), "resolution": RES, **fields})
    assert str(refused.value) == message.format(**{name: name for name in names})
    with pytest.raises(UserError) as refused:
        resolved(stage_args("vae", folder, tmp_path, "--channel-mult", "1", "2", *options), tmp_path / "run")
    assert str(refused.value) == message.format(**{name: "--" + name.replace("_", "-") for name in names})


def spelled(message: str, options: bool, data_fields: tuple[str, ...] = ()) -> str:
    """`message` with its {field} placeholders spelled as code spells them, or as train.py's options (`options`)
    except `data_fields`, which the data decides and no option sets."""
    names = [name for _, name, _, _ in string.Formatter().parse(message) if name]
    return message.format(**{name: "--" + name.replace("_", "-") if options and name not in data_fields else name
                              for name in names})


@pytest.mark.parametrize("fields, options, message", [
    ({"num_res_blocks": 0}, ("--num-res-blocks", "0"), "{num_res_blocks} must be at least 1, got 0."),
    ({"channel_mult": ()}, ("--channel-mult",), "{channel_mult} needs at least one level, each a positive multiplier "
                                                "(e.g. 1 2 2 2), got (none)."),
    ({"base_channels": 48}, ("--base-channels", "48"), "{base_channels} times each {channel_mult} must be a multiple of "
                                                      "32, so that every width and every sum of widths at a skip "
                                                      "connection splits into whole GroupNorm groups, got 48 x 1 = 48; "
                                                      "use {base_channels} 32 or a multiple of it."),
    ({"num_heads": 3}, ("--num-heads", "3"), "{num_heads} 3 must divide every level's channels, got 32; use a count "
                                             "that divides {base_channels} times each {channel_mult}."),
])
def test_one_unet_check_reads_in_fields_to_code_and_in_options_to_train_py(tmp_path, folder, no_data, fields, options,
                                                                          message):
    """A U-Net built from fields (the Python API, a checkpoint) is refused in field names; train.py's options that
    set the same fields are refused in the options' names, in the same sentence."""
    from ddpm.unet import UNetConfig
    with pytest.raises(UserError) as refused:
        UNetConfig(**{"base_channels": 32, "channel_mult": (1, 2), **fields})
    assert str(refused.value) == spelled(message, options=False)
    with pytest.raises(UserError) as refused:
        resolved(stage_args("ddpm", folder, tmp_path, "--base-channels", "32", "--channel-mult", "1", "2", *options),
                 tmp_path / "run")
    assert str(refused.value) == spelled(message, options=True)


@pytest.mark.parametrize("fields, options, message", [
    ({"attention_resolutions": (3,)}, ("--attention-resolutions", "3"),
     "{attention_resolutions} (3,) must be among the feature-map sizes (16, 8) of a 16x16 input; keep only those, or "
     "none for no attention."),
    ({"channel_mult": (1,) * 6, "attention_resolutions": ()}, ("--channel-mult", *"111111", "--attention-resolutions"),
     "{image_size} 16 must be divisible by 32: the 6 levels of {channel_mult} halve it 5 times; use fewer "
     "{channel_mult} levels or another size."),
])
def test_a_unet_that_does_not_fit_the_image_size_keeps_the_data_s_field_name_on_the_command_line(tmp_path, folder,
                                                                                                 no_data, fields,
                                                                                                 options, message):
    """The image size is the data's (--resolution), so no option is named for it; the options beside it are."""
    from ddpm.unet import UNet, UNetConfig
    with pytest.raises(UserError) as refused:
        UNet(UNetConfig(**{"image_size": RES, "base_channels": 32, "channel_mult": (1, 2), **fields}))
    assert str(refused.value) == spelled(message, options=False)
    with pytest.raises(UserError) as refused:
        resolved(stage_args("ddpm", folder, tmp_path, "--base-channels", "32", "--channel-mult", "1", "2", *options),
                 tmp_path / "run")
    assert str(refused.value) == (f"{RES}x{RES} images (--resolution {RES}) do not fit the U-Net: "
                                  f"{spelled(message, options=True, data_fields=('image_size',))}")


@pytest.mark.parametrize("fields, options, message", [
    ({"schedule": "linear", "num_timesteps": 20}, ("--schedule", "linear", "--num-timesteps", "20"),
     "{schedule} linear needs {num_timesteps} above 20 (its betas are scaled by 1000/T and would reach 1), got 20; "
     "use more timesteps or {schedule} cosine."),
    ({"schedule": "cosine", "beta_range": (0.001, 0.02)}, ("--schedule", "cosine", "--beta-range", "0.001", "0.02"),
     "The cosine schedule has no beta range; drop {beta_range} or use {schedule} linear or scaled_linear."),
    ({"num_timesteps": 0}, ("--num-timesteps", "0"), "{num_timesteps} must be from 1 to 100,000 (DDPM: 1000, improved "
                                                     "DDPM: 4000), got 0."),
])
def test_a_diffusion_check_reads_in_fields_to_code_and_in_options_to_train_py(tmp_path, folder, no_data, fields,
                                                                             options, message):
    """The diffusion section's checks and the schedule's own (its arguments are the section's fields) alike."""
    from ddpm.config import DiffusionConfig
    with pytest.raises(UserError) as refused:
        DiffusionConfig(**fields)
    assert str(refused.value) == spelled(message, options=False)
    with pytest.raises(UserError) as refused:
        resolved(stage_args("ddpm", folder, tmp_path, *options), tmp_path / "run")
    assert str(refused.value) == spelled(message, options=True)


@dataclasses.dataclass(frozen=True)
class Heads:
    """A section whose check names a field mid-sentence and spells two fields in a formula that is no option."""
    width: int = 8
    num_heads: int = 1

    def __post_init__(self) -> None:
        from core.errors import FieldError
        if self.width % self.num_heads:
            raise FieldError("{num_heads} {heads} must divide the {width} {value}, so that each head is "
                             "width / num_heads channels wide.", heads=self.num_heads, value=self.width)


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    net: Heads = dataclasses.field(default_factory=Heads)


def test_only_the_fields_a_check_names_become_options_not_its_other_words():
    """What a rewrite of the finished sentence got wrong: it left a field named mid-sentence without an underscore
    (the width) as it was, and rewrote a formula's num_heads into an option."""
    spec = SimpleNamespace(sections=(Section("data", DataConfig), Section("net", Heads)))
    with pytest.raises(UserError) as refused:
        with_options(spec, HeadsConfig(), argparse.Namespace(**{"net.width": 10, "net.num_heads": 4}))
    assert str(refused.value) == ("--num-heads 4 must divide the --width 10, so that each head is width / num_heads "
                                  "channels wide.")
    with pytest.raises(UserError) as refused:
        Heads(width=10, num_heads=4)
    told = "num_heads 4 must divide the width 10, so that each head is width / num_heads channels wide."
    assert str(refused.value) == told and str(pickle.loads(pickle.dumps(refused.value))) == told


def test_a_linear_schedule_too_short_is_refused_in_the_options_words(tmp_path, folder):
    with pytest.raises(UserError) as refused:
        resolved(stage_args("ddpm", folder, tmp_path, "--schedule", "linear", "--num-timesteps", "20"), tmp_path / "run")
    assert str(refused.value) == ("--schedule linear needs --num-timesteps above 20 (its betas are scaled by 1000/T "
                                  "and would reach 1), got 20; use more timesteps or --schedule cosine.")


def section_class(name: str) -> type:
    """A config section by its dotted path ("core.config.TrainConfig"), imported when the test runs."""
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("section, stage, fields, options, message", [
    ("core.config.TrainConfig", "ddpm", {"lr": -1.0}, ("--lr", "-1"), "{lr} must be a positive number, got -1.0."),
    ("core.config.TrainConfig", "vae", {"lr_schedule": "onecycle", "steps": 10, "warmup_steps": 10},
     ("--lr-schedule", "onecycle", "--steps", "10", "--warmup-steps", "10"),
     "{warmup_steps} 10 leaves no annealing phase in a one-cycle schedule of {steps} 10; pass {warmup_steps} 3 (30% "
     "of the run is usual)."),
    ("core.config.DataConfig", "ddpm", {"num_samples": -1}, ("--num-samples", "-1"),
     "{num_samples} must be 0 (all) or positive, got -1."),
    ("core.config.DataConfig", "classify", {"cache_dir": " "}, ("--cache-dir", " "),
     "{cache_dir} is empty; give a folder (default .cache/datasets)."),
    ("vae.config.VAELossConfig", "vae", {"perceptual_taps": 6}, ("--perceptual-taps", "6"),
     "{perceptual_taps} must be in 1..5, got 6."),
    ("vae.config.VAELossConfig", "vae", {"kl_weight": -1.0}, ("--kl-weight", "-1"),
     "{kl_weight} must be 0 or positive, got -1.0."),
    ("vae.config.VAEOptions", "vae", {"scale_samples": 1}, ("--scale-samples", "1"),
     "{scale_samples} must be at least 2, got 1."),
    ("ldm.config.LatentConfig", "ldm", {"encode_batch": 0}, ("--encode-batch", "0"),
     "{encode_batch} must be at least 1, got 0."),
    ("invert.config.InvertOptions", "invert", {"eval_timesteps": 0}, ("--eval-timesteps", "0"),
     "{eval_timesteps} must be at least 1, got 0."),
    ("classify.config.ClassifyOptions", "classify", {"momentum": 1.0}, ("--momentum", "1"),
     "{momentum} must be in [0, 1), got 1.0."),
    ("classify.config.ClassifyOptions", "classify", {"momentum": 0.0}, ("--momentum", "0"),
     "{nesterov} needs a positive {momentum}; turn {nesterov} off for plain SGD."),
])
def test_a_section_s_check_reads_in_fields_to_code_and_in_options_to_train_py(tmp_path, folder, monkeypatch, no_data,
                                                                             section, stage, fields, options, message):
    """The data, training, loss and stage options' checks name their fields as the networks' do: a config built in
    Python is told its field names, with no option in sight; train.py the options that set them."""
    monkeypatch.chdir(tmp_path)  # (ldm: no default autoencoder run is looked at)
    with pytest.raises(UserError) as refused:
        section_class(section)(**fields)
    assert str(refused.value) == spelled(message, options=False) and "--" not in str(refused.value)
    with pytest.raises(UserError) as refused:
        resolved(stage_args(stage, folder, tmp_path, *options), tmp_path / "run")
    assert str(refused.value) == spelled(message, options=True)


def test_a_value_that_looks_like_a_field_is_printed_as_it_is():
    """Only a check's own placeholders are names: a value spelled like one ("{lr}") is neither filled in nor a
    format error, in field names or in option words (with_options here, past argparse's own choices)."""
    from core.config import TrainConfig
    from stages import STAGES
    with pytest.raises(UserError) as refused:
        TrainConfig(lr_schedule="{lr}")
    assert str(refused.value) == "lr_schedule must be one of constant, cosine, onecycle, got '{lr}'."
    spec = STAGES["ddpm"]
    with pytest.raises(UserError) as refused:
        with_options(spec, spec.presets[spec.default_preset](), argparse.Namespace(**{"train.lr_schedule": "{lr}"}))
    assert str(refused.value) == "--lr-schedule must be one of constant, cosine, onecycle, got '{lr}'."


def test_the_classifier_s_own_check_of_a_field_the_data_decides_keeps_its_name():
    from classify.config import MODEL_FROM_DATA
    from classify.model import ClassifierConfig
    from core.config import in_option_words
    with pytest.raises(UserError) as refused:
        ClassifierConfig(in_channels=2)
    assert refused.value.fields == ("in_channels",)
    assert in_option_words(refused.value, ClassifierConfig, MODEL_FROM_DATA) == "in_channels must be 1 or 3, got 2."
    with pytest.raises(UserError) as refused:
        ClassifierConfig(stem="{stem}")
    assert str(refused.value) == "stem must be one of auto, small, imagenet, got '{stem}'."
    assert in_option_words(refused.value, ClassifierConfig, MODEL_FROM_DATA) == ("--stem must be one of auto, small, "
                                                                                  "imagenet, got '{stem}'.")


def keyed(message: str, options: bool) -> str:
    """`message` with its {section.field} placeholders spelled as code spells them, or as train.py's options."""
    for _, key, _, _ in string.Formatter().parse(message):
        if key:
            message = message.replace("{" + key + "}", "--" + key.split(".")[1].replace("_", "-") if options else key)
    return message


@pytest.mark.parametrize("config, options, message", [
    (dict(data=dict(resolution=RES), classify=dict(crop_padding=RES)), ("--crop-padding", str(RES)),
     f"{{classify.crop_padding}} must be smaller than {{data.resolution}} ({RES} px), got {RES}; pass at most "
     f"{RES - 1}, or -1 for an eighth of {{data.resolution}}."),
    (dict(data=dict(resolution=32), model=dict(stem="imagenet"), train=dict(batch_size=1)),
     ("--resolution", "32", "--stem", "imagenet", "--batch-size", "1"),
     "ResNet-18 shrinks 32 px images to 1x1 in its last stage, where batch norm needs more than one value per channel, "
     "so {train.batch_size} 1 cannot train it; pass {train.batch_size} 2 or more, or {model.stem} small."),
])
def test_a_check_across_a_stage_s_sections_reads_in_keys_to_code_and_in_options_to_train_py(tmp_path, folder, no_data,
                                                                                          config, options, message):
    """The classifier's checks of one section against another name their fields by dotted keys: code (and a
    checkpoint) reads "train.batch_size", train.py --batch-size."""
    from classify.config import ClassifyConfig
    from core.config import from_dict, to_dict
    with pytest.raises(UserError) as refused:
        ClassifyConfig(**{name: dataclasses.replace(getattr(ClassifyConfig(), name), **fields)
                          for name, fields in config.items()})
    assert str(refused.value) == keyed(message, options=False) and "--" not in str(refused.value)
    record = to_dict(ClassifyConfig())
    for name, fields in config.items():
        record[name].update(fields)
    with pytest.raises(UserError) as refused:
        from_dict(ClassifyConfig, record, "checkpoint.pt")
    assert f"fails its own checks ({keyed(message, options=False).rstrip('.')}); " in str(refused.value)
    with pytest.raises(UserError) as refused:
        resolved(stage_args("classify", folder, tmp_path, "--target", "class", *options), tmp_path / "run")
    assert str(refused.value) == keyed(message, options=True)


@pytest.mark.parametrize("fields, options, message", [
    ({"steps": 0}, ("--steps", "0"), "{steps} must be at least 1, got 0."),
    ({"eta": 2.0}, ("--eta", "2"), "{eta} must be in [0, 1], got 2.0."),
    ({"sampler": "pndm", "steps": 3}, ("--sampler", "pndm", "--steps", "3"),
     "{sampler} pndm needs at least 4 steps, got 3."),
    ({"guidance_scale": math.inf}, ("--guidance-scale", "inf"), "{guidance_scale} must be a finite number, got inf."),
])
def test_a_sampling_check_reads_in_fields_to_code_and_in_options_to_the_commands_that_draw(tmp_path, fields, options,
                                                                                           message):
    """sample.py and the consistency check refuse their sampling options before opening any checkpoint, in the
    options' words; code that builds the config is told its fields."""
    import sample
    from ddpm.config import SamplingConfig
    from evaluate import consistency
    with pytest.raises(UserError) as refused:
        SamplingConfig(**fields)
    assert str(refused.value) == spelled(message, options=False) and "--" not in str(refused.value)
    missing = str(tmp_path / "missing.pt")
    for main, argv in ((sample.main, ["--ckpt", missing, "--device", "cpu"]),
                       (consistency.main, ["--ckpt", missing, "--judge", missing, "--device", "cpu"])):
        with pytest.raises(UserError) as refused:
            main([*argv, *options])
        assert str(refused.value) == spelled(message, options=True), main


@pytest.mark.parametrize("fields, message", [
    ({"interp": 2.0}, "{interp} must be in [0, 1], got 2.0."),
    ({"emb_noise": -1.0}, "{emb_noise} must be 0 or a positive number, got -1.0."),
    ({"reference": "{interp}"}, "{reference} must be one of mean, null, got '{{interp}}'."),
])
def test_an_inversion_s_variations_read_in_fields_to_code_and_in_options_to_sample_py(fields, message):
    """What sample.py asks of an inversion (`Request.sections`) is refused in its options' words."""
    from ddpm.source import Request
    from invert.variations import Variations, requested_variations
    with pytest.raises(UserError) as refused:
        Variations(**fields)
    assert str(refused.value) == spelled(message, options=False) and "--" not in str(refused.value)
    with pytest.raises(UserError) as refused:
        requested_variations(Request(sections={"variations": fields}))
    assert str(refused.value) == spelled(message, options=True)


def toy_trainer(tmp_path: Path, config, amp: torch.dtype | None = None):
    from core.config import TrainConfig
    from core.contract import Trainable, TrainingStage
    from core.runtime import Runtime
    from training.loop import Trainer
    stage = TrainingStage(name="toy", trainables={"model": Trainable(torch.nn.Linear(2, 1), lr=1e-3)},
                          loss=lambda models, batch, generator, step: (models["model"](batch).mean(), {}),
                          dataset=torch.zeros(4, 2), config={}, data_info={})
    trainer = Trainer(stage, TrainConfig(steps=1), tmp_path / "run", Runtime(CPU), advice=config.divergence_advice)
    trainer.amp_dtype = amp
    return trainer


def test_divergence_advice_names_the_options_that_throw_the_autoencoder_off(tmp_path):
    from ddpm.config import ddpm_demo
    from vae.config import VAELossConfig, vae_demo
    gan = vae_demo()
    gan = dataclasses.replace(gan, loss=dataclasses.replace(gan.loss, disc_start=10))

    def advice(config, what: str, step: int, amp=None) -> str:
        return str(toy_trainer(tmp_path, config, amp)._divergence_error(what, step)).split(", so start a new run ")[1]
    assert advice(gan, "the loss/disc became nan", 20) == "with a lower --disc-lr (it trains at --lr now)."
    assert advice(gan, "the loss became nan", 20) == "with a lower --disc-weight or --lr."
    assert advice(gan, "the loss became nan", 5) == "with a lower --lr."  # the discriminator has not started yet
    learned = dataclasses.replace(gan, loss=VAELossConfig(learn_logvar=True))
    assert advice(learned, "the loss became inf", 5) == "with a lower --lr, or without --learn-logvar."
    assert advice(ddpm_demo(), "the loss became nan", 5, torch.bfloat16) == "with a lower --lr, or with --amp none."
    assert advice(gan, "the loss became nan", 20, torch.float16) == (
        "with --amp bf16 or none (fp16 overflows where they do not), or with a lower --disc-weight or --lr.")


# ---------------------------------------------------------------------------------------------
# 12. networks larger than the device, refused before the data is loaded


@pytest.mark.parametrize("stage, extra, network", [
    ("ddpm", ("--base-channels", "100032"), "U-Net"),
    ("ldm", ("--cond", "none", "--attention-resolutions", "--base-channels", "100032"), "U-Net"),
    ("vae", ("--base-channels", "20000"), "autoencoder"),
])
def test_a_network_too_large_for_the_device_is_refused_before_any_data_is_read(tmp_path, folder, monkeypatch, no_data,
                                                                             stage, extra, network):
    monkeypatch.chdir(tmp_path)  # (ldm: the default autoencoder is not trained first)
    argv = [*stage_args(stage, folder, tmp_path, *extra), "--run-dir", str(tmp_path / "run")]
    with pytest.raises(UserError, match=rf"^The {network}'s [\d,]+ parameters, trained with AdamW in fp32, take "
                                        rf"[\d,.]+ GiB, more than the [\d,.]+ GiB of memory this machine has; give a "
                                        rf"smaller --base-channels"):
        train.main(argv)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage", ["ddpm", "vae"])
def test_the_network_memory_estimate_is_weights_gradients_adam_and_ema(tmp_path, folder, monkeypatch, stage):
    """Held against the networks themselves: 4 bytes x (weights, gradients, two moments, average) of each."""
    import core.runtime
    from ddpm.unet import UNet
    from vae.autoencoder import AutoencoderKL
    from vae.discriminator import PatchDiscriminator
    argv = stage_args(stage, folder, tmp_path, "--channel-mult", "1", "2", "--attention-resolutions")
    if stage == "vae":
        argv += ["--disc-start", "0", "--disc-layers", "1"]
    config = resolved(argv, tmp_path / "run")
    if stage == "ddpm":
        need = 20 * sum(p.numel() for p in UNet(dataclasses.replace(config.unet, image_size=RES)).parameters())
    else:
        autoencoder = AutoencoderKL(dataclasses.replace(config.autoencoder, resolution=RES))
        disc = PatchDiscriminator(3, num_layers=1)
        need = 20 * sum(p.numel() for p in autoencoder.parameters()) + 16 * sum(p.numel() for p in disc.parameters())
    for memory, fits in ((need, True), (need - 1, False)):
        monkeypatch.setattr(core.runtime, "device_memory", lambda device, memory=memory: memory)
        if fits:
            resolved(argv, tmp_path / "run")
        else:
            with pytest.raises(UserError, match="more than the"):
                resolved(argv, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# 9. a run folder the run cannot write to, found before the run resumes


def as_a_user(monkeypatch) -> None:
    """As root, os.access grants writing whatever the mode bits say (though a read-only mount refuses it):
    judge by the owner's bits, as for any other user."""
    if os.geteuid() != 0:
        return
    bits = {os.R_OK: stat.S_IRUSR, os.W_OK: stat.S_IWUSR, os.X_OK: stat.S_IXUSR}
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: os.path.exists(path) and all(
        os.stat(path).st_mode & bit for flag, bit in bits.items() if mode & flag))


@pytest.mark.parametrize("read_only", ["samples", "metrics.jsonl"])
def test_resuming_into_a_read_only_output_is_refused_before_any_work(tmp_path, class_ckpt, monkeypatch, no_data,
                                                                     read_only):
    run_dir = tmp_path / "run"
    shutil.copytree(class_ckpt.parent, run_dir)
    path = run_dir / read_only
    path.chmod(0o555 if path.is_dir() else 0o444)
    as_a_user(monkeypatch)
    before = (run_dir / "checkpoint.pt").read_bytes()
    try:
        with pytest.raises(UserError, match=rf"^{path} is read-only, and this run writes (into|to) it; make it writable "
                                            rf"\(chmod u\+w {path}\) and run the same command again\.$"):
            train.main(["--run-dir", str(run_dir), "--resume", "--steps", "4", "--device", "cpu"])
    finally:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert (run_dir / "checkpoint.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 13. starting over: what the stopped run wrote goes, once the new run is sure to start


def killed_run(run_dir: Path) -> None:
    """What a run killed after a preview and an evaluation, before its first checkpoint, leaves; and a note of
    the user's in samples/."""
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "figures").mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n')
    for name in ("samples/step-0000100.png", "samples/final.png", "figures/confusion-step-0000100.png",
                 "confusion.png"):
        Image.new("RGB", (4, 4)).save(run_dir / name)
    (run_dir / "samples" / "notes.txt").write_text("mine")


def test_starting_over_removes_the_stopped_run_s_previews_and_nothing_else(tmp_path, folder, capsys):
    run_dir = tmp_path / "run"
    killed_run(run_dir)
    train.main(tiny_args(run_dir, folder, steps=1))
    assert "holds the log and 4 image(s) of a run that stopped before its first checkpoint; starting it over" in \
        capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["final.png", "notes.txt", "step-0000001.png"]
    assert not (run_dir / "figures").exists() and not (run_dir / "confusion.png").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's step, logged once


def test_a_run_whose_data_fails_to_load_removes_nothing_of_the_stopped_run(tmp_path, folder):
    run_dir = tmp_path / "run"
    killed_run(run_dir)
    before = sorted(str(p) for p in run_dir.rglob("*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="contains no images"):
        train.main(tiny_args(run_dir, tmp_path / "empty", steps=1))
    assert sorted(str(p) for p in run_dir.rglob("*")) == before
    assert (run_dir / "metrics.jsonl").read_text().startswith('{"step": 1')
