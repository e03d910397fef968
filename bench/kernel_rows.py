"""Rows for our fused kernels: the Triton backend against the unfused PyTorch ops it replaces, through the
same public function switched with `kernels.using`.

Where Triton cannot run (a CPU without TRITON_INTERPRET=1, or no triton package), the row says so and
still prints the PyTorch numbers. On CUDA the notes give the achieved memory bandwidth, counted from
the bytes the op must move at least (each input read once, each output written once), beside the
GPU's peak where `bench.device.GPU_PEAKS` knows it. Each row's size is in images (the batch), so its
img/s reads like the model rows'.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

import kernels
from bench.common import alternating_seconds, seconds_per_call
from bench.device import peaks
from bench.rows import Plan
from bench.table import Row
from ddpm.unet import group_norm
from kernels.group_norm import group_norm_act
from kernels.lpips import tap_distance
from kernels.sampler_step import Update, sampler_step

Step = Callable[[], object]
TORCH_OPS = "torch ops (unfused)"
SAMPLE_SECONDS = 0.05  # long enough that one preemption of the process does not decide a timed sample


def triton_unavailable(device: torch.device) -> str:
    """"" when our Triton kernels can run on `device`, else what the row says instead of their numbers."""
    try:
        kernels.resolve("triton", device)
    except ValueError:
        return "needs CUDA" if kernels.triton_importable() else "needs triton"
    return ""


def kernel_row(plan: Plan, name: str, size: str, images: int, step: Callable[[], Step], bytes_moved: int) -> Row:
    """Time `step()` (built once per backend, run under that backend) with Triton and with PyTorch, alternating."""
    device = plan.device
    absent = triton_unavailable(device)
    backends = ("torch",) if absent else ("triton", "torch")
    steps = {backend: _under(backend, device, step()) for backend in backends}
    # A kernel call is too short to time alone: each timed sample is as many calls as fill SAMPLE_SECONDS.
    once = min(seconds_per_call(fn, device, repeats=1, warmup=plan.warmup + 1) for fn in steps.values())
    inner = max(1, min(1000, round(SAMPLE_SECONDS / once)))
    seconds = alternating_seconds(steps, device, plan.repeats, warmup=0, inner=inner)
    rate = {backend: images / s for backend, s in seconds.items()}
    triton = rate.get("triton")
    settings = absent or ("triton, fp32" if plan.cuda else "triton, fp32 (CPU interpreter)")
    return Row(name=name, size=size, ours_fp32=triton, ours_fastest=triton, settings=settings, peer=TORCH_OPS,
               peer_default=rate["torch"], notes=_bandwidth(seconds, bytes_moved, device) if plan.cuda else "")


def _under(backend: str, device: torch.device, fn: Step) -> Step:
    def call():
        with kernels.using(backend, device):
            return fn()
    return call


def _bandwidth(seconds: dict[str, float], bytes_moved: int, device: torch.device) -> str:
    peak = peaks(device).bandwidth
    achieved = ", ".join(f"{backend} {bytes_moved / s / 1e9:.0f} GB/s" for backend, s in seconds.items())
    return achieved + (f" (peak {peak / 1e9:.0f} GB/s)" if peak else "")


def group_norm_rows(plan: Plan) -> list[Row]:
    """GroupNorm with the time-embedding modulation and SiLU (the start of every ResBlock branch), forward and
    forward+backward, at the widths and sizes of the ddpm-cifar10 U-Net: DDPM's GN(x + emb), improved DDPM's
    scale-shift, and the plain GN + SiLU of the autoencoder; and DDPM's GN(x + emb) + SiLU + dropout 0.1, the
    op before each ddpm-cifar10 block's second convolution in training."""
    device = plan.device
    batch = plan.pick(cuda=128, cpu=16, quick_cpu=4)
    variants = [(128, 32, "add")] if plan.quick else [(128, 32, "add"), (256, 16, "scale-shift"), (256, 8, "plain")]
    rows = []
    for channels, side, modulation in variants:
        norm = group_norm(channels).to(device)
        x = torch.randn(batch, channels, side, side, device=device)
        emb = {"add": {"add": torch.randn(batch, channels, device=device)},
               "scale-shift": {"scale": torch.randn(batch, channels, device=device),
                               "shift": torch.randn(batch, channels, device=device)},
               "plain": {}}[modulation]
        size = f"{batch}x{channels}x{side}x{side} fp32, {modulation}"

        def forward(emb=emb, x=x, norm=norm) -> Step:
            return torch.no_grad()(lambda: group_norm_act(x, norm, **emb, silu=True))

        def forward_backward(emb=emb, x=x, norm=norm, dropout=0.0) -> Step:
            grad = torch.randn_like(x)

            def step():
                leaf = x.detach().requires_grad_(True)
                out = group_norm_act(leaf, norm, **emb, silu=True, dropout=dropout)
                return torch.autograd.grad(out, (leaf, *norm.parameters()), grad)
            return step

        n = x.numel() * x.element_size()
        rows.append(kernel_row(plan, "fused GroupNorm+SiLU, forward", size, batch, forward, 2 * n))
        if not plan.quick or plan.cuda:
            rows.append(kernel_row(plan, "fused GroupNorm+SiLU, fwd+bwd", size, batch, forward_backward, 5 * n))
            if modulation == "add":  # the bytes are the same: the fused dropout moves none of its own
                rows.append(kernel_row(plan, "fused GroupNorm+SiLU+dropout, fwd+bwd", f"{size}, dropout 0.1", batch,
                                       functools.partial(forward_backward, dropout=0.1), 5 * n))
    return rows


def sampler_step_rows(plan: Plan) -> list[Row]:
    """One guided DDIM step with x0 clipping (guidance, x0 prediction, clip, update; x0 kept for a callback):
    the most common sampler update, at a pixel-model sampling batch."""
    device = plan.device
    batch = plan.pick(cuda=64, cpu=16, quick_cpu=4)
    sides = [64] if plan.quick else [32, 64, 256]
    abar, abar_prev = 0.5, 0.6  # any step; the arithmetic does not depend on where
    update = Update(recip=abar ** -0.5, recipm1=(1 / abar - 1) ** 0.5, c_x0=abar_prev ** 0.5,
                    c_eps=(1 - abar_prev) ** 0.5)
    rows = []
    for side in sides:
        x, eps, eps_ref = (torch.randn(batch, 3, side, side, device=device) for _ in range(3))

        def step(x=x, eps=eps, eps_ref=eps_ref) -> Step:
            return lambda: sampler_step(x, eps, update, eps_ref=eps_ref, guidance_scale=2.0, clip_x0=True,
                                        return_x0=True, return_eps=False)

        n = x.numel() * x.element_size()  # reads x, eps, eps_ref; writes x_prev, x0
        rows.append(kernel_row(plan, "fused sampler step (DDIM, guided, clip)", f"{batch}x3x{side}x{side} fp32",
                               batch, step, 5 * n))
    return rows


def lpips_term_rows(plan: Plan) -> list[Row]:
    """LPIPS's term of one tap (normalise both feature maps over channels, weighted squared difference,
    mean over positions), forward and forward+backward, at the first and third VGG-16 taps of 64 px images
    (channels_last, as the trunk leaves them)."""
    device = plan.device
    batch = plan.pick(cuda=64, cpu=8, quick_cpu=4)
    taps = [(64, 64)] if plan.quick else [(64, 64), (256, 16)]
    rows = []
    for channels, side in taps:
        fx, fy = (torch.randn(batch, channels, side, side, device=device).relu().contiguous(
            memory_format=torch.channels_last) for _ in range(2))
        weight = torch.rand(channels, device=device)

        def forward(fx=fx, fy=fy, weight=weight) -> Step:
            return torch.no_grad()(lambda: tap_distance(fx, fy, weight))

        def forward_backward(fx=fx, fy=fy, weight=weight) -> Step:
            def step():
                a, b = fx.detach().requires_grad_(True), fy.detach().requires_grad_(True)
                return torch.autograd.grad(tap_distance(a, b, weight).sum(), (a, b))
            return step

        n = fx.numel() * fx.element_size()
        size = f"{batch}x{channels}x{side}x{side} fp32 channels_last"
        rows.append(kernel_row(plan, "fused LPIPS term, forward", size, batch, forward, 2 * n))
        if not plan.quick or plan.cuda:
            rows.append(kernel_row(plan, "fused LPIPS term, fwd+bwd", size, batch, forward_backward, 6 * n))
    return rows


def kernel_rows(plan: Plan) -> list[Row]:
    """Every fused kernel's rows."""
    return group_norm_rows(plan) + sampler_step_rows(plan) + lpips_term_rows(plan)
