"""Drawing images: `Drawer` draws seeded batches with one model, sampler and precision, and the four
outputs of sample.py are written from it (each function below names the files it writes)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.checkpoint import state_fingerprint
from core.config import given_arguments, given_in, to_dict
from core.errors import UserError
from core.runtime import precision_name, write_csv
from data.imageio import save_gif, save_grid, save_images
from data.writer import DatasetWriter, manifest_column
from ddpm.conditioning import Conditions, interpolate_conditions, interpolation_end, requested, slerp, sweep_columns
from ddpm.config import SamplingConfig
from ddpm.generate import DiffusionSampler, image_seed, sample_images
from ddpm.samplers import per_sample_noise
from ddpm.source import ImageSource, Request
from ddpm.synthetic import DatasetPlan

GIF_FRAMES = 60  # at most this many frames of the reverse process, whatever the step count, then the images drawn


def source_request(args: argparse.Namespace) -> Request:
    """What sample.py's parsed command line asks of the source it opens."""
    sections = {name.split(".", 1)[0] for name in given_arguments(args)} - {"sampling"}
    return Request(seed=args.seed, label=args.label, params=tuple(args.param), sweep=args.sweep,
                   interpolate=args.interpolate, interpolate_to=tuple(args.interpolate_to),
                   dataset_out=args.dataset_out, num=args.num, per_class=args.per_class, per_image=args.per_image,
                   classes=args.classes, guidance_scale=given_in(args, "sampling").get("guidance_scale"),
                   sections={name: given_in(args, name) for name in sections})


class Drawer:
    """Draws batches of images with one model, sampling config and precision."""

    def __init__(self, model: DiffusionSampler, sampling: SamplingConfig, amp: torch.dtype | None, batch_size: int):
        self.model, self.sampling, self.amp, self.batch_size = model, sampling, amp, batch_size

    def __call__(self, seeds: list[int], conditions: Conditions, x_T: torch.Tensor | None = None,
                 callback=None, desc: str = "sample") -> torch.Tensor:
        images = []
        for start in tqdm(range(0, len(seeds), self.batch_size), desc=desc, unit="batch"):
            rows = slice(start, start + self.batch_size)
            images.append(self.batch(seeds[rows], conditions[rows], None if x_T is None else x_T[rows],
                                     callback=callback if start == 0 else None))
        return torch.cat(images)

    def batch(self, seeds: list[int], conditions: Conditions, x_T: torch.Tensor | None = None,
              callback=None) -> torch.Tensor:
        """One forward batch: images in [-1, 1] on the CPU, one per seed."""
        conditions = conditions.to(self.model.device)
        images = sample_images(self.model, self.sampling, seeds, cond=conditions.cond, cond_emb=conditions.cond_emb,
                               reference=conditions.reference, x_T=x_T, amp_dtype=self.amp, callback=callback).cpu()
        broken = int((~torch.isfinite(images)).flatten(1).any(dim=1).sum())
        if broken:  # saved, they would be black images that look drawn
            guidance = self.sampling.guidance_scale
            raise UserError(f"{broken} of a batch of {len(seeds)} samples came out NaN or infinite (guidance scale "
                            f"{guidance:g}, {self.sampling.sampler} with {self.sampling.steps} steps); "
                            + ("lower the guidance scale" if guidance > 1 else "the model or these settings diverge: "
                               "try another sampler, or more steps")
                            + (", or full precision (--amp none)." if self.amp == torch.float16 else "."))
        return images


def manifest_row(own: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """A manifest row: its own columns, then what the conditions record (class, parameters), a parameter named
    like an own column under `manifest_column`'s name for it, so that it overwrites nothing."""
    return {**own, **{manifest_column(key, own): value for key, value in record.items()}}


def draw_images(draw: Drawer, args: argparse.Namespace, request: Request, source: ImageSource, indices: list[int],
                out: Path) -> None:
    """The default mode: numbered images (under the conditions `request` asks `source` for), a grid, a manifest
    and optionally the reverse process as a GIF."""
    model = source.model
    conditions = source.conditions(indices, request)
    frames = []
    every = math.ceil(draw.sampling.steps / GIF_FRAMES)
    show_x0 = args.gif_frames == "x0" or (args.gif_frames == "auto" and model.latent)
    # The frames come from the first batch only, so every frame, the last included, shows its first images.
    shown = min(args.gif_images, draw.batch_size, len(indices))

    def keep_frame(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i % every == 0:
            frames.append(model.to_images((x0 if show_x0 else x_t)[:shown]).float().cpu())

    seeds = [image_seed(args.seed, k) for k in indices]
    images = draw(seeds, conditions, callback=keep_frame if args.gif else None, desc=f"sample {draw.sampling.sampler}")
    names = [f"{k:06d}.png" for k in indices]
    save_images(images, out / "images", names)
    save_grid(images, out / "grid.png")
    if args.gif:
        save_gif(frames + [images[:shown]], out / "reverse.gif")
    write_csv([manifest_row({"index": k, "file": f"images/{name}", "seed": seed}, record)
               for k, name, seed, record in zip(indices, names, seeds, conditions.records)], out / "manifest.csv")


def sweep_plan(args: argparse.Namespace, model: DiffusionSampler, indices: list[int]
               ) -> tuple[list[Conditions], list[str]]:
    """The conditions of each column of the --sweep grid whose rows are images `indices`, and a label per column:
    worked out, and --sweep checked, before anything is written."""
    kind, info = model.net.config.cond, model.info
    base = requested(kind, info, indices, args.seed, label=args.label, params=args.param)
    return sweep_columns(args.sweep, kind, info, base, label=args.label, params=args.param)


def draw_sweep(draw: Drawer, args: argparse.Namespace, indices: list[int], columns: list[Conditions],
               labels: list[str], out: Path) -> None:
    """Rows are images (each with its own noise), columns step through the swept condition (`sweep_plan`)."""
    seeds = [image_seed(args.seed, k) for k in indices]
    per_column = [draw(seeds, c, desc=f"sweep {label}") for c, label in zip(columns, labels)]
    grid = torch.stack(per_column, dim=1).flatten(0, 1)  # row-major: image k at every column value
    save_grid(grid, out / "sweep.png", nrow=len(columns))
    save_gif(per_column, out / "sweep.gif", nrow=len(indices), duration_ms=400, hold_last_ms=800)
    write_csv([manifest_row({"row": r, "column": c, "index": k, "seed": seeds[r]}, columns[c].records[r])
               for r, k in enumerate(indices) for c in range(len(columns))], out / "sweep.csv")
    print(f"Sweep over {args.sweep}: columns {', '.join(labels)}")


def draw_interpolations(draw: Drawer, args: argparse.Namespace, model: DiffusionSampler, indices: list[int],
                        out: Path) -> None:
    """Per row k: noise slerped from image k's to image k+1's under k's condition; and, for conditional
    models, k's noise under conditions moving linearly from k's condition to --interpolate-to."""
    kind, info = model.net.config.cond, model.info
    weights = torch.linspace(0, 1, args.frames)
    starts = [requested(kind, info, [k], args.seed, label=args.label, params=args.param) for k in indices]
    # Every condition is worked out (and every --interpolate-to checked) before any image is drawn.
    ends = [interpolation_end(kind, info, start, args.interpolate_to) for start in starts] if kind != "none" else []
    embed = (lambda c: model.net.embed_condition(c.to(model.device)).cpu())
    noise_rows, cond_rows = [], []
    for row, (k, start) in enumerate(zip(indices, starts)):
        (x_a, _), (x_b, _) = (per_sample_noise([image_seed(args.seed, j)], (1, *model.shape), "cpu") for j in (k, k + 1))
        seeds = [image_seed(args.seed, k)] * args.frames
        same = Conditions(*(None if c is None else c.expand(args.frames, *c.shape[1:])
                            for c in (start.cond, start.cond_emb)), records=start.records * args.frames)
        noise_rows.append(draw(seeds, same, x_T=slerp(x_a[0], x_b[0], weights), desc=f"interpolate noise {k}"))
        if ends:
            line = interpolate_conditions(start, ends[row], weights, embed)
            cond_rows.append(draw(seeds, line, desc=f"interpolate condition {k}"))
    for name, rows in (("noise", noise_rows), ("condition", cond_rows)):
        if rows:
            save_grid(torch.cat(rows), out / f"interpolate-{name}.png", nrow=args.frames)
            frames = list(torch.stack(rows, dim=1))  # frame j: every row at weight j
            save_gif(frames + frames[::-1][1:-1], out / f"interpolate-{name}.gif", nrow=len(indices),
                     duration_ms=150, hold_last_ms=150)


def dataset_writer(draw: Drawer, request: Request, source: ImageSource, weights: str, checkpoint: Path
                   ) -> tuple[DatasetPlan, DatasetWriter]:
    """The plan of a --dataset-out `request` and the writer of its folder, which `open()` checks against it;
    `weights` (ema or model) of `checkpoint` drew them."""
    model = source.model
    plan, specific = source.dataset(request)
    # What makes image k: changing any of it would give other images, so a folder holds one request.
    made_by = {"model": state_fingerprint(model.net.state_dict()), "weights": weights, "seed": request.seed,
               "sampling": to_dict(draw.sampling), "precision": precision_name(draw.amp), **specific,
               "param_names": list(plan.param_names)}
    return plan, DatasetWriter(request.dataset_out, made_by, about={"checkpoint": str(checkpoint)})


def draw_dataset(draw: Drawer, request: Request, source: ImageSource, weights: str, checkpoint: Path) -> None:
    """--dataset-out: the planned images not on disk yet, batch by batch, each batch saved before the next."""
    plan, writer = dataset_writer(draw, request, source, weights, checkpoint)
    writer.open(plan.items)
    fill_dataset(draw, plan, writer)


def fill_dataset(draw: Drawer, plan: DatasetPlan, writer: DatasetWriter) -> None:
    """Draw the images of `plan` that the opened `writer`'s folder lacks, each batch saved before the next."""
    pending = writer.pending(plan.items)
    bar = tqdm(total=len(plan.items), initial=len(plan.items) - len(pending), desc=f"dataset {writer.root}", unit="img")
    with bar:
        for start in range(0, max(len(pending), 1), draw.batch_size):
            part = pending[start:start + draw.batch_size]
            if part:
                images = draw.batch([item.record["seed"] for item in part], plan.conditions([i.index for i in part]))
            else:  # nothing left to draw: bring the tables up to date with the images on disk
                images = torch.zeros(0, *draw.model.shape)
            writer.write(part, images, every_item=plan.items if start == 0 else ())
            bar.update(len(part))
