"""The stage-neutral core: the training loop's contract, learning-rate schedules, atomic files,
checkpoint format and fingerprints, weight files, and the stage registry behind both entry points."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from core.checkpoint import VERSION, load_checkpoint, save_checkpoint, state_fingerprint
from core.config import LR_SCHEDULES, DataConfig, StageConfig, TrainConfig
from core.contract import Outputs, Trainable, TrainingStage
from core.errors import FieldError, UserError
from core.runtime import Runtime, atomic_write
from core.weights import check_state_dict, read_state_dict
from stages import STAGES
from training.loop import Trainer, check_schedule_kept, lr_factor

CPU = Runtime(torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# learning-rate schedules


def test_lr_schedules_warm_up_then_follow_their_formula():
    steps, warmup = 100, 10
    for name in ("constant", "cosine"):
        # Linear warm-up: (s + 1) / warmup.
        assert [lr_factor(name, s, steps, warmup) for s in range(warmup)] == [(s + 1) / warmup for s in range(warmup)]
    assert all(lr_factor("constant", s, steps, warmup) == 1.0 for s in range(warmup, steps))
    # Cosine: 1 at the end of the warm-up, 1/2 half way through the rest, 0 at the last step.
    assert lr_factor("cosine", warmup, steps, warmup) == pytest.approx(1.0)
    assert lr_factor("cosine", warmup + 45, steps, warmup) == pytest.approx(0.5)
    assert lr_factor("cosine", steps, steps, warmup) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_factor("cosine", s, steps, warmup) for s in range(warmup, steps)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    with pytest.raises(ValueError, match="constant, cosine, onecycle"):
        lr_factor("step", 0, steps, warmup)
    assert set(LR_SCHEDULES) == {"constant", "cosine", "onecycle"}


def test_onecycle_rises_from_a_25th_of_the_peak_then_anneals_to_a_10000th_of_that():
    steps, warmup = 100, 30
    rise = [lr_factor("onecycle", s, steps, warmup) for s in range(warmup + 1)]
    assert rise[0] == pytest.approx(1 / 25) and rise[-1] == pytest.approx(1.0)
    assert rise[15] == pytest.approx(1 / 25 + (1 - 1 / 25) / 2)             # linear
    fall = [lr_factor("onecycle", s, steps, warmup) for s in range(warmup, steps + 1)]
    assert all(a > b for a, b in zip(fall, fall[1:]))
    assert fall[35] == pytest.approx((1 + 1 / 250000) / 2)                  # cosine half way down
    assert fall[-1] == pytest.approx(1 / 250000)
    with pytest.raises(ValueError, match="no annealing phase"):
        TrainConfig(steps=30, warmup_steps=30, lr_schedule="onecycle")


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_a_resume_may_change_steps_only_where_the_rates_already_trained_with_stay(schedule):
    """Extending a run must train the weights of a run started with that many steps: a cosine or one-cycle
    rate follows the total, so once a step past the warm-up's end has trained, another total is refused."""
    was = TrainConfig(steps=100, warmup_steps=30, lr_schedule=schedule)
    for done, steps in ((0, 300), (31, 300), (32, 300), (100, 300), (100, 100), (50, 60)):
        now = dataclasses.replace(was, steps=steps)
        kept = all(lr_factor(schedule, s, 100, 30) == lr_factor(schedule, s, steps, 30) for s in range(done))
        assert kept == (schedule == "constant" or steps == 100 or done <= 31), (done, steps)  # step 30: the peak
        if kept:
            check_schedule_kept(done, was, now)
        else:
            with pytest.raises(ValueError, match=rf"^--steps {steps} would change the learning rates this run has "
                                                 rf"trained with \(its --lr-schedule {schedule} follows the total "
                                                 rf"steps, 100\), .*; resume with --steps 100, or start a new"):
                check_schedule_kept(done, was, now)


# ---------------------------------------------------------------------------------------------
# the loop's contract, with toy stages


class Pair(nn.Module):
    """A scalar parameter; the toy "generator" and "discriminator" below are one each."""

    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value]))

    def forward(self, x):
        return self.w * x


def toy_stage(losses, *, metrics=None, payload=None, evaluate=None, data=None):
    torch.manual_seed(0)
    g, d = Pair(1.0), Pair(1.0)
    data = data or torch.utils.data.TensorDataset(torch.ones(8, 1))

    def loss(models, batch, generator, step):
        return losses(models, batch, step), (metrics(step) if metrics else {})

    stage = TrainingStage("toy", {"model": Trainable(g, lr=0.1, ema=True), "disc": Trainable(d, lr=0.1)}, loss, data,
                          {"toy": 1}, {"name": "toy"}, outputs=Outputs(payload=payload, evaluate=evaluate))
    return stage, g, d


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_loss_trains_only_its_own_model(tmp_path):
    """A GAN's generator loss flows through the discriminator and vice versa; each must update only its
    own model. Here each loss pulls the *other* model's parameter the opposite way to its own loss, so any
    leak would flip the sign of Adam's first step (whose size is lr whatever the gradient's)."""
    def losses(models, batch, step):
        x = batch[0]
        g_out, d_out = models["model"](x), models["disc"](x)
        return {"model": (g_out - 3).square().mean() + 10 * d_out.mean(),     # pulls g up, would push d down
                "disc": (d_out - 3).square().mean() - 10 * g_out.mean()}      # pulls d up, would push g down

    stage, g, d = toy_stage(losses)
    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=0, lr=0.1, grad_clip=0, log_every=1, sample_every=0)
    Trainer(stage, cfg, tmp_path, CPU).run()
    assert g.w.item() == pytest.approx(1.1, abs=1e-6) and d.w.item() == pytest.approx(1.1, abs=1e-6)


def test_a_trainable_without_a_loss_this_step_is_left_alone_and_metrics_average_over_their_own_steps(tmp_path):
    def losses(models, batch, step):
        out = {"model": (models["model"](batch[0]) - 3).square().mean()}
        if step >= 2:  # the "discriminator" starts late, as a GAN's does
            out["disc"] = (models["disc"](batch[0]) - 3).square().mean()
        return out

    def metrics(step):
        return {"step_seen": torch.tensor(float(step)), **({"late": torch.tensor(float(step))} if step >= 3 else {})}

    stage, g, d = toy_stage(losses, metrics=metrics)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=0, grad_clip=0, log_every=4, ckpt_every=1, sample_every=0)
    Trainer(stage, cfg, tmp_path, CPU).run()
    assert d.w.item() == 1.0 and g.w.item() != 1.0
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=0, grad_clip=0, log_every=4, ckpt_every=1, sample_every=0)
    stage, g, d = toy_stage(losses, metrics=metrics)
    Trainer(stage, cfg, tmp_path, CPU, resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy")).run()
    [line] = [r for r in records(tmp_path) if r["step"] == 4]
    assert line["step_seen"] == pytest.approx(2.5)   # the resumed window holds steps 2 and 3
    assert line["late"] == pytest.approx(3.0)        # seen at step 3 only: averaged over its own count
    assert "loss/disc" in line and "grad_norm/disc" in line
    assert d.w.item() != 1.0


def test_evaluation_lines_payload_and_a_zero_step_run(tmp_path):
    def losses(models, batch, step):
        return {"model": models["model"](batch[0]).square().mean()}

    stage, g, d = toy_stage(losses, payload=lambda models: {"extra": models["model"].w.item() * 2},
                            evaluate=lambda models: {"split": "heldout", "value": models["model"].w.item()})
    Trainer(stage, TrainConfig(steps=0, sample_every=0), tmp_path, CPU).run()
    payload = load_checkpoint(tmp_path / "checkpoint.pt", "toy")
    assert payload["step"] == 0 and payload["extra"] == 2.0           # written as the model starts
    assert records(tmp_path) == [{"step": 0, "split": "heldout", "value": 1.0}]
    assert not (tmp_path / "samples").exists()                          # no preview: the stage has none
    assert set(payload["models"]) == {"model", "disc"} and set(payload["ema"]) == {"model"}


def test_a_run_of_zero_steps_resubmitted_changes_nothing_and_writes_what_a_kill_left_out(tmp_path, monkeypatch,
                                                                                       capsys):
    """A run of --steps 0 (a published autoencoder's weights, written as a run) is finished once its checkpoint and
    outputs are written: run again, it logged its evaluation twice and wrote its checkpoint anew; killed between
    its checkpoint and its evaluation, it owes that evaluation, once."""
    def stage():
        return toy_stage(lambda m, b, s: m["model"](b[0]).square().mean(),
                         evaluate=lambda models: {"split": "heldout", "value": models["model"].w.item()})[0]

    cfg = TrainConfig(steps=0, sample_every=0)
    Trainer(stage(), cfg, tmp_path, CPU).run()
    files = (tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl")
    before = [p.read_bytes() for p in files]
    capsys.readouterr()
    Trainer(stage(), cfg, tmp_path, CPU, resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy")).run()
    assert "already at step 0 of 0: nothing to train" in capsys.readouterr().out
    assert [p.read_bytes() for p in files] == before
    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_evaluate", lambda self, step: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            Trainer(stage(), cfg, killed, CPU).run()
    for _ in range(2):
        Trainer(stage(), cfg, killed, CPU, resume_from=load_checkpoint(killed / "checkpoint.pt", "toy")).run()
        assert records(killed) == [{"step": 0, "split": "heldout", "value": 1.0}]


def test_resuming_a_finished_run_does_nothing_and_going_back_or_into_an_existing_one_is_refused(tmp_path, capsys):
    stage, *_ = toy_stage(lambda models, batch, step: models["model"](batch[0]).mean())
    cfg = TrainConfig(steps=2, batch_size=4, sample_every=0)
    first = Trainer(stage, cfg, tmp_path, CPU).run()
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl")}
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(toy_stage(lambda m, b, s: m["model"](b[0]).mean())[0], cfg, tmp_path, CPU)
    # The same run resumed to the same step (a resubmitted job): nothing trained, nothing changed, no error.
    again = Trainer(toy_stage(lambda m, b, s: m["model"](b[0]).mean())[0], cfg, tmp_path, CPU,
                    resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy")).run()
    assert "already at step 2 of 2: nothing to train" in capsys.readouterr().out
    assert again["step"] == 2 and again["loss"] == pytest.approx(first["loss"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint.pt", tmp_path / "metrics.jsonl")} == before
    with pytest.raises(ValueError, match="already at step 2, past --steps 1"):
        Trainer(toy_stage(lambda m, b, s: m["model"](b[0]).mean())[0], dataclasses.replace(cfg, steps=1), tmp_path,
                CPU, resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy"))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
    stage, *_ = toy_stage(lambda m, b, s: m["model"](b[0]).square().mean())
    cfg = TrainConfig(steps=2, batch_size=4, log_every=1, ckpt_every=2, sample_every=0)
    Trainer(stage, cfg, tmp_path, CPU).run()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "spl')  # a full disk, or a kill mid-write
    stage, *_ = toy_stage(lambda m, b, s: m["model"](b[0]).square().mean())
    with pytest.warns(UserWarning, match="torn"):
        Trainer(stage, TrainConfig(steps=3, batch_size=4, log_every=1, sample_every=0), tmp_path, CPU,
                resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy")).run()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]


def seeded_stage(seen: list) -> TrainingStage:
    """A toy stage whose loss draws noise from the step's generator and dropout from torch's global one, and
    records each step's (step, generator seed, global seed) in `seen`."""
    torch.manual_seed(0)

    def loss(models, batch, generator, step):
        seen.append((step, generator.initial_seed(), torch.initial_seed()))
        x = batch[0]
        noise = torch.randn(x.shape, generator=generator)
        keep = nn.functional.dropout(torch.ones_like(x), 0.5)
        return {"model": ((models["model"](x) - noise) * keep).square().mean()}, {}

    return TrainingStage("toy", {"model": Trainable(Pair(1.0), lr=0.1, ema=True)}, loss,
                         torch.utils.data.TensorDataset(torch.arange(8.0)[:, None]), {"toy": 1}, {"name": "toy"})


def test_step_seeds_never_meet_the_seeds_that_shuffle_the_data(tmp_path):
    """numpy's SeedSequence pads keys with zeros, so a step seed keyed (seed, step, rank 0) was the seed of epoch
    `step`'s permutation (seed, epoch) and of a mixed batch's order: one stream drew both."""
    from core.runtime import derive_seed
    seen = []
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=0, log_every=1, sample_every=0, seed=3)
    Trainer(seeded_stage(seen), cfg, tmp_path, CPU).run()
    shuffles = {derive_seed(3, e) for e in range(8)} | {derive_seed(3, e, part) for e in range(8) for part in (1, 2)}
    used = {seed for _, *seeds in seen for seed in seeds}
    assert len(used) == 6 and not used & shuffles
    from training.loop import SEEDING, mix_seed, step_seed
    assert load_checkpoint(tmp_path / "checkpoint.pt", "toy")["seeding"] == SEEDING
    steps = {step_seed(3, s, rank) for s in range(8) for rank in range(3)}
    mixes = {mix_seed(3, s) for s in range(8)}
    assert len(steps) == 24 and len(mixes) == 8 and not (steps & mixes or steps & shuffles or mixes & shuffles)


def _losses_and_weight(run_dir: Path, trainer: Trainer) -> tuple[list[float], float]:
    return [r["loss"] for r in records(run_dir)], trainer.models["model"].w.item()


def test_a_checkpoint_without_a_seeding_record_resumes_with_the_seeds_it_was_written_with(tmp_path, monkeypatch):
    """Runs checkpointed before the seeding scheme was recorded go on exactly as they started (scheme 1); a new
    run records its scheme and resumes exactly too."""
    import training.loop
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=0, log_every=1, ckpt_every=2, sample_every=0, seed=5)
    half = dataclasses.replace(cfg, steps=2)
    results = {}
    for scheme in (1, 2):
        with monkeypatch.context() as patch:
            patch.setattr(training.loop, "SEEDING", scheme)  # what the code of the day started its runs with
            straight, split = tmp_path / f"straight{scheme}", tmp_path / f"split{scheme}"
            trainer = Trainer(seeded_stage([]), cfg, straight, CPU)
            trainer.run()
            results[scheme] = _losses_and_weight(straight, trainer)
            Trainer(seeded_stage([]), half, split, CPU).run()
        payload = load_checkpoint(split / "checkpoint.pt", "toy")
        assert payload["seeding"] == scheme
        if scheme == 1:  # as the code before the record wrote it
            del payload["seeding"]
            save_checkpoint(payload, split / "checkpoint.pt")
        seen = []
        trainer = Trainer(seeded_stage(seen), cfg, split, CPU,
                          resume_from=load_checkpoint(split / "checkpoint.pt", "toy"))
        trainer.run()
        assert _losses_and_weight(split, trainer) == results[scheme]
        assert [s for _, s, _ in seen] == [training.loop.step_seed(5, step, 0, scheme) for step in (2, 3)]
    assert results[1] != results[2]


def test_elapsed_time_counts_on_from_the_checkpoint_when_a_run_resumes(tmp_path, monkeypatch):
    """`elapsed_s` is the run's training time: a resumed run's starts from its checkpoint's, not from zero (from
    the last logged value for a checkpoint older than its record of it)."""
    import types
    import training.loop
    clock = [1000.0]
    monkeypatch.setattr(training.loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def losses(models, batch, step):
        clock[0] += 10.0  # each step takes 10 s
        return models["model"](batch[0]).square().mean()

    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=0, log_every=1, ckpt_every=2, sample_every=0)
    run_dir, old = tmp_path / "run", tmp_path / "old"
    Trainer(toy_stage(losses)[0], cfg, run_dir, CPU).run()
    old.mkdir()  # the same run, as a checkpoint older than the record of its time left it
    (old / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    payload = load_checkpoint(run_dir / "checkpoint.pt", "toy")
    save_checkpoint({k: v for k, v in payload.items() if k != "elapsed_s"}, old / "checkpoint.pt")
    for resumed in (run_dir, old):
        clock[0] = 5.0  # another process: its clock starts anywhere
        Trainer(toy_stage(losses)[0], dataclasses.replace(cfg, steps=4), resumed, CPU,
                resume_from=load_checkpoint(resumed / "checkpoint.pt", "toy")).run()
        assert [r["elapsed_s"] for r in records(resumed)] == [10.0, 20.0, 30.0, 40.0]
        assert load_checkpoint(resumed / "checkpoint.pt", "toy")["elapsed_s"] == 40.0


def test_a_run_trained_without_loss_scaling_resumes_where_amp_auto_picks_fp16(tmp_path, monkeypatch):
    """--device is no part of a run's config: a run checkpointed on a CPU (or a bf16 GPU) may be resumed on a GPU
    without bf16, where --amp auto picks fp16 with loss scaling. Its checkpoint holds no scale to take up; it was
    refused as inconsistent, the advice being to start the run anew."""
    import training.loop

    def losses(models, batch, step):
        return models["model"](batch[0]).square().mean()

    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=0, log_every=1, sample_every=0)
    Trainer(toy_stage(losses)[0], cfg, tmp_path, CPU).run()
    assert load_checkpoint(tmp_path / "checkpoint.pt", "toy")["scaler"] == {}
    monkeypatch.setattr(training.loop, "autocast_dtype", lambda amp, device: torch.float16)
    Trainer(toy_stage(losses)[0], dataclasses.replace(cfg, steps=4), tmp_path, CPU,
            resume_from=load_checkpoint(tmp_path / "checkpoint.pt", "toy")).run()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "checkpoint.pt", "toy")["scaler"]["scale"] > 0  # scaling from here on


# ---------------------------------------------------------------------------------------------
# files and checkpoints


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_without_replace_keeps_a_file_that_appeared_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "stats.npz"

    def another_writer_finishes_first(f):
        f.write(b"mine")
        path.write_bytes(b"theirs")  # the other command's rename lands while this one writes

    with pytest.raises(FileExistsError):
        atomic_write(path, another_writer_finishes_first, replace=False)
    assert path.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["stats.npz"]
    atomic_write(tmp_path / "new.npz", lambda f: f.write(b"new"), replace=False)
    assert (tmp_path / "new.npz").read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 2
    # Without hard links (FAT, some network file systems): the same refusal, by a check before the rename.
    monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    with pytest.raises(FileExistsError):
        atomic_write(path, lambda f: f.write(b"mine"), replace=False)
    atomic_write(tmp_path / "third.npz", lambda f: f.write(b"3"), replace=False)
    assert path.read_bytes() == b"theirs" and (tmp_path / "third.npz").read_bytes() == b"3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.npz", "stats.npz", "third.npz"]


def test_version_1_checkpoints_load_in_the_new_layout(tmp_path):
    weights = {"w": torch.ones(2)}
    torch.save({"format": "synthdiff-checkpoint", "version": 1, "stage": "ddpm", "model": weights, "ema": weights,
                "optimizer": {"state": {}}, "step": 3}, tmp_path / "old.pt")
    payload = load_checkpoint(tmp_path / "old.pt", "ddpm")
    assert payload["version"] == VERSION and torch.equal(payload["models"]["model"]["w"], weights["w"])
    assert payload["ema"]["model"].keys() == weights.keys() and payload["optimizers"] == {"model": {"state": {}}}
    save_checkpoint({"stage": "ddpm", "version_check": True}, tmp_path / "new.pt")
    assert load_checkpoint(tmp_path / "new.pt")["version"] == VERSION


def test_state_fingerprint_sees_every_weight():
    state = {"a.weight": torch.arange(6.0).view(2, 3), "a.bias": torch.zeros(2)}
    same = {k: v.clone() for k, v in reversed(list(state.items()))}
    assert state_fingerprint(state) == state_fingerprint(same)
    nudged = {**same, "a.bias": torch.tensor([0.0, 1e-7])}
    renamed = {"b.weight": state["a.weight"], "a.bias": state["a.bias"]}
    retyped = {**same, "a.bias": torch.zeros(2, dtype=torch.float64)}
    assert len({state_fingerprint(s) for s in (state, nudged, renamed, retyped)}) == 4


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A minimal writer of the format (8-byte header length, JSON header, raw little-endian data)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_weight_files_load_as_data_in_every_published_form(tmp_path):
    tensors = {"x.weight": torch.randn(3, 2), "x.half": torch.randn(4).half(), "n": torch.arange(5)}
    write_safetensors(tmp_path / "w.safetensors", tensors)
    torch.save({"state_dict": tensors, "global_step": 7}, tmp_path / "w.ckpt")  # a Lightning-style wrapper
    for name, mmap in [(n, m) for n in ("w.safetensors", "w.ckpt") for m in (False, True)]:
        loaded = read_state_dict(tmp_path / name, "test", mmap=mmap)
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    full = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(full[:-3])  # the last tensor's data runs past the end
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name, mmap in [(n, m) for n in ("bad", "cut", "empty") for m in (False, True)]:
        with pytest.raises(ValueError, match="Cannot read test file"):
            read_state_dict(tmp_path / f"{name}.safetensors", "test", mmap=mmap)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="Cannot read test file") as refused:
        read_state_dict(tmp_path / "evil.pt", "test")  # a pickle that would run code is refused, not run
    # ... in our words: PyTorch's own message advises loading it with weights_only=False, as code.
    assert "holds Python objects besides tensors" in str(refused.value) and "weights_only" not in str(refused.value)


def test_check_state_dict_names_what_is_wrong():
    expected = {"a": (2, 3), "b": (4,)}
    check_state_dict({"a": torch.zeros(2, 3), "b": torch.zeros(4), "loss.x": torch.zeros(1)}, expected,
                     source="f", what="toy", ignore_prefixes=("loss.",))
    for found, message in (({"a": torch.zeros(2, 3)}, "1 missing.*b"),
                           ({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, "1 unexpected.*c"),
                           ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, r"wrong shape.*a: \(3, 2\) instead of \(2, 3\)")):
        with pytest.raises(ValueError, match=message):
            check_state_dict(found, expected, source="f", what="toy")


# ---------------------------------------------------------------------------------------------
# the registry and the entry points


def test_full_help_lists_every_option_of_every_stage_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out.replace("\n                        ", " ")
    for spec in STAGES.values():
        part = text[text.index(f"Options of --stage {spec.name}:"):]
        for section in spec.sections:
            for field in section.cls.__dataclass_fields__:
                if field in section.skip:
                    continue
                described = section.help.get(field) or section.cls.__dataclass_fields__[field].metadata.get("help")
                assert described, f"--stage {spec.name}: {section.name}.{field} has no help text"
                flag = f"--{field.replace('_', '-')}"
                line = next((l for l in part.splitlines() if l.strip().split(" ")[0].rstrip(",") == flag), None)
                assert line is not None and "(default:" in line, (spec.name, flag)
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "vae", "--help"])
    only_vae = capsys.readouterr().out
    assert "--perceptual-taps" in only_vae and "--vae-ckpt" not in only_vae


def test_entry_points_reject_unknown_stages_presets_and_values(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "gan"])
    assert "invalid choice: 'gan'" in capsys.readouterr().err
    for argv, stage in ((["--stage", "vae", "--preset", "ddpm-demo"], "ddpm"), (["--preset", "vae-demo"], "vae")):
        with pytest.raises(ValueError, match=rf"--preset {argv[-1]} is a preset of --stage {stage}, and this is "
                                             rf"--stage {'vae' if stage == 'ddpm' else 'ddpm'}; pass --stage {stage}\."):
            train.parse_args(argv)
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "vae", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        train.main(["--stage", "vae", "--batch-size", "0", "--run-dir", "unused"])
    with pytest.raises(ValueError, match=r"--perceptual-taps must be in 1..5"):
        train.main(["--stage", "vae", "--perceptual-taps", "6", "--run-dir", "unused"])
    assert not Path("unused").exists()


def test_sampling_never_imports_training_code_and_no_entry_point_imports_the_compiler():
    """PyTorch's compiler (torch._dynamo: torchvision imports it, and so does registering our Triton ops) adds 2-3 s
    to every start of a command on a 2-core CPU; it is loaded only where a run needs it (--compile, a classifier,
    our Triton kernels, the start-up check of a network's shapes)."""
    code = ("import sys, sample; print([m for m in sys.modules if m.split('.')[0] == 'training']); "
            "import train, fid.__main__, evaluate.sweep, evaluate.consistency, evaluate.experiment; "
            "print([m for m in ('torch._dynamo', 'torchvision') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(train.__file__).parent)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout


def test_every_registered_stage_has_presets_whose_configs_round_trip():
    from core.config import from_dict, to_dict
    for spec in STAGES.values():
        assert spec.default_preset in spec.presets
        for make in spec.presets.values():
            config = make()
            assert from_dict(spec.config_class, json.loads(json.dumps(to_dict(config)))) == config
            assert math.isfinite(config.train.lr)


# ---------------------------------------------------------------------------------------------
# a check across a stage's sections names its fields by their dotted keys


@dataclasses.dataclass(frozen=True)
class ToyNet:
    width: int = 8
    size: int = 16  # decided by the data: no option sets it


@dataclasses.dataclass(frozen=True)
class ToyStageConfig(StageConfig):
    net: ToyNet = dataclasses.field(default_factory=ToyNet)

    def __post_init__(self) -> None:
        if self.net.width > self.data.resolution:
            raise FieldError("{net.width} {value:.1f} must fit {data.resolution} and {net.size}, for {name!r}.",
                             value=self.net.width, name=self.data.dataset)


def test_a_check_across_sections_reads_in_dotted_keys_to_code_and_in_options_to_train_py():
    """Its placeholders are keys such as "net.width", looked up whole (not as attribute width of net); a value is
    never read as one, and a field no option sets keeps its key on the command line."""
    import argparse
    import pickle
    from types import SimpleNamespace
    from core.contract import sections_of
    from training.run import with_options
    told = "net.width 64.0 must fit data.resolution and net.size, for '{net.width}'."
    with pytest.raises(UserError) as refused:
        ToyStageConfig(data=DataConfig(dataset="{net.width}"), net=ToyNet(width=64))
    assert str(refused.value) == told and str(pickle.loads(pickle.dumps(refused.value))) == told
    assert refused.value.fields == ("net.width", "data.resolution", "net.size")
    spec = SimpleNamespace(sections=sections_of(ToyStageConfig, net=dict(skip=frozenset({"size"}))))
    with pytest.raises(UserError) as refused:
        with_options(spec, ToyStageConfig(), argparse.Namespace(**{"data.dataset": "{net.width}", "net.width": 64}))
    assert str(refused.value) == "--width 64.0 must fit --resolution and net.size, for '{net.width}'."
