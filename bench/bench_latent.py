"""Throughput of latent diffusion's pieces: autoencoder encode/decode, and pixel against latent sampling.

    python bench/bench_latent.py                                   # the demo sizes (fine on a CPU)
    python bench/bench_latent.py --vae vae-demo kl-f4 kl-f8 --ldm ldm-demo ldm-celebahq256   # on a GPU

Prints two markdown tables for whatever device is present. The second compares, at the same output
resolution, a latent model (U-Net on latents, then one decode) with the same U-Net run directly on
pixels: identical widths, depths and attention levels, only the side it works at differs by the
autoencoder's factor f. Weights are random; throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import seconds_per_call, setup  # noqa: E402
from core.runtime import autocast  # noqa: E402
from data import DatasetInfo  # noqa: E402
from ddpm.config import SamplingConfig  # noqa: E402
from ddpm.generate import DiffusionSampler, sample  # noqa: E402
from ddpm.unet import UNet  # noqa: E402
from ldm.config import PRESETS as LDM_PRESETS, VAE_PRESET_OF  # noqa: E402
from vae.autoencoder import AutoencoderKL  # noqa: E402
from vae.config import PRESETS as VAE_PRESETS  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autoencoder(name: str, device: torch.device) -> AutoencoderKL:
    config = VAE_PRESETS[name]().autoencoder
    torch.manual_seed(0)
    return AutoencoderKL(config).to(device).eval().requires_grad_(False)


@torch.no_grad()
def bench_vae(name: str, batch: int, dtype, device: torch.device, repeats: int) -> str:
    model = autoencoder(name, device)
    cfg = model.config
    f, r = cfg.downsampling_factor, cfg.resolution
    x = torch.rand(batch, cfg.in_channels, r, r, device=device) * 2 - 1
    z = torch.randn(batch, cfg.latent_channels, r // f, r // f, device=device)
    with autocast(device, dtype):
        encode = seconds_per_call(lambda: model.encode_moments(x), device, repeats)
        decode = seconds_per_call(lambda: model.decode(z), device, repeats)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (f"| {name} | {params:.1f}M | {r}x{r} | {cfg.latent_channels}x{r // f}x{r // f} | {batch} | "
            f"{batch / encode:.1f} | {batch / decode:.1f} |")


def unet_pair(ldm: str, device: torch.device) -> tuple[UNet, UNet, AutoencoderKL]:
    """The preset's U-Net on its VAE's latents, and the same network on the pixels they decode to."""
    config = LDM_PRESETS[ldm]()
    vae = autoencoder(VAE_PRESET_OF[ldm], device)
    f, L, r = vae.config.downsampling_factor, vae.config.latent_channels, config.data.resolution
    cond = dict(cond="none", num_classes=0, num_params=0)  # conditioning costs the same in both
    latent = dataclasses.replace(config.unet, image_size=r // f, in_channels=L, **cond)
    pixel = dataclasses.replace(config.unet, image_size=r, in_channels=vae.config.in_channels,
                                attention_resolutions=tuple(s * f for s in config.unet.attention_resolutions), **cond)
    torch.manual_seed(0)
    return (UNet(latent).to(device).eval().requires_grad_(False), UNet(pixel).to(device).eval().requires_grad_(False),
            vae)


@torch.no_grad()
def bench_sampling(ldm: str, batch: int, steps: int, dtype, device: torch.device, repeats: int) -> list[str]:
    config = LDM_PRESETS[ldm]()
    latent_net, pixel_net, vae = unet_pair(ldm, device)
    schedule = config.diffusion.make_schedule().to(device)
    info = DatasetInfo("bench", config.data.resolution, vae.config.in_channels, (), (), (), 1)
    sampling = SamplingConfig(sampler="ddim", steps=steps)
    rows = []
    r = config.data.resolution
    for name, net, decode in (("pixel", pixel_net, None), ("latent", latent_net, vae.decode)):
        model = DiffusionSampler(net, schedule, config.diffusion.prediction, info, decode)

        def draw():
            x = sample(model, sampling, list(range(batch)), amp_dtype=dtype)
            with autocast(device, dtype):
                return model.to_images(x)

        seconds = seconds_per_call(draw, device, repeats)
        decode_share = ""
        if decode is not None:
            z = torch.randn(batch, *model.shape, device=device)
            with autocast(device, dtype):
                decode_share = f"{100 * seconds_per_call(lambda: vae.decode(z), device, repeats) / seconds:.1f}%"
        side = model.shape[1]
        params = sum(p.numel() for p in net.parameters()) / 1e6
        rows.append(f"| {ldm} | {name} | {r}x{r} | {model.shape[0]}x{side}x{side} | {params:.1f}M | {batch} | "
                    f"{batch / seconds:.2f} | {decode_share or '-'} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", nargs="*", default=["vae-demo"], help="autoencoder presets (default: vae-demo)")
    parser.add_argument("--ldm", nargs="*", default=["ldm-demo"], help="latent presets (default: ldm-demo)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="autocast dtype (default: fp32)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per call (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per image (default: 50)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: 10 on CUDA, 1 on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    args = parser.parse_args()

    device, description = setup(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (16 if cuda else 4)
    repeats = args.repeats or (10 if cuda else 1)
    dtype = DTYPES[args.dtype]
    print(f"{description}, {args.dtype}\n")
    print("| autoencoder | params | image | latent | batch | encode img/s | decode img/s |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.vae:
        print(bench_vae(preset, batch, dtype, device, repeats), flush=True)
    print(f"\n| preset | diffusion in | output | sampled tensor | U-Net params | batch | DDIM-{args.steps} img/s | "
          f"decode share |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.ldm:
        for row in bench_sampling(preset, batch, args.steps, dtype, device, repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
