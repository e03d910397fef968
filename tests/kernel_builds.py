"""Build every Triton kernel launch that our networks, samplers and LPIPS make, for NVIDIA GPUs, on any machine.

The kernel tests run the kernels in Triton's CPU interpreter, which executes a kernel's Python line by line
and so never meets what only the compiler checks: types that do not unify, a block shape that is not a power
of two, an op the GPU backend lacks. Here each launch is compiled for real (Triton's front end, LLVM, and
ptxas, all inside the triton package) for several GPU architectures, without a GPU.

The launches are the ones the code makes: a small U-Net (both embeddings, attention, dropout), the
autoencoder, the perceptual distance and every sampler run on the CPU with the Triton backend forced on and
each launch recorded instead of run (their outputs stay uninitialised; only shapes and dtypes matter), in
float32 and under bf16 and fp16 autocast. Each distinct launch (kernel, argument types, constants, the
JIT's specialisations of its arguments, launch options) is then compiled for one of `ARCHITECTURES` in turn,
or with --every-architecture for each of them.

Run by tests/test_kernels_build.py in processes of their own, as Triton's JIT functions exist only where
TRITON_INTERPRET is off when triton is imported; by hand: `python tests/kernel_builds.py --every-architecture`
(about 2.5 minutes in one process). Prints one JSON object: what was built, any kernel of the kernel modules that
no workload launched, the failures (empty when every build succeeded), and the builds that spill registers to
local memory (`cuobjdump -res-usage`, from the triton package too; none do: 26 to 76 registers a thread on
sm_90), and any launch whose written tensors torch.compile's analysis gets other than its outputs (`OUTPUTS`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Compute capabilities: Turing (RTX 20, T4), Ampere (A100; RTX 30), Ada (RTX 40, L4), Hopper (H100),
# consumer Blackwell (RTX 50).
ARCHITECTURES = (75, 80, 86, 89, 90, 120)
PRECISIONS = (None, torch.bfloat16, torch.float16)  # None: float32, no autocast


# What each kernel writes. torch.compile copies every tensor its analysis finds a kernel writing before the
# launch, so the analysis must find these and no others (it once counted x as written by the group norm).
OUTPUTS = {"_forward_stats_kernel": {"partial_ptr"}, "_forward_apply_kernel": {"y_ptr", "mean_ptr", "rstd_ptr"},
           "_backward_sums_kernel": {"partial_ptr"}, "_backward_apply_kernel": {"dx_ptr"},
           "_keep_mask_kernel": {"keep_ptr"}, "_forward_kernel": {"partial_ptr"},
           "_backward_kernel": {"dfx_ptr", "dfy_ptr"}, "_sampler_step_kernel": {"x_prev_ptr", "x0_ptr", "guided_ptr"}}


def record_launches() -> list[tuple]:
    """[(kernel, args, kwargs)] of every launch the workloads below make."""
    import kernels
    from kernels import group_norm, lpips, sampler_step

    launches = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module in (group_norm, lpips, sampler_step):
        module.traceable = Recorded
    group_norm._keep_mask_kernel = Recorded(group_norm._keep_mask_kernel)
    kernels._register_triton_ops()
    kernels._set("triton")
    kernels.runs_triton = lambda tensor: True

    for dtype in PRECISIONS:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            run_workloads(dtype or torch.float32)
    group_norm.dropout_keep_mask(torch.tensor([5]), 0.1, (2, 3, 4, 5))
    return launches


def run_workloads(eps_dtype: torch.dtype) -> None:
    from ddpm.guidance import classifier_free_guidance
    from ddpm.samplers import SAMPLERS, make_timesteps, per_sample_noise
    from ddpm.schedule import Schedule
    from ddpm.unet import UNet, UNetConfig
    from vae.autoencoder import AutoencoderConfig, AutoencoderKL
    from vae.perceptual import PerceptualDistance

    for scale_shift_norm in (False, True):
        config = UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(4,), num_heads=2, dropout=0.1, scale_shift_norm=scale_shift_norm,
                            cond="class", num_classes=3)
        unet = UNet(config).train()
        unet(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])).float().sum().backward()
        with torch.no_grad():
            unet.eval()(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2]))

    autoencoder = AutoencoderKL(AutoencoderConfig(in_channels=3, base_channels=32, channel_mult=(1, 2),
                                                  num_res_blocks=1, latent_channels=4, resolution=8))
    x = torch.randn(2, 3, 8, 8)
    autoencoder.decode(autoencoder.encode(x).sample(torch.randn(2, 4, 4, 4))).float().sum().backward()

    image = torch.rand(2, 3, 16, 16, requires_grad=True)
    PerceptualDistance(taps=2).tap_distances(image, torch.rand(2, 3, 16, 16)).sum().backward()

    schedule = Schedule.from_name("cosine", 100)
    denoiser = lambda x, t, reference_mask=None: (0.5 * x).to(eps_dtype)  # noqa: E731
    for guided in (False, True):
        model = classifier_free_guidance(denoiser, 3.0) if guided else denoiser
        for name, options, steps in (("ddpm", {}, 2), ("ddim", {"eta": 0.5}, 2), ("ddim", {}, 2), ("pndm", {}, 5),
                                     ("spndm", {}, 3)):
            for clip_x0 in (False, True):  # half the runs hand each step's x0 to a callback (a GIF's frames)
                x, noise = per_sample_noise([0, 1], (2, 3, 5, 7), "cpu")
                SAMPLERS[name](model, x, schedule, make_timesteps(100, steps), clip_x0=clip_x0, noise=noise,
                               callback=(lambda i, t, x_t, x0: None) if guided != clip_x0 else None, **options)


def build_plan(launches: list[tuple], architecture: int) -> dict:
    """{key: (kernel, source, options, args, kwargs)}, one entry per distinct build for `architecture`, with the
    arguments of its first launch: the signature, constants, specialisations (a pointer or integer divisible by
    16, an integer 1) and options that Triton's JIT derives from a launch's arguments, by the JIT's own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", architecture, 32))
    plan, binders = {}, {}
    for kernel, args, kwargs in launches:
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binders[kernel](*args, **kwargs)
        options, signature, constants, attributes = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = (kernel.__name__, repr(signature), repr(constants), repr(attributes),  # the same for every architecture
               f"num_warps={options.num_warps} num_stages={options.num_stages}")
        plan.setdefault(key, (kernel, ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes),
                              options.__dict__, args, kwargs))
    return plan


def compile_writes(kernel, args: tuple, kwargs: dict) -> list[str] | None:
    """The tensor arguments that torch.compile's analysis of the kernel's Triton IR finds it writes, for an H100
    (the analysis asks the driver for its target, so one that knows only the target stands in); None where this
    PyTorch has neither form of the analysis."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    class TargetOnly:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    bound = dict(inspect.signature(kernel.fn).bind(*args, **{name: value for name, value in kwargs.items()
                                                             if name in kernel.arg_names}).arguments)
    previous = driver._active  # reset_active() would make the real driver, which needs a GPU
    driver.set_active(TargetOnly())
    try:
        if hasattr(wrap, "identify_accessed_tensors"):  # PyTorch 2.14
            writes = wrap.identify_accessed_tensors(kernel, bound, {}).read_writes.writes
            return sorted(dep.name for dep in writes if isinstance(bound.get(dep.name), torch.Tensor))
        if hasattr(wrap, "identify_mutated_tensors"):  # 2.11
            return sorted(wrap.identify_mutated_tensors(kernel, bound, {}))
        return None
    finally:
        driver._active = previous


def spilled(cubin: bytes, cuobjdump: Path) -> bool:
    """Whether the kernel in `cubin` keeps values in local memory (registers spilled, or a stack frame), as
    `cuobjdump -res-usage` reports it: for these memory-bound kernels a launch configuration gone wrong."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    counts = [int(n) for n in re.findall(r"(?:STACK|LOCAL):(\d+)", usage.stdout)]
    assert counts, usage.stdout
    return any(counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build every Triton kernel launch of our code for NVIDIA GPUs.")
    parser.add_argument("--every-architecture", action="store_true",
                        help="build each launch for every architecture (minutes), not for one of them in turn")
    parser.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"),
                        help="build only the I-th of every N builds (for N processes side by side)")
    args = parser.parse_args(argv)
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET unset"
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import group_norm, lpips, sampler_step

    every_kernel = {name for module in (group_norm, lpips, sampler_step) for name in vars(module)
                    if name.endswith("_kernel")}
    torch.manual_seed(0)
    launches = record_launches()
    plans = {architecture: build_plan(launches, architecture) for architecture in ARCHITECTURES}
    keys = sorted(plans[ARCHITECTURES[0]])
    jobs = [(key, architecture) for j, key in enumerate(keys) for architecture in
            (ARCHITECTURES if args.every_architecture else [ARCHITECTURES[j % len(ARCHITECTURES)]])]
    index, count = args.shard
    wrong_writes, analysed = set(), set()
    for key in keys[index::count]:
        kernel, _, _, launch_args, launch_kwargs = plans[ARCHITECTURES[0]][key]
        writes = compile_writes(kernel, launch_args, launch_kwargs)
        if writes is not None:
            analysed.add(kernel.__name__)
            if not writes or not set(writes) <= OUTPUTS[kernel.__name__]:
                wrong_writes.add(f"{kernel.__name__} writes {writes} by torch.compile's analysis")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    failures, built, spills = [], [], []
    for key, architecture in jobs[index::count]:
        kernel, source, options, *_ = plans[architecture][key]
        try:
            binary = triton.compile(source, target=GPUTarget("cuda", architecture, 32), options=options)
            assert binary.asm.get("cubin"), "no cubin"
        except Exception as err:  # noqa: BLE001 - every failure is reported, with its kernel and types
            message = str(err).strip().splitlines()
            failures.append(f"sm_{architecture} {key[0]} {key[1]} {key[2]}: {type(err).__name__}: "
                            f"{message[-1] if message else ''}")
        else:
            if cuobjdump.is_file() and spilled(binary.asm["cubin"], cuobjdump):
                spills.append(f"sm_{architecture} {key[0]} {key[1]} {key[2]} {key[4]}")
        built.append((key[0], architecture))
    print(json.dumps({"triton": triton.__version__, "launches": len(keys), "builds": len(built),
                      "architectures": sorted({a for _, a in built}), "kernels": sorted({k for k, _ in built}),
                      "never_launched": sorted(every_kernel - {key[0] for key in keys}), "failures": failures,
                      "spills": spills, "spills_checked": cuobjdump.is_file(),
                      "wrong_writes": sorted(wrong_writes), "writes_analysed": sorted(analysed)}))


if __name__ == "__main__":
    main()
