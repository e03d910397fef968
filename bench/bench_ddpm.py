"""Throughput of the pixel-diffusion U-Nets: training images/s and DDIM-50 sampling images/s.

    python bench/bench_ddpm.py                      # ddpm-demo and ddpm-cifar10 U-Nets, fp32 and bf16
    python bench/bench_ddpm.py --presets ddpm-demo --iters 20 --compile

Prints a markdown table for whatever device is present. Training steps are full optimizer steps
(forward, backward, AdamW) on random data; sampling is the DDIM sampler with 50 steps, so the
number includes the sampler's own overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DatasetInfo  # noqa: E402
from ddpm.config import PRESETS, SamplingConfig  # noqa: E402
from ddpm.generate import DiffusionSampler, sample_images  # noqa: E402
from ddpm.unet import UNet  # noqa: E402
from bench.common import seconds_per_call, setup  # noqa: E402
from core.contract import Trainable  # noqa: E402
from training.loop import make_optimizer  # noqa: E402


def train_throughput(net, schedule, batch: int, dtype, device, iters: int, warmup: int, compiled: bool) -> float:
    cfg = net.config
    model = torch.compile(net) if compiled else net
    optimizer = make_optimizer(Trainable(net, lr=1e-4), net, device)  # the training loop's (fused) AdamW
    x0 = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    net.train()

    def step():
        t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
        with autocast:
            loss = schedule.training_losses(lambda x, tt: model(x, tt), x0, t, torch.randn_like(x0)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / seconds_per_call(step, device, iters, warmup)


def sample_throughput(net, schedule, batch: int, dtype, device, repeats: int) -> float:
    net.eval()
    cfg = net.config
    model = DiffusionSampler(net, schedule, "eps", DatasetInfo("bench", cfg.image_size, cfg.in_channels, (), (), (), 1))
    sampling = SamplingConfig(sampler="ddim", steps=50)
    amp = None if dtype == torch.float32 else dtype
    sample_images(model, SamplingConfig(sampler="ddim", steps=2), range(batch), amp_dtype=amp)  # warm-up
    calls = iter(range(repeats))  # fresh seeds for every timed batch

    def draw():
        r = next(calls)
        sample_images(model, sampling, range(r * batch, (r + 1) * batch), amp_dtype=amp)

    return batch / seconds_per_call(draw, device, repeats, warmup=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=["ddpm-demo", "ddpm-cifar10"], help="U-Nets to measure (default: ddpm-demo ddpm-cifar10)")
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], help="fp32 | bf16 | fp16 (default: fp32 bf16)")
    parser.add_argument("--batch-size", type=int, default=None, help="training and sampling batch (default: the preset's on CUDA, 16 on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed training steps (default: 50 on CUDA, 3 on CPU)")
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed DDIM-50 batches (default: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net for training (default: off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args()

    device, description = setup(args.device)
    cuda = device.type == "cuda"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    print(f"{description}\n")
    print("| U-Net | params | dtype | batch | train img/s | DDIM-50 img/s |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        config = PRESETS[preset]()
        for dtype_name in args.dtypes:
            torch.manual_seed(0)
            net = UNet(config.unet).to(device)
            if cuda:
                net = net.to(memory_format=torch.channels_last)
            schedule = config.diffusion.make_schedule().to(device)
            batch = args.batch_size or (config.train.batch_size if cuda else 16)
            iters = args.iters or (50 if cuda else 3)
            dtype = dtypes[dtype_name]
            train_ips = train_throughput(net, schedule, batch, dtype, device, iters, warmup=3 if cuda else 1,
                                         compiled=args.compile)
            sample_ips = sample_throughput(net, schedule, batch, dtype, device, args.sample_repeats)
            params = sum(p.numel() for p in net.parameters()) / 1e6
            print(f"| {preset} | {params:.1f}M | {dtype_name} | {batch} | {train_ips:.1f} | {sample_ips:.2f} |", flush=True)


if __name__ == "__main__":
    main()
