"""What the benchmark needs to know about the machine: its name, the settings worth trying on it, and
its published peaks (bf16 dense tensor FLOP/s, memory bandwidth) for utilisation figures."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.runtime import cpu_computes_bf16, cpu_has_amx

# Published dense peaks, from the vendors' data sheets: (name fragment as torch.cuda.get_device_name
# spells it, bf16 tensor-core FLOP/s without sparsity, with fp32 accumulation; memory bandwidth B/s).
# First match wins, so the more specific fragments come first. A GPU not listed gets no utilisation.
GPU_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),          # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),
    ("L40S", 362e12, 0.864e12),
    ("L40", 181e12, 0.864e12),
    ("L4", 121e12, 0.3e12),
    ("RTX 4090", 165e12, 1.008e12),
    ("RTX 3090", 71e12, 0.936e12),
)


@dataclass(frozen=True)
class Peaks:
    bf16_flops: float | None   # dense bf16 FLOP/s
    bandwidth: float | None    # bytes/s


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (the processor string elsewhere) with the
    vector instructions PyTorch uses on it and whether it computes bf16 natively.

    Virtual machines often report a bare family name ("AMD EPYC") for CPUs as different as an AVX2 Zen 1
    and an AVX512-BF16 Zen 4, whose fp32 and bf16 speeds differ several-fold: the instruction set keeps
    their results apart.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    model = match[1].strip() if match else (platform.processor() or platform.machine() or "CPU")
    amx = ", AMX" if cpu_has_amx() else ""  # (changes which attention form is faster: kernels.attention)
    bf16 = ", native bf16" if cpu_computes_bf16() else ""
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}{amx}{bf16})"


def file_stem(name: str) -> str:
    """A device name as a file name: letters, digits, dots, dashes and underscores only, without trademark signs."""
    name = re.sub(r"\((R|TM)\)", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "device"


def peaks(device: torch.device) -> Peaks:
    if device.type != "cuda":
        return Peaks(None, None)
    name = torch.cuda.get_device_name(device)
    for fragment, flops, bandwidth in GPU_PEAKS:
        if fragment in name:
            return Peaks(flops, bandwidth)
    return Peaks(None, None)


@dataclass(frozen=True)
class Settings:
    """One way to run our code: autocast dtype, memory format, compilation."""
    dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    channels_last: bool = False       # weights and inputs in NHWC, the layout oneDNN and cuDNN prefer
    compile: bool = False             # torch.compile (inductor)

    @property
    def label(self) -> str:
        parts = [{None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.dtype]]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compile")
        return " + ".join(parts)


FP32 = Settings()


def candidate_settings(device: torch.device, quick: bool) -> list[Settings]:
    """Plain fp32 first, then what may be faster on this device; each row measures them all and keeps the fastest.

    bf16 only where it is computed natively (CUDA, or a CPU with AVX512-BF16 / AMX: elsewhere PyTorch
    emulates it, many times slower); compilation everywhere but in a quick run on the CPU, where
    compiling alone takes minutes and only fp32 and the likeliest winner are tried.
    """
    if device.type == "cuda":
        bf16 = torch.bfloat16
        extra = [] if quick else [Settings(channels_last=True), Settings(bf16)]
        return [FP32, *extra, Settings(bf16, channels_last=True), Settings(bf16, channels_last=True, compile=True)]
    bf16 = torch.bfloat16 if cpu_computes_bf16() else None
    if quick:  # the likeliest winner only: a quick run on a small CPU has no time for the rest
        return [FP32, Settings(bf16, channels_last=True)]
    candidates = [FP32, Settings(channels_last=True), Settings(channels_last=True, compile=True)]
    if bf16 is not None:
        candidates += [Settings(bf16), Settings(bf16, channels_last=True), Settings(bf16, channels_last=True, compile=True)]
    return candidates
