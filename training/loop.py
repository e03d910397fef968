"""The one training loop every stage uses: AdamW per trainable model, a warm-up and a named learning-rate
schedule, EMA, AMP, gradient clipping, checkpoints, exact resume, DDP, JSONL metrics, previews and a
progress bar.

A stage (core.contract.TrainingStage) hands the loop its models, a loss that returns named metrics,
and optionally an augmentation, a preview, a held-out evaluation and extra checkpoint entries. The
loop knows nothing about diffusion, autoencoders or any other stage.

Exact resume: everything random in step s (data order, augmentation, noise, timesteps, dropout) is
drawn from generators seeded by (seed, s, rank), and the learning rate depends on s alone, so a run
resumed from its step-s checkpoint takes exactly the steps an uninterrupted run would have. Which
seeds those keys give is the run's seeding scheme (`SEEDING`), recorded in its checkpoints, so a run
started by an older version of the loop resumes with the seeds it started with.

Stopping: Ctrl-C (SIGINT) or SIGTERM (what batch schedulers send before pre-empting a job) lets the
current step finish, writes a checkpoint there and ends with a line saying how to resume; a second
Ctrl-C stops at once. Under torchrun every process stops after the step that follows the signal
(core.distributed.StopAgreement: the processes agree on it while that step runs).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from core.cli import (RunError, RunInterrupted, compiler_stopped, ignore_stop_signals, launched_world_size, lost_stop,
                      stop_signals_held)
from core.config import LR_SCHEDULES, TrainConfig
from core.contract import MAIN, Trainable, TrainingModels, TrainingStage
from core.distributed import StopAgreement, gather_across_processes, main_process_first, mean_across_processes
from core.errors import ExistsError, UserError, warn_once
from core.runtime import Runtime, atomic_write, autocast, autocast_dtype, derive_seed, read_metrics, write_json
from data.imageio import atomic_save_image, save_grid
from training.optim import LazyAdamW


class TrainingDiverged(RunError):
    pass


class RunExists(ExistsError):
    """A run folder already holds a run (or its metrics)."""


# ---------------------------------------------------------------------------------------------
# pieces that are functions of the step alone


# The seeding scheme of new runs, recorded in their checkpoints ("seeding"); a checkpoint without one was
# written with scheme 1 and resumes with it. Scheme 1 seeded step s of rank r by derive_seed(seed, s, r), and a
# mixed batch's order by derive_seed(seed, s); numpy's SeedSequence pads its keys with zeros, so on rank 0 both
# were the seed of epoch s's permutation, derive_seed(seed, s), and rank r's step seed was that of part r's epoch
# s: the noise, dropout and augmentation of a step were drawn from the very stream that shuffled an epoch. Scheme
# 2 gives each use a purpose key of its own, last and non-zero, so no zero padding can make two uses meet.
SEEDING = 2
SEEDINGS = (1, 2)
STEP_KEY = 0x53544550  # "STEP": (seed, step, rank, STEP_KEY) seeds a step's draws
MIX_KEY = 0x4D495820   # "MIX ": (seed, step, MIX_KEY) seeds the order of a mixed batch


def step_seed(seed: int, step: int, rank: int, seeding: int = SEEDING) -> int:
    """The seed of everything random in step `step` of process `rank` (dropout, augmentation, noise, timesteps)
    under seeding scheme `seeding`."""
    return derive_seed(seed, step, rank) if seeding == 1 else derive_seed(seed, step, rank, STEP_KEY)


def mix_seed(seed: int, step: int, seeding: int = SEEDING) -> int:
    """The seed of the order of step `step`'s mixed batch (`StepBatches` with `mix`) under scheme `seeding`."""
    return derive_seed(seed, step) if seeding == 1 else derive_seed(seed, step, MIX_KEY)


class StepBatches(Sampler[list[int]]):
    """Batch indices as a function of the step: epoch e of a dataset is the permutation seeded by
    (seed, e), and step s takes global positions [s*B, (s+1)*B) of the concatenated epochs, this
    process taking its contiguous share. Starting at any step needs no replay of the ones before it.

    With `mix`, the dataset is consecutive parts, (items, count) each: step s takes positions
    [s*count, (s+1)*count) of each part's own epochs (part i > 0 seeded by (seed, e, i)), so every
    global batch holds exactly `count` items of each part, shuffled together (seeded by the step) so
    that under DDP each process sees the same mix. `seeding`: the run's seeding scheme (see `SEEDING`).
    """

    def __init__(self, num_items: int, global_batch: int, seed: int, start_step: int, runtime: Runtime,
                 mix: tuple[tuple[int, int], ...] | None = None, seeding: int = SEEDING):
        if global_batch % runtime.world_size:
            raise UserError(f"--batch-size {global_batch} must split evenly across {runtime.world_size} processes.")
        self.parts = mix or ((num_items, global_batch),)
        assert sum(n for n, _ in self.parts) == num_items and sum(c for _, c in self.parts) == global_batch, (
            f"mix {self.parts} must cover {num_items} items and {global_batch} per batch")
        self.batch, self.seed, self.start, self.seeding = global_batch, seed, start_step, seeding
        self.share = global_batch // runtime.world_size
        self.offset = runtime.rank * self.share

    def _epoch(self, part: int, epoch: int) -> torch.Tensor:
        keys = (self.seed, epoch) if part == 0 else (self.seed, epoch, part)
        return torch.randperm(self.parts[part][0], generator=torch.Generator().manual_seed(derive_seed(*keys)))

    def __iter__(self) -> Iterator[list[int]]:
        cached: list[dict[int, torch.Tensor]] = [{} for _ in self.parts]
        step = self.start
        while True:
            batch, first_item = [], 0
            for part, (n, count) in enumerate(self.parts):
                for pos in range(step * count, (step + 1) * count):
                    epoch = pos // n
                    if epoch not in cached[part]:
                        cached[part] = {epoch: self._epoch(part, epoch)}
                    batch.append(first_item + int(cached[part][epoch][pos % n]))
                first_item += n
            if len(self.parts) > 1:
                seed = mix_seed(self.seed, step, self.seeding)
                order = torch.randperm(self.batch, generator=torch.Generator().manual_seed(seed))
                batch = [batch[i] for i in order]
            yield batch[self.offset:self.offset + self.share]
            step += 1


ONECYCLE_START = 1 / 25      # one-cycle starts at peak / 25 ...
ONECYCLE_END = ONECYCLE_START / 1e4   # ... and anneals to 1/10^4 of that (PyTorch's OneCycleLR defaults)


def lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at 0-based `step` of a `steps`-step run.

    "constant" (DDPM) and "cosine" warm up linearly from 0 over the first `warmup` steps, then stay
    at the peak or decay to 0 at the end of the run (Loshchilov & Hutter 2017, SGDR without restarts).
    "onecycle" (Smith & Topin 2019) rises linearly from peak/25 to the peak over the first `warmup`
    steps, then anneals along a cosine to peak/250000 at the end of the run; unlike the paper it leaves
    the momentum fixed. The cosines end at step `steps`, one past the last step trained (as PyTorch's
    CosineAnnealingLR with T_max = steps): the last step trains at a small rate, not at none.
    """
    if schedule not in LR_SCHEDULES:
        raise UserError(f"Unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "onecycle":
        if step < warmup:
            return ONECYCLE_START + (1 - ONECYCLE_START) * step / warmup
        return ONECYCLE_END + (1 - ONECYCLE_END) * cosine
    if step < warmup:
        return (step + 1) / warmup
    return 1.0 if schedule == "constant" else cosine


def warn_unfinished_warmup(cfg: TrainConfig) -> None:
    """Warn, once, where a constant or cosine schedule's warm-up outlasts the run, so its learning rate never
    reaches --lr. Not refused: tiny smoke runs (a preset's warm-up with --steps 3) are meant to run as they are.
    (One-cycle, whose annealing phase would vanish, is refused by TrainConfig.)"""
    if cfg.lr_schedule == "onecycle" or not 0 < cfg.steps < cfg.warmup_steps:
        return
    peak = lr_factor(cfg.lr_schedule, cfg.steps - 1, cfg.steps, cfg.warmup_steps)  # the last step's: still rising
    warn_once("warm-up", f"--warmup-steps {cfg.warmup_steps} outlasts --steps {cfg.steps}, so the learning rate "
                         f"reaches only {100 * peak:.3g}% of --lr ({peak * cfg.lr:.3g}); pass --warmup-steps "
                         f"{cfg.steps} or fewer for the full rate.")


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the average up, so early previews are not dominated by the random initialisation; the
    cap (1 + s) / (10 + s) passes 0.999 after ~9000 steps and leaves long runs unchanged."""
    return min(decay, (1 + step) / (10 + step))


def make_optimizer(trainable: Trainable, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer a `Trainable` asks for, over `model`'s parameters.

    PyTorch's fused kernels on CUDA and on the CPU: one pass over all parameters instead of a loop of
    small ops per tensor (on the CPU the per-tensor loop took 2.5% of a `ddpm-cifar10` training step).
    """
    fused = device.type in ("cuda", "cpu")
    if trainable.optimizer == "lazy_adamw":
        return LazyAdamW(model.parameters(), lr=trainable.lr, betas=trainable.betas, weight_decay=trainable.weight_decay)
    if trainable.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=trainable.lr, momentum=trainable.momentum,
                               nesterov=trainable.nesterov, weight_decay=trainable.weight_decay, fused=fused or None)
    return torch.optim.AdamW(model.parameters(), lr=trainable.lr, betas=trainable.betas,
                             weight_decay=trainable.weight_decay, fused=fused)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, in one fused call; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _buffer_sync(every_forward: bool) -> dict[str, bool]:
    """DistributedDataParallel's argument for whether each forward copies rank 0's buffers (BatchNorm's running
    statistics) into every process: nothing for its default (yes); to turn it off, `forward_sync_buffers=False`
    where this PyTorch has it (2.14, which warns at `broadcast_buffers`, now deprecated), else
    `broadcast_buffers=False` (2.11; unlike the new name, it skips the copy at the start too, where BatchNorm's
    statistics are the same constants in every process anyway)."""
    if every_forward:
        return {}
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if new_name else "broadcast_buffers": False}


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`batch` with `fn` applied to every tensor in it and its nesting kept: named tuples, tuples, lists
    and dicts (what `default_collate` makes of a dataset's items) come back as the same structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple takes its fields as arguments
        return type(batch)(*(map_tensors(b, fn) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(b, fn) for b in batch)
    if isinstance(batch, Mapping):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    return batch  # strings, numbers: left as they are


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """The signals (SIGINT, SIGTERM) received while the body runs, for the loop to act on between steps.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who will not wait for the step; not in a
    torchrun worker, which a Ctrl-C reaches only through the launcher, and often twice (a scheduler signals
    every process, and the launcher passes its own copy on), so a second one there is no one's impatience.
    Signal handlers can only be set from the main thread; elsewhere nothing is caught.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    impatience_stops = launched_world_size() == 1

    def handle(signum: int, frame: Any) -> None:
        lost_stop()  # a stop put off while a finalizer ran (`cli.terminate_as_interrupt`) is this one, answered here
        if received and signum == signal.SIGINT and impatience_stops:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)



def rng_state() -> dict[str, Any]:
    """Every global random number generator torch uses in a training step (dropout draws from these)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the loop


def missing_outputs(run_dir: Path, checkpoint: dict[str, Any], steps: int) -> list[str]:
    """What was due right after the checkpoint `checkpoint` of the run in `run_dir` (its `outputs_due`) and is
    not there: "evaluate" (a held-out record at its step in metrics.jsonl), "preview" (its grid), "final" (the
    last step's final.png). A process killed between writing a checkpoint and its outputs leaves them out;
    resuming from that checkpoint writes them (`Trainer.run`). Checkpoints older than `outputs_due` owe none."""
    step, due = int(checkpoint["step"]), checkpoint.get("outputs_due") or {}
    missing = []
    if due.get("evaluate"):
        metrics = run_dir / "metrics.jsonl"
        records = read_metrics(metrics) if metrics.exists() else []
        if not any(r["step"] == step and r.get("split") != "train" for _, r in records):
            missing.append("evaluate")
    if due.get("preview"):
        if not (run_dir / "samples" / f"step-{step:07d}.png").exists():
            missing.append("preview")
        if step == steps and not (run_dir / "samples" / "final.png").exists():
            missing.append("final")
    return missing


def finished_run(run_dir: Path, steps: int, runtime: Runtime) -> dict[str, Any]:
    """The summary `Trainer.run` returns, for a run already at its last step and run again to it (a
    resubmitted job): nothing to train, and no error. `training.run.train` says so before it loads any
    data or builds a model, unless what the last checkpoint owed is missing (`missing_outputs`): then the
    trainer writes that first."""
    if runtime.is_main:
        print(f"The run in {run_dir} is already at step {steps} of {steps}: nothing to train (pass a larger --steps "
              f"to train further).", flush=True)
    metrics, final = run_dir / "metrics.jsonl", run_dir / "samples" / "final.png"
    # Only the main process prints the summary, so only it reads the log.
    losses = [r["loss"] for _, r in read_metrics(metrics) if r.get("split") == "train" and "loss" in r] \
        if runtime.is_main and metrics.exists() else []
    return {"step": steps, "loss": float(losses[-1]) if losses else math.nan, "seconds": 0.0,
            "checkpoint": str(run_dir / "checkpoint.pt"), "final_grid": str(final) if final.exists() else None}


def check_steps_ahead(run_dir: Path, done: int, steps: int) -> None:
    """Refuse a resume whose --steps is below the step its checkpoint reached."""
    if done > steps:
        raise UserError(f"The run in {run_dir} is already at step {done}, past --steps {steps}; pass --steps larger "
                        f"than {done} to train further.")


def check_schedule_kept(done: int, was: TrainConfig, now: TrainConfig) -> None:
    """Refuse a resume whose --steps would change the learning rates of the `done` steps already trained (a
    cosine or one-cycle schedule follows the total): the run would then be neither the one it started as nor
    one started with that many steps. A constant schedule, or one still warming up, may be extended."""
    if now.steps == was.steps or was.lr_schedule == "constant" or all(  # (a constant rate follows no total)
            lr_factor(was.lr_schedule, step, was.steps, was.warmup_steps) ==
            lr_factor(now.lr_schedule, step, now.steps, now.warmup_steps) for step in range(done)):
        return
    raise UserError(f"--steps {now.steps} would change the learning rates this run has trained with (its "
                    f"--lr-schedule {was.lr_schedule} follows the total steps, {was.steps}), so it would not train the "
                    f"weights of a run started with {now.steps}; resume with --steps {was.steps}, or start a new "
                    f"--run-dir.")


class Trainer:
    """Trains one `TrainingStage` for `cfg.steps` steps, writing everything under `run_dir`.

    `resume_from` is the run's loaded checkpoint when it continues. `run()` returns a summary (final
    step, last logged loss, wall time, paths).
    """

    def __init__(self, stage: TrainingStage, cfg: TrainConfig, run_dir: str | os.PathLike, runtime: Runtime,
                 resume_from: dict[str, Any] | None = None, num_workers: int = 0,
                 advice: Callable[[str, int], str] | None = None):
        """`advice(diverged, step)`: what to change after training diverged, in the words of the stage's options
        (its config's `divergence_advice`); None: a lower --lr."""
        self.stage, self.cfg, self.runtime, self.num_workers = stage, cfg, runtime, num_workers
        self.advice = advice or (lambda diverged, step: "a lower --lr")
        self.run_dir = Path(run_dir)
        self.ckpt_path, self.metrics_path = self.run_dir / "checkpoint.pt", self.run_dir / "metrics.jsonl"
        if resume_from is None and self.ckpt_path.exists():
            raise RunExists(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --run-dir.")

        device = runtime.device
        self.models = {name: t.model.to(device) for name, t in stage.trainables.items()}
        # The weight averages sampling uses. At --ema-decay 0 the average is the weights themselves, so no
        # copy is kept or updated (a kl-f8 autoencoder's would cost 84M parameters and a pass every step).
        self.averaged = [name for name, t in stage.trainables.items() if t.ema]
        self.ema = {name: copy.deepcopy(self.models[name]).eval().requires_grad_(False)
                    for name in self.averaged if cfg.ema_decay > 0}
        self.optimizers = {name: make_optimizer(t, self.models[name], device) for name, t in stage.trainables.items()}
        self.amp_dtype = autocast_dtype(cfg.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)

        self.start_step, self.resumed_window, self.resumed_outputs = 0, None, {}
        self.seeding = SEEDING  # a resumed run keeps its checkpoint's (`_restore`)
        # The training time of the run before this process took it up (a resumed run's, at its checkpoint), so that
        # `elapsed_s` counts on from there; None: a checkpoint older than that record (`run` reads its log).
        self.elapsed_before: float | None = 0.0
        if resume_from is not None:
            self._restore(resume_from)
        check_steps_ahead(self.run_dir, self.start_step, cfg.steps)
        self.train_models = TrainingModels({name: self._wrap(model, stage.trainables.get(name))
                                            for name, model in self.models.items()}, self.models)

    # -- set-up ------------------------------------------------------------------------------

    def _restore(self, payload: dict[str, Any]) -> None:
        assert payload["stage"] == self.stage.name, "resume from a checkpoint of the same stage"
        try:
            for name, model in self.models.items():
                model.load_state_dict(payload["models"][name])
                self.optimizers[name].load_state_dict(payload["optimizers"][name])
            for name, ema in self.ema.items():
                ema.load_state_dict(payload["ema"][name])
            # A run that trained without fp16 loss scaling (on a CPU, or a GPU that computes in bf16) and resumes where
            # --amp auto picks fp16 (a GPU without bf16) has no scale to take up: its scaler starts as a new run's.
            if payload["scaler"] or not self.scaler.is_enabled():
                self.scaler.load_state_dict(payload["scaler"])
            set_rng_state(payload["rng"])
            # The logging window open at the checkpoint (absent from checkpoints older than it).
            self.resumed_window = MetricsWindow.restored(payload.get("metrics_window") or {}, self.runtime)
            # Checkpoints older than the record of the seeding scheme were seeded by scheme 1.
            self.seeding = payload.get("seeding", 1)
            if self.seeding not in SEEDINGS:
                raise ValueError(f"seeding scheme {self.seeding!r} is none of {', '.join(map(str, SEEDINGS))}")
            elapsed = payload.get("elapsed_s")
            if elapsed is not None and not (type(elapsed) in (int, float) and math.isfinite(elapsed) and elapsed >= 0):
                raise ValueError(f"elapsed_s {elapsed!r} is not a time")
            self.elapsed_before = None if elapsed is None else float(elapsed)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise UserError(f"The checkpoint in {self.run_dir} does not fit the run its config describes "
                            f"({type(err).__name__}: {' '.join(str(err).split())[:160]}); it is inconsistent, so "
                            f"start a new --run-dir.") from err
        self.start_step = int(payload["step"])
        self.resumed_outputs = {"step": self.start_step, "outputs_due": payload.get("outputs_due")}

    def _wrap(self, model: nn.Module, trainable: Trainable | None) -> nn.Module:
        """The version of `model` the loss calls: DDP across processes, compiled if asked."""
        if self.runtime.distributed and any(p.requires_grad for p in model.parameters()):
            # The weight gradients of 1x1 convolutions come with channels-last strides, which for their size-1
            # dimensions is the same memory order as the parameter's; DDP compares strides literally and would
            # warn once per process about a copy it makes into its buckets anyway.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            device = self.runtime.device
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                            **_buffer_sync(trainable is None or trainable.broadcast_buffers))
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    def _batches(self) -> DataLoader:
        sampler = StepBatches(len(self.stage.dataset), self.cfg.batch_size, self.cfg.seed, self.start_step, self.runtime,
                              mix=self.stage.mix, seeding=self.seeding)
        return DataLoader(self.stage.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=self.runtime.device.type == "cuda",
                          worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None)

    @contextlib.contextmanager
    def eval_models(self) -> Iterator[dict[str, nn.Module]]:
        """What previews, evaluations and checkpoint payloads see: the EMA copy where there is one, and at
        --ema-decay 0 the trained model in its place, meanwhile in eval mode as the copy would be."""
        standing_in = [self.models[name] for name in self.averaged if name not in self.ema]
        for model in standing_in:
            model.eval()
        try:
            yield {name: self.ema.get(name, model) for name, model in self.models.items()}
        finally:
            for model in standing_in:
                model.train()

    # -- one step ----------------------------------------------------------------------------

    def _set_lr(self, step: int) -> None:
        factor = lr_factor(self.cfg.lr_schedule, step, self.cfg.steps, self.cfg.warmup_steps)
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.stage.trainables[name].lr * factor

    def _step(self, step: int, batch: Any, generator: torch.Generator) -> tuple[dict, dict, dict]:
        """One optimizer step of every trainable the loss names; returns (losses, metrics, grad norms)."""
        device = self.runtime.device
        batch = map_tensors(batch, lambda t: t.to(device, non_blocking=True))
        self._set_lr(step)
        seed = step_seed(self.cfg.seed, step, self.runtime.rank, self.seeding)
        torch.manual_seed(seed)          # dropout
        generator.manual_seed(seed)      # augmentation, noise, timesteps, condition dropout
        if self.stage.augment is not None:
            batch = self.stage.augment(batch, generator)

        with autocast(device, self.amp_dtype):
            losses, metrics = self.stage.loss(self.train_models, batch, generator, step)
        if isinstance(losses, torch.Tensor):
            losses = {MAIN: losses}
        unknown = set(losses) - set(self.models)
        assert not unknown, f"the loss names trainables the stage does not have: {sorted(unknown)}"

        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        # Each loss reaches only its own model's parameters (a GAN's generator loss must not train
        # the discriminator it flows through, and vice versa).
        for name, loss in losses.items():
            self.scaler.scale(loss).backward(inputs=[p for p in self.models[name].parameters() if p.requires_grad])
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norms = {}
        for name in losses:
            self.scaler.unscale_(self.optimizers[name])
            grad_norms[name] = nn.utils.clip_grad_norm_(self.models[name].parameters(), clip)
            self.scaler.step(self.optimizers[name])
        self.scaler.update()
        for name, ema in self.ema.items():
            update_ema(ema, self.models[name], ema_decay_at(step, self.cfg.ema_decay))
        return losses, metrics, grad_norms

    # -- outputs -----------------------------------------------------------------------------

    def _save(self, step: int, window: dict[str, Any] | None = None, outputs_due: bool = False) -> None:
        """Write the checkpoint of step `step`; `window`: the open metrics window's state (`MetricsWindow.state`);
        `outputs_due`: whether the evaluation and preview of this step follow it (see `missing_outputs`)."""
        with self.eval_models() as models:
            extra = self.stage.outputs.payload(models) if self.stage.outputs.payload is not None else {}
        payload = {
            "stage": self.stage.name, "config": self.stage.config, "data_info": self.stage.data_info, "step": step,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            # At --ema-decay 0, the weights again: loaders find what to sample with in one place, and
            # torch.save writes tensors shared by both entries once.
            "ema": {name: models[name].state_dict() for name in self.averaged},
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
            "metrics_window": window or {},
            "seeding": self.seeding,
            # The training time up to here, across every resume: a run resumed from it counts on from there.
            "elapsed_s": time.perf_counter() - self.clock_origin,
            "outputs_due": {"evaluate": outputs_due and self.stage.outputs.evaluate is not None,
                            "preview": outputs_due and self.stage.outputs.preview is not None},
        }
        clash = set(extra) & (set(payload) | {"format", "version"})
        assert not clash, f"the stage's checkpoint payload overwrites {sorted(clash)}"
        save_checkpoint({**payload, **extra}, self.ckpt_path)

    def _preview(self, step: int) -> Path | None:
        outputs = self.stage.outputs
        if outputs.preview is None:
            return None
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        with self.eval_models() as models:
            save_grid(outputs.preview(models), path, nrow=outputs.preview_nrow)
        return path

    def _evaluate(self, step: int) -> None:
        if self.stage.outputs.evaluate is None:
            return
        with self.eval_models() as models:
            record = {"step": step, **self.stage.outputs.evaluate(models)}
        for name, image in record.pop("figures", {}).items():
            atomic_save_image(image, self.run_dir / "figures" / f"{name}-step-{step:07d}.png")
            atomic_save_image(image, self.run_dir / f"{name}.png")
        self._append_metrics(record)
        shown = {k: f"{v:.4g}" for k, v in record.items() if isinstance(v, float)}
        tqdm.write(f"step {step} {record.get('split', 'eval')}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _logged_elapsed(self) -> float:
        """The `elapsed_s` of the last training record at or before the step this run resumes from (0 if none): a
        checkpoint older than its own record of it resumes the count from there."""
        if not self.metrics_path.exists():
            return 0.0
        times = [r["elapsed_s"] for _, r in read_metrics(self.metrics_path) if r["step"] <= self.start_step
                 and r.get("split") == "train" and type(r.get("elapsed_s")) in (int, float)
                 and math.isfinite(r["elapsed_s"]) and r["elapsed_s"] >= 0]
        return float(times[-1]) if times else 0.0

    def _trim_metrics(self) -> None:
        """On resume, drop metrics logged after the checkpoint we restart from: they will be logged again."""
        if not self.metrics_path.exists():
            return
        kept = [line for line, record in read_metrics(self.metrics_path) if record["step"] <= self.start_step]
        if self.metrics_path.read_bytes() != "".join(line + "\n" for line in kept).encode():  # else left untouched
            write_json_lines(kept, self.metrics_path)

    # -- the run -----------------------------------------------------------------------------

    def _write_missing_outputs(self) -> None:
        """The evaluation and preview due right after the checkpoint this run resumes from, if the process that
        wrote it was killed before them: from the same weights, so the same records and grids as then."""
        missing = missing_outputs(self.run_dir, self.resumed_outputs, self.cfg.steps)
        if missing:
            tqdm.write(f"Writing what step {self.start_step} owed when its run stopped: {', '.join(missing)}.")
            kept = rng_state()  # the checkpoint's: training goes on from it as if these had run before it
            if "evaluate" in missing:
                self._evaluate(self.start_step)
            if "preview" in missing:
                self._preview(self.start_step)
            set_rng_state(kept)

    def _final_grid(self) -> Path | None:
        """samples/final.png, a copy of the last step's preview (None for a stage without previews)."""
        last_preview = self.run_dir / "samples" / f"step-{self.cfg.steps:07d}.png"
        if not last_preview.exists():
            return None
        final = self.run_dir / "samples" / "final.png"
        grid = last_preview.read_bytes()
        if not final.exists() or final.read_bytes() != grid:
            atomic_write(final, lambda f: f.write(grid))  # as every file: a kill mid-copy leaves no torn grid
        return final

    def run(self) -> dict[str, Any]:
        cfg, runtime = self.cfg, self.runtime
        if runtime.is_main:
            self._trim_metrics()
        resumed = bool(self.resumed_outputs)  # (a checkpoint of step 0 too: a run of --steps 0)
        if resumed:
            # The other processes wait on the host, not in the first step's collectives (NCCL's time out sooner).
            with main_process_first(runtime):
                if runtime.is_main:
                    self._write_missing_outputs()
        if self.start_step == cfg.steps and resumed:
            if runtime.is_main:
                self._final_grid()
            return finished_run(self.run_dir, cfg.steps, runtime)
        if runtime.is_main:
            write_json(self.stage.config, self.run_dir / "config.json")
        generator = torch.Generator(runtime.device)
        self.window = MetricsWindow(runtime, self.resumed_window, skipped_steps=self.scaler.is_enabled())
        self.started = time.perf_counter()
        if self.elapsed_before is None:  # a checkpoint older than its record of it: the last the log says
            self.elapsed_before = self._logged_elapsed() if runtime.is_main else 0.0
        # Where `elapsed_s` counts from: the run's start, however many processes took it up before this one.
        self.clock_origin = self.started - self.elapsed_before
        self.progress = tqdm(total=cfg.steps, initial=self.start_step, desc=f"train {self.stage.name}", unit="step",
                             disable=not runtime.is_main, dynamic_ncols=True)
        for model in self.models.values():
            model.train()

        steps = range(self.start_step, cfg.steps)
        signum = None
        # Decided on the host, so no step waits for the GPU to drain (nor, under torchrun, for the network).
        stops = StopAgreement(runtime)
        # The bar is closed however the loop ends, so an error message starts on a line of its own.
        with stop_requests() as received, contextlib.closing(self.progress):
            with stop_signals_held():  # the loader's worker processes start here: see `stop_signals_held`
                batches = iter(self._batches()) if len(steps) else iter(())
            try:
                for step, batch in zip(steps, batches):
                    self.window.add(*self._compiled_step(step, batch, generator))
                    self.progress.update(1)
                    saved = self._after_step(step + 1)
                    signum = stops.after_step(received, last=step + 1 == cfg.steps)
                    if signum is not None and step + 1 < cfg.steps:
                        self._stop(step + 1, signum, saved)
            finally:
                # The workers stop when their iterator goes: not kept alive by a traceback that keeps this frame
                # (they ignore SIGTERM, so Python's exit, which joins them, would wait for ever).
                del batches

        final = None
        if runtime.is_main:
            if cfg.steps == 0 and self.start_step == 0:  # nothing to train: write the model as it starts
                self._save(0, outputs_due=True)
                self._evaluate(0)
                self._preview(0)
            final = self._final_grid()
        if signum is not None:  # agreed after the last step and its outputs: the run is complete; the caller stops
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name} at the end of the run, which finished "
                                 f"step {cfg.steps} and saved {self.ckpt_path}", signum)
        return {"step": cfg.steps, "loss": self.window.last_loss, "seconds": time.perf_counter() - self.started,
                "checkpoint": str(self.ckpt_path), "final_grid": str(final) if final else None}

    def _compiled_step(self, step: int, batch: Any, generator: torch.Generator) -> tuple[dict, dict, dict]:
        """`_step`, where a stop signal that killed the compiler torch.compile ran for it (a Ctrl-C or SIGTERM reaches
        the whole process group: `core.cli.compiler_stopped`) is answered as one between steps is: the steps done
        since the last checkpoint are saved (step `step` had not changed the weights yet). A recompile comes after
        the first step too (the first training step after a preview, whose eval mode changed what was compiled).
        Under torchrun another process's compiler may have lived on, and saving takes every process, so there the
        error stands (the last checkpoint is kept)."""
        try:
            return self._step(step, batch, generator)
        except Exception as err:
            signum = compiler_stopped(err)
            if signum is None or self.runtime.distributed or step == self.start_step:  # (nothing new to save)
                raise
            self._stop(step, signum, saved=step % self.cfg.ckpt_every == 0)
            raise  # (not reached: _stop raises RunInterrupted)

    def _after_step(self, done: int) -> bool:
        """Log, check for divergence, checkpoint, evaluate and preview as due after step `done`; returns
        whether a checkpoint was written."""
        cfg, runtime = self.cfg, self.runtime
        last = done == cfg.steps
        save_due = last or done % cfg.ckpt_every == 0
        log_due = last or done % cfg.log_every == 0
        if save_due or log_due:
            means = self.window.means()  # every process takes part: the means are all-reduced
            # Checked before any checkpoint is written, so a diverged model never replaces a good one.
            diverged = self._divergence(means) or (self._weights_not_finite() if save_due else None)
            if diverged:
                raise self._divergence_error(diverged, done)
        if log_due:
            record = self.window.close(done, self.optimizers[MAIN].param_groups[0]["lr"], cfg.batch_size,
                                       self.clock_origin)
            self.progress.set_postfix(loss=f"{record['loss']:.4f}")
            if runtime.is_main:
                self._append_metrics(record)
        window = self.window.state() if save_due else None  # every process takes part
        outputs_due = last or bool(cfg.sample_every and done % cfg.sample_every == 0)
        if runtime.is_main:
            if save_due:
                self._save(done, window, outputs_due)  # before anything else that could fail at this step
            if outputs_due:
                self._evaluate(done)
                self._preview(done)
        return save_due

    def _divergence(self, means: dict[str, float]) -> str | None:
        """What shows that training has diverged, or None: a loss that is not finite; a gradient norm that is
        not finite, unless fp16 loss scaling is on (it skips those steps and lowers its scale); or what the
        stage's own test (`TrainingStage.diverged`) finds in the weights being trained."""
        watched = ("loss",) if self.scaler.is_enabled() else ("loss", "grad_norm")
        bad = [k for k in means if k.startswith(watched) and not math.isfinite(means[k])]
        if bad:
            return f"the {bad[0]} became {means[bad[0]]}"
        return self.stage.diverged(self.models, means) if self.stage.diverged is not None else None

    def _divergence_error(self, what: str, done: int) -> TrainingDiverged:
        """The error that ends a run in which `what` (from `_divergence` or `_weights_not_finite`) went wrong by
        step `done`."""
        change = self.advice(what, done)
        if self.amp_dtype is torch.float16:  # fp16's range (65504) is the likelier cause: named first
            change = f"--amp bf16 or none (fp16 overflows where they do not), or with {change}"
        elif self.amp_dtype is torch.bfloat16:
            change = f"{change}, or with --amp none"
        return TrainingDiverged(f"{what} by step {done}; nothing was saved past the last checkpoint "
                                f"({self.ckpt_path if self.ckpt_path.exists() else 'none yet'}), so start a new run "
                                f"with {change}.")

    def _weights_not_finite(self) -> str | None:
        """Weights (or buffers: batch-norm statistics) that became NaN or infinite, which the losses and gradient
        norms of the steps before cannot show when the last step before a checkpoint threw them off."""
        for name, model in self.models.items():
            tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
            if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):  # one sync
                return f"the weights of the {name} became NaN or infinite"
        return None

    def _stop(self, done: int, signum: int, saved: bool) -> None:
        """Checkpoint the step just finished (unless that happened already) and end the run."""
        window = None if saved else self.window.state()  # every process takes part
        # The checkpoint a stop writes is checked as a due one is: weights thrown off since the last log are
        # never saved over a good checkpoint (every process holds the same weights, so all of them stop here).
        diverged = None if saved else self._weights_not_finite()
        if diverged:
            raise self._divergence_error(diverged, done)
        if self.runtime.is_main and not saved:
            self._save(done, window)
        name = signal.Signals(signum).name
        # With as many processes as now: each draws its own noise, so another count continues another way.
        launch = (f"torchrun --nproc_per_node {self.runtime.world_size}" if self.runtime.distributed else "python")
        raise RunInterrupted(f"stopped by {name} at step {done} of {self.cfg.steps} and saved {self.ckpt_path}; "
                             f"resume with: {launch} train.py --stage {self.stage.name} --run-dir {self.run_dir} "
                             f"--resume", signum)


class MetricsWindow:
    """Sums and counts of what the steps of one logging window reported, per name (a name may be absent
    from some steps, e.g. a discriminator's loss before it starts, so each averages over its own count).

    A checkpoint written inside a window carries its `state`, so the run resumed from it logs the same
    numbers at the same steps as one never stopped (its speed is timed over the steps run since)."""

    def __init__(self, runtime: Runtime, resumed: tuple[dict[str, torch.Tensor], dict[str, int], int] | None = None,
                 skipped_steps: bool = False):
        """`resumed`: the window a checkpoint carried, as `restored` reads it. `skipped_steps`: fp16 loss scaling
        skips the steps whose gradient overflowed, so their (infinite or NaN) gradient norms are left out of the
        means, which would otherwise be NaN for a window holding one."""
        self.runtime, self.skipped_steps = runtime, skipped_steps
        self.last_loss = math.nan
        self.reset(time.perf_counter())
        if resumed is not None:
            self.sums, self.counts, self.steps = resumed

    @staticmethod
    def restored(state: dict[str, Any], runtime: Runtime) -> tuple[dict[str, torch.Tensor], dict[str, int], int] | None:
        """This process's (sums, counts, steps) from a checkpoint's `state` (None for a closed window). Each
        process takes back its own sums; resumed with another number of processes, each takes their mean,
        which gives the same means up to rounding. A state that does not add up raises KeyError or ValueError."""
        if not state:
            return None
        per_process, counts = state["sums"], {k: int(n) for k, n in state["counts"].items()}
        if not per_process or any(set(sums) != set(counts) for sums in per_process):
            raise ValueError("the metrics window's sums and counts name different values")
        sums = (per_process[runtime.rank] if len(per_process) == runtime.world_size else
                {k: sum(p[k] for p in per_process) / len(per_process) for k in counts})
        tensors = {k: torch.tensor(float(v), dtype=torch.float32, device=runtime.device) for k, v in sums.items()}
        return tensors, counts, int(state["steps"])

    def state(self) -> dict[str, Any]:
        """The open window as plain numbers for a checkpoint: every process's sums (gathered: every process
        takes part), the counts and the steps."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        mine = torch.stack([self.sums[k] for k in keys])
        gathered = gather_across_processes(mine, self.runtime).tolist()
        counts = {k: int(n) for k, n in self.counts.items()}
        return {"sums": [dict(zip(keys, row)) for row in gathered], "counts": counts, "steps": self.steps}

    def reset(self, now: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int | torch.Tensor] = {}  # a tensor where steps are counted on the device
        self.steps, self.start = 0, now
        self.timed = 0  # the steps since `start`: a resumed window's earlier steps ran in another process

    def add(self, losses: dict, metrics: dict, grad_norms: dict) -> None:
        for key, value in _named(losses, metrics, grad_norms).items():
            value, count = value.detach().float(), 1
            if self.skipped_steps and key.startswith("grad_norm"):  # counted on the device: no wait for the GPU
                finite = torch.isfinite(value)
                value, count = torch.where(finite, value, 0.0), finite.float()
            self.sums[key] = self.sums.get(key, 0) + value
            self.counts[key] = self.counts.get(key, 0) + count
        self.steps += 1
        self.timed += 1

    def means(self) -> dict[str, float]:
        """Each value's mean over the window's steps and processes; a gradient norm of a window whose every step
        fp16 loss scaling skipped is left out."""
        return {k: mean_across_processes(v / self.counts[k], self.runtime).item() for k, v in sorted(self.sums.items())
                if int(self.counts[k]) > 0}

    def close(self, done: int, lr: float, batch_size: int, started: float) -> dict[str, Any]:
        """The metrics.jsonl record of the window ending at step `done`, and a fresh window."""
        now = time.perf_counter()
        means = self.means()
        self.last_loss = means["loss"]
        record = {"step": done, "split": "train", **means, "lr": lr,
                  "images_per_s": self.timed * batch_size / max(now - self.start, 1e-9), "elapsed_s": now - started}
        self.reset(now)
        return record


def _named(losses: dict, metrics: dict, grad_norms: dict) -> dict[str, torch.Tensor]:
    """One flat dict of what a step logs: loss, loss/<trainable>, metrics, grad_norm, grad_norm/<trainable>."""
    named = {("loss" if name == MAIN else f"loss/{name}"): value for name, value in losses.items()}
    named.update({("grad_norm" if name == MAIN else f"grad_norm/{name}"): value for name, value in grad_norms.items()})
    clash = set(named) & set(metrics)
    assert not clash, f"stage metrics reuse the loop's names {sorted(clash)}"
    named.update(metrics)
    return {k: torch.as_tensor(v) for k, v in named.items()}


def write_json_lines(lines: list[str], path: Path) -> None:
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in lines).encode()))
