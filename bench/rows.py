"""The rows of `python -m bench`: each builds our network and its peer at one configuration and
measures them side by side, in one process, alternating.

Every row function takes a `Plan` (device, quick or thorough, the candidate settings) and returns
`Row`s. `compare` does the measuring all rows share: it times our step under every candidate
setting and the peer's step at its defaults in turn, A B C A B C, and keeps our fastest.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import alternating_seconds, peak_memory_bytes
from bench.device import FP32, Settings, peaks
from bench.peers import (diffusers_autoencoder, diffusers_ddim, diffusers_unet, missing, parameter_count,
                         torchvision_resnet18_cifar)
from bench.table import Row
from core.contract import Trainable
from core.runtime import autocast
from data import DatasetInfo
from ddpm.config import PRESETS as DDPM_PRESETS, SamplingConfig
from ddpm.generate import DiffusionSampler, sample
from ddpm.unet import UNet
from training.loop import make_optimizer

Step = Callable[[], object]
GUIDANCE_SCALE = 2.0  # classifier-free guidance scale of the sampling rows (1 + w; 2: a typical strength)
NUM_CLASSES = 10


@dataclass(frozen=True)
class Plan:
    """How hard to measure: where, how many timed rounds, and which of our settings to try."""
    device: torch.device
    quick: bool
    candidates: tuple[Settings, ...]  # the first is plain fp32
    repeats: int                      # timed rounds per row (the median is kept)
    warmup: int                       # untimed rounds after the memory pass (itself a warm-up)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def pick(self, cuda: int, cpu: int, quick_cpu: int, quick_cuda: int | None = None) -> int:
        """A batch size (or image side) for this device and mode."""
        if self.cuda:
            return quick_cuda if self.quick and quick_cuda is not None else cuda
        return quick_cpu if self.quick else cpu


def prepared(net: nn.Module, settings: Settings,
             compiled_parts: Callable[[nn.Module], Iterable[nn.Module]] = lambda net: [net]) -> nn.Module:
    """`net` in the memory format `settings` asks for, and compiled (in place) if it asks for that.

    Compilation acts on a module's forward, so a network used through other methods (the autoencoder's
    encode and decode) names the submodules those call in `compiled_parts`.
    """
    if settings.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if settings.compile:
        from core.speed import compile_module
        for part in compiled_parts(net):
            compile_module(part)
    return net


def layout(x: torch.Tensor, settings: Settings) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if settings.channels_last and x.dim() == 4 else x


def compare(plan: Plan, name: str, size: str, images: int, ours: Callable[[Settings], Step], peer_name: str,
            peer: Callable[[], Step] | None, candidates: tuple[Settings, ...] | None = None, notes: str = "") -> Row:
    """Measure `ours(settings)` for every candidate and `peer()` side by side; `images` per call.

    A candidate other than plain fp32 that fails (e.g. compilation on a machine without a compiler)
    is dropped with a note rather than failing the row.
    """
    candidates = candidates or plan.candidates
    steps: dict[str, Step] = {}
    memory: dict[str, int | None] = {}
    dropped = []
    for settings in candidates:
        try:
            torch.manual_seed(0)
            step = ours(settings)
            memory[settings.label] = peak_memory_bytes(step, plan.device)  # also the first warm-up call
            steps[settings.label] = step
        except Exception as err:  # noqa: BLE001 -- any failure of an optional setting only removes it
            if settings == FP32:
                raise
            dropped.append(f"{settings.label} failed ({type(err).__name__})")
    if peer is not None:
        torch.manual_seed(0)
        steps["peer"] = peer()
        memory["peer"] = peak_memory_bytes(steps["peer"], plan.device)
    seconds = alternating_seconds(steps, plan.device, plan.repeats, plan.warmup)
    rates = {label: images / s for label, s in seconds.items()}
    fastest = max((s for s in candidates if s.label in rates), key=lambda s: rates[s.label])
    best_fp32 = max((s for s in candidates if s.label in rates and s.dtype is None), key=lambda s: rates[s.label])
    return Row(name=name, size=size, ours_fp32=rates[FP32.label], ours_fastest=rates[fastest.label],
               settings=fastest.label, peer=peer_name, peer_default=rates.get("peer"),
               memory=(memory[FP32.label], memory[fastest.label], memory.get("peer")),
               notes="; ".join(filter(None, [notes, *dropped])),
               best_fp32=rates[best_fp32.label], best_fp32_settings=best_fp32.label)


def _millions(net: nn.Module) -> str:
    return f"{parameter_count(net) / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------
# pixel diffusion: U-Net training step, DDIM sampling with classifier-free guidance


def unet_train(plan: Plan, preset: str) -> Row:
    """One full training step (forward, backward, AdamW) of the preset's U-Net against diffusers' UNet2DModel
    of the same configuration, on random images. The peer's loss is the same L_simple written the way a
    diffusers training script writes it (noise the images, MSE against the noise)."""
    config = DDPM_PRESETS[preset]()
    device, unet, train = plan.device, config.unet, config.train
    batch = plan.pick(cuda=train.batch_size, cpu=16, quick_cpu=4 if unet.base_channels >= 128 else 8)
    schedule = config.diffusion.make_schedule().to(device)
    torch.manual_seed(0)
    base = UNet(unet).to(device)
    x0 = torch.rand(batch, unet.in_channels, unet.image_size, unet.image_size, device=device) * 2 - 1

    def ours(settings: Settings) -> Step:
        net = prepared(copy.deepcopy(base).train(), settings)
        # Our training loop's optimizer (fused AdamW); the peer's is PyTorch's AdamW as shipped.
        opt = make_optimizer(Trainable(net, lr=train.lr, weight_decay=train.weight_decay), net, device)
        x = layout(x0, settings)

        def step():
            t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
            with autocast(device, settings.dtype):
                loss = schedule.training_losses(net, x, t, torch.randn_like(x), config.diffusion.prediction).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def peer() -> Step:
        net = diffusers_unet(unet, base).to(device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)

        def step():
            t = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
            noise = torch.randn_like(x0)
            loss = F.mse_loss(net(schedule.q_sample(x0, t, noise), t).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    absent = missing("diffusers")
    row = compare(plan, "U-Net train step (fwd+bwd+AdamW)", f"{preset} {_millions(base)}, batch {batch}", batch, ours,
                  absent or "diffusers UNet2DModel", None if absent else peer)
    if plan.cuda and preset == "ddpm-cifar10":
        row.notes = "; ".join(filter(None, [row.notes, _mfu(ours, row, batch, plan.device)]))
    return row


def _mfu(ours: Callable[[Settings], Step], row: Row, batch: int, device: torch.device) -> str:
    """Model FLOP utilisation of the fastest training step: FLOPs of one step (counted by PyTorch's
    FlopCounterMode on an eager fp32 step; the count does not depend on the dtype) times steps/s, over
    the GPU's dense bf16 peak."""
    from torch.utils.flop_counter import FlopCounterMode
    step = ours(FP32)
    with FlopCounterMode(display=False) as counter:
        step()
    achieved = counter.get_total_flops() * row.ours_fastest / batch
    peak = peaks(device).bf16_flops
    if "bf16" not in row.settings:
        return f"{achieved / 1e12:.1f} TFLOP/s (fastest is not bf16: no MFU)"
    if peak is None:
        return f"{achieved / 1e12:.1f} TFLOP/s (bf16 peak of this GPU unknown: no MFU)"
    return f"MFU {100 * achieved / peak:.0f}% ({achieved / 1e12:.0f} of {peak / 1e12:.0f} TFLOP/s bf16 dense)"


def ddim_guided(plan: Plan, preset: str) -> Row:
    """DDIM-50 sampling with classifier-free guidance (scale 2: one network call of batch 2B per step) of a
    class-conditional U-Net of the preset's shape, through ddpm.generate, against diffusers' UNet2DModel with
    class embeddings (the extra one is the null class) driven by DDIMScheduler in the usual guidance loop."""
    config = DDPM_PRESETS[preset]()
    device, diffusion = plan.device, config.diffusion
    unet = dataclasses.replace(config.unet, cond="class", num_classes=NUM_CLASSES)
    batch = plan.pick(cuda=64, cpu=4, quick_cpu=2, quick_cuda=32)
    # A quick CPU run takes 10 steps: the time per step, and so the ratio, is the same, and a small
    # network's 50 steps cost minutes on a busy 2-core machine.
    steps = plan.pick(cuda=50, cpu=50, quick_cpu=10)
    schedule = diffusion.make_schedule().to(device)
    torch.manual_seed(0)
    base = UNet(unet).to(device).eval().requires_grad_(False)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    info = DatasetInfo("bench", unet.image_size, unet.in_channels, tuple(map(str, range(NUM_CLASSES))), (), (), 1)
    sampling = SamplingConfig(sampler="ddim", steps=steps, guidance_scale=GUIDANCE_SCALE)

    def ours(settings: Settings) -> Step:
        net = prepared(copy.deepcopy(base), settings)
        model = DiffusionSampler(net, schedule, diffusion.prediction, info)
        return lambda: sample(model, sampling, range(batch), cond=labels, amp_dtype=settings.dtype)

    def peer() -> Step:
        net = diffusers_unet(unet, base).to(device).eval()
        scheduler = diffusers_ddim(schedule, diffusion.prediction)
        guided_labels = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])  # conditional | null

        @torch.no_grad()
        def draw():
            x = torch.randn(batch, unet.in_channels, unet.image_size, unet.image_size,
                            generator=torch.Generator().manual_seed(0)).to(device)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                out_cond, out_null = net(torch.cat([x, x]), t, class_labels=guided_labels).sample.chunk(2)
                guided = out_null + GUIDANCE_SCALE * (out_cond - out_null)
                x = scheduler.step(guided, t, x, use_clipped_model_output=True).prev_sample
            return x
        return draw

    absent = missing("diffusers")
    return compare(plan, f"DDIM-{steps} sampling, guidance {GUIDANCE_SCALE:g}",
                   f"{preset} shape, {NUM_CLASSES} classes, {_millions(base)}, batch {batch} ({2 * batch} per call)",
                   batch, ours, absent or "diffusers UNet2DModel + DDIMScheduler", None if absent else peer,
                   notes="" if steps == 50 else f"quick: {steps} steps (DDIM-50 draws {steps / 50:g}x these img/s)")


# ---------------------------------------------------------------------------------------------
# latent diffusion's autoencoder and its perceptual loss


def autoencoder(plan: Plan, preset: str = "kl-f8") -> list[Row]:
    """Encode (image -> posterior) and decode (latent -> image) of the preset's autoencoder against diffusers'
    AutoencoderKL of the same configuration, under no_grad as both are used for inference."""
    from vae.autoencoder import AutoencoderKL
    from vae.config import PRESETS as VAE_PRESETS
    config = VAE_PRESETS[preset]().autoencoder
    device = plan.device
    side = plan.pick(cuda=512, cpu=128, quick_cpu=64, quick_cuda=256)
    batch = plan.pick(cuda=8, cpu=2, quick_cpu=2)
    f = config.downsampling_factor
    torch.manual_seed(0)
    base = AutoencoderKL(config).to(device).eval().requires_grad_(False)
    x = torch.rand(batch, config.in_channels, side, side, device=device) * 2 - 1
    z = torch.randn(batch, config.latent_channels, side // f, side // f, device=device)
    absent = missing("diffusers")
    rows = []
    for direction in ("encode", "decode"):
        def ours(settings: Settings, direction=direction) -> Step:
            net = prepared(copy.deepcopy(base), settings, lambda net: (net.encoder, net.decoder))
            run, inputs = (net.encode, x) if direction == "encode" else (net.decode, z)
            inputs = layout(inputs, settings)

            @torch.no_grad()
            def step():
                with autocast(device, settings.dtype):
                    return run(inputs)
            return step

        def peer(direction=direction) -> Step:
            net = diffusers_autoencoder(config, base).to(device).eval()
            if direction == "encode":
                return torch.no_grad()(lambda: net.encode(x).latent_dist)
            return torch.no_grad()(lambda: net.decode(z).sample)

        size = f"{preset} {_millions(base)}, {side} px, batch {batch}"
        rows.append(compare(plan, f"autoencoder {direction}", size, batch, ours,
                            absent or "diffusers AutoencoderKL", None if absent else peer))
    return rows


def lpips(plan: Plan) -> Row:
    """LPIPS forward and backward (the gradient reaches the reconstruction, as in autoencoder training) at
    64 px, our network with random weights (`build_perceptual("random")`), against the `lpips` package where
    it is installed (same VGG-16 trunk, random too: no weights are downloaded)."""
    from vae.perceptual import build_perceptual
    device, side = plan.device, 64
    batch = plan.pick(cuda=64, cpu=8, quick_cpu=4)
    x = torch.rand(batch, 3, side, side, device=device) * 2 - 1
    y = torch.rand(batch, 3, side, side, device=device) * 2 - 1
    base = build_perceptual("random").to(device)
    # Our trunk is channels_last already: the memory-format candidates would measure the same thing twice.
    candidates = tuple(dict.fromkeys(dataclasses.replace(s, channels_last=False) for s in plan.candidates))

    def gradient_step(net: nn.Module, dtype: torch.dtype | None) -> Step:
        def step():
            recon = x.clone().requires_grad_(True)
            with autocast(device, dtype):
                distance = net(recon, y).float().sum()
            return torch.autograd.grad(distance, recon)[0]
        return step

    def ours(settings: Settings) -> Step:
        return gradient_step(prepared(copy.deepcopy(base), settings), settings.dtype)

    def peer() -> Step:
        import lpips as lpips_package
        net = lpips_package.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).to(device)
        return gradient_step(net.requires_grad_(False), None)

    absent = importlib.util.find_spec("lpips") is None
    return compare(plan, "LPIPS fwd+bwd", f"VGG-16, 5 taps, random weights, {side} px, batch {batch}", batch, ours,
                   "no peer (lpips not installed)" if absent else "lpips package", None if absent else peer, candidates,
                   notes="our trunk runs channels_last in every setting")


# ---------------------------------------------------------------------------------------------
# judging the data: FID features, the ResNet-18 classifier


def fid_features(plan: Plan) -> Row:
    """Our FID Inception features against pytorch-fid's, same random weights, same images: bench/bench_fid.py's
    `fid_features_row`, which times the two A B A B and reports how far their features differ (they must not)."""
    count = plan.pick(cuda=500, cpu=16, quick_cpu=4, quick_cuda=200)
    compiled = any(s.compile for s in plan.candidates)
    name, size = "FID features (Inception)", f"{count} images of 32 px, batch {min(count, 50)}"
    try:
        from bench.bench_fid import fid_features_row
    except ImportError:
        return Row(name, size, None, None, "-", "pytorch-fid", notes="bench/bench_fid.py is missing: not measured")
    result = fid_features_row(plan.device, count, plan.repeats, batch_size=min(count, 50), compile=compiled)
    return fid_row(result, name, size)


def fid_row(result: dict, name: str, size: str) -> Row:
    """A `Row` from what `fid_features_row` returns: ours (eager, and compiled when asked) and pytorch-fid's
    img/s, and the largest absolute difference between the features."""
    eager, compiled = result["ours_img_per_s"], result.get("ours_compiled_img_per_s")
    fastest, settings = (compiled, "fp32 + compile") if compiled and compiled > eager else (eager, "fp32")
    difference = result.get("max_abs_diff")
    notes = [] if difference is None else [f"max abs feature difference {difference:.1e}"]
    if compiled is not None:
        notes.append(f"compiled vs eager {result['max_abs_diff_compiled']:.1e}")
    return Row(name, size, eager, fastest, settings, result.get("peer_note") or "pytorch-fid",
               result.get("peer_img_per_s"), notes="; ".join(notes), best_fp32=fastest, best_fp32_settings=settings)


def resnet18(plan: Plan) -> Row:
    """One SGD step (Nesterov momentum, label-smoothed cross-entropy: the resnet18-cifar10 recipe) of our
    classifier, torchvision's ResNet-18 with the CIFAR stem at 32 px, against the same torchvision network
    built and run with PyTorch's defaults."""
    from classify.config import PRESETS as CLASSIFY_PRESETS
    from classify.model import ClassifierConfig, build_resnet18
    config = CLASSIFY_PRESETS["resnet18-cifar10"]()
    device, options, train = plan.device, config.classify, config.train
    batch = plan.pick(cuda=train.batch_size, cpu=32, quick_cpu=16)
    images = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    sgd = dict(lr=train.lr, momentum=options.momentum, nesterov=options.nesterov, weight_decay=train.weight_decay)

    def train_step(net: nn.Module, settings: Settings, opt: torch.optim.Optimizer) -> Step:
        x = layout(images, settings)

        def step():
            with autocast(device, settings.dtype):
                out = net(x)
            loss = F.cross_entropy(out.float(), labels, label_smoothing=options.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def ours(settings: Settings) -> Step:
        torch.manual_seed(0)
        net = prepared(build_resnet18(ClassifierConfig(target="class", num_outputs=NUM_CLASSES), 32).to(device).train(),
                       settings)
        # Our training loop's optimizer (fused SGD); the peer's is PyTorch's SGD as shipped.
        return train_step(net, settings, make_optimizer(Trainable(net, optimizer="sgd", **sgd), net, device))

    def peer() -> Step:
        torch.manual_seed(0)
        net = torchvision_resnet18_cifar(NUM_CLASSES).to(device).train()
        return train_step(net, FP32, torch.optim.SGD(net.parameters(), **sgd))

    return compare(plan, "ResNet-18 train step (SGD)", f"CIFAR stem, 32 px, batch {batch}", batch, ours,
                   "torchvision resnet18, defaults", peer)
