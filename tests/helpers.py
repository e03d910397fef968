"""What several test files share: the command line of a tiny pixel-diffusion run, folders of
labelled images that a few classifier steps learn, damaged copies of an .npz archive, torchrun
launches on the CPU, spies on reads of tensor values on the host and on copies of host data to a device,
and the guard of the Triton kernels' tests and their opcheck."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RES = 16  # image side of every tiny run


def torchrun_command(nproc: int, script: str | Path) -> list[str]:
    """A torchrun launch of `script` with `nproc` processes; `--standalone` lets torchrun pick a free port (a
    fixed one can still be held by another job, or by the previous launch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]


def torchrun_env() -> dict[str, str]:
    """The environment of a torchrun launch on the CPU: one thread per process, and gloo pinned to the loopback
    interface instead of whatever the host name resolves to."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def tiny_args(run_dir: Path, dataset: str | Path, *extra: str, steps: int = 3) -> list[str]:
    """`train.py` arguments for a ddpm run that takes about a second per step on one CPU thread: 16 px
    images, a two-level 32-channel U-Net (with dropout, so exact resume replays it), T = 100, batches of 4,
    one checkpoint at the end. `dataset` is a dataset spec, or a folder of images; `extra` options come
    last, so they override these."""
    spec = f"folder:{dataset}" if isinstance(dataset, Path) else dataset
    return ["--run-dir", str(run_dir), "--device", "cpu", "--dataset", spec, "--resolution", str(RES), "--no-hflip",
            "--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attention-resolutions", "8",
            "--dropout", "0.1", "--schedule", "linear", "--prediction", "eps", "--num-timesteps", "100",
            "--steps", str(steps), "--batch-size", "4", "--warmup-steps", "2", "--log-every", "1", "--sample-every", "0",
            "--ckpt-every", "100000", "--preview-images", "2", "--preview-steps", "2", *extra]


COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 50, 40)}


def colour_folder(root: Path, per_class: int, seed: int, classes: dict = COLOURS) -> Path:
    """Class folders of noisy solid colours (RES px): trivially separable, so a few steps learn them."""
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (RES, RES, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image file at `path`, read from its header (the file closed again)."""
    with Image.open(path) as image:
        return image.size


def noise_folder(root: Path, count: int, classes: int = 0) -> Path:
    """`count` RES px RGB images of uniform noise (seed 0): in `classes` class folders class0, class1, ... taken in
    turn, or flat for 0."""
    rng = np.random.default_rng(0)
    for k in range(count):
        folder = root / f"class{k % classes}" if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


# Damage to an .npz (a zip) that numpy reports with neither an OSError nor a ValueError: a compression method
# zipfile does not know (NotImplementedError), and the encryption flag set (RuntimeError).
NPZ_DAMAGE = {"compression": (8, 99), "encrypted": (6, 1)}  # offset in a local file header, new 16-bit value


def damaged_npz(data: bytes, how: str) -> bytes:
    """`data`, an .npz file, with the field `NPZ_DAMAGE[how]` of every member's headers overwritten."""
    offset, value = NPZ_DAMAGE[how]
    damaged = bytearray(data)
    for signature, shift in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):  # local header; central directory entry
        at = damaged.find(signature)
        while at >= 0:
            struct.pack_into("<H", damaged, at + offset + shift, value)
            at = damaged.find(signature, at + 4)
    return bytes(damaged)


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """`net` in eval mode with every weight moved by Gaussian noise of `scale`, so that its zero-initialised
    layers (residual branches, output convolutions) matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


class HostReads:
    """The reads of a tensor's value on the host (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, ...) made inside the
    functions `watch` wraps, by name in `reads`: on a GPU each makes the host wait until the device has drained
    its queue. Spied on the CPU, where the same Python calls run (reads inside C++ ops are not seen)."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        self.calls: list[str] = []  # the watched functions, as they were called
        self.spying = False
        for name in self.NAMES:
            def spy(tensor, *args, _name=name, _real=getattr(torch.Tensor, name), **kwargs):
                if self.spying:
                    self.reads.append(_name)
                return _real(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, spy)

    def watch(self, function, when=lambda *args: True):
        """`function`, with the reads it makes recorded (in the calls whose positional arguments satisfy `when`)."""
        def watched(*args, **kwargs):
            self.calls.append(function.__name__)
            self.spying = when(*args)
            try:
                return function(*args, **kwargs)
            finally:
                self.spying = False
        return watched


class HostToDevice(torch.overrides.TorchFunctionMode):
    """The copies of host data to another device made while active, in `copies`: `torch.tensor(data, device=D)`
    and `t.to(D)` or `t.cuda()` of a CPU tensor. On a GPU each is a copy from pageable memory, which waits for
    the device. Run on the meta device, which takes the same Python calls as a GPU and no memory."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.copies.append(f"torch.{func.__name__}(host data, device={kwargs['device']})")
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and args[0].device.type == "cpu":
            targets = [torch.device(a) for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
            targets += [a.device for a in args[1:] if isinstance(a, torch.Tensor)]
            if func is torch.Tensor.cuda or any(t.type != "cpu" for t in targets):
                self.copies.append(f"a CPU tensor {tuple(args[0].shape)} moved by .{func.__name__}")
        return func(*args, **kwargs)


def skip_unless_kernels_run(kernel) -> None:
    """Skips a test where our Triton kernel `kernel` (one of a kernels module's @jit functions) cannot run:
    without triton, or on a CPU where triton was imported before TRITON_INTERPRET was set."""
    import pytest
    pytest.importorskip("triton", reason="the triton package is not installed, so there are no kernels to test")
    import kernels
    from kernels.triton_support import InterpretedFunction
    if kernels.interpreting() and not isinstance(kernel, InterpretedFunction):
        # Whether jit functions run in the interpreter (tl.zeros and the rest of Triton's own library
        # included) is settled when triton is imported.
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, so its CPU interpreter is off; set "
                    "TRITON_INTERPRET=1 in the environment or in tests/conftest.py")


def opcheck(op, args: tuple) -> None:
    """`torch.library.opcheck` of one of our ops on `args`: its schema, autograd registration, fake (the shapes,
    strides and dtypes that compiled code allocates by) and AOT dispatch agree with what the op does. Under
    Triton's CPU interpreter AOT dispatch keeps the op opaque, as the interpreter cannot run a kernel on the
    fake tensors it would trace with."""
    import kernels
    with torch._functorch.config.patch(decompose_custom_triton_ops=not kernels.interpreting()):
        torch.library.opcheck(op, args)
