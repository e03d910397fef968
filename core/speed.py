"""How a network call is made fast without changing what it computes: torch.compile and CUDA graphs.

Both act on a module in place (its attributes, parameters and state dict stay where they were), so
the code that holds the network -- a sampler, a training stage, the FID extractor -- never needs to
know whether it was compiled or captured.

- `compile_module`: `torch.compile` on the module's forward. Inductor fuses the elementwise work
  between convolutions and matmuls (on the CPU into vectorised C++ loops, on CUDA into Triton); on
  the CPU its C++ wrapper also runs the kernels in order without returning to Python between them.
- `capture_cuda_graphs`: the forward is recorded once per input signature as a CUDA graph and
  replayed afterwards, so a small-batch sampling step costs one graph launch instead of hundreds of
  kernel launches issued by Python. Only inference calls on CUDA tensors are captured; everything
  else runs the module as usual.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from core.errors import UserError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_module(module: nn.Module, mode: str = "default") -> nn.Module:
    """Compile `module`'s forward in place (`nn.Module.compile`); returns the module for chaining.

    "reduce-overhead" also records CUDA graphs on CUDA (compile's own capture). Weights stay inputs of
    the compiled graphs, so weights loaded later are used. Inductor's "freezing" (weights folded in as
    constants, oneDNN's prepacked convolutions) was measured on the CPU and gave nothing: DDIM sampling
    of the demo U-Net and ResNet-18 inference, bf16 and fp32, within 1-2% of unfrozen (docs/speed.md).
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"Unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}.")
    if mode == "default" and _on_cpu(module):
        # Inductor's C++ wrapper calls the generated kernels from C++ instead of one Python call per
        # kernel: a small network's step on a CPU is mostly that overhead (measured in docs/speed.md).
        module.compile(options={"cpp_wrapper": True})
    else:
        module.compile(mode=None if mode == "default" else mode)
    return module


def _on_cpu(module: nn.Module) -> bool:
    """Whether every parameter and buffer of `module` is on the CPU (and it has at least one)."""
    devices = {t.device.type for t in (*module.parameters(), *module.buffers())}
    return devices == {"cpu"}


def capture_cuda_graphs(module: nn.Module, warmup: int = 2) -> nn.Module:
    """Replace `module.forward` by a CUDA-graph replay of it (see `GraphedForward`); returns the module."""
    if not isinstance(module.forward, GraphedForward):
        module.forward = GraphedForward(module.forward, warmup)
    return module


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]        # the static tensors the graph reads: each call copies its arguments in
    output: Tensor              # the static tensor the graph writes


class GraphedForward:
    """A forward function that runs as a replayed CUDA graph.

    One graph is recorded per signature (the shapes, dtypes and devices of the tensor arguments, the
    other arguments' values, and the autocast state), after `warmup` eager calls on a side stream as
    CUDA graphs require. A replay copies the call's tensors into the graph's static inputs and
    returns a copy of its static output, so a caller may keep the result (PNDM keeps past eps).
    Calls with gradients enabled, or with CPU tensors, run the original function.
    """

    device_type = "cuda"  # what is captured (the tests imitate a graph on the CPU)

    def __init__(self, forward: Callable[..., Tensor], warmup: int = 2):
        self.forward, self.warmup = forward, warmup
        self.graphs: dict[tuple, _Graph] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        tensors = _tensors(args, kwargs)
        if torch.is_grad_enabled() or not tensors or any(t.device.type != self.device_type for t in tensors):
            return self.forward(*args, **kwargs)
        key = self._signature(args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._record(args, kwargs)
        for static, value in zip(entry.inputs, tensors):
            static.copy_(value)
        entry.graph.replay()
        return entry.output.clone()

    def _signature(self, args: tuple, kwargs: dict) -> tuple:
        def describe(value: Any) -> Any:
            if isinstance(value, Tensor):
                return ("tensor", tuple(value.shape), value.dtype, value.device)
            return ("value", value)
        autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        return (tuple(describe(a) for a in args), tuple((k, describe(v)) for k, v in sorted(kwargs.items())), autocast)

    def _record(self, args: tuple, kwargs: dict) -> _Graph:
        # Static copies of the tensor arguments, in the order __call__ copies into them.
        def static(value: Any) -> Any:
            return value.clone() if isinstance(value, Tensor) else value
        args, kwargs = tuple(static(a) for a in args), {k: static(v) for k, v in kwargs.items()}
        inputs = _tensors(args, kwargs)
        with _no_autocast_cache():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy initialisation and autotuning stay out of the graph
                for _ in range(self.warmup):
                    self.forward(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.forward(*args, **kwargs)
        return _Graph(graph, inputs, output)


@contextlib.contextmanager
def _no_autocast_cache() -> Iterator[None]:
    """Autocast's weight cache off for the body. Autocast keeps the low-precision copy of each weight that requires
    grad for the rest of its region and frees it when the region ends; a graph captured in the same region as its
    warm-up would read the warm-up's cached copies, made outside the graph, and replay from freed memory ever
    after (PyTorch's make_graphed_callables refuses autocast's cache for this reason). Without the cache the
    capture records its own casts. (Sampling's networks are frozen, so their weights never enter the cache.)"""
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensor arguments of a call, in one fixed order (keyword arguments sorted by name)."""
    return [a for a in (*args, *(kwargs[k] for k in sorted(kwargs))) if isinstance(a, Tensor)]


def speed_up(module: nn.Module, device: torch.device, *, compile: bool = False, cuda_graphs: bool = False) -> nn.Module:
    """`--compile` and `--cuda-graphs` for an inference network whose weights are final, in place:
    compiled (`compile_module`), with compile's own CUDA graphs when both are asked for;
    captured by `capture_cuda_graphs` when only graphs are. On the CPU always channels-last first
    (`inference_layout`)."""
    check_cuda_graphs(cuda_graphs, device)
    check_compile(compile, device)
    inference_layout(module, device)
    if compile and cuda_graphs:
        # Compile's CUDA graphs hand back tensors in the graph's own memory, which the next replay
        # overwrites; a sampler keeps past outputs (PNDM's history), so each call returns a copy.
        module.forward = OwnedOutputs(torch.compile(module.forward, mode="reduce-overhead"))
        return module
    if compile:
        return compile_module(module)
    return capture_cuda_graphs(module) if cuda_graphs else module


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout our networks' inference runs fastest in on `device`: channels-last on the CPU, where
    oneDNN's convolutions are faster in it for our U-Nets, autoencoders, ResNet-18 and the FID Inception (forward
    alone, alternating in one process, 2-core Intel Xeon with AMX: the U-Net 1.07-1.33x, the autoencoders
    1.10-2.41x but for one case at 0.94x, the kl-f8 in bf16 2.2-2.4x, ResNet-18 0.98-1.28x in fp32 and
    1.40-1.77x in bf16; `python -m bench` chose it for sampling and the autoencoder on all three CPUs measured,
    docs/speed.md). The default layout elsewhere: on CUDA it is unmeasured."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def inference_layout(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` in place in `inference_memory_format(device)` where that is channels-last (elsewhere its layout is
    left as it is). The values computed are the same up to float rounding."""
    if inference_memory_format(device) == torch.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


class OwnedOutputs:
    """A forward whose tensor results are copies the caller owns (see `speed_up`)."""

    def __init__(self, forward: Callable[..., Any]):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.forward(*args, **kwargs)
        return out.clone() if isinstance(out, Tensor) else out


def check_compile(compile: bool, device: torch.device) -> None:
    """Refuse `--compile` where Inductor cannot build what it generates, before any work: its CPU kernels
    (and the C++ wrapper) are C++, and on CUDA Triton builds each kernel's launcher with a C compiler."""
    if not compile:
        return
    if device.type == "cpu":
        missing = _cpp_compiler_missing()
        if missing:
            raise UserError(f"--compile needs a working C++ compiler on the CPU (g++, or the one the CXX variable "
                            f"names), and none was found ({missing}); install one or drop --compile.")
    # Triton's own choice: the compiler CC names if it is set, else gcc, else clang.
    elif not (shutil.which(os.environ["CC"]) if os.environ.get("CC") else shutil.which("gcc") or shutil.which("clang")):
        raise UserError("--compile needs a C compiler for Triton's kernel launchers (the one the CC variable names, "
                        "else gcc or clang), and none was found; install one or drop --compile.")


@functools.cache
def _cpp_compiler_missing() -> str:
    """Why Inductor would find no C++ compiler ("" when it finds one). It probes the compiler (CXX, else g++),
    tens of milliseconds, so a command that checks --compile twice (at start-up, then where it compiles) pays once."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()
    except Exception as err:  # InvalidCxxCompiler, or whatever a broken compiler makes the probe raise
        return type(err).__name__
    return ""


def check_cuda_graphs(cuda_graphs: bool, device: torch.device) -> None:
    """Refuse `--cuda-graphs` where there is no CUDA device, before any work."""
    if cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs captures CUDA kernel launches, and this run is on {device.type}; drop it "
                        f"(use --compile to speed up CPU sampling).")
