"""The training loop, checkpoints and the two entry points, end to end on tiny models."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import TrainConfig, from_dict
from core.contract import Outputs, Trainable, TrainingStage
from core.runtime import Runtime
from ddpm.config import DDPMConfig
from helpers import tiny_args, torchrun_command, torchrun_env
from core.distributed import StopAgreement
from training.loop import RunExists, StepBatches, Trainer, TrainingDiverged


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Four 16x16 RGB images with distinct, simple content."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k in range(4):
        base = np.zeros((16, 16, 3), np.uint8)
        base[:, :, k % 3] = 40 + 50 * k
        base[4 * k:4 * k + 4] = 255
        base += rng.integers(0, 10, base.shape, dtype=np.uint8)
        Image.fromarray(base).save(root / f"img{k}.png")
    return root


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, image_folder) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    train.main(tiny_args(run_dir, image_folder, steps=3))
    return run_dir


def test_a_run_of_zero_steps_saves_the_initial_weights_and_claims_no_loss(tmp_path, image_folder, capsys):
    summary = train.main(tiny_args(tmp_path / "run", image_folder, steps=0))
    assert summary["step"] == 0 and load_checkpoint(tmp_path / "run" / "checkpoint.pt", "ddpm")["step"] == 0
    assert "Done (ddpm): step 0, loss none yet," in capsys.readouterr().out


def test_run_directory_holds_config_checkpoint_metrics_and_grids(trained_run):
    assert {p.name for p in trained_run.iterdir()} >= {"config.json", "checkpoint.pt", "metrics.jsonl", "samples"}
    assert (trained_run / "samples" / "final.png").is_file()
    config = from_dict(DDPMConfig, json.loads((trained_run / "config.json").read_text()))
    assert config.unet.image_size == 16 and config.unet.channel_mult == (1, 2)
    payload = load_checkpoint(trained_run / "checkpoint.pt", "ddpm")
    assert payload["step"] == 3 and payload["data_info"]["resolution"] == 16
    assert [json.loads(x)["step"] for x in (trained_run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_continues_exactly(tmp_path, image_folder):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(tiny_args(straight, image_folder, steps=6))
    train.main(tiny_args(split, image_folder, steps=3))
    # Resumed on "another machine": a loader process and another cache folder, which change nothing computed.
    # The loader process is started by a fork server, Python 3.14's default on Linux, which pickles the dataset.
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        train.main(["--run-dir", str(split), "--resume", "--steps", "6", "--device", "cpu", "--num-workers", "1",
                    "--cache-dir", str(tmp_path / "elsewhere")])
    finally:
        multiprocessing.set_start_method(previous, force=True)
    assert losses(split) == losses(straight)  # bit-identical: data order, noise and dropout all replayed
    a, b = (load_checkpoint(d / "checkpoint.pt", "ddpm") for d in (straight, split))
    for key in ("models", "ema"):
        for name, value in a[key]["model"].items():
            assert torch.equal(value, b[key]["model"][name]), f"{key}.{name} differs after resume"


def test_a_run_resumed_from_inside_a_logging_window_logs_what_an_unbroken_one_does(tmp_path, image_folder, monkeypatch):
    """Checkpoint at step 4, logs every 3 steps, killed after step 5: the record of step 6 must still average
    steps 4, 5 and 6, the first of which only the checkpoint remembers."""
    options = ("--log-every", "3", "--ckpt-every", "4")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(tiny_args(straight, image_folder, *options, steps=8))

    after_step = Trainer._after_step

    def killed_after_step_5(self, done):
        if done == 5:
            raise SystemExit("killed")  # as a kill -9 between steps: step 5 neither logged nor saved
        return after_step(self, done)
    monkeypatch.setattr(Trainer, "_after_step", killed_after_step_5)
    with pytest.raises(SystemExit, match="killed"):
        train.main(tiny_args(split, image_folder, *options, steps=8))
    monkeypatch.setattr(Trainer, "_after_step", after_step)
    assert load_checkpoint(split / "checkpoint.pt", "ddpm")["step"] == 4 and losses(split) == losses(straight)[:1]
    payload = load_checkpoint(split / "checkpoint.pt", "ddpm")
    assert payload["metrics_window"]["counts"]["loss"] == 1  # step 4, summed for the record of step 6
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (damaged / name).write_bytes((split / name).read_bytes())
    save_checkpoint({**payload, "metrics_window": {**payload["metrics_window"], "counts": {}}}, damaged / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit the run its config describes .*metrics window"):
        train.main(["--run-dir", str(damaged), "--resume", "--steps", "8", "--device", "cpu"])
    train.main(["--run-dir", str(split), "--resume", "--steps", "8", "--device", "cpu"])
    assert [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()] == [3, 6, 8]
    assert losses(split) == losses(straight)


def test_tiny_model_overfits_a_handful_of_images(tmp_path, image_folder):
    run_dir = tmp_path / "overfit"
    train.main(tiny_args(run_dir, image_folder, "--dropout", "0", "--lr", "3e-3", "--log-every", "10", steps=100))
    history = losses(run_dir)
    assert history[-1] < 0.35 * history[0], history


def test_new_run_refuses_to_overwrite_an_existing_one(trained_run, image_folder):
    before = {p: p.read_bytes() for p in (trained_run / "config.json", trained_run / "checkpoint.pt")}
    with pytest.raises(RunExists, match="--resume"):
        train.main(tiny_args(trained_run, image_folder, "--lr", "1e-4", steps=3))
    assert all(p.read_bytes() == data for p, data in before.items())


def test_resume_rejects_options_the_checkpoint_fixes(trained_run):
    with pytest.raises(ValueError, match="cannot change when resuming"):
        train.main(["--run-dir", str(trained_run), "--resume", "--steps", "5", "--lr", "1.0"])


def test_a_step_that_makes_the_weights_nan_is_caught_before_its_checkpoint(tmp_path):
    """The step's own loss and gradient were finite: only the weights it left show it (an absurd --lr)."""
    data = torch.utils.data.TensorDataset(torch.randn(8, 3))

    def loss(models, batch, gen, step):
        return models["model"](batch[0]).pow(2).mean(), {}

    torch.manual_seed(0)
    stage = TrainingStage("toy", {"model": Trainable(torch.nn.Linear(3, 1), lr=1e39, ema=True)}, loss, data, {}, {})
    cfg = TrainConfig(steps=1, batch_size=4, log_every=1, ckpt_every=1, sample_every=0, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match=r"the weights of the model became NaN or infinite by step 1; nothing "
                                               r"was saved past the last checkpoint \(none yet\)"):
        Trainer(stage, cfg, tmp_path, Runtime(torch.device("cpu"))).run()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_stop_signal_after_a_step_that_made_the_weights_nan_saves_no_checkpoint(tmp_path):
    """A requeue's SIGTERM between logs: the checkpoint the stop writes is checked like a due one."""
    import os
    import signal
    data = torch.utils.data.TensorDataset(torch.randn(8, 3))

    def loss(models, batch, gen, step):
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # seen after this step, whose update throws the weights off
        return models["model"](batch[0]).pow(2).mean(), {}

    torch.manual_seed(0)
    stage = TrainingStage("toy", {"model": Trainable(torch.nn.Linear(3, 1), lr=1e39, ema=True)}, loss, data, {}, {})
    cfg = TrainConfig(steps=3, batch_size=4, log_every=10, ckpt_every=10, sample_every=0, warmup_steps=0)
    with pytest.raises(TrainingDiverged, match=r"the weights of the model became NaN or infinite by step 1"):
        Trainer(stage, cfg, tmp_path, Runtime(torch.device("cpu"))).run()
    assert not (tmp_path / "checkpoint.pt").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(8, 3))
    poison = {"on": False}

    def loss(models, batch, gen, step):
        value = models["model"](batch[0]).pow(2).mean()
        return (value * float("nan") if poison["on"] else value), {}

    def stage():
        torch.manual_seed(0)
        return TrainingStage("toy", {"model": Trainable(torch.nn.Linear(3, 1), lr=1e-3, ema=True)}, loss, data, {}, {})

    cfg = TrainConfig(steps=2, batch_size=4, log_every=1, ckpt_every=1, sample_every=0)
    Trainer(stage(), cfg, tmp_path, Runtime(torch.device("cpu"))).run()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    poison["on"] = True
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        Trainer(stage(), dataclasses.replace(cfg, steps=4), tmp_path, Runtime(torch.device("cpu")),
                resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy")).run()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good



class PairItems(torch.utils.data.Dataset):
    """Item k: (image k, k) as a plain tuple, or as a dict, or nested inside one."""

    def __init__(self, kind: str):
        self.kind, self.images = kind, torch.arange(8 * 6, dtype=torch.float32).view(8, 2, 3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int):
        image, index = self.images[k], torch.tensor(k)
        if self.kind == "tuple":
            return image, index
        if self.kind == "dict":
            return {"image": image, "index": index, "name": f"item{k}"}
        return {"pair": (image, index), "extra": [index, index]}


@pytest.mark.parametrize("kind", ["tuple", "dict", "nested"])
def test_a_batch_reaches_the_loss_whole_whatever_its_structure(tmp_path, kind):
    """`default_collate` turns tuples into lists and keeps dicts: the loop must hand the loss the batch
    it collated (moved to the device), never a tensor split into its rows."""
    dataset, seen = PairItems(kind), []

    def loss(models, batch, generator, step):
        if kind == "tuple":
            image, index = batch
        elif kind == "dict":
            image, index = batch["image"], batch["index"]
            assert batch["name"] == [f"item{int(k)}" for k in index]
        else:
            (image, index), extra = batch["pair"], batch["extra"]
            assert isinstance(extra, list) and all(torch.equal(e, index) for e in extra)
        seen.append((image, index))
        return models["model"](image.flatten(1)).square().mean(), {}

    stage = TrainingStage("toy", {"model": Trainable(torch.nn.Linear(6, 1), lr=1e-3)}, loss, dataset, {}, {})
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1, ckpt_every=10, sample_every=0)
    Trainer(stage, cfg, tmp_path, Runtime(torch.device("cpu"))).run()
    assert len(seen) == 2
    for image, index in seen:
        assert image.shape == (4, 2, 3) and index.shape == (4,)
        assert torch.equal(image, dataset.images[index])  # each image beside its own index



def test_an_ema_decay_of_zero_keeps_no_copy_and_checkpoints_the_weights_as_the_average(tmp_path):
    """kl-f4 and kl-f8 train without a weight average: no copy is made or updated, the trained model stands
    in for it (in eval mode) wherever the average would be seen, and checkpoint loaders find the weights
    under "ema" as usual, at no cost in file size."""
    data = torch.utils.data.TensorDataset(torch.randn(8, 256))

    def loss(models, batch, generator, step):
        return models["model"](batch[0]).square().mean(), {}

    def run(decay: float, run_dir: Path) -> tuple[Trainer, torch.nn.Module, list]:
        torch.manual_seed(0)
        net, modes = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Dropout(0.5)), []
        stage = TrainingStage("toy", {"model": Trainable(net, lr=1e-3, ema=True)}, loss, data, {}, {},
                              outputs=Outputs(evaluate=lambda models: modes.append(models["model"].training) or {}))
        cfg = TrainConfig(steps=2, batch_size=4, log_every=1, ckpt_every=10, sample_every=1, ema_decay=decay)
        trainer = Trainer(stage, cfg, run_dir, Runtime(torch.device("cpu")))
        trainer.run()
        return trainer, net, modes

    trainer, net, modes = run(0.0, tmp_path / "none")
    assert trainer.ema == {} and modes == [False, False] and net.training
    payload = load_checkpoint(tmp_path / "none" / "checkpoint.pt", "toy")
    assert payload["ema"]["model"].keys() == payload["models"]["model"].keys()
    assert all(torch.equal(v, payload["ema"]["model"][k]) for k, v in payload["models"]["model"].items())
    run(0.5, tmp_path / "kept")
    weights_bytes = sum(p.numel() * 4 for p in net.parameters())
    sizes = [(tmp_path / name / "checkpoint.pt").stat().st_size for name in ("none", "kept")]
    assert sizes[1] - sizes[0] > 0.9 * weights_bytes  # the weights are written once, not again as the "average"


def test_step_batches_cover_each_epoch_once_and_start_anywhere():
    runtime = Runtime(torch.device("cpu"))
    stream = iter(StepBatches(10, 4, seed=3, start_step=0, runtime=runtime))
    first = [next(stream) for _ in range(5)]                      # 20 positions = two epochs of 10
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]                                 # each epoch reshuffled
    assert next(iter(StepBatches(10, 4, seed=3, start_step=3, runtime=runtime))) == first[3]
    halves = [next(iter(StepBatches(10, 4, 3, 2, Runtime(torch.device("cpu"), r, 2)))) for r in (0, 1)]
    assert halves[0] + halves[1] == first[2]                      # DDP ranks split the global batch


def test_mixed_batches_hold_fixed_shares_of_each_part_and_cover_each_part_per_epoch():
    # Items 0..9 are part one (3 per batch), 10..29 part two (1 per batch).
    runtime, mix = Runtime(torch.device("cpu")), ((10, 3), (20, 1))
    stream = iter(StepBatches(30, 4, seed=5, start_step=0, runtime=runtime, mix=mix))
    batches = [next(stream) for _ in range(20)]
    assert all(sum(i < 10 for i in b) == 3 for b in batches)
    first_part = [i for b in batches[:10] for i in b if i < 10]   # 30 positions: three epochs of part one
    assert sorted(first_part) == sorted(list(range(10)) * 3)
    assert sorted(i for b in batches for i in b if i >= 10) == list(range(10, 30))  # one epoch of part two
    assert any(b.index(max(b)) != 3 for b in batches)              # parts are shuffled together, not stacked
    assert next(iter(StepBatches(30, 4, 5, 7, runtime, mix=mix))) == batches[7]
    halves = [next(iter(StepBatches(30, 4, 5, 7, Runtime(torch.device("cpu"), r, 2), mix=mix))) for r in (0, 1)]
    assert halves[0] + halves[1] == batches[7]


def test_sample_help_lists_every_option_with_its_default(capsys):
    # train.py's help, every stage's options, is checked in test_core.
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = capsys.readouterr().out
    options = [line.split()[0] for line in text.splitlines() if line.strip().startswith("--")]
    assert len(options) > 5
    for line in text.replace("\n                        ", " ").splitlines():
        if line.strip().startswith("--") and not line.strip().startswith("--help"):
            assert "default" in line or "required" in line, line


# ---------------------------------------------------------------------------------------------
# sample.py


def test_sample_writes_grid_images_gif_and_redraws_image_k_alone(trained_run, tmp_path):
    out = sample.main(["--ckpt", str(trained_run / "checkpoint.pt"), "--sampler", "ddpm", "--steps", "5",
                       "--num", "3", "--gif", "--out", str(tmp_path / "all"), "--device", "cpu"])
    assert {p.name for p in out.iterdir()} == {"grid.png", "images", "reverse.gif", "manifest.csv"}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    with Image.open(out / "reverse.gif") as gif:
        assert gif.n_frames == 6  # one per step, plus the final images
    alone = sample.main(["--ckpt", str(trained_run / "checkpoint.pt"), "--sampler", "ddpm", "--steps", "5",
                         "--num", "1", "--first-index", "1", "--out", str(tmp_path / "one"), "--device", "cpu"])
    a = np.asarray(Image.open(out / "images" / "000001.png"), dtype=int)
    b = np.asarray(Image.open(alone / "images" / "000001.png"), dtype=int)
    assert np.abs(a - b).max() <= 1  # same seed, same image; batching may move a value by one level


def test_overwrite_replaces_what_an_earlier_drawing_wrote_and_keeps_other_files(trained_run, tmp_path):
    common = ["--ckpt", str(trained_run / "checkpoint.pt"), "--steps", "2", "--out", str(tmp_path / "out"),
              "--device", "cpu"]
    out = sample.main([*common, "--num", "3", "--gif", "--sampler", "ddpm"])
    (out / "notes.txt").write_text("mine")
    sample.main([*common, "--num", "1", "--sampler", "ddim", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "manifest.csv", "notes.txt"]
    assert [p.name for p in (out / "images").iterdir()] == ["000000.png"]
    sample.main([*common, "--interpolate", "--num", "2", "--frames", "2", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["interpolate-noise.gif", "interpolate-noise.png", "notes.txt"]
    # A folder of the user's own images that no drawing wrote: --overwrite replaces only what it writes.
    own = tmp_path / "photos"
    for name in ("images/000005.png", "images/000000.png", "interpolate-mine.png"):
        (own / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(own / name)
    sample.main([*common[:-4], "--out", str(own), "--device", "cpu", "--num", "1", "--overwrite"])
    assert sorted(p.relative_to(own).as_posix() for p in own.rglob("*.png")) == [
        "grid.png", "images/000000.png", "images/000005.png", "interpolate-mine.png"]


def test_samples_that_come_out_nan_are_refused_not_saved_as_black_images(trained_run, tmp_path, monkeypatch):
    import sampling.draw
    monkeypatch.setattr(sampling.draw, "sample_images", lambda model, sampling, seeds, **kw: torch.full(
        (len(seeds), *model.shape), float("nan")))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"2 of a batch of 2 samples came out NaN or infinite"):
        sample.main(["--ckpt", str(trained_run / "checkpoint.pt"), "--num", "2", "--out", str(out), "--device", "cpu"])
    assert not (out / "images").exists() or not any((out / "images").iterdir())


def test_sample_with_compile_writes_the_eager_images(trained_run, tmp_path):
    # Through the whole command with a real Inductor compilation (C++ wrapper on the CPU): about 20 s.
    def draw(name: str, *extra: str) -> list[np.ndarray]:
        out = sample.main(["--ckpt", str(trained_run / "checkpoint.pt"), "--sampler", "ddim", "--steps", "4",
                           "--num", "2", "--out", str(tmp_path / name), "--device", "cpu", "--amp", "none", *extra])
        return [np.asarray(Image.open(p), dtype=int) for p in sorted((out / "images").iterdir())]

    from torch._dynamo.utils import counters
    eager = draw("eager")
    counters.clear()
    compiled = draw("compiled", "--compile")
    assert counters["stats"]["unique_graphs"] >= 1  # the network did run compiled
    assert len(compiled) == 2 and all(np.abs(a - b).max() <= 1 for a, b in zip(eager, compiled))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "pndm", "spndm"])
def test_every_sampler_is_reproducible_from_its_seed_on_the_command_line(trained_run, tmp_path, sampler):
    def draw(name: str) -> list[np.ndarray]:
        out = sample.main(["--ckpt", str(trained_run / "checkpoint.pt"), "--sampler", sampler, "--steps", "6",
                           "--num", "2", "--out", str(tmp_path / name), "--device", "cpu"])
        return [np.asarray(Image.open(p), dtype=int) for p in sorted((out / "images").iterdir())]

    first, again = draw("a"), draw("b")
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # same seed, same images
    assert not np.array_equal(first[0], first[1])                     # image k has its own seed


def test_sample_refuses_bad_input_and_writes_nothing(trained_run, tmp_path, capsys):
    ckpt = str(trained_run / "checkpoint.pt")
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--sampler", "euler", "--out", str(out), "--device", "cpu"])
    assert "invalid choice: 'euler'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps"):
        sample.main(["--ckpt", ckpt, "--steps", "101", "--out", str(out), "--device", "cpu"])  # T = 100
    with pytest.raises(ValueError, match="without conditioning"):
        sample.main(["--ckpt", ckpt, "--class", "cat", "--out", str(out), "--device", "cpu"])
    with pytest.raises(ValueError, match="--interpolate writes GIFs of its own; drop --gif"):
        sample.main(["--ckpt", ckpt, "--interpolate", "--gif", "--out", str(out), "--device", "cpu"])
    assert not out.exists()
    out.mkdir()
    (out / "keep.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        sample.main(["--ckpt", ckpt, "--out", str(out), "--device", "cpu"])
    assert (out / "keep.png").read_bytes() == b"mine"


def test_sampling_stopped_midway_goes_on_when_run_again_and_a_finished_output_is_kept(trained_run, tmp_path,
                                                                                       monkeypatch, capsys):
    import sampling.draw
    out = tmp_path / "out"
    command = ["--ckpt", str(trained_run / "checkpoint.pt"), "--out", str(out), "--device", "cpu", "--num", "4",
               "--steps", "2"]

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C after the images, before the grid
    with monkeypatch.context() as patch:
        patch.setattr(sampling.draw, "save_grid", stopped)
        with pytest.raises(KeyboardInterrupt):
            sample.main(command)
    assert len(list((out / "images").iterdir())) == 4 and not (out / "grid.png").exists()
    sample.main(command)  # "run the same command again", as the interruption's message says: no --overwrite needed
    assert "was stopped before it finished; writing it again" in capsys.readouterr().err
    assert (out / "grid.png").is_file() and sorted(p.name for p in out.iterdir()) == ["grid.png", "images",
                                                                                         "manifest.csv"]
    sample.main([*command, "--out", str(tmp_path / "fresh")])
    assert all((out / "images" / p.name).read_bytes() == p.read_bytes() for p in (tmp_path / "fresh" / "images").iterdir())
    with pytest.raises(FileExistsError, match="--overwrite"):  # a finished output is a result: kept
        sample.main(command)


def test_checkpoint_errors_are_clear(tmp_path, trained_run):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", "ddpm")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(corrupt, "ddpm")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained_run / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(truncated, "ddpm")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a checkpoint written by this toolkit"):
        load_checkpoint(foreign, "ddpm")
    other = tmp_path / "vae.pt"
    save_checkpoint({"stage": "vae", "model": {}}, other)
    with pytest.raises(ValueError, match="stage 'vae'"):
        sample.main(["--ckpt", str(other), "--device", "cpu"])


# ---------------------------------------------------------------------------------------------
# conditional models, end to end


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        (root / name).mkdir()
        for k in range(2):
            Image.new("RGB", (16 + 4 * k, 16), colour).save(root / name / f"{k}.png")
    return root


def manifest(out: Path) -> list[dict[str, str]]:
    import csv
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_class_conditional_run_samples_the_asked_class_with_guidance(tmp_path, labelled_folder, image_folder):
    run_dir = tmp_path / "classes"
    train.main(tiny_args(run_dir, labelled_folder, "--cond", "class", steps=2))
    ckpt = str(run_dir / "checkpoint.pt")
    out = sample.main(["--ckpt", ckpt, "--class", "red", "--guidance-scale", "3", "--num", "2", "--steps", "4",
                       "--out", str(tmp_path / "red"), "--device", "cpu"])
    assert [row["class"] for row in manifest(out)] == ["red", "red"]
    out = sample.main(["--ckpt", ckpt, "--num", "3", "--steps", "4", "--out", str(tmp_path / "all"), "--device", "cpu"])
    assert [row["class"] for row in manifest(out)] == ["blue", "red", "blue"]  # classes in turn
    with pytest.raises(ValueError, match="Unknown class 'green'"):
        sample.main(["--ckpt", ckpt, "--class", "green", "--out", str(tmp_path / "x"), "--device", "cpu"])
    with pytest.raises(ValueError, match="--class instead of --param"):
        sample.main(["--ckpt", ckpt, "--param", "wind=1", "--out", str(tmp_path / "x"), "--device", "cpu"])
    with pytest.raises(ValueError, match="no classes"):
        train.main(tiny_args(tmp_path / "unlabelled", image_folder, "--cond", "class", steps=2))


def test_parameter_conditional_run_on_plumes(tmp_path):
    run_dir = tmp_path / "params"
    train.main(tiny_args(run_dir, "plumes", "--num-samples", "8", "--cache-dir", str(tmp_path / "cache"),
                         "--cond", "params", steps=2))
    out = sample.main(["--ckpt", str(run_dir / "checkpoint.pt"), "--param", "wind=0.25", "--guidance-scale", "2",
                       "--num", "2", "--steps", "4", "--out", str(tmp_path / "out"), "--device", "cpu"])
    info = load_checkpoint(run_dir / "checkpoint.pt", "ddpm")["data_info"]
    (lo, hi), rows = info["param_ranges"][1], manifest(out)
    assert [float(r["wind"]) for r in rows] == [0.25, 0.25]
    assert all(lo <= float(r["temperature"]) <= hi for r in rows)        # unspecified: drawn in range
    assert rows[0]["temperature"] != rows[1]["temperature"]              # ... per image
    with pytest.raises(ValueError, match="NAME=VALUE"):
        sample.main(["--ckpt", str(run_dir / "checkpoint.pt"), "--param", "humidity=3",
                     "--out", str(tmp_path / "x"), "--device", "cpu"])


def test_a_refusal_under_torchrun_is_one_line_and_removes_nothing(tmp_path, image_folder):
    """Both processes refuse an odd --batch-size; one says so. A killed run's log stays until a run starts."""
    import subprocess
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    command = [*torchrun_command(2, train.__file__), *tiny_args(run_dir, image_folder, "--batch-size", "3")]
    done = subprocess.run(command, env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch-size 3 must split evenly across the 2 processes; use a multiple of 2."]
    ours = str(Path(train.__file__).parent)
    assert f'File "{ours}' not in done.stderr  # no traceback through our code (the launcher prints its own)
    assert (run_dir / "metrics.jsonl").exists() and "starting it over" not in done.stdout


def test_a_bad_command_line_or_a_smaller_steps_under_torchrun_is_told_once(tmp_path, image_folder):
    """A mistyped command line (every process parses the same one) and a resume to fewer steps than the
    checkpoint holds are one line from the whole job, not one per process; the latter before any data is read."""
    import subprocess
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, image_folder, steps=2))
    launch = torchrun_command(2, train.__file__)
    for args, told in ((["--stage", "bogus"], "error: argument --stage: invalid choice: 'bogus'"),
                       (["--preset", "vae-demo"], "error: --preset vae-demo is a preset of --stage vae"),
                       (["--run-dir", str(run_dir), "--resume", "--steps", "1", "--device", "cpu"],
                        f"error: The run in {run_dir} is already at step 2, past --steps 1"),
                       (tiny_args(tmp_path / "on-a-gpu", image_folder, "--device", "cuda:0"),
                        "error: --device cuda:0 " + ("names one GPU" if torch.cuda.is_available() else
                                                     "was asked for but PyTorch sees no CUDA GPU"))):
        done = subprocess.run(launch + args, env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode != 0
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(told), done.stderr[-3000:]
        assert "Decoding" not in done.stderr


def test_a_torchrun_process_takes_the_gpu_of_its_local_rank_or_is_refused(monkeypatch):
    """Where --device says cuda, or auto on a machine with GPUs, each process takes the GPU of its local rank;
    a GPU named by number, a process without a GPU of its own, and cuda without any GPU are refused."""
    from core.distributed import process_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert process_device("auto", 1) == process_device("cuda", 1) == torch.device("cuda", 1)
    assert process_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:1 names one GPU, but under torchrun each process takes "):
        process_device("cuda:1", 0)
    for local_rank in (0, 2):  # every process of the job is refused alike, the first as the third
        with pytest.raises(ValueError, match=r"torchrun started 3 processes on this machine, more than its 2 CUDA "
                                             r"GPU\(s\); pass --nproc_per_node 2 or fewer") as refused:
            process_device("cuda", local_rank, 3)
        assert refused.value.every_process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device("auto", 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda was asked for but PyTorch sees no CUDA GPU"):
        process_device("cuda", 0)  # under torchrun, this once trained on the CPU without a word


def test_a_gpu_named_by_number_becomes_the_current_one(monkeypatch):
    """Our Triton kernels launch on the current GPU, as do CUDA streams and graphs, whatever GPU their tensors
    are on: --device cuda:1 must make GPU 1 current, or a run on it launches them on GPU 0."""
    from core.runtime import resolve_device
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
    assert made_current == [torch.device("cuda", 1)]  # plain cuda keeps the current GPU (0, or CUDA_VISIBLE_DEVICES')
    with pytest.raises(ValueError, match="--device cuda:2 does not exist: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_a_bad_image_under_torchrun_is_told_once(tmp_path, image_folder):
    """Every process reads the data and meets the same unreadable file after the start-up checks; one says
    so (the lowest rank), the others stop quietly, and the refused run leaves no folder behind."""
    import shutil
    import subprocess
    images = tmp_path / "images"
    shutil.copytree(image_folder, images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    run_dir = tmp_path / "run"
    command = [*torchrun_command(2, train.__file__), *tiny_args(run_dir, images)]
    done = subprocess.run(command, env=torchrun_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0], done.stderr[-3000:]
    assert not run_dir.exists()


def _main_first(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from core.cli import ReportedByAnotherProcess
    from core import distributed
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    runtime = Runtime(torch.device("cpu"), rank, 2)
    ran, outcome = False, "finished"
    try:
        with distributed.together(runtime):
            with distributed.main_process_first(runtime):
                ran = True
                if rank == 0:
                    raise ValueError("the cache cannot be built")
    except ReportedByAnotherProcess:
        outcome = "quiet"
    except ValueError:
        outcome = "reported"
    torch.save({"ran": ran, "outcome": outcome}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_main_process_first_keeps_the_others_out_when_the_main_process_fails(tmp_path):
    """The main process fails in the body (building a cache): the other never runs it, and stops quietly
    while the main process's error is the one raised; every process leaves in step (no hang)."""
    import torch.multiprocessing as mp
    mp.spawn(_main_first, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert results == [{"ran": True, "outcome": "reported"}, {"ran": False, "outcome": "quiet"}]


def _window_state_round_trip(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from training.loop import MetricsWindow
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    runtime = Runtime(torch.device("cpu"), rank, 2)
    window = MetricsWindow(runtime)
    for value in ([0.1, 0.7, 1 / 3] if rank == 0 else [0.2, 0.9, 2 / 7]):
        window.add({"model": torch.tensor(value)}, {}, {})
    state = window.state()  # a collective: both processes
    resumed = MetricsWindow(runtime, MetricsWindow.restored(state, runtime))
    torch.save({"state": state, "mine": window.sums["loss"], "resumed": resumed.sums["loss"],
                "means": (window.means(), resumed.means())}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_a_checkpointed_logging_window_gives_each_process_its_own_sums_back(tmp_path):
    """Under torchrun the window's state holds every process's sums; a resume with as many processes
    gives each its own (the means then match an unbroken run bit for bit), with another number their mean."""
    import torch.multiprocessing as mp
    mp.spawn(_window_state_round_trip, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for rank, result in enumerate(results):
        assert torch.equal(result["resumed"], result["mine"])
        assert result["means"][0] == result["means"][1]
        assert result["state"]["counts"] == {"loss": 3} and result["state"]["steps"] == 3
    sums = results[0]["state"]["sums"]
    assert [row["loss"] for row in sums] == [results[0]["mine"].item(), results[1]["mine"].item()]
    from training.loop import MetricsWindow
    alone = MetricsWindow(Runtime(torch.device("cpu")),  # resumed by one process
                          MetricsWindow.restored(results[0]["state"], Runtime(torch.device("cpu"))))
    assert alone.sums["loss"].item() == pytest.approx((sums[0]["loss"] + sums[1]["loss"]) / 2)


def test_a_window_leaves_out_the_gradient_norms_of_steps_fp16_skipped_and_times_only_its_own_steps():
    """fp16 loss scaling skips a step whose gradient overflowed: its infinite or NaN norm is no part of the
    window's mean (which it would make NaN: strict JSON readers refuse the record). Elsewhere a non-finite
    norm stays, for the divergence check. A resumed window's speed counts only the steps timed since."""
    import time

    from training.loop import MetricsWindow
    runtime = Runtime(torch.device("cpu"))
    norms = [math.inf, 2.0, math.nan, 4.0]
    fp16, other = MetricsWindow(runtime, skipped_steps=True), MetricsWindow(runtime)
    for norm in norms:
        for window in (fp16, other):
            window.add({"model": torch.tensor(1.0)}, {}, {"model": torch.tensor(norm)})
    assert fp16.means() == {"loss": 1.0, "grad_norm": 3.0} and fp16.state()["counts"] == {"loss": 4, "grad_norm": 2}
    assert math.isnan(other.means()["grad_norm"])
    skipped = MetricsWindow(runtime, skipped_steps=True)
    skipped.add({"model": torch.tensor(1.0)}, {}, {"model": torch.tensor(math.inf)})
    assert skipped.means() == {"loss": 1.0}
    resumed = MetricsWindow(runtime, MetricsWindow.restored(fp16.state(), runtime), skipped_steps=True)
    assert resumed.means() == fp16.means()
    resumed.start = time.perf_counter() - 2.0  # one step run in 2 s since the resume; four before it
    resumed.add({"model": torch.tensor(1.0)}, {}, {"model": torch.tensor(6.0)})
    record = resumed.close(5, 1e-3, 8, resumed.start)
    assert record["images_per_s"] == pytest.approx(8 / 2.0, rel=0.05) and record["grad_norm"] == 4.0


def test_no_stage_reads_a_value_back_from_the_device_between_logging_steps(tmp_path, monkeypatch):
    """No read of a tensor's value on the host (`helpers.HostReads`), which on a GPU makes the step wait for the
    device: not in any stage's step, nor in the loop's bookkeeping between logging steps, nor in the stop check."""
    from helpers import HostReads, colour_folder
    from training.loop import MetricsWindow, Trainer
    host = HostReads(monkeypatch)
    between_logs = lambda trainer, done: bool(done % trainer.cfg.log_every) and done < trainer.cfg.steps  # noqa: E731
    monkeypatch.setattr(Trainer, "_step", host.watch(Trainer._step))
    monkeypatch.setattr(MetricsWindow, "add", host.watch(MetricsWindow.add))
    monkeypatch.setattr(Trainer, "_after_step", host.watch(Trainer._after_step, between_logs))
    monkeypatch.setattr(StopAgreement, "after_step", host.watch(StopAgreement.after_step))

    images = colour_folder(tmp_path / "images", 2, seed=0)
    common = ["--device", "cpu", "--dataset", f"folder:{images}", "--resolution", "16", "--steps", "4", "--log-every",
              "2", "--sample-every", "0", "--batch-size", "4"]
    model = tmp_path / "ddpm"
    stages = {"ddpm": ["--cond", "class", "--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks", "1",
                       "--attention-resolutions", "8", "--preview-images", "2", "--preview-steps", "2"],
              "vae": ["--disc-start", "0", "--disc-layers", "1", "--channel-mult", "1", "2", "--base-channels", "16"],
              "ldm": ["--vae-ckpt", str(tmp_path / "vae" / "checkpoint.pt"), "--cond", "class", "--base-channels", "32",
                      "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions", "4",
                      "--preview-images", "2", "--preview-steps", "2"],
              "classify": ["--target", "class", "--warmup-steps", "1"],
              "invert": ["--model", str(model / "checkpoint.pt")]}
    for stage, options in stages.items():
        host.calls.clear()
        train.main(["--stage", stage, "--run-dir", str(model if stage == "ddpm" else tmp_path / stage), *common,
                    *options])
        assert host.reads == [], f"{stage}: {host.reads}"
        assert {"_step", "add", "_after_step", "after_step"} <= set(host.calls), f"{stage}: watched {host.calls}"


# Per scenario: {rank: {step index (of 5): signal caught during that step}}; no entry, no signal.
STOP_SCENARIOS = {
    "none": {},
    "one process, mid-run": {1: {1: 15}},
    "both, different steps and signals": {0: {2: 2}, 1: {1: 15}},
    "one process, before the last step": {0: {3: 2}},
    "one process, in the last step": {1: {4: 15}},
}


def _stop_agreement(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from core.distributed import StopAgreement
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    stops = {}
    for name, caught in STOP_SCENARIOS.items():
        agreement, received = StopAgreement(Runtime(torch.device("cpu"), rank, 2)), []
        for step in range(5):
            if step in caught.get(rank, {}):
                received.append(caught[rank][step])
            signum = agreement.after_step(received, last=step == 4)
            if signum is not None:
                stops[name] = (step, signum)
                break
    torch.save(stops, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_every_process_stops_after_the_same_step_one_step_after_the_first_signal(tmp_path):
    """A signal caught by either process during step k stops both after step k + 1 (the agreement runs behind
    that step), for the largest signal caught by then; in the last step, after that step."""
    import torch.multiprocessing as mp
    mp.spawn(_stop_agreement, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0] == results[1] == {"one process, mid-run": (2, 15), "both, different steps and signals": (2, 15),
                                        "one process, before the last step": (4, 2),
                                        "one process, in the last step": (4, 15)}
    alone = StopAgreement(Runtime(torch.device("cpu")))  # alone: after the very step the signal came in
    assert alone.after_step([], last=False) is None and alone.after_step([15, 2], last=False) == 15


def test_two_process_ddp_run_trains_and_checkpoints(tmp_path, image_folder, torchrun):
    """torchrun with 2 CPU processes (gloo): the DDP path runs, only rank 0 writes, and resume works."""
    run_dir = tmp_path / "ddp"
    script = str(Path(train.__file__))
    torchrun(2, script, tiny_args(run_dir, image_folder, steps=2), cwd=tmp_path)
    torchrun(2, script, ["--run-dir", str(run_dir), "--resume", "--steps", "3", "--device", "cpu"], cwd=tmp_path)
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_checkpoint(run_dir / "checkpoint.pt", "ddpm")["step"] == 3
