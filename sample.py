"""Draw images from a trained model: `python sample.py --ckpt runs/demo/checkpoint.pt --sampler ddim --steps 50`.

Writes OUT/grid.png, OUT/images/NNNNNN.png (image k is reproducible alone: --first-index k --num 1),
OUT/manifest.csv (seed, class and parameters of each image) and, with --gif, OUT/reverse.gif.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data.imageio import save_gif, save_grid, save_images
from ddpm.config import SamplingConfig
from ddpm.generate import image_seed, sample_images
from ddpm.stage import load_trained
from training.config import AMP_MODES, add_config_arguments, override
from training.distributed import resolve_device
from training.loop import autocast_dtype
from training.seeds import derive_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint.pt of a training run (required)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN_DIR/samples/SAMPLER-STEPS-seedSEED next to the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out (default: off)")
    parser.add_argument("--num", type=int, default=64, help="number of images (default: 64)")
    parser.add_argument("--first-index", type=int, default=0, help="index of the first image, to redraw image k alone (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; image k uses a seed derived from (seed, k) (default: 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--class", dest="label", default=None,
                        help="class name or index for a class-conditional model (default: cycle through the classes)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter value in the data's units for a parameter-conditional model; repeat per "
                             "parameter (default: drawn uniformly from the training range, per image)")
    parser.add_argument("--gif", action="store_true", help="also write reverse.gif of the first batch's reverse process (default: off)")
    parser.add_argument("--gif-images", type=int, default=16, help="images shown in the GIF (default: 16)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights (default: ema)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES,
                        help="mixed precision (default: auto: bf16, or fp16 where bf16 is unsupported, on CUDA; none on CPU)")
    add_config_arguments(parser, "sampling", SamplingConfig, SamplingConfig())
    return parser.parse_args(argv)


def conditions(args, net, info, indices: list[int], device) -> tuple[torch.Tensor | None, list[dict]]:
    """The condition of each requested image, and what the manifest records about it."""
    kind = net.config.cond
    if kind == "none":
        if args.label is not None or args.param:
            raise ValueError("This model was trained without conditioning; drop --class and --param.")
        return None, [{} for _ in indices]
    if kind == "class":
        names = list(info.class_names)
        if args.param:
            raise ValueError("This model is conditioned on classes, not parameters; use --class instead of --param.")
        if args.label is None:
            labels = [k % len(names) for k in indices]
        elif args.label in names:
            labels = [names.index(args.label)] * len(indices)
        elif args.label.isdigit() and int(args.label) < len(names):
            labels = [int(args.label)] * len(indices)
        else:
            raise ValueError(f"Unknown class {args.label!r}; choose one of {', '.join(names)} or an index below {len(names)}.")
        return torch.tensor(labels, device=device), [{"class": names[y]} for y in labels]
    # kind == "params"
    if args.label is not None:
        raise ValueError("This model is conditioned on parameters, not classes; use --param NAME=VALUE instead of --class.")
    fixed = {}
    for item in args.param:
        name, _, value = item.partition("=")
        if name not in info.param_names or not value:
            raise ValueError(f"--param {item!r} is not NAME=VALUE with NAME one of {', '.join(info.param_names)}.")
        fixed[name] = float(value)
    rows = []
    for k in indices:
        draw = torch.rand(len(info.param_names), generator=torch.Generator().manual_seed(derive_seed(args.seed, k, 1)))
        rows.append([fixed.get(name, lo + (hi - lo) * float(u))
                     for name, (lo, hi), u in zip(info.param_names, info.param_ranges, draw)])
    raw = torch.tensor(rows, dtype=torch.float32)
    return info.normalize_params(raw).to(device), [dict(zip(info.param_names, row)) for row in rows]


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    sampling = override(SamplingConfig(), args, "sampling")
    device = resolve_device(args.device)
    net, schedule, config, info = load_trained(args.ckpt, device, args.weights)
    out = args.out or args.ckpt.parent / "samples" / f"{sampling.sampler}-{sampling.steps}-seed{args.seed}"
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already holds files; choose another --out or pass --overwrite.")

    indices = list(range(args.first_index, args.first_index + args.num))
    cond, records = conditions(args, net, info, indices, device)
    amp = autocast_dtype(args.amp, device)
    images, frames = [], []
    every = max(1, sampling.steps // 60)  # GIF: at most ~60 frames, whatever the step count

    def keep_frame(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if i % every == 0:
            frames.append(x_t[: args.gif_images].float().cpu())

    for start in tqdm(range(0, len(indices), args.batch_size), desc=f"sample {sampling.sampler}", unit="batch"):
        chunk = indices[start:start + args.batch_size]
        record_gif = args.gif and start == 0  # the reverse process of the first batch
        images.append(sample_images(net, schedule, config.diffusion.prediction, sampling,
                                    [image_seed(args.seed, k) for k in chunk],
                                    cond=None if cond is None else cond[start:start + args.batch_size],
                                    amp_dtype=amp, callback=keep_frame if record_gif else None).cpu())
    images = torch.cat(images)

    names = [f"{k:06d}.png" for k in indices]
    save_images(images, out / "images", names)
    save_grid(images, out / "grid.png")
    if args.gif:
        save_gif(frames + [images[: args.gif_images]], out / "reverse.gif")
    with open(out / "manifest.csv", "w", newline="") as f:
        fields = ["index", "file", "seed", *sorted({key for r in records for key in r})]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for k, name, rec in zip(indices, names, records):
            writer.writerow({"index": k, "file": f"images/{name}", "seed": image_seed(args.seed, k), **rec})
    print(f"Wrote {len(indices)} images to {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
