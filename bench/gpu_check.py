"""Everything a lent GPU should confirm, in one go, with one report: `bash bench/gpu_check.sh`.

1. The kernel and speed tests on real CUDA (Triton compiled for the GPU, not interpreted).
2. A few training steps of every stage through `train.py`, in bf16 and in fp16 with loss scaling
   (the VAE with its discriminator on from step 0, so the adaptive GAN weight runs under fp16), and
   with --compile.
3. `sample.py --cuda-graphs` and `--compile` give the images eager sampling gives.
4. DDP over NCCL on every visible GPU (torchrun), when there is more than one.
5. `python -m bench --quick`.

Each check prints PASS or FAIL with its time; the report ends with a summary. `--device cpu` runs
the same checks that make sense without a GPU, to try the script itself; `--device cpu --stages-only`
(the training steps of 2. without compile, under a minute) is what the test suite runs, so the
commands here keep up with the stages' options and presets.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS: list[tuple[str, bool, float, str]] = []
NOT_RUN: list[str] = []  # checks left out, and why (past the time budget, one GPU only)
DEADLINE = float("inf")  # perf_counter() time by which every check must have ended (--budget)
REPORT_ON_STOP: tuple | None = None  # report()'s arguments once the checks have begun

# Dropout on: training steps then run the fused GroupNorm + SiLU + dropout kernels (--kernels auto on CUDA).
TINY_UNET = ["--resolution", "16", "--no-hflip", "--base-channels", "32", "--channel-mult", "1", "2",
             "--num-res-blocks", "1", "--attention-resolutions", "8", "--dropout", "0.1", "--num-timesteps", "100",
             "--batch-size", "8", "--log-every", "1", "--sample-every", "0", "--preview-images", "4", "--preview-steps", "4"]
TINY_VAE = ["--resolution", "16", "--no-hflip", "--base-channels", "32", "--channel-mult", "1", "2",
            "--num-res-blocks", "1", "--attention-resolutions", "--latent-channels", "3", "--batch-size", "8",
            "--log-every", "1", "--sample-every", "0", "--preview-images", "4", "--perceptual", "random",
            "--perceptual-taps", "2"]


def check(name: str, command: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> bool:
    """Run one command; record PASS/FAIL, its time and the tail of its output. A check that would start
    past the time budget is not run, and one the budget cuts short is listed as not run, not as failed."""
    start = time.perf_counter()
    left = DEADLINE - start
    if left < 10:
        NOT_RUN.append(f"{name} (past the --budget)")
        print(f"SKIP {name}: past the --budget", flush=True)
        return False
    try:
        done = subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=min(timeout, left))
        ok, tail = done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        if left < timeout:
            NOT_RUN.append(f"{name} (cut short at the --budget)")
            print(f"SKIP {name}: cut short at the --budget", flush=True)
            return False
        ok, tail = False, [f"timed out after {timeout} s"]
    seconds = time.perf_counter() - start
    RESULTS.append((name, ok, seconds, " | ".join(tail)[-300:]))
    print(f"{'PASS' if ok else 'FAIL'} {name} ({seconds:.0f} s){'' if ok else ': ' + RESULTS[-1][3]}", flush=True)
    return ok


def make_folder(root: Path) -> Path:
    """Two classes of 16 small RGB images, blobs of two colours, so every stage has something to learn."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(((220, 60, 40), (40, 90, 220))):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(16):
            image = rng.normal(128, 20, (16, 16, 3))
            y, x = rng.integers(3, 13, 2)
            image[max(0, y - 3):y + 3, max(0, x - 3):x + 3] = colour
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def train(stage: str, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "train.py", "--stage", stage, "--run-dir", str(run_dir), *args]


def images_equal(a: Path, b: Path, tolerance: int) -> bool:
    """Whether two `sample.py` outputs hold the same images (images/NNNNNN.png), pixel for pixel within
    `tolerance` levels."""
    a, b = a / "images", b / "images"
    names = sorted(p.name for p in a.glob("*.png"))
    if not names or names != sorted(p.name for p in b.glob("*.png")):
        return False
    return all(np.abs(np.asarray(Image.open(a / n), dtype=int) - np.asarray(Image.open(b / n), dtype=int)).max()
               <= tolerance for n in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the real check) or cpu (to try the script)")
    parser.add_argument("--skip-bench", action="store_true", help="leave out `python -m bench --quick`")
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds for all the checks (default: 480, 8 minutes); those that do not fit are listed "
                             "as not run")
    parser.add_argument("--stages-only", action="store_true",
                        help="only the eager training steps of every stage (what the test suite runs)")
    args = parser.parse_args()
    if not 0 < args.budget < float("inf"):
        parser.error(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", args.device):
        parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device}")
    global DEADLINE
    DEADLINE = time.perf_counter() + args.budget
    cuda = args.device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    data = make_folder(work / "data")
    dev = ["--device", args.device, "--dataset", f"folder:{data}"]
    # On the CPU (trying the script): whatever --amp auto picks, bf16 where the CPU computes it natively; elsewhere
    # PyTorch emulates bf16, many times slower than fp32 (the five stages: 162 s in bf16 against 45 s in fp32 on
    # a 2-core AVX2 EPYC).
    precisions = ["bf16", "fp16"] if cuda else ["auto"]
    began = time.perf_counter()
    global REPORT_ON_STOP
    REPORT_ON_STOP = (args.device, began, work)

    # 1. Kernels and fast paths on the device (the kernel tests pick CUDA tensors when CUDA is there).
    if not args.stages_only:
        check("kernel and speed tests", [sys.executable, "-m", "pytest", "-q", "tests/test_kernels_group_norm.py",
                                         "tests/test_kernels_sampler.py", "tests/test_kernels_lpips.py",
                                         "tests/test_speed.py"], ROOT, env={"TRITON_INTERPRET": "0" if cuda else "1"})

    # 2. Every stage, each precision; the pixel model also compiled.
    ddpm = work / ("ddpm-" + precisions[0] if args.stages_only else "ddpm")  # the model sampled and inverted below
    for amp in precisions:
        check(f"ddpm train --amp {amp}", train("ddpm", work / f"ddpm-{amp}", *dev, *TINY_UNET, "--steps", "6",
                                               "--amp", amp, "--cond", "class"), ROOT)
    if not args.stages_only:
        check("ddpm train --compile (bf16)", train("ddpm", ddpm, *dev, *TINY_UNET, "--steps", "20", "--amp", "bf16",
                                                   "--cond", "class", "--compile"), ROOT, timeout=600)
    for amp in precisions:
        check(f"vae train with GAN --amp {amp}", train("vae", work / f"vae-{amp}", *dev, *TINY_VAE, "--steps", "6",
                                                       "--amp", amp, "--disc-start", "0", "--disc-layers", "1"), ROOT)
    vae = work / f"vae-{precisions[0]}" / "checkpoint.pt"
    for amp in precisions:
        check(f"ldm train --amp {amp}", train("ldm", work / f"ldm-{amp}", *dev, "--vae-ckpt", str(vae), "--no-hflip",
                                              "--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks",
                                              "1", "--attention-resolutions", "4", "--batch-size", "8", "--steps", "6",
                                              "--log-every", "1", "--sample-every", "0", "--preview-images", "4",
                                              "--preview-steps", "4", "--amp", amp, "--cache-dir", str(work / "cache"),
                                              "--cond", "class", "--resolution", "16"), ROOT)
        check(f"classify train --amp {amp}", train("classify", work / f"classify-{amp}", *dev, "--resolution", "16",
                                                   "--steps", "6", "--warmup-steps", "2", "--batch-size", "8",
                                                   "--log-every", "1", "--sample-every", "0", "--amp", amp,
                                                   "--target", "class"), ROOT)
        check(f"invert train --amp {amp}", train("invert", work / f"invert-{amp}", *dev, "--model",
                                                 str(ddpm / "checkpoint.pt"), "--resolution", "16", "--steps", "6",
                                                 "--batch-size", "8", "--log-every", "1", "--sample-every", "0",
                                                 "--amp", amp), ROOT)
    if args.stages_only:
        return report(args.device, began, work)

    # 3. Sampling: eager, compiled and graph-captured give the same images.
    sample = [sys.executable, "sample.py", "--ckpt", str(ddpm / "checkpoint.pt"), "--device", args.device,
              "--sampler", "ddim", "--steps", "20", "--num", "8", "--batch-size", "4", "--guidance-scale", "2",
              "--amp", "none"]
    eager, graphed, compiled = work / "s-eager", work / "s-graphs", work / "s-compile"
    check("sample eager", [*sample, "--out", str(eager)], ROOT)
    if cuda:
        check("sample --cuda-graphs", [*sample, "--out", str(graphed), "--cuda-graphs"], ROOT)
        RESULTS.append(("cuda-graph images == eager images", images_equal(eager, graphed, 1), 0.0, ""))
    check("sample --compile", [*sample, "--out", str(compiled), "--compile"], ROOT, timeout=600)
    RESULTS.append(("compiled images == eager images", images_equal(eager, compiled, 2), 0.0, ""))

    # 4. DDP over NCCL on every visible GPU.
    if cuda:
        import torch
        gpus = torch.cuda.device_count()
        if gpus < 2:  # one process would run alone (WORLD_SIZE 1): neither NCCL nor DDP would be exercised
            NOT_RUN.append("DDP over NCCL (needs 2 GPUs; this machine has 1)")
        else:
            check(f"DDP (NCCL) on {gpus} GPUs",
                  [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   "train.py", "--stage", "ddpm", "--run-dir", str(work / "ddp"), "--device", "cuda", "--dataset",
                   f"folder:{data}", *TINY_UNET, "--steps", "6"], ROOT)

    # 5. The benchmark table.
    if not args.skip_bench:
        check("python -m bench --quick", [sys.executable, "-m", "bench", "--quick", "--device", args.device], ROOT,
              timeout=900)

    return report(args.device, began, work)


def report(device: str, began: float, work: Path) -> int:
    """Print the summary table of every check so far; the exit code: 1 if any failed."""
    print(f"\n## GPU check report ({device}, {time.perf_counter() - began:.0f} s; files in {work})\n")
    print("| check | result | seconds | detail |\n|---|---|---|---|")
    for name, ok, seconds, tail in RESULTS:
        print(f"| {name} | {'PASS' if ok else 'FAIL'} | {seconds:.0f} | {'' if ok else tail} |")
    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    for reason in NOT_RUN:
        print(f"not run: {reason}")
    return 1 if failed else 0


def _stop(signum: int, frame) -> None:
    raise KeyboardInterrupt  # (subprocess.run then kills the check it was running)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)  # a lent machine's time limit: still the report of what ran
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        if REPORT_ON_STOP is None:
            sys.exit(130)
        NOT_RUN.append("the check running when a stop signal came, and every one after it")
        report(*REPORT_ON_STOP)
        sys.exit(130)
