"""The `vae` and `ldm` stages end to end on tiny models: held-out metrics and previews, the latent scale,
the latent cache, exact resume, self-contained latent checkpoints, and every bad input the issue lists."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from training.loop import Trainer
from training.run import resolve_config
from core.cli import RunInterrupted
from core.checkpoint import load_checkpoint
from core.config import from_dict
from data import load_dataset
from ldm.config import DEFAULT_VAE_CKPT, LDMConfig
from helpers import NPZ_DAMAGE, damaged_npz
from ldm.latents import _read, draw_latent
from vae.stage import latent_scale_factor
from ldm.stage import prerequisite
from vae.stage import latent_scale, load_autoencoder

RES = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def vae_args(run_dir: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return ["--stage", "vae", "--run-dir", str(run_dir), "--device", "cpu", "--dataset", "plumes", "--num-samples", "12",
            "--resolution", str(RES), "--cache-dir", str(cache), "--test-samples", "4", "--base-channels", "16",
            "--channel-mult", "1", "2", "--num-res-blocks", "1", "--latent-channels", "2", "--perceptual-taps", "1",
            "--scale-samples", "12", "--steps", str(steps), "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "2",
            "--log-every", "1", "--sample-every", "0", "--ckpt-every", "100", "--preview-images", "4", *extra]


def ldm_args(run_dir: Path, cache: Path, vae: Path, steps: int, *extra: str) -> list[str]:
    return ["--stage", "ldm", "--run-dir", str(run_dir), "--device", "cpu", "--dataset", "plumes", "--num-samples", "12",
            "--resolution", str(RES), "--cache-dir", str(cache), "--vae-ckpt", str(vae), "--base-channels", "32",
            "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions", "4", "--num-timesteps", "100",
            "--steps", str(steps), "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "2", "--log-every", "1",
            "--sample-every", "0", "--ckpt-every", "100", "--preview-images", "4", "--preview-steps", "4", *extra]


def records(run_dir: Path, split: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["split"] == split]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("vae")
    train.main(vae_args(run_dir, cache, 6))
    return run_dir


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, cache, vae_run) -> Path:
    run_dir = tmp_path_factory.mktemp("ldm")
    train.main(ldm_args(run_dir, cache, vae_run / "checkpoint.pt", 3, "--cond", "params"))
    return run_dir


# ---------------------------------------------------------------------------------------------
# vae


def test_vae_run_writes_reconstructions_heldout_metrics_and_the_latent_scale(vae_run):
    [evaluation] = records(vae_run, "heldout")  # plumes has a test split: these images were never trained on
    assert evaluation["step"] == 6 and evaluation["images"] == 4
    assert set(evaluation) >= {"l1", "psnr", "perceptual", "kl"} and evaluation["psnr"] > 0
    assert {"l1", "perceptual", "kl", "loss"} <= set(records(vae_run)[0])
    with Image.open(vae_run / "samples" / "final.png") as grid:  # 4 originals above their 4 reconstructions
        assert grid.size == (4 * (RES + 2) + 2, 2 * (RES + 2) + 2)
    payload = load_checkpoint(vae_run / "checkpoint.pt", "vae")
    assert payload["scale_factor"] > 0 and payload["scale_samples"] == 12
    assert from_dict(type(from_dict(LDMConfig, {}).data), payload["config"]["data"]).resolution == RES


def test_scale_factor_gives_latents_of_unit_standard_deviation(vae_run, cache):
    payload = load_checkpoint(vae_run / "checkpoint.pt", "vae")
    autoencoder, scale, _ = load_autoencoder(payload, torch.device("cpu"), vae_run)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in autoencoder.modules()
               if isinstance(m, torch.nn.Conv2d))  # on the CPU, the faster layout for inference (core.speed)
    from data import load_dataset
    images = load_dataset("plumes", RES, cache_dir=cache, num_samples=12).images
    assert scale == pytest.approx(latent_scale(autoencoder, images), rel=0.05)  # other images
    with torch.no_grad():
        z = torch.cat([autoencoder.encode(images.float() / 127.5 - 1).sample(generator=torch.Generator().manual_seed(s))
                       for s in range(4)])
    assert (z * scale).std().item() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("logvar, fp16", [((), False), (("--learn-logvar", "--logvar-init", "0.5"), False), ((), True)],
                         ids=["fixed-logvar", "learned-logvar", "fp16-loss-scaling"])
def test_vae_resume_with_discriminator_is_exact(tmp_path, cache, monkeypatch, logvar, fp16):
    """Two optimizers (autoencoder and PatchGAN from step 2), EMA and the adaptive weight, and a third for
    the output log-variance when it is learned, interrupted and resumed, give bit-identical losses and weights.
    With fp16, what `--amp auto` picks on a GPU without bf16, every loss goes through one gradient scaler,
    whose state resumes with the run (autocast and the scaler run on the CPU too; only `--amp fp16` is
    refused there)."""
    if fp16:
        import training.loop
        monkeypatch.setattr(training.loop, "autocast_dtype", lambda amp, device: torch.float16)
    straight, split = tmp_path / "straight", tmp_path / "split"
    gan = ("--disc-start", "2", "--disc-layers", "2", *logvar)
    train.main(vae_args(straight, cache, 4, *gan))
    train.main(vae_args(split, cache, 2, *gan))
    train.main(["--stage", "vae", "--run-dir", str(split), "--resume", "--steps", "4", "--device", "cpu"])
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in records(straight)]
    assert "loss/disc" in records(straight)[-1] and "d_weight" in records(straight)[-1]
    a, b = (load_checkpoint(d / "checkpoint.pt", "vae") for d in (straight, split))
    assert a["scaler"] == b["scaler"] and bool(a["scaler"]) == fp16  # a disabled scaler's state is empty
    if logvar:  # s is a trainable of its own, saved with the run, and it moved
        assert set(a["models"]) == {"model", "disc", "logvar"} and "loss/logvar" in records(straight)[-1]
        assert a["models"]["logvar"]["logvar"].item() != 0.5 and records(straight)[0]["logvar"] == 0.5
    for group in ("models", "ema"):
        for name in a[group]:
            for key, value in a[group][name].items():
                assert torch.equal(value, b[group][name][key]), f"{group}.{name}.{key} differs after resume"


def test_folder_without_a_test_split_is_evaluated_on_training_images_and_says_so(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    args = vae_args(tmp_path / "run", tmp_path, 1, "--num-samples", "0")
    args[args.index("plumes")] = f"folder:{folder}"
    train.main(args)
    assert "has no test split" in capsys.readouterr().out
    [evaluation] = records(tmp_path / "run", "trainset")  # never labelled "heldout"
    assert evaluation["images"] == 4 and not records(tmp_path / "run", "heldout")


# ---------------------------------------------------------------------------------------------
# ldm


def test_ldm_checkpoint_carries_its_autoencoder_and_samples_alone(ldm_run, vae_run, tmp_path):
    payload = load_checkpoint(ldm_run / "checkpoint.pt", "ldm")
    vae_payload = load_checkpoint(vae_run / "checkpoint.pt", "vae")
    assert payload["vae"]["autoencoder_scale_factor"] == vae_payload["scale_factor"]  # kept for comparison
    for key, value in vae_payload["ema"]["model"].items():
        assert torch.equal(payload["vae"]["ema"]["model"][key], value)
    assert payload["config"]["unet"]["image_size"] == RES // 2 and payload["config"]["unet"]["in_channels"] == 2
    # The VAE run may disappear: the latent checkpoint is enough to sample (copy it somewhere else).
    alone = tmp_path / "alone" / "checkpoint.pt"
    alone.parent.mkdir()
    alone.write_bytes((ldm_run / "checkpoint.pt").read_bytes())
    with pytest.warns(UserWarning, match=r"--param 'wind=-1' lies outside the range the model was trained on \(-?\d"):
        out = sample.main(["--ckpt", str(alone), "--param", "wind=-1", "--param", "temperature=2", "--guidance-scale",
                           "3", "--sampler", "pndm", "--steps", "4", "--num", "2", "--gif", "--device", "cpu"])
    for name in ("000000.png", "000001.png"):
        with Image.open(out / "images" / name) as image:
            assert image.size == (RES, RES)  # decoded pixels, not 8x8 latents
    with Image.open(out / "reverse.gif") as gif:
        # One frame per step plus the result (Pillow merges identical neighbours), decoded to pixels.
        assert 1 < gif.n_frames <= 5 and gif.size == (2 * (RES + 2) + 2, RES + 2 + 2)
    rows = list(__import__("csv").DictReader((out / "manifest.csv").read_text().splitlines()))
    assert [float(r["wind"]) for r in rows] == [-1.0, -1.0]


def test_latent_scale_factor_is_one_over_the_std_of_the_posterior_draws_in_closed_form():
    """Var(z) = Var(mean) + E[std^2] over every element of every view of a cache small enough to write out."""
    g = torch.Generator().manual_seed(0)
    mean = (torch.randn(5, 2, 3, 4, 4, generator=g) + 40.0).half()  # a large offset must not cancel the variance
    std = (0.3 + torch.rand(5, 2, 3, 4, 4, generator=g)).half()
    moments = torch.cat([mean, std], dim=2)  # (N, V, 2L, h, w) = [mean | std]
    m, v = mean.double().flatten(), std.double().flatten()
    expected = 1 / math.sqrt(((m - m.mean()) ** 2).mean() + (v ** 2).mean())
    assert latent_scale_factor(moments) == pytest.approx(expected, rel=1e-12)
    assert latent_scale_factor(moments, chunk=2) == pytest.approx(expected, rel=1e-12)
    # ... which is what many posterior draws spread as.
    draws = torch.stack([draw_latent(moments.flatten(0, 1).float(), g) for _ in range(400)])
    assert latent_scale_factor(moments) == pytest.approx(1 / draws.double().std().item(), rel=0.01)
    with pytest.raises(ValueError, match="standard deviation 0.0"):
        latent_scale_factor(torch.zeros(2, 1, 2, 2, 2))


def test_latent_model_trains_and_samples_with_the_scale_of_its_own_latents(ldm_run, vae_run, cache, tmp_path):
    """Latent diffusion's scale_by_std: measured on this run's latent cache, stored in its checkpoint, and
    what sampling divides by before decoding; a resumed run keeps the stored value."""
    from core.runtime import Runtime
    from ldm.latents import latent_dataset
    from ldm.stage import SPEC as LDM
    cpu = torch.device("cpu")
    autoencoder, _, fingerprint = load_autoencoder(load_checkpoint(vae_run / "checkpoint.pt", "vae"), cpu, vae_run)
    latents = latent_dataset(autoencoder, fingerprint, load_dataset("plumes", RES, cache_dir=cache, num_samples=12),
                             hflip=False, cache_dir=cache, batch=64, runtime=Runtime(cpu))
    payload = load_checkpoint(ldm_run / "checkpoint.pt", "ldm")
    assert payload["vae"]["scale_factor"] == latent_scale_factor(latents.moments)

    # A checkpoint whose scale differs from what its cache would measure: sampling and resuming both use it.
    payload["vae"]["scale_factor"] = 0.5
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(payload, run_dir / "checkpoint.pt")
    z = torch.randn(2, 2, RES // 2, RES // 2, generator=torch.Generator().manual_seed(0))
    decode = LDM.load_source(payload, cpu, "ema", run_dir / "checkpoint.pt").model.decode
    with torch.no_grad():
        assert torch.equal(decode(z), autoencoder.decode(z / 0.5))
    (run_dir / "metrics.jsonl").write_text((ldm_run / "metrics.jsonl").read_text())
    train.main(["--stage", "ldm", "--run-dir", str(run_dir), "--resume", "--steps", "4", "--device", "cpu"])
    resumed = load_checkpoint(run_dir / "checkpoint.pt", "ldm")
    assert resumed["step"] == 4 and resumed["vae"]["scale_factor"] == 0.5
    assert resumed["vae"]["autoencoder_scale_factor"] == payload["vae"]["autoencoder_scale_factor"]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "spndm"])
def test_latent_sampling_is_reproducible_for_every_sampler(ldm_run, tmp_path, sampler):
    def draw(name):
        out = sample.main(["--ckpt", str(ldm_run / "checkpoint.pt"), "--sampler", sampler, "--steps", "3", "--num", "2",
                           "--out", str(tmp_path / name), "--device", "cpu"])
        return [np.asarray(Image.open(p)) for p in sorted((out / "images").iterdir())]

    first, again = draw("a"), draw("b")
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], first[1])


def test_ldm_resume_is_exact(tmp_path, cache, vae_run):
    straight, split = tmp_path / "straight", tmp_path / "split"
    vae = vae_run / "checkpoint.pt"
    train.main(ldm_args(straight, cache, vae, 4, "--cond", "params", "--dropout", "0.1"))
    train.main(ldm_args(split, cache, vae, 2, "--cond", "params", "--dropout", "0.1"))
    train.main(["--stage", "ldm", "--run-dir", str(split), "--resume", "--steps", "4", "--device", "cpu"])
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in records(straight)]
    a, b = (load_checkpoint(d / "checkpoint.pt", "ldm") for d in (straight, split))
    assert all(torch.equal(v, b["ema"]["model"][k]) for k, v in a["ema"]["model"].items())


def test_ldm_resumes_exactly_from_the_autoencoder_it_carries_once_the_file_is_gone(tmp_path, cache, vae_run, capsys):
    """The README's promise: a latent checkpoint is enough to resume. The VAE file it started from may be
    moved or deleted; another autoencoder in its place is refused, its latents not being this run's."""
    vae = tmp_path / "vae.pt"
    vae.write_bytes((vae_run / "checkpoint.pt").read_bytes())
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(ldm_args(straight, cache, vae_run / "checkpoint.pt", 4, "--cond", "params"))
    train.main(ldm_args(split, cache, vae, 2, "--cond", "params"))
    resume = ["--stage", "ldm", "--run-dir", str(split), "--resume", "--steps", "4", "--device", "cpu"]

    other = load_checkpoint(vae_run / "checkpoint.pt", "vae")
    other["ema"]["model"]["decoder.conv_out.bias"] += 0.1  # the autoencoder trained further, say
    torch.save(other, vae)
    saved = (split / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=f"--vae-ckpt {vae} holds another autoencoder .* move it away to resume with "
                                         f"the copy the checkpoint carries"):
        train.main(resume)
    assert (split / "checkpoint.pt").read_bytes() == saved

    vae.unlink()
    capsys.readouterr()
    train.main(resume)
    assert f"from the copy in this run's checkpoint (first read from {vae})" in capsys.readouterr().out
    assert [r["loss"] for r in records(split)] == [r["loss"] for r in records(straight)]
    a, b = (load_checkpoint(d / "checkpoint.pt", "ldm") for d in (straight, split))
    for group in ("models", "ema"):
        assert all(torch.equal(v, b[group]["model"][k]) for k, v in a[group]["model"].items())
    assert b["vae"]["source"] == str(vae)  # still names the file it came from


def test_latent_cache_is_reused_for_the_same_autoencoder_and_rebuilt_for_another(tmp_path, cache, vae_run, capsys):
    other_vae = tmp_path / "other-vae"
    train.main(vae_args(other_vae, cache, 1, "--seed", "1"))
    capsys.readouterr()
    folder = tmp_path / "latents"
    train.main(ldm_args(tmp_path / "a", cache, vae_run / "checkpoint.pt", 1, "--cache-dir", str(folder)))
    assert "Encoding 12 images" in capsys.readouterr().err
    [first] = list((folder / "latents").iterdir())
    stamp = first.stat().st_mtime_ns
    train.main(ldm_args(tmp_path / "b", cache, vae_run / "checkpoint.pt", 1, "--cache-dir", str(folder)))
    assert "Encoding" not in capsys.readouterr().err and first.stat().st_mtime_ns == stamp  # reused
    train.main(ldm_args(tmp_path / "c", cache, other_vae / "checkpoint.pt", 1, "--cache-dir", str(folder)))
    assert "Encoding 12 images" in capsys.readouterr().err
    assert len(list((folder / "latents").iterdir())) == 2   # a different VAE has its own cache
    first.write_bytes(b"torn")                              # a cache cut off mid-write is encoded again
    train.main(ldm_args(tmp_path / "d", cache, vae_run / "checkpoint.pt", 1, "--cache-dir", str(folder)))
    assert f"Latent cache {first} is unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("how", sorted(NPZ_DAMAGE))
def test_a_damaged_latent_cache_is_unusable_and_says_why_not_a_traceback(tmp_path, how):
    path, moments = tmp_path / "latents.npz", np.zeros((2, 1, 6, 4, 4), np.float16)
    np.savez(path, moments=moments, vae_fingerprint="v", data_hash="d")
    assert _read(path, "v", "d", moments.shape)[0] is not None
    path.write_bytes(damaged_npz(path.read_bytes(), how))
    loaded, why = _read(path, "v", "d", moments.shape)
    assert loaded is None and why.startswith("is unreadable (")


def test_a_tiny_latent_model_overfits_a_few_images(tmp_path, cache, vae_run):
    # A 6-step VAE's posterior is still ~N(mean, 1): its latents are mostly noise. Pin the log-variance
    # to -12 (std 0.0025), as training with a small KL weight drives it, so there is something to learn.
    payload = load_checkpoint(vae_run / "checkpoint.pt", "vae")
    L = payload["config"]["autoencoder"]["latent_channels"]
    for weights in (payload["models"]["model"], payload["ema"]["model"]):
        weights["quant_conv.weight"][L:] = 0
        weights["quant_conv.bias"][L:] = -12.0
    sharp = tmp_path / "sharp-vae.pt"
    torch.save(payload, sharp)
    run_dir = tmp_path / "overfit"
    train.main(ldm_args(run_dir, cache, sharp, 200, "--num-samples", "4", "--lr", "3e-3", "--log-every", "25",
                        "--prediction", "eps"))
    history = [r["loss"] for r in records(run_dir)]
    assert history[-1] < 0.35 * history[0], history


def test_greyscale_images_train_a_latent_model_through_an_rgb_autoencoder(tmp_path, cache, vae_run, capsys):
    grey = tmp_path / "grey"
    grey.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (RES, RES), dtype=np.uint8), mode="L").save(grey / f"{k}.png")
    run_dir = tmp_path / "run"
    train.main(ldm_args(run_dir, cache, vae_run / "checkpoint.pt", 1, "--dataset", f"folder:{grey}",
                        "--num-samples", "0", "--cond", "none"))
    assert "is greyscale and the autoencoder takes RGB images" in capsys.readouterr().out
    payload = load_checkpoint(run_dir / "checkpoint.pt", "ldm")
    assert payload["data_info"]["channels"] == 3 and payload["data_info"]["num_samples"] == 6
    rgb = load_dataset(f"folder:{grey}", RES, channels=3)  # what the autoencoder was given: each grey pixel thrice
    assert payload["data_info"]["fingerprint"] == rgb.fingerprint()


def test_ldm_refuses_bad_autoencoders_and_writes_nothing(tmp_path, cache, vae_run, ldm_run):
    run_dir = tmp_path / "never"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 64)
    for vae, message in ((tmp_path / "missing.pt", "does not exist"), (corrupt, "corrupt"),
                         (ldm_run / "checkpoint.pt", "stage 'ldm', not an autoencoder"),
                         (vae_run, rf"is a run folder; pass its checkpoint, {vae_run / 'checkpoint.pt'}\.$")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train.main(ldm_args(run_dir, cache, vae, 1))
    with pytest.raises(ValueError, match=r"latents \(2x8x8\) do not fit the U-Net"):
        train.main(ldm_args(run_dir, cache, vae_run / "checkpoint.pt", 1, "--channel-mult", "1", "1", "1", "1", "1"))
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="not an autoencoder"):  # a latent model handed to the autoencoder loader
        load_autoencoder(load_checkpoint(ldm_run / "checkpoint.pt"), torch.device("cpu"), ldm_run)
    with pytest.raises(ValueError, match="does not generate images"):
        sample.main(["--ckpt", str(vae_run / "checkpoint.pt"), "--device", "cpu"])
    with pytest.raises(ValueError, match="--clip-x0 applies to pixel models only"):
        sample.main(["--ckpt", str(ldm_run / "checkpoint.pt"), "--clip-x0", "--out", str(run_dir), "--device", "cpu"])


def test_default_autoencoder_is_trained_first_or_finished_when_missing(tmp_path, monkeypatch, vae_run):
    monkeypatch.chdir(tmp_path)
    config = from_dict(LDMConfig, {})
    need = prerequisite(config, "cpu")
    assert need is not None and "--preset" in need.argv and "vae-demo" in need.argv and "has no checkpoint" in need.message
    assert need.argv[need.argv.index("--run-dir") + 1] == str(Path(DEFAULT_VAE_CKPT).parent)
    Path(DEFAULT_VAE_CKPT).parent.mkdir(parents=True)
    unfinished = load_checkpoint(vae_run / "checkpoint.pt")
    unfinished["config"]["train"]["steps"] = 50  # stopped at step 6 of 50
    torch.save(unfinished, DEFAULT_VAE_CKPT)
    need = prerequisite(config, "cpu")
    assert "--resume" in need.argv and "step 6 of 50" in need.message
    Path(DEFAULT_VAE_CKPT).write_bytes((vae_run / "checkpoint.pt").read_bytes())
    assert prerequisite(config, "cpu") is None
    import dataclasses
    named = dataclasses.replace(config, latent=dataclasses.replace(config.latent, vae_ckpt="elsewhere.pt"))
    assert prerequisite(named, "cpu") is None  # a VAE the user names is never trained behind their back


def test_an_interrupted_default_autoencoder_says_the_latent_command_finishes_it(tmp_path, monkeypatch, cache, vae_run):
    """SIGTERM in the autoencoder run that `--stage ldm` trains first: the advice names the command the user
    typed, and that command, run again, finishes the autoencoder and then trains the latent model."""
    monkeypatch.chdir(tmp_path)
    Path(DEFAULT_VAE_CKPT).parent.mkdir(parents=True)
    unfinished = load_checkpoint(vae_run / "checkpoint.pt")
    unfinished["config"]["train"]["steps"] = 8  # stopped at step 6 of 8
    torch.save(unfinished, DEFAULT_VAE_CKPT)
    run = Trainer.run

    def stopped(self):
        if self.stage.name == "vae":
            raise RunInterrupted("stopped by SIGTERM at step 7 of 8 and saved it; resume with: python train.py "
                                 "--stage vae --resume", signal.SIGTERM)
        return run(self)

    monkeypatch.setattr(Trainer, "run", stopped)
    args = ldm_args(tmp_path / "ldm", cache, Path(DEFAULT_VAE_CKPT), 1)
    with pytest.raises(RunInterrupted) as stop:
        train.main(args)
    assert str(stop.value) == (f"stopped by SIGTERM in the vae run {Path(DEFAULT_VAE_CKPT).parent} that --stage ldm "
                               f"trains first; run the same command again to go on from where it stopped.")
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert not (tmp_path / "ldm" / "checkpoint.pt").exists()
    monkeypatch.setattr(Trainer, "run", run)
    train.main(args)
    assert load_checkpoint(DEFAULT_VAE_CKPT, "vae")["step"] == 8
    assert load_checkpoint(tmp_path / "ldm" / "checkpoint.pt", "ldm")["step"] == 1


def test_two_process_ddp_vae_with_discriminator(tmp_path, cache, torchrun):
    """torchrun with 2 CPU processes (gloo): three optimizers (autoencoder, PatchGAN, output log-variance),
    the discriminator's two passes in one call through DDP, and the adaptive weight. No warning either (DDP's
    `broadcast_buffers` warned in every process once PyTorch renamed it)."""
    run_dir = tmp_path / "ddp"
    said = torchrun(2, str(Path(train.__file__)), vae_args(run_dir, cache, 3, "--disc-start", "1", "--disc-layers",
                                                           "2", "--learn-logvar"), cwd=tmp_path)
    assert not [line for line in said.splitlines() if line.startswith("warning:")], said
    last = records(run_dir)[-1]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3] and "loss/disc" in last and "loss/logvar" in last


def test_every_preset_builds_its_network_on_the_data_it_names():
    """Presets are checked the way a run would resolve them; the meta device keeps even the 274M-parameter
    LDM-4 U-Net free to build."""
    from data import DatasetInfo
    from ddpm.config import PRESETS as DDPM_PRESETS, resolve_unet
    from ddpm.unet import UNet
    from ldm.config import PRESETS as LDM_PRESETS, VAE_PRESET_OF
    from ldm.stage import fit_unet_to_latents
    from vae.autoencoder import AutoencoderKL
    from vae.config import PRESETS as VAE_PRESETS, resolve_autoencoder

    def info(resolution):
        return DatasetInfo("preset", resolution, 3, (), ("wind", "temperature"), ((-1.0, 1.0), (1.0, 3.0)), 1)

    def on_meta(build_network):
        with torch.device("meta"):
            return build_network()

    for make in DDPM_PRESETS.values():
        config = make()
        unet = resolve_unet(config.unet, info(config.data.resolution), config.data.resolution, 3)
        on_meta(lambda: UNet(unet))
    for make in VAE_PRESETS.values():
        config = resolve_autoencoder(make(), 3, make().data.resolution)
        on_meta(lambda: AutoencoderKL(config.autoencoder))
    for name, make in LDM_PRESETS.items():
        config = make()
        vae = resolve_autoencoder(VAE_PRESETS[VAE_PRESET_OF[name]](), 3, config.data.resolution).autoencoder
        unet = fit_unet_to_latents(config, info(config.data.resolution), on_meta(lambda: AutoencoderKL(vae))).unet
        on_meta(lambda: UNet(unet))


def test_random_view_picks_each_stored_view_uniformly():
    from data.augment import random_view
    from ldm.latents import LatentBatch
    n = 4000
    views = torch.arange(2.0).view(1, 2, 1, 1, 1).expand(n, 2, 1, 1, 1)  # each view holds its own index
    batch = LatentBatch(views, torch.zeros(n, dtype=torch.long), torch.zeros(n, 0), torch.arange(n))
    picked = random_view(batch, torch.Generator().manual_seed(0)).views
    assert picked.shape == (n, 1, 1, 1, 1)
    assert abs(picked.mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5


def test_with_flips_the_cache_holds_each_image_and_its_mirror_encoded(tmp_path, cache, vae_run):
    folder = tmp_path / "latents"
    train.main(ldm_args(tmp_path / "flip", cache, vae_run / "checkpoint.pt", 2, "--hflip", "--cache-dir", str(folder)))
    [path] = list((folder / "latents").iterdir())
    moments = torch.from_numpy(np.load(path)["moments"]).float()
    assert moments.shape == (12, 2, 4, RES // 2, RES // 2)     # 12 images x 2 views x [mean | std]
    autoencoder, _, _ = load_autoencoder(load_checkpoint(vae_run / "checkpoint.pt"), torch.device("cpu"), vae_run)
    from data import load_dataset
    images = load_dataset("plumes", RES, cache_dir=folder, num_samples=12).images[:2].float() / 127.5 - 1
    with torch.no_grad():
        mirror = autoencoder.encode(images.flip(3))
    assert torch.allclose(moments[:2, 1, :2], mirror.mean, atol=2e-3)  # float16 storage
    assert torch.allclose(moments[:2, 1, 2:], mirror.std, rtol=2e-3, atol=1e-4)


def test_class_conditional_latent_model_samples_the_asked_class(tmp_path, cache, vae_run):
    root = tmp_path / "labelled"
    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (RES, RES), colour).save(root / name / f"{k}.png")
    args = ldm_args(tmp_path / "run", tmp_path, vae_run / "checkpoint.pt", 2, "--cond", "class", "--num-samples", "0")
    args[args.index("plumes")] = f"folder:{root}"
    train.main(args)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    out = sample.main(["--ckpt", ckpt, "--class", "red", "--guidance-scale", "2", "--num", "2", "--steps", "3",
                       "--out", str(tmp_path / "red"), "--device", "cpu"])
    assert [r["class"] for r in __import__("csv").DictReader((out / "manifest.csv").read_text().splitlines())] == ["red", "red"]
    out = sample.main(["--ckpt", ckpt, "--sweep", "class", "--num", "1", "--steps", "3", "--out", str(tmp_path / "sweep"),
                       "--device", "cpu"])
    with Image.open(out / "sweep.png") as grid:
        assert grid.size == (2 * (RES + 2) + 2, RES + 4)


def test_resuming_never_retrains_the_default_autoencoder(tmp_path, monkeypatch, cache, vae_run):
    """A latent run carries its autoencoder: resuming it needs no VAE run, even the default one."""
    monkeypatch.chdir(tmp_path)
    Path(DEFAULT_VAE_CKPT).parent.mkdir(parents=True)
    Path(DEFAULT_VAE_CKPT).write_bytes((vae_run / "checkpoint.pt").read_bytes())
    train.main(ldm_args(tmp_path / "ldm", cache, Path(DEFAULT_VAE_CKPT), 1))
    for leftover in Path(DEFAULT_VAE_CKPT).parent.iterdir():
        leftover.unlink()
    Path(DEFAULT_VAE_CKPT).parent.rmdir()
    train.main(["--stage", "ldm", "--run-dir", str(tmp_path / "ldm"), "--resume", "--steps", "2", "--device", "cpu"])
    assert not Path(DEFAULT_VAE_CKPT).parent.exists()
    assert load_checkpoint(tmp_path / "ldm" / "checkpoint.pt", "ldm")["step"] == 2


@pytest.mark.filterwarnings("ignore:.*published autoencoders normalise:UserWarning")  # 16 channels: fewer groups
def test_published_weights_import_into_a_vae_run_with_zero_steps(tmp_path, cache):
    """`--pretrained FILE --steps 0`: the run holds exactly the file's weights and measures their latent scale."""
    from vae.autoencoder import AutoencoderConfig, AutoencoderKL
    from vae.published import to_published
    config = AutoencoderConfig(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               latent_channels=2, resolution=RES)
    torch.manual_seed(5)
    source = AutoencoderKL(config)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))  # no zero-initialised layers: every weight must arrive
    torch.save({"state_dict": to_published(source.state_dict(), config)}, tmp_path / "published.ckpt")
    run_dir = tmp_path / "imported"
    train.main(vae_args(run_dir, cache, 0, "--pretrained", str(tmp_path / "published.ckpt")))
    payload = load_checkpoint(run_dir / "checkpoint.pt", "vae")
    assert payload["step"] == 0 and payload["scale_factor"] > 0
    for key, value in source.state_dict().items():
        assert torch.equal(payload["ema"]["model"][key], value), key
    assert records(run_dir, "heldout")[0]["step"] == 0
    (tmp_path / "wrong.ckpt").write_bytes((tmp_path / "published.ckpt").read_bytes())
    with pytest.raises(ValueError, match="not a latent-diffusion KL autoencoder"):
        train.main(vae_args(tmp_path / "never", cache, 0, "--pretrained", str(tmp_path / "wrong.ckpt"),
                            "--latent-channels", "4"))
    assert not (tmp_path / "never").exists()
    (tmp_path / "published.ckpt").unlink()  # fine-tuning goes on from the run's own checkpoint: the file may go
    train.main(["--stage", "vae", "--run-dir", str(run_dir), "--resume", "--steps", "1", "--device", "cpu"])
    assert load_checkpoint(run_dir / "checkpoint.pt", "vae")["step"] == 1


@pytest.mark.filterwarnings("ignore:.*published autoencoders normalise:UserWarning")  # 16 channels: fewer groups
def test_grey_images_fine_tune_a_published_rgb_autoencoder_as_rgb(tmp_path, cache, capsys):
    """Grey photos and RGB weights (Stable Diffusion's autoencoder, say): each image is given to it as RGB with
    three equal channels (refused before, as if the file were not an autoencoder's); a resumed run stays RGB."""
    from PIL import Image

    from vae.autoencoder import AutoencoderConfig, AutoencoderKL
    from vae.published import to_published
    config = AutoencoderConfig(in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               latent_channels=2, resolution=RES)
    torch.save({"state_dict": to_published(AutoencoderKL(config).state_dict(), config)}, tmp_path / "published.ckpt")
    (tmp_path / "grey").mkdir()
    for k in range(12):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (RES, RES), dtype=np.uint8), "L").save(
            tmp_path / "grey" / f"{k}.png")
    run_dir = tmp_path / "run"
    train.main(vae_args(run_dir, cache, 1, "--dataset", f"folder:{tmp_path / 'grey'}",
                        "--pretrained", str(tmp_path / "published.ckpt")))
    assert "is greyscale and the published autoencoder takes RGB images" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoint.pt", "vae")["config"]["autoencoder"]["in_channels"] == 3
    train.main(["--stage", "vae", "--run-dir", str(run_dir), "--resume", "--steps", "2", "--device", "cpu"])
    assert "is greyscale and this run's autoencoder takes RGB images" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoint.pt", "vae")["step"] == 2


# ---------------------------------------------------------------------------------------------
# inversion against a latent model


def test_inversion_against_a_latent_model_learns_on_its_latents_and_draws_images(ldm_run, cache, tmp_path):
    from core.runtime import Runtime
    ckpt = ldm_run / "checkpoint.pt"
    args = ["--stage", "invert", "--run-dir", str(tmp_path / "inv"), "--device", "cpu", "--model", str(ckpt),
            "--dataset", "plumes", "--num-samples", "12", "--resolution", str(RES), "--cache-dir", str(cache),
            "--steps", "2", "--batch-size", "4", "--sample-every", "0", "--preview-images", "2", "--preview-steps", "2",
            "--eval-images", "4", "--eval-timesteps", "2"]
    spec, parsed = train.parse_args(args)
    config, _ = resolve_config(spec, parsed, tmp_path / "inv")
    _, stage = spec.build(config, Runtime(torch.device("cpu")), None)
    net = stage.loss.__self__.net
    # What is denoised is the autoencoder's scaled latents, not pixels.
    assert stage.loss.__self__.eval_x0.shape == (4, net.config.in_channels, RES // 2, RES // 2)
    train.main(args)
    payload = load_checkpoint(tmp_path / "inv" / "checkpoint.pt")
    assert payload["inversion"]["start"] == "params" and payload["models"]["model"]["weight"].shape[0] == 12
    out = sample.main(["--ckpt", str(tmp_path / "inv" / "checkpoint.pt"), "--dataset-out", str(tmp_path / "set"),
                       "--device", "cpu", "--steps", "2", "--batch-size", "6"])
    images = load_dataset(f"folder:{out}", RES)
    assert len(images) == 12 and images.info.param_names == ("wind", "temperature")
