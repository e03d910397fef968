"""Diffusion inversion: the per-row optimizer, convergence to closed-form optima on a model whose
dependence on the embedding is known, the invert stage end to end on a tiny class-conditional model
(frozen weights, records, exact resume, refusals), and images drawn from the learned vectors."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sample
import train
from stages import open_source
from training.run import resolve_config
from core.checkpoint import load_checkpoint, state_fingerprint
from core.config import DataConfig, TrainConfig
from core.runtime import Runtime
from data import DatasetInfo, ImageDataset, load_dataset
from ddpm.config import SamplingConfig
from ddpm.generate import DiffusionSampler, image_seed, sample_images
from ddpm.schedule import Schedule
from invert.config import InvertConfig, InvertOptions
from invert.frozen import FrozenModel, fit_images, load_frozen
from invert.stage import inversion_stage
from training.loop import Trainer
from training.optim import LazyAdamW
from helpers import RES, tiny_args

CPU = torch.device("cpu")


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the optimizer


def test_lazy_adamw_is_adamw_when_every_row_has_a_gradient():
    torch.manual_seed(0)
    ours, theirs = (torch.randn(5, 3).requires_grad_(True) for _ in range(2))
    with torch.no_grad():
        theirs.copy_(ours)
    a = LazyAdamW([ours], lr=0.1, weight_decay=0.01)
    b = torch.optim.AdamW([theirs], lr=0.1, weight_decay=0.01)
    for _ in range(10):
        g = torch.randn(5, 3)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours, theirs)


def test_lazy_adamw_moves_a_row_only_when_touched_and_as_if_it_were_alone():
    torch.manual_seed(1)
    table = torch.randn(4, 3).requires_grad_(True)
    alone = table[2:3].detach().clone().requires_grad_(True)
    start = table.detach().clone()
    lazy, single = LazyAdamW([table], lr=0.05), torch.optim.AdamW([alone], lr=0.05, weight_decay=0.0)
    for step in range(12):
        g = torch.zeros(4, 3)
        g[step % 2] = torch.randn(3)                # row 0 or 1 every step
        if step % 3 == 0:                           # row 2 every third step
            g[2] = torch.randn(3)
            alone.grad = g[2:3].clone()
            single.step()
        table.grad = g
        lazy.step()
    assert torch.equal(table[3], start[3])          # never touched: never moved
    torch.testing.assert_close(table[2:3], alone)   # touched 4 times: AdamW's 4 steps, not 12
    assert lazy.state[table]["step"].tolist() == [6, 6, 4, 0]


@pytest.mark.parametrize("shape", [(40, 6), (24, 3, 2), (30,)])
def test_lazy_adamw_by_mask_is_lazy_adamw_by_index_bit_for_bit_and_reads_nothing_back(shape, monkeypatch):
    """The GPU's way (every row computed, a mask keeps the untouched) gives the CPU's numbers exactly, rows never
    touched included, without listing indices (`nonzero`) or reading a value on the host: both would make a
    GPU step wait."""
    torch.manual_seed(2)
    by_index = torch.randn(*shape).requires_grad_(True)
    by_mask = by_index.detach().clone().requires_grad_(True)
    index_opt = LazyAdamW([by_index], lr=0.05, weight_decay=0.01, masked=False)
    mask_opt = LazyAdamW([by_mask], lr=0.05, weight_decay=0.01, masked=True)
    gradients = []
    for step in range(30):
        reached = torch.rand(shape[0]) < (0.3 if step % 5 else 0.0)  # every fifth step reaches no row
        reached[-1] = False                                          # the last row: never
        gradients.append(torch.randn(*shape) * reached.view((-1,) + (1,) * (len(shape) - 1)))
    for g in gradients:
        by_index.grad = g.clone()
        index_opt.step()

    def host_read(*args, **kwargs):
        raise AssertionError("a host read in the masked update")
    for name in ("nonzero", "item", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    monkeypatch.setattr(torch, "nonzero", host_read)
    for g in gradients:
        by_mask.grad = g.clone()
        mask_opt.step()
    monkeypatch.undo()
    assert torch.equal(by_mask, by_index)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(mask_opt.state[by_mask][key], index_opt.state[by_index][key])
    assert index_opt.state[by_index]["step"][-1] == 0


@pytest.mark.parametrize("masked", [False, True])
def test_under_fp16_loss_scaling_a_step_is_the_unscaled_one_and_an_overflow_moves_nothing(masked, monkeypatch):
    """GradScaler hands LazyAdamW its overflow check as a tensor (`_step_supports_amp_scaling`): without it the
    scaler read the check on the host at every step, which on a GPU waits for the device."""
    from helpers import HostReads
    torch.manual_seed(3)
    scaled = torch.randn(5, 3).requires_grad_(True)
    plain = scaled.detach().clone().requires_grad_(True)
    optimizer, reference = LazyAdamW([scaled], lr=0.1, masked=masked), LazyAdamW([plain], lr=0.1, masked=masked)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    host = HostReads(monkeypatch)
    step = host.watch(scaler.step)
    for overflow, unscaled in ((False, True), (True, True), (False, False)):  # unscaled first, as the loop does
        gradient = torch.randn(5, 3)
        gradient[2] = 0  # a row the batch did not reach
        scaler.scale(torch.ones(()))
        before = (scaled.detach().clone(), optimizer.state[scaled]["step"].clone() if optimizer.state else None)
        scaled.grad = gradient * scaler.get_scale()
        if overflow:
            scaled.grad[0, 0] = math.inf
        if unscaled:
            scaler.unscale_(optimizer)
        step(optimizer)
        scaler.update()
        if overflow:
            assert torch.equal(scaled, before[0]) and torch.equal(optimizer.state[scaled]["step"], before[1])
        else:
            plain.grad = gradient
            reference.step()
            torch.testing.assert_close(scaled, plain, rtol=0, atol=1e-6)
    assert scaler.get_scale() == 512.0 and host.reads == []


def test_a_state_read_onto_the_cpu_resumes_on_the_parameters_device():
    """A checkpoint is read onto the CPU; torch.optim moves each state entry to its parameter's device except
    those named "step", whose per-row counts a GPU step would then mix with the rows (the meta device stands in
    for a GPU: it refuses such a mix as CUDA does)."""
    table = torch.zeros(4, 3, requires_grad=True)
    optimizer = LazyAdamW([table], lr=0.1)
    table.grad = torch.ones(4, 3)
    optimizer.step()
    on_gpu = torch.zeros(4, 3, device="meta", requires_grad=True)
    resumed = LazyAdamW([on_gpu], lr=0.1, masked=True)
    resumed.load_state_dict(optimizer.state_dict())
    assert {key: value.device.type for key, value in resumed.state[on_gpu].items()} == \
        {"step": "meta", "exp_avg": "meta", "exp_avg_sq": "meta"}
    on_gpu.grad = torch.ones(4, 3, device="meta")
    resumed.step()


# ---------------------------------------------------------------------------------------------
# a model whose dependence on the embedding is known: x0 = W e, whatever x_t and t


class LinearDenoiser(nn.Module):
    """A frozen "x0-predicting" network that outputs W e for conditioning vector e (the null embedding
    when none is given), so the inversion objective is least squares: min_e |W e - x0|^2."""

    def __init__(self, weight: torch.Tensor, classes: torch.Tensor):
        super().__init__()
        d, e = weight.shape
        side = int(d ** 0.5)
        self.config = SimpleNamespace(cond="class", embedding_dim=e, num_classes=len(classes), in_channels=1,
                                      image_size=side)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.table = nn.Parameter(classes, requires_grad=False)
        self.null_embedding = nn.Parameter(torch.zeros(e), requires_grad=False)

    def embed_condition(self, labels):
        return self.table[labels]

    def check_inputs(self, x, t, cond=None, *, null_mask=None, cond_emb=None):
        assert x.shape[1:] == (1, self.config.image_size, self.config.image_size) and t.shape == x.shape[:1]

    def forward(self, x, t, cond=None, *, null_mask=None, cond_emb=None):
        e = self.null_embedding.expand(len(x), -1) if cond_emb is None else cond_emb
        if null_mask is not None:
            e = torch.where(null_mask[:, None], self.null_embedding, e)
        return (e @ self.weight.T).view_as(x) + 0 * x


def linear_inversion(targets: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor,
                     tmp_path: Path, *, init: str, steps: int = 400):
    """Invert uint8 images `targets` (N, 1, R, R) into a LinearDenoiser; returns (stage, final evaluation)."""
    n, _, r, _ = targets.shape
    net = LinearDenoiser(weight, classes)
    info = DatasetInfo("linear", r, 1, tuple(f"c{k}" for k in range(len(classes))), (), (), n)
    images = ImageDataset(targets, labels, torch.zeros(n, 0), info)
    model = FrozenModel(DiffusionSampler(net, Schedule.from_name("cosine", 100), "x0", info), tmp_path / "model.pt",
                        "ddpm", "ema", "linear", {})
    config = InvertConfig(data=DataConfig(dataset="linear", resolution=r), invert=InvertOptions(init=init,
                                                                                                eval_images=0),
                          train=TrainConfig(steps=steps, batch_size=3, lr=3e-2, lr_schedule="cosine", warmup_steps=0,
                                            grad_clip=0.0, log_every=100, sample_every=0, ckpt_every=max(steps, 1),
                                            preview_images=2, preview_steps=2))
    stage = inversion_stage(config, model, images, images, lambda batch, generator: batch.image, CPU)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    Trainer(stage, config.train, tmp_path / "run", Runtime(CPU)).run()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    return stage, [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]


def test_inversion_of_a_linear_model_converges_to_the_least_squares_embedding(tmp_path):
    torch.manual_seed(0)
    r, e = 8, 6
    weight = torch.randn(r * r, e) / e ** 0.5
    targets = torch.randint(0, 256, (6, 1, r, r), dtype=torch.uint8)
    stage, final = linear_inversion(targets, weight, torch.randn(2, e), torch.zeros(6, dtype=torch.long), tmp_path,
                                    init="null")
    x0 = targets.double().flatten(1) / 127.5 - 1
    optimum = torch.linalg.lstsq(weight.double(), x0.T).solution.T      # argmin_e |W e - x0|^2, per image
    learned = stage.trainables["model"].model.weight.detach().double()
    assert (learned - optimum).norm(dim=1).max() < 1e-2 * optimum.norm(dim=1).min()
    # The quality signal: every image fits better than from the null embedding it started at.
    assert final["split"] == "inversion" and final["start"] == "null" and final["improved"] == 1.0
    assert final["loss_learned"] < 0.9 * final["loss_null"]


def test_inversion_of_images_of_class_c_lands_nearest_class_c(tmp_path):
    torch.manual_seed(1)
    r, e = 8, 8
    weight = torch.randn(r * r, e) / e ** 0.5 * 0.25
    classes = torch.randn(3, e)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    clean = (classes[labels] @ weight.T) + 0.05 * torch.randn(6, r * r)    # images of class c, plus noise
    targets = ((clean.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).view(6, 1, r, r)
    stage, final = linear_inversion(targets, weight, classes, labels, tmp_path, init="null")
    learned = stage.trainables["model"].model.weight.detach()
    nearest = torch.cdist(learned, classes).argmin(dim=1)
    assert nearest.tolist() == labels.tolist()
    assert final["improved"] == 1.0


def test_the_quality_signal_is_the_same_for_the_same_vectors(tmp_path):
    torch.manual_seed(2)
    weight, classes = torch.randn(64, 4), torch.randn(2, 4)
    targets = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    stage, _ = linear_inversion(targets, weight, classes, torch.tensor([0, 1] * 3), tmp_path, init="condition",
                                steps=0)
    first = stage.outputs.evaluate({"model": stage.trainables["model"].model})
    assert first == stage.outputs.evaluate({"model": stage.trainables["model"].model})   # fixed timesteps and noises
    assert first["start"] == "class" and first["loss_learned"] == first["loss_start"] and first["shift"] == 0


# ---------------------------------------------------------------------------------------------
# the invert stage on a tiny class-conditional U-Net (conftest's class_ckpt: blue, green, red)


def folder_of(ckpt: Path) -> str:
    return json.loads((ckpt.parent / "config.json").read_text())["data"]["dataset"]


def invert_args(run_dir: Path, model: Path, dataset: str, *extra: str) -> list[str]:
    return ["--stage", "invert", "--run-dir", str(run_dir), "--device", "cpu", "--model", str(model),
            "--dataset", dataset, "--resolution", str(RES), "--steps", "4", "--batch-size", "4", "--log-every", "1",
            "--sample-every", "0", "--ckpt-every", "2", "--preview-images", "2", "--preview-steps", "2",
            "--eval-images", "3", "--eval-timesteps", "2", "--cache-dir", str(run_dir.parent / "cache"), *extra]


@pytest.fixture(scope="module")
def inverted(class_ckpt, tmp_path_factory) -> Path:
    """An inversion of the class model's own six training images (four steps)."""
    run_dir = tmp_path_factory.mktemp("inverted") / "run"
    before = file_hash(class_ckpt)
    train.main(invert_args(run_dir, class_ckpt, folder_of(class_ckpt)))
    assert file_hash(class_ckpt) == before        # the frozen model's file is never written
    return run_dir


def test_the_checkpoint_records_sources_labels_and_the_frozen_model(inverted, class_ckpt):
    payload = torch.load(inverted / "checkpoint.pt", weights_only=True)
    record = payload["inversion"]
    assert payload["stage"] == "invert" and record["start"] == "class"
    assert record["sources"] == [f"{c}/{k}.png" for c in ("blue", "green", "red") for k in range(2)]
    assert record["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    model = load_checkpoint(class_ckpt)
    from ddpm.stage import load_sampler
    net = load_sampler(model, CPU, "ema", class_ckpt).net
    assert record["model"] == {"path": str(class_ckpt), "stage": "ddpm", "weights": "ema",
                               "fingerprint": state_fingerprint(net.state_dict()),
                               "relative": os.path.relpath(class_ckpt, inverted.resolve())}
    vectors = payload["models"]["model"]["weight"]
    assert vectors.shape == (6, net.config.embedding_dim)
    # The vectors started at their class's embedding and moved.
    start = net.embed_condition(record["labels"])
    assert not torch.equal(vectors, start) and (vectors - start).norm(dim=1).max() < 1.0
    assert set(payload["models"]) == {"model"} and payload["ema"] == {}   # nothing of the U-Net is stored
    assert (inverted / "samples" / "final.png").is_file()
    quality = [json.loads(line) for line in (inverted / "metrics.jsonl").read_text().splitlines()][-1]
    assert quality["split"] == "inversion" and quality["images"] == 3


def test_only_the_vectors_get_gradients_and_the_network_is_untouched(class_ckpt, tmp_path):
    spec, args = train.parse_args(invert_args(tmp_path / "run", class_ckpt, folder_of(class_ckpt)))
    config, _ = resolve_config(spec, args, tmp_path / "run")
    _, stage = spec.build(config, Runtime(CPU), None)
    run = stage.loss.__self__
    net = run.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = torch.utils.data.default_collate([stage.dataset[i] for i in range(4)])
    loss, _ = stage.loss({"model": stage.trainables["model"].model}, batch, torch.Generator().manual_seed(0), 0)
    loss.backward()
    store = stage.trainables["model"].model
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert not net.training
    grad = store.weight.grad
    assert grad[:4].ne(0).any(dim=1).all() and grad[4:].eq(0).all()      # exactly the batch's rows
    Trainer(stage, config.train, tmp_path / "run", Runtime(CPU)).run()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_batch_larger_than_the_images_runs_as_every_stage_runs_it_with_a_note(class_ckpt, tmp_path, capsys):
    """A batch of 10 of the 6 images spans two epochs, as in every stage (training.loop.StepBatches): accepted, with
    one line that says what it means for the vectors; a batch the images fill says nothing of it."""
    note = ("Note: --batch-size 10 is larger than the 6 images to invert, so a batch holds some of them more than once "
            "and a vector takes one step for all its copies; pass --batch-size 6 or fewer to visit each image at most "
            "once a step.")
    train.main(invert_args(tmp_path / "run", class_ckpt, folder_of(class_ckpt), "--batch-size", "10", "--steps", "2"))
    out = capsys.readouterr().out
    assert out.count(note) == 1 and (tmp_path / "run" / "checkpoint.pt").is_file()
    spec, args = train.parse_args(invert_args(tmp_path / "full", class_ckpt, folder_of(class_ckpt), "--batch-size", "6"))
    spec.build(resolve_config(spec, args, tmp_path / "full")[0], Runtime(CPU), None)
    out = capsys.readouterr().out
    assert "Inverting 6 images" in out and "--batch-size" not in out


def test_resume_continues_exactly(class_ckpt, tmp_path):
    # A constant rate, so that stopping at 3 of 3 steps and extending to 6 is an interruption at 3 of 6.
    data = folder_of(class_ckpt)
    common = ("--ckpt-every", "3", "--lr-schedule", "constant")
    train.main(invert_args(tmp_path / "straight", class_ckpt, data, "--steps", "6", *common))
    train.main(invert_args(tmp_path / "resumed", class_ckpt, data, "--steps", "3", *common))
    train.main(["--stage", "invert", "--run-dir", str(tmp_path / "resumed"), "--resume", "--steps", "6",
                "--device", "cpu"])
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "resumed"))
    assert torch.equal(a["models"]["model"]["weight"], b["models"]["model"]["weight"])
    assert torch.equal(a["optimizers"]["model"]["state"][0]["exp_avg_sq"],
                       b["optimizers"]["model"]["state"][0]["exp_avg_sq"])


@pytest.fixture(scope="module")
def unconditional_ckpt(class_ckpt, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("unconditional")
    train.main(tiny_args(run_dir, folder_of(class_ckpt), "--steps", "1"))
    return run_dir / "checkpoint.pt"


def test_bad_inputs_are_refused_before_anything_is_written(class_ckpt, unconditional_ckpt, tmp_path):
    data = folder_of(class_ckpt)
    grey = tmp_path / "grey"
    grey.mkdir()
    for k in range(3):
        Image.new("L", (RES, RES), 40 * k).save(grey / f"{k}.png")
    cases = [
        (unconditional_ckpt, data, (), "trained without conditioning"),
        (class_ckpt, data, ("--resolution", str(2 * RES)), f"pass --resolution {RES}"),
        (tmp_path / "missing.pt", data, (), "does not exist"),
        (tmp_path, data, (), r"is a folder, not a file; pass the checkpoint.pt of a conditional ddpm or ldm run\.$"),
        (class_ckpt, data, ("--lr", "-1"), "--lr"),
    ]
    for k, (model, dataset, extra, message) in enumerate(cases):
        run_dir = tmp_path / f"run{k}"
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train.main(invert_args(run_dir, model, dataset, *extra))
        assert not run_dir.exists() or not any(p for p in run_dir.iterdir() if p.name != ".lock")
    with pytest.raises(ValueError, match="--model is required"):
        train.main(["--stage", "invert", "--run-dir", str(tmp_path / "none"), "--dataset", data])


def test_vectors_and_a_frozen_model_larger_than_the_device_are_refused_before_any_image_is_read(class_ckpt, tmp_path,
                                                                                              monkeypatch):
    """Held against the device: the vectors trained with AdamW (4 bytes x weights, gradients, two moments; no
    average) and the frozen model's weights alone (fp32), counted before an image is decoded or the run folder
    written; one sentence says what to lower."""
    import core.runtime
    import invert.stage

    def loading(*args, **kwargs):
        raise AssertionError("images were read before the inversion's size was checked")
    monkeypatch.setattr(invert.stage, "load_dataset", loading)
    net = load_frozen(class_ckpt, CPU, "ema").sampler.net
    width, weights = net.config.embedding_dim, sum(v.numel() for v in net.state_dict().values())
    need = 16 * 6 * width + 4 * weights                 # the six images of the model's own folder
    argv = invert_args(tmp_path / "run", class_ckpt, folder_of(class_ckpt))
    for memory, fits in ((need, True), (need - 1, False)):
        monkeypatch.setattr(core.runtime, "device_memory", lambda device, memory=memory: memory)
        spec, args = train.parse_args(argv)
        if fits:
            resolve_config(spec, args, tmp_path / "run")
            continue
        with pytest.raises(ValueError) as told:
            train.main(argv)
        assert str(told.value) == (
            f"The 6 learned vectors of {width} values (trained with AdamW in fp32) and the frozen model's {weights:,} "
            f"weights take {need / 2**30:,.1f} GiB, more than the {(need - 1) / 2**30:,.1f} GiB of memory this "
            f"machine has; invert fewer images (--num-samples), or against a smaller model.")
    assert not (tmp_path / "run").exists()


def test_greyscale_images_are_inverted_as_rgb_by_a_colour_model_and_colour_refused_by_a_grey_one(class_ckpt, tmp_path):
    grey = tmp_path / "grey"
    grey.mkdir()
    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (RES, RES), dtype=np.uint8)).save(grey / f"{k}.png")
    model = load_frozen(str(class_ckpt), torch.device("cpu"), "ema")
    images = load_dataset(f"folder:{grey}", RES, cache_dir=tmp_path / "cache")
    assert images.info.channels == 1
    fitted = fit_images(model, images, announce=False)
    assert fitted.info.channels == 3 and torch.equal(fitted.images, images.images.expand(-1, 3, -1, -1))
    run_dir = tmp_path / "run"
    train.main(invert_args(run_dir, class_ckpt, f"folder:{grey}", "--steps", "1"))
    assert (run_dir / "checkpoint.pt").exists()

    grey_model = SimpleNamespace(path=class_ckpt, sampler=SimpleNamespace(info=dataclasses.replace(
        model.sampler.info, channels=1)))
    with pytest.raises(ValueError, match="has colour images but the model .* was trained on greyscale ones"):
        fit_images(grey_model, images.with_channels(3))


def test_a_changed_or_missing_model_is_refused_on_resume_and_when_sampling(class_ckpt, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(class_ckpt.read_bytes())
    run_dir = tmp_path / "run"
    # (A constant rate: a cosine one would refuse the longer --steps below before the model is read.)
    train.main(invert_args(run_dir, model, folder_of(class_ckpt), "--steps", "2", "--lr-schedule", "constant"))
    saved = file_hash(run_dir / "checkpoint.pt")
    payload = load_checkpoint(model)
    payload["ema"]["model"]["null_embedding"] += 1          # the model is trained further, say
    from core.checkpoint import save_checkpoint
    save_checkpoint({k: v for k, v in payload.items() if k not in ("format", "version")}, model)
    with pytest.raises(ValueError, match="changed since these embeddings were learned"):
        train.main(["--stage", "invert", "--run-dir", str(run_dir), "--resume", "--steps", "4", "--device", "cpu"])
    with pytest.raises(ValueError, match="changed since these embeddings were learned"):
        draw(run_dir / "checkpoint.pt", tmp_path / "set")
    model.unlink()
    with pytest.raises(FileNotFoundError, match="does not exist; restore it"):
        draw(run_dir / "checkpoint.pt", tmp_path / "set")
    assert file_hash(run_dir / "checkpoint.pt") == saved and not (tmp_path / "set").exists()


def test_a_model_named_relative_to_one_folder_is_found_from_any_other(class_ckpt, tmp_path, monkeypatch):
    """The checkpoint records the model's absolute path: sample.py and a resume work from another folder (the
    fingerprint proves the file the same model), and `~` is the user's home. Sampling never writes into the
    frozen model's training images either, though the inversion was of other images."""
    from helpers import colour_folder
    project = tmp_path / "project"
    project.mkdir()
    (project / "model.pt").write_bytes(class_ckpt.read_bytes())
    images = colour_folder(tmp_path / "others", 2, seed=9)
    monkeypatch.setenv("HOME", str(project))
    monkeypatch.chdir(project)
    train.main(invert_args(tmp_path / "home", Path("~/model.pt"), f"folder:{images}", "--steps", "2",
                           "--lr-schedule", "constant"))
    run_dir = tmp_path / "run"
    train.main(invert_args(run_dir, Path("model.pt"), f"folder:{images}", "--steps", "2", "--lr-schedule", "constant"))
    assert load_checkpoint(run_dir / "checkpoint.pt")["inversion"]["model"]["path"] == str(project / "model.pt")
    monkeypatch.chdir(tmp_path)
    assert len(list(draw(run_dir / "checkpoint.pt", tmp_path / "set").rglob("*.png"))) == 6
    train.main(["--stage", "invert", "--run-dir", str(run_dir), "--resume", "--steps", "3", "--device", "cpu"])
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3
    trained_on = folder_of(class_ckpt).removeprefix("folder:")
    with pytest.raises(ValueError, match="the frozen model's --dataset"):
        draw(run_dir / "checkpoint.pt", Path(trained_on) / "synthetic")
    assert not (Path(trained_on) / "synthetic").exists()


def test_a_project_folder_moved_with_its_runs_still_finds_its_model_and_not_another(class_ckpt, tmp_path):
    """An inversion told its run folder records the model's path from there too: a copy of the folder that holds
    both runs, the original deleted, draws the same images and resumes against the copy's model (found beside the
    run, proved the same by its fingerprint); a copy whose model was replaced is refused, and one without it names
    both places it looked."""
    import shutil
    from core.checkpoint import save_checkpoint
    from invert.stage import SPEC, resumed_model
    project = tmp_path / "project"
    (project / "runs" / "model").mkdir(parents=True)
    shutil.copy(class_ckpt, project / "runs" / "model" / "checkpoint.pt")
    run_dir = project / "runs" / "inverted"
    spec, args = train.parse_args(invert_args(run_dir, project / "runs" / "model" / "checkpoint.pt",
                                              folder_of(class_ckpt), "--steps", "2", "--lr-schedule", "constant"))
    config, _ = resolve_config(spec, args, run_dir)
    _, stage = spec.build(config, Runtime(CPU), None, run_dir=run_dir)
    Trainer(stage, config.train, run_dir, Runtime(CPU)).run()
    record = load_checkpoint(run_dir / "checkpoint.pt")["inversion"]["model"]
    assert record["path"] == str(project / "runs" / "model" / "checkpoint.pt")
    assert record["relative"] == str(Path("..") / "model" / "checkpoint.pt")
    before = draw(run_dir / "checkpoint.pt", tmp_path / "before")

    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(project, moved)
    shutil.rmtree(project)
    ckpt = moved / "runs" / "inverted" / "checkpoint.pt"
    after = draw(ckpt, tmp_path / "after")
    manifest = rows(after / "manifest.csv")
    assert len(manifest) == 6 and manifest == rows(before / "manifest.csv")
    for r in manifest:
        assert np.array_equal(pixels(after / r["file"]), pixels(before / r["file"]))
    saved = load_checkpoint(ckpt)
    assert resumed_model(config, saved, ckpt.parent, CPU).path == moved / "runs" / "model" / "checkpoint.pt"
    SPEC.check(config, saved, CPU, run_dir=ckpt.parent)
    _, resumed = SPEC.build(config, Runtime(CPU), saved, run_dir=ckpt.parent)
    assert resumed.outputs.payload({})["inversion"]["model"] == {
        **record, "path": str(moved / "runs" / "model" / "checkpoint.pt")}

    payload = load_checkpoint(moved / "runs" / "model" / "checkpoint.pt")
    payload["ema"]["model"]["null_embedding"] += 1                  # another model in its place
    save_checkpoint({k: v for k, v in payload.items() if k not in ("format", "version")},
                    moved / "runs" / "model" / "checkpoint.pt")
    other = load_frozen(moved / "runs" / "model" / "checkpoint.pt", CPU, "ema").fingerprint
    tried = (f"{project / 'runs' / 'model' / 'checkpoint.pt'} does not exist and "
             f"{moved / 'runs' / 'model' / 'checkpoint.pt'} (its place from the inversion's run folder) ")
    with pytest.raises(ValueError, match=re.escape(f"{tried}holds another model (weights {other}); put that model back")):
        draw(ckpt, tmp_path / "replaced")
    with pytest.raises(ValueError, match=re.escape(f"{tried}holds another model (weights {other}); put that model back")):
        SPEC.build(config, Runtime(CPU), saved, run_dir=ckpt.parent)
    (moved / "runs" / "model" / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tried}does not exist; put that model back at one of them")):
        draw(ckpt, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--model {tried}does not exist; put that model back")):
        SPEC.check(config, saved, CPU, run_dir=ckpt.parent)
    assert not any((tmp_path / name).exists() for name in ("replaced", "missing"))


def test_train_py_records_the_models_place_from_the_run_so_a_moved_project_samples_and_resumes(class_ckpt, tmp_path,
                                                                                               monkeypatch):
    """`train.py --stage invert` tells the stage its run folder: a project folder copied elsewhere (the original
    deleted) samples and resumes from the new place, both run folders named relative to it."""
    import shutil
    project = tmp_path / "project"
    (project / "runs" / "model").mkdir(parents=True)
    shutil.copy(class_ckpt, project / "runs" / "model" / "checkpoint.pt")
    monkeypatch.chdir(project)
    train.main(invert_args(Path("runs/inverted"), project / "runs" / "model" / "checkpoint.pt", folder_of(class_ckpt),
                           "--steps", "2", "--lr-schedule", "constant"))
    record = load_checkpoint(project / "runs" / "inverted" / "checkpoint.pt")["inversion"]["model"]
    assert record["relative"] == os.path.join("..", "model", "checkpoint.pt")
    moved = tmp_path / "elsewhere"
    shutil.copytree(project, moved)
    monkeypatch.chdir(moved)
    shutil.rmtree(project)
    assert len(list(draw(Path("runs/inverted/checkpoint.pt"), tmp_path / "set").rglob("*.png"))) == 6
    train.main(["--stage", "invert", "--run-dir", "runs/inverted", "--resume", "--steps", "3", "--device", "cpu"])
    assert load_checkpoint(moved / "runs" / "inverted" / "checkpoint.pt")["step"] == 3
    (moved / "runs" / "model" / "checkpoint.pt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{moved / 'runs' / 'model' / 'checkpoint.pt'} does not "
                                                          f"exist; put that model back at one of them")):
        train.main(["--stage", "invert", "--run-dir", "runs/inverted", "--resume", "--steps", "4", "--device", "cpu"])


def inverted_project(class_ckpt: Path, project: Path) -> Path:
    """A project folder holding a copy of the class model (runs/model) and a two-step inversion against it
    (runs/inverted, told its run folder, so it records the model's place from there too); the inversion's folder."""
    import shutil
    (project / "runs" / "model").mkdir(parents=True)
    shutil.copy(class_ckpt, project / "runs" / "model" / "checkpoint.pt")
    run_dir = project / "runs" / "inverted"
    train.main(invert_args(run_dir, project / "runs" / "model" / "checkpoint.pt", folder_of(class_ckpt),
                           "--steps", "2", "--lr-schedule", "constant"))
    return run_dir


def another_model(path: Path, shift: float = 1.0) -> str:
    """Write another model over the diffusion checkpoint at `path` (its null embedding moved, as further training
    would); that model's fingerprint."""
    from core.checkpoint import save_checkpoint
    payload = load_checkpoint(path)
    payload["ema"]["model"]["null_embedding"] += shift
    save_checkpoint({k: v for k, v in payload.items() if k not in ("format", "version")}, path)
    return load_frozen(path, CPU, "ema").fingerprint


def test_another_model_at_the_recorded_path_is_looked_past_to_the_right_one_beside_the_run(class_ckpt, tmp_path):
    """A copy of a project whose original's model was then replaced: the absolute path the inversion records holds
    another model, its place from the run folder the right one. sample.py draws from the copy the images it drew
    before, and a resume there (train.py, its checks included) goes on as it would have against the original, and
    records the copy's model."""
    import shutil
    project = tmp_path / "project"
    run_dir = inverted_project(class_ckpt, project)
    before = draw(run_dir / "checkpoint.pt", tmp_path / "before")
    copy, control = tmp_path / "copy", tmp_path / "control"
    shutil.copytree(project, copy)
    shutil.copytree(project, control)
    resume = ["--stage", "invert", "--resume", "--steps", "3", "--device", "cpu"]
    train.main([*resume, "--run-dir", str(control / "runs" / "inverted")])   # against the original, still right
    another_model(project / "runs" / "model" / "checkpoint.pt")

    ckpt = copy / "runs" / "inverted" / "checkpoint.pt"
    after = draw(ckpt, tmp_path / "after")
    manifest = rows(after / "manifest.csv")
    assert len(manifest) == 6 and manifest == rows(before / "manifest.csv")
    for r in manifest:
        assert np.array_equal(pixels(after / r["file"]), pixels(before / r["file"]))
    train.main([*resume, "--run-dir", str(copy / "runs" / "inverted")])
    resumed, reference = load_checkpoint(ckpt), load_checkpoint(control / "runs" / "inverted" / "checkpoint.pt")
    assert resumed["step"] == 3
    assert torch.equal(resumed["models"]["model"]["weight"], reference["models"]["model"]["weight"])
    assert resumed["inversion"]["model"]["path"] == str(copy / "runs" / "model" / "checkpoint.pt")


def test_a_link_loop_at_one_recorded_place_is_a_place_that_holds_nothing(class_ckpt, tmp_path):
    """A loop of links where the copy's model would be (Path.resolve raised on it before any place was tried):
    the model at the recorded absolute path is still found."""
    import shutil
    project = tmp_path / "project"
    run_dir = inverted_project(class_ckpt, project)
    before = draw(run_dir / "checkpoint.pt", tmp_path / "before")
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    looped = copy / "runs" / "model" / "checkpoint.pt"
    looped.unlink()
    looped.symlink_to(looped)
    after = draw(copy / "runs" / "inverted" / "checkpoint.pt", tmp_path / "after")
    for r in rows(before / "manifest.csv"):
        assert np.array_equal(pixels(after / r["file"]), pixels(before / r["file"]))


def test_where_no_recorded_place_holds_the_model_one_sentence_names_each_and_what_it_holds(class_ckpt, tmp_path):
    """The recorded absolute path holds another model and the place from the run folder none: sample.py and a resume
    are refused in one sentence naming both places and what was wrong with each, having written nothing."""
    import shutil
    project = tmp_path / "project"
    run_dir = inverted_project(class_ckpt, project)
    learned = load_checkpoint(run_dir / "checkpoint.pt")["inversion"]["model"]["fingerprint"]
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    original, beside = project / "runs" / "model" / "checkpoint.pt", copy / "runs" / "model" / "checkpoint.pt"
    other = another_model(original)
    beside.unlink()
    ckpt = copy / "runs" / "inverted" / "checkpoint.pt"
    saved = file_hash(ckpt)

    def refusal(first: str) -> str:
        return (f"The diffusion model that the embeddings in {ckpt} were learned against (weights {learned}) is at "
                f"none of the places tried: {first} holds another model (weights {other}) and {beside} (its place "
                f"from the inversion's run folder) does not exist; put that model back at one of them, or learn the "
                f"embeddings again against another model.")
    with pytest.raises(ValueError) as told:
        draw(ckpt, tmp_path / "set")
    assert str(told.value) == refusal(str(original))
    with pytest.raises(ValueError) as told:
        train.main(["--stage", "invert", "--resume", "--steps", "3", "--device", "cpu", "--run-dir", str(ckpt.parent)])
    assert str(told.value) == refusal(f"the run's --model {original}")
    assert file_hash(ckpt) == saved and not (tmp_path / "set").exists()


# ---------------------------------------------------------------------------------------------
# images from the learned vectors: sample.py on an inversion checkpoint


def draw(ckpt: Path, out: Path, *extra: str) -> Path:
    return sample.main(["--ckpt", str(ckpt), "--dataset-out", str(out), "--device", "cpu", "--sampler", "ddim",
                        "--steps", "2", "--batch-size", "4", *extra])


def test_without_noise_or_interpolation_image_k_is_the_plain_sample_of_its_vector(inverted, tmp_path):
    out = draw(inverted / "checkpoint.pt", tmp_path / "set", "--emb-noise", "0", "--interp", "0")
    manifest = rows(out / "manifest.csv")
    assert [r["file"] for r in manifest] == [f"{c}/{k:06d}.png" for k, c in
                                             enumerate(["blue", "blue", "green", "green", "red", "red"])]
    payload = load_checkpoint(inverted / "checkpoint.pt")
    vectors = payload["models"]["model"]["weight"]
    model = open_source(inverted / "checkpoint.pt", CPU).model
    sampling = SamplingConfig(sampler="ddim", steps=2, guidance_scale=2.0)
    for k in (1, 4):
        plain = sample_images(model, sampling, [image_seed(0, k)], cond_emb=vectors[k:k + 1],
                              reference=vectors.mean(dim=0))
        expected = ((plain[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        assert np.abs(pixels(out / manifest[k]["file"]).astype(int) - expected.astype(int)).max() <= 1
        assert manifest[k]["source"] == payload["inversion"]["sources"][k] and float(manifest[k]["weight"]) == 0


def test_variations_stay_in_class_reproduce_alone_and_extend(inverted, tmp_path):
    ckpt = inverted / "checkpoint.pt"
    out = draw(ckpt, tmp_path / "set", "--per-image", "2", "--interp", "1", "--emb-noise", "0.5")
    manifest = rows(out / "manifest.csv")
    assert len(manifest) == 12
    sources = load_checkpoint(ckpt)["inversion"]["sources"]
    for r in manifest:
        k = int(r["index"])
        assert r["source"] == sources[k % 6] and r["partner"].split("/")[0] == r["class"] == r["file"].split("/")[0]
        assert 0 <= float(r["weight"]) <= 1
    assert any(r["partner"] != r["source"] for r in manifest)
    # Image 9 drawn alone (grid mode, same seed and options) is the same picture.
    alone = sample.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "alone"), "--device", "cpu", "--sampler", "ddim",
                         "--steps", "2", "--first-index", "9", "--num", "1", "--interp", "1", "--emb-noise", "0.5"])
    assert np.array_equal(pixels(alone / "images" / "000009.png"), pixels(out / manifest[9]["file"]))
    # One per image is the first six of those: a larger --per-image only adds images.
    fewer = draw(ckpt, tmp_path / "fewer", "--interp", "1", "--emb-noise", "0.5")
    for r in rows(fewer / "manifest.csv"):
        assert np.array_equal(pixels(fewer / r["file"]), pixels(out / r["file"]))
    # So a larger --per-image extends that set, to the one written at once (a set written before the count
    # left the request, with per_image in its dataset.json, continues too).
    request = json.loads((fewer / "dataset.json").read_text())
    assert "per_image" not in request["request"]
    request["request"]["per_image"] = 1
    (fewer / "dataset.json").write_text(json.dumps(request))
    draw(ckpt, fewer, "--per-image", "2", "--interp", "1", "--emb-noise", "0.5")
    assert rows(fewer / "manifest.csv") == manifest
    for r in manifest:
        assert np.array_equal(pixels(fewer / r["file"]), pixels(out / r["file"]))


def test_guidance_against_a_reference_vector_is_eps_ref_plus_scale_times_the_difference():
    from ddpm.generate import eps_model
    from ddpm.unet import UNet, UNetConfig
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(), cond="class", num_classes=3)).eval()
    for p in net.parameters():  # away from the zero-initialised output, so conditions matter
        p.data += 0.05 * torch.randn_like(p)
    schedule = Schedule.from_name("cosine", 50)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 40])
    vectors, reference = torch.randn(2, net.config.embedding_dim), torch.randn(net.config.embedding_dim)
    with torch.no_grad():
        guided = eps_model(net, schedule, "eps", cond_emb=vectors, reference=reference, guidance_scale=2.5)(x, t)
        own = net(x, t, cond_emb=vectors)
        ref = net(x, t, cond_emb=reference.expand(2, -1))
        plain_null = eps_model(net, schedule, "eps", cond_emb=vectors, guidance_scale=2.5)(x, t)
        null = net(x, t, None)
    torch.testing.assert_close(guided, ref + 2.5 * (own - ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_null, null + 2.5 * (own - null), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, plain_null, atol=1e-3)
    # Class labels guided against a reference vector: the labels are embedded first.
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        by_label = eps_model(net, schedule, "eps", cond=labels, reference=reference, guidance_scale=2.5)(x, t)
        by_vector = eps_model(net, schedule, "eps", cond_emb=net.embed_condition(labels), reference=reference,
                              guidance_scale=2.5)(x, t)
    torch.testing.assert_close(by_label, by_vector)


@pytest.mark.parametrize("extra, message", [
    (("--per-class", "2"), "--per-class does not apply to an inversion"),
    (("--num", "3"), "use --per-image instead of --num"),
    (("--class", "red"), "--class does not apply to an inversion"),
    (("--interp", "2"), "--interp must be in"),
    (("--emb-noise", "-1"), "--emb-noise must be"),
])
def test_bad_variation_options_are_refused(inverted, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        draw(inverted / "checkpoint.pt", tmp_path / "set", *extra)
    assert not (tmp_path / "set").exists()


def test_variation_options_need_an_inversion_checkpoint(class_ckpt, tmp_path):
    for extra in (("--per-image", "2"), ("--emb-noise", "0.2")):
        with pytest.raises(ValueError, match="applies to (inversion|invert) checkpoints"):
            draw(class_ckpt, tmp_path / "set", *extra)


@pytest.mark.parametrize("sampler", ["ddpm", "pndm", "spndm"])
def test_every_sampler_draws_from_an_inversion(inverted, tmp_path, sampler):
    out = sample.main(["--ckpt", str(inverted / "checkpoint.pt"), "--out", str(tmp_path / sampler), "--device", "cpu",
                       "--sampler", sampler, "--steps", "4", "--num", "3", "--seed", "5"])
    manifest = rows(out / "manifest.csv")
    assert [r["source_index"] for r in manifest] == ["0", "1", "2"]
    assert all(r["seed"] == str(image_seed(5, k)) for k, r in enumerate(manifest))
    assert pixels(out / "images" / "000002.png").shape == (RES, RES, 3)


def test_a_resume_of_a_project_not_moved_reads_its_frozen_model_once(class_ckpt, tmp_path, monkeypatch):
    """The start-up check read the whole model to find its file, then the stage read it again."""
    import invert.frozen
    run_dir = inverted_project(class_ckpt, tmp_path / "project")
    reads, read = [], invert.frozen._read_frozen
    monkeypatch.setattr(invert.frozen, "_read_frozen", lambda *args, **kwargs: reads.append(args[0]) or
                        read(*args, **kwargs))
    train.main(["--stage", "invert", "--resume", "--steps", "3", "--device", "cpu", "--run-dir", str(run_dir)])
    assert len(reads) == 1 and load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3
