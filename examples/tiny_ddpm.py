"""A tiny DDPM on the built-in plumes, from the math modules alone: the reference to start from.

Simulates 512 smoke plumes at 16x16, trains a small U-Net for a few hundred steps to predict v
(Salimans & Ho 2022) under improved DDPM's cosine schedule, then draws 16 plumes with 25 DDIM steps
and writes them as one PNG grid (about a minute on one CPU core). What a real run adds (EMA, AMP,
checkpoints, conditioning and guidance, previews) belongs to the training loop (`training/`) and the
stages (`ddpm/stage.py`); this is the method and nothing else. Run it from the repository root:

    python -m examples.tiny_ddpm        # writes tiny_ddpm.png
"""

import torch

from data.imageio import from_uint8, save_grid
from data.plumes import generate, sample_seeds
from ddpm.objective import diffusion_loss
from ddpm.samplers import ddim_sample, make_timesteps
from ddpm.schedule import Schedule
from ddpm.unet import UNet, UNetConfig

STEPS = 400          # training steps of batch BATCH
BATCH = 32
IMAGES = 512         # plumes to train on, simulated in memory (a few seconds)
SIZE = 16            # image side in pixels


def main(steps: int = STEPS, images: int = IMAGES, out: str = "tiny_ddpm.png", seed: int = 0,
         batch: int = BATCH) -> list[float]:
    """Train, sample, write the grid to `out`; returns the training loss of every step."""
    torch.manual_seed(seed)  # the network's initial weights
    g = torch.Generator().manual_seed(seed)  # every other draw: batches, timesteps, noise

    # Data: plume renders (uint8) as floats in [-1, 1], the range the schedule assumes.
    pixels, _ = generate(sample_seeds(seed, images, train=True), resolution=SIZE)
    data = from_uint8(pixels)

    # The forward process q(x_t | x_0): T = 1000 steps of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).
    schedule = Schedule.from_name("cosine", 1000)

    # The network maps (x_t, t) to a tensor of x_t's shape; what it means (here v) is the objective's choice.
    net = UNet(UNetConfig(image_size=SIZE, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(), dropout=0.0, scale_shift_norm=True))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    # Training: a random timestep and noise per image, x_t = q_sample(x0, t, noise), MSE to v (DDPM eq. 14's form).
    losses = []
    for step in range(steps):
        x0 = data[torch.randint(len(data), (batch,), generator=g)]
        loss = diffusion_loss(net, schedule, x0, g, prediction="v").mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    # Sampling: samplers take a function (x_t, t) -> eps, so the v the network predicts is converted first.
    net.eval()

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.to_eps(x_t, t, net(x_t, t), "v")

    with torch.no_grad():
        x_T = torch.randn(16, 3, SIZE, SIZE, generator=g)
        samples = ddim_sample(eps_model, x_T, schedule, make_timesteps(schedule.num_timesteps, 25),
                              clip_x0=True)  # eta = 0
    save_grid(samples, out)
    print(f"wrote {out}")
    return losses


if __name__ == "__main__":
    import argparse
    import os
    parser = argparse.ArgumentParser(prog="python -m examples.tiny_ddpm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tiny_ddpm.png", help="the PNG grid to write (default: tiny_ddpm.png)")
    out = parser.parse_args().out
    if not out.lower().endswith(".png") or os.path.isdir(out):  # checked before a minute of training, not after
        parser.error(f"--out {out} must name a .png file")
    main(out=out)
