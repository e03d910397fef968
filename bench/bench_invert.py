"""Diffusion inversion: images/s of an inversion step against a frozen U-Net (next to training that
U-Net), and steps to convergence of the quality signal on real images.

    python bench/bench_invert.py                                  # throughput, ddpm-demo and ddpm-cifar10 shapes
    python bench/bench_invert.py --model runs/ddpm-params/checkpoint.pt --dataset folder:REAL --steps 2000
    python bench/bench_invert.py --from-run runs/invert           # the same table from a finished run

Throughput: one inversion step is the forward and backward pass through the frozen network (no weight
gradients) and a LazyAdamW step on the batch's rows of an (N, E) table; "train" is a full training
step of the same network (weight gradients and AdamW), for comparison. Random images; --model uses
that checkpoint's U-Net, else a freshly initialised, class-conditional one of each preset's shape.

Convergence (with --model and --dataset): runs the invert stage for --steps and prints its quality
signal at every evaluation, then the first step whose learned-vector loss has covered 90% of the way
from the starting loss to the best one reached.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import seconds_per_call, setup  # noqa: E402
from ddpm.config import PRESETS  # noqa: E402
from ddpm.unet import UNet  # noqa: E402
from training.optim import LazyAdamW  # noqa: E402

TABLE_ROWS = 50_000  # the embedding table the optimizer steps over (CIFAR-10's training set)


def step_throughput(net: UNet, schedule, batch: int, dtype, device, iters: int, invert: bool) -> float:
    """Images/s of inversion steps (`invert`) or training steps of `net` on random data."""
    cfg = net.config
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if invert:
        net.eval().requires_grad_(False)
        table = torch.zeros(TABLE_ROWS, cfg.embedding_dim, device=device, requires_grad=True)
        optimizer = LazyAdamW([table], lr=3e-2)
    else:
        net.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    rows = iter(range(10 ** 9))

    def step():
        t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
        with autocast:
            if invert:
                start = next(rows) * batch % (TABLE_ROWS - batch)
                out = net(schedule.q_sample(x0, t, torch.randn_like(x0)), t, cond_emb=table[start:start + batch])
            else:
                out = net(schedule.q_sample(x0, t, torch.randn_like(x0)), t, torch.zeros(batch, dtype=torch.long,
                                                                                        device=device))
        loss = out.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / seconds_per_call(step, device, iters, warmup=3 if device.type == "cuda" else 1)


def throughput_table(args, device) -> None:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cuda = device.type == "cuda"
    print("| U-Net | params | dtype | batch | invert img/s | train img/s |")
    print("|---|---|---|---|---|---|")
    if args.model:
        from invert.frozen import load_frozen
        frozen = load_frozen(args.model, device, "ema")
        shapes = [(args.model, frozen.sampler.net.config, frozen.sampler.schedule)]
    else:
        shapes = []
        for preset in ("ddpm-demo", "ddpm-cifar10"):
            config = PRESETS[preset]()
            unet = dataclasses.replace(config.unet, cond="class", num_classes=10)
            shapes.append((preset, unet, config.diffusion.make_schedule()))
    for name, unet, schedule in shapes:
        schedule = schedule.to(device)
        for dtype_name in args.dtypes:
            batch = args.batch_size or (128 if cuda else 16)
            iters = args.iters or (30 if cuda else 3)
            results = []
            for invert in (True, False):
                torch.manual_seed(0)
                net = UNet(unet).to(device)
                results.append(step_throughput(net, schedule, batch, dtypes[dtype_name], device, iters, invert))
            params = sum(p.numel() for p in net.parameters()) / 1e6
            print(f"| {name} | {params:.1f}M | {dtype_name} | {batch} | {results[0]:.1f} | {results[1]:.1f} |",
                  flush=True)


def convergence_table(args) -> None:
    from core.checkpoint import load_checkpoint
    from invert.stage import SPEC as INVERT
    from training.run import parse_stage_args, run
    resolution = load_checkpoint(args.model)["data_info"]["resolution"]  # the images the model was trained on
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir or tmp) / "invert"
        argv = ["--stage", "invert", "--model", args.model, "--dataset", args.dataset, "--run-dir", str(run_dir),
                "--resolution", str(resolution), "--steps", str(args.steps), "--sample-every", str(args.eval_every),
                "--device", args.device, "--cache-dir", args.cache_dir]
        if args.num_samples:
            argv += ["--num-samples", str(args.num_samples)]
        run(INVERT, parse_stage_args(INVERT, argv))
        print_convergence(run_dir)


def print_convergence(run_dir: Path) -> None:
    """The quality signal of an inversion run at each evaluation, and when it converged."""
    config = json.loads((run_dir / "config.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    quality = [r for r in lines if r["split"] == "inversion"]
    train_rows = [r for r in lines if r["split"] == "train"]
    speed = sum(r["images_per_s"] for r in train_rows) / max(len(train_rows), 1)
    print(f"\nInversion of {config['data']['dataset']} against {config['invert']['model']}: {config['train']['steps']} "
          f"steps of {config['train']['batch_size']}, {speed:.0f} images/s on average (evaluations and previews "
          f"excluded)\n")
    print("| step | loss, learned | loss, start | loss, null | images improved | mean shift |")
    print("|---|---|---|---|---|---|")
    for r in quality:
        print(f"| {r['step']} | {r['loss_learned']:.5f} | {r['loss_start']:.5f} | {r['loss_null']:.5f} | "
              f"{100 * r['improved']:.0f}% | {r['shift']:.3f} |")
    start, best = quality[0]["loss_start"], min(r["loss_learned"] for r in quality)
    if best >= start:
        print(f"\nThe learned vectors never beat their starting point (loss {start:.5f}).")
        return
    reached = next(r["step"] for r in quality if r["loss_learned"] <= start - 0.9 * (start - best))
    print(f"\n90% of the improvement ({start:.5f} -> {best:.5f}) was reached by step {reached}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="checkpoint.pt of a conditional diffusion run (default: none: "
                                                    "fresh U-Nets of the ddpm-demo and ddpm-cifar10 shapes)")
    parser.add_argument("--dataset", default="", help="real images for the convergence table (default: none: skip it)")
    parser.add_argument("--num-samples", type=int, default=0, help="a seeded subset of --dataset (default: 0, all)")
    parser.add_argument("--steps", type=int, default=2000, help="inversion steps of the convergence run (default: 2000)")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between quality signals (default: 250)")
    parser.add_argument("--run-dir", default="", help="keep the convergence run here (default: a temporary folder)")
    parser.add_argument("--from-run", default="", help="print the convergence table of this finished invert run "
                                                       "instead of measuring anything (default: off)")
    parser.add_argument("--cache-dir", default=".cache/datasets", help="dataset cache (default: .cache/datasets)")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], help="fp32 | bf16 | fp16 (default: fp32 bf16)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 128 on CUDA, 16 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: 30 on CUDA, 3 on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args()
    if args.from_run:
        print_convergence(Path(args.from_run))
        return
    if args.dataset and not args.model:
        parser.error("--dataset needs --model: the convergence run inverts against a trained conditional model")
    device, description = setup(args.device)
    print(f"{description}\n")
    throughput_table(args, device)
    if args.dataset:
        convergence_table(args)


if __name__ == "__main__":
    main()
