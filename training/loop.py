"""The one training loop every stage uses: AdamW with warm-up, EMA, AMP, gradient clipping,
checkpoints, exact resume, DDP, JSONL metrics, preview grids and a progress bar.

A stage (DDPM now; the VAE, latent diffusion and classifiers later) describes itself with a
`Stage`: the model, a loss on a batch, and how to draw preview images. The loop knows nothing about
diffusion.

Exact resume: everything random in step s (data order, augmentation, noise, timesteps, dropout)
is drawn from generators seeded by (seed, s, rank), and the learning rate depends on s alone, so a
run resumed from its step-s checkpoint takes exactly the steps an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from data.imageio import save_grid
from training.checkpoint import rng_state, save_checkpoint, set_rng_state
from training.config import AMP_MODES, TrainConfig, write_json
from training.distributed import Runtime, mean_across_processes
from training.seeds import derive_seed

Batch = tuple[torch.Tensor, ...]


@dataclass
class Stage:
    """What a stage hands the training loop."""
    name: str                                                   # checkpoint "stage" field, e.g. "ddpm"
    model: nn.Module
    loss: Callable[[nn.Module, Batch, torch.Generator], torch.Tensor]   # mean loss of a batch (float32 scalar)
    preview: Callable[[nn.Module], torch.Tensor]                # images in [-1, 1] drawn with the EMA weights
    config: dict[str, Any]                                      # the resolved stage config, stored in checkpoints
    data_info: dict[str, Any]                                   # what the model was trained on


class TrainingDiverged(RuntimeError):
    pass


class RunExists(FileExistsError):
    pass


class StepBatches(Sampler[list[int]]):
    """Batch indices as a function of the step: epoch e is the permutation seeded by (seed, e), and
    step s takes global positions [s*B, (s+1)*B) of the concatenated epochs, this process taking
    its contiguous share. Starting at any step needs no replay of the ones before it."""

    def __init__(self, num_items: int, global_batch: int, seed: int, start_step: int, runtime: Runtime):
        assert global_batch % runtime.world_size == 0, "the batch must split evenly across processes"
        self.n, self.batch, self.seed, self.start = num_items, global_batch, seed, start_step
        self.share = global_batch // runtime.world_size
        self.offset = runtime.rank * self.share

    def _epoch(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))

    def __iter__(self) -> Iterator[list[int]]:
        cached: dict[int, torch.Tensor] = {}
        step = self.start
        while True:
            first = step * self.batch + self.offset
            indices = []
            for pos in range(first, first + self.share):
                epoch = pos // self.n
                if epoch not in cached:
                    cached = {epoch: self._epoch(epoch)}
                indices.append(int(cached[epoch][pos % self.n]))
            yield indices
            step += 1


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp`, or None for full precision."""
    if amp not in AMP_MODES:
        raise ValueError(f"Unknown --amp {amp!r}; choose auto, none, bf16 or fp16.")
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA GPU (loss scaling is a GPU technique); use --amp bf16 or none on the CPU.")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, in one fused call; buffers are copied."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the average up, so early previews are not dominated by the random initialisation; the
    cap (1 + s) / (10 + s) passes 0.999 after ~9000 steps and leaves long runs unchanged."""
    return min(decay, (1 + step) / (10 + step))


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metrics logged after the checkpoint we restart from: they will be logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def fit(stage: Stage, cfg: TrainConfig, dataset: Dataset, run_dir: str | os.PathLike, runtime: Runtime,
        resume_from: dict[str, Any] | None = None, num_workers: int = 0) -> dict[str, Any]:
    """Train `stage.model` on `dataset` for `cfg.steps` steps, writing everything under `run_dir`;
    `resume_from` is the run's loaded checkpoint when it continues.

    Returns a summary (final step, last logged loss, wall time, paths).
    """
    run_dir = Path(run_dir)
    ckpt_path, metrics_path = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    if resume_from is None and ckpt_path.exists():
        raise RunExists(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir.")

    device = runtime.device
    model = stage.model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    start_step = 0
    if resume_from is not None:
        payload = resume_from
        assert payload["stage"] == stage.name, "resume from a checkpoint of the same stage"
        model.load_state_dict(payload["model"])
        ema.load_state_dict(payload["ema"])
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        start_step = payload["step"]
        if runtime.is_main:
            _trim_metrics(metrics_path, start_step)
    if runtime.is_main:
        write_json(stage.config, run_dir / "config.json")
    if start_step >= cfg.steps:
        raise ValueError(f"The run in {run_dir} is already at step {start_step}; pass --steps larger than that to train further.")

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), cfg.batch_size, cfg.seed, start_step, runtime),
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=device.type == "cuda")
    generator = torch.Generator(device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    loss_sum, grad_sum, window = torch.zeros((), device=device), torch.zeros((), device=device), 0
    last_loss, started, window_start = math.nan, time.perf_counter(), time.perf_counter()

    def checkpoint(step: int) -> None:
        save_checkpoint({
            "stage": stage.name, "config": stage.config, "data_info": stage.data_info, "step": step,
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(),
        }, ckpt_path)

    def preview(name: str) -> None:
        save_grid(stage.preview(ema), run_dir / "samples" / name)

    progress = tqdm(total=cfg.steps, initial=start_step, desc=f"train {stage.name}", unit="step",
                    disable=not runtime.is_main, dynamic_ncols=True)
    model.train()
    for step, batch in zip(range(start_step, cfg.steps), loader):
        batch = tuple(b.to(device, non_blocking=True) for b in batch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        seed = derive_seed(cfg.seed, step, runtime.rank)
        torch.manual_seed(seed)          # dropout
        generator.manual_seed(seed)      # noise, timesteps, flips, condition dropout

        with autocast:
            loss = stage.loss(train_model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, model, ema_decay_at(step, cfg.ema_decay))

        loss_sum += loss.detach().float()
        grad_sum += grad_norm.detach().float()
        window += 1
        done = step + 1
        progress.update(1)
        last = done == cfg.steps

        save_due = last or done % cfg.ckpt_every == 0  # every process runs the check: it all-reduces
        if done % cfg.log_every == 0 or last or save_due:
            # Checked before any checkpoint is written, so a diverged model never replaces a good one.
            mean_loss = mean_across_processes(loss_sum / window, runtime).item()
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(
                    f"The loss became {mean_loss} by step {done}; nothing was saved past the last checkpoint "
                    f"({ckpt_path if ckpt_path.exists() else 'none yet'}): lower --lr, or use --amp none, and resume or restart.")
        if done % cfg.log_every == 0 or last:
            now = time.perf_counter()
            last_loss = mean_loss
            record = {"step": done, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": (grad_sum / window).item(),
                      "images_per_s": window * cfg.batch_size / max(now - window_start, 1e-9),
                      "elapsed_s": now - started}
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            if runtime.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            loss_sum.zero_(), grad_sum.zero_()
            window, window_start = 0, now

        if runtime.is_main and (last or (cfg.sample_every and done % cfg.sample_every == 0)):
            preview(f"step-{done:07d}.png")
        if runtime.is_main and save_due:
            checkpoint(done)
    progress.close()

    final = run_dir / "samples" / "final.png"
    if runtime.is_main:
        shutil.copyfile(run_dir / "samples" / f"step-{cfg.steps:07d}.png", final)
    return {"step": cfg.steps, "loss": last_loss, "seconds": time.perf_counter() - started,
            "checkpoint": str(ckpt_path), "final_grid": str(final)}
