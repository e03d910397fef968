"""`python -m bench.attention`: the measurements behind `kernels.attention`'s choice, on this machine.

For each shape (batch x heads, sequence length L, head_dim) and precision it times SDPA and the matmul
form, alternating, forward alone and forward + backward, and prints one markdown table with the speed-up
of the matmul form and which of the two `attention` picks. q, k and v are laid out as the U-Net makes
them (channel-first heads), so SDPA pays the copy it needs there, as it does in the network.

    python -m bench.attention            # the CPU: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse

import torch

from bench.common import alternating_seconds, setup
from kernels.attention import matmul_attention, sdpa_attention, uses_matmul_form

SHAPES = [  # (batch, heads, L, head_dim)
    (16, 1, 256, 256),   # ddpm-cifar10's 16x16 attention at the bench's training batch
    (8, 8, 256, 64),
    (8, 1, 64, 512),     # the kl-f8 autoencoder's middle block at 64 px
    (8, 1, 64, 64),      # ddpm-demo's 8x8 attention
    (16, 4, 512, 64),
    (4, 4, 1024, 128),
    (2, 1, 1024, 512),   # kl-f8's middle at 256 px
    (8, 2, 1024, 64),
    (2, 1, 2048, 128),
    (8, 8, 256, 32),
]


def speedup(shape, dtype, device, backward: bool, repeats: int) -> float:
    batch, heads, length, head_dim = shape
    qkv = torch.randn(batch, 3, heads, head_dim, length, device=device, dtype=dtype, requires_grad=backward)
    q, k, v = qkv.transpose(-1, -2).unbind(dim=1)
    grad = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)

    def timed(fn):
        def call():
            if backward:
                fn(q, k, v).backward(grad, retain_graph=True)
            else:
                with torch.no_grad():
                    fn(q, k, v)
        return call

    seconds = alternating_seconds({"sdpa": timed(sdpa_attention), "matmul": timed(matmul_attention)}, device, repeats, warmup=2)
    return seconds["sdpa"] / seconds["matmul"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per cell (the median is kept)")
    args = parser.parse_args(argv)
    device, name = setup(args.device)
    print(f"# attention forms on {name}: speed-up of the matmul form over SDPA (above 1: matmul faster)\n")
    print("| batch x heads, L, head_dim | dtype | fwd | fwd+bwd | `attention` uses |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            fwd, both = (speedup(shape, dtype, device, backward, args.repeats) for backward in (False, True))
            chosen = "matmul" if uses_matmul_form(torch.empty(shape, dtype=dtype, device=device)) else "SDPA"
            batch, heads, length, head_dim = shape
            print(f"| {batch} x {heads}, {length}, {head_dim} | {str(dtype).removeprefix('torch.')} "
                  f"| {fwd:.2f}x | {both:.2f}x | {chosen} |", flush=True)


if __name__ == "__main__":
    main()
