"""The built-in `plumes` dataset: procedural smoke plumes, so the project works offline.

Each sample is a short 2D smoke simulation (Stam, "Stable Fluids", SIGGRAPH 1999: semi-Lagrangian
advection plus pressure projection, see `data.fluid`) driven by a hot, dense source near the bottom,
buoyancy (hot smoke rises, dense smoke sinks a little, Fedkiw et al., "Visual Simulation of Smoke",
SIGGRAPH 2001), a constant horizontal wind and small seeded turbulence, rendered as lit smoke on black.
The parameters a model can condition on are the wind and the source temperature.

Every random number of sample k comes from its own generator seeded with its own seed, so a sample is
the same whether simulated alone or in a batch. Datasets are cached as .npz under the cache directory,
batch by batch while they are simulated, so an interrupted simulation goes on where it stopped.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.cli import launched_rank
from core.errors import UserError
from core.lock import taking_turns
from core.runtime import atomic_write, check_fits_memory
from data.dataset import DatasetInfo, ImageDataset, param_ranges, resize_uint8, to_channels
from data.fluid import advect, project

# Bump whenever anything below changes what a seed renders to, so stale caches are not reused.
VERSION = 1
PARAM_NAMES = ("wind", "temperature")
WIND_RANGE = (-1.0, 1.0)          # the wind parameter; WIND_SPEED view-widths per unit time at 1
TEMPERATURE_RANGE = (1.0, 3.0)    # source temperature above ambient
DEFAULT_NUM_SAMPLES = 10_000
BATCH = 500

# Physics in view units (the visible square is 1 x 1) so the result does not depend on the grid.
MIN_GRID = 64        # coarser grids blur a plume away; smaller images are downsampled renders
MARGIN = 0.125       # hidden border on every side, where outflow is absorbed (the projection is periodic)
STEPS = 40
DT = 0.04
WIND_SPEED = 0.3
BUOYANCY = 1.8       # upward acceleration per unit temperature
WEIGHT = 0.3         # downward acceleration per unit density
COOLING = 0.8        # temperature decays as exp(-COOLING t)
SOURCE_Y = 0.88      # source centre, from the top of the view
SOURCE_RADIUS = 0.055
NOISE_CELLS = 6      # turbulence is drawn on a NOISE_CELLS^2 lattice and smoothly upsampled,
NOISE_EVERY = 4      # and held for this many steps: gusts, and a quarter of the upsampling cost
NOISE_STRENGTH = 1.0
OPACITY = 4.0        # per unit density
SHADOW = 3.0         # light absorbed per unit density per view height


def sample_seeds(seed: int, num_samples: int, train: bool) -> list[int]:
    """Per-sample simulation seeds; train and test splits never share one."""
    return [int(np.random.SeedSequence([seed, 0 if train else 1, k]).generate_state(1)[0]) for k in range(num_samples)]


def draw_inputs(seeds: Sequence[int]) -> dict[str, torch.Tensor]:
    """All random inputs of each sample from that sample's own generator, stacked over the batch."""
    draws = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        draws.append({
            "wind": WIND_RANGE[0] + (WIND_RANGE[1] - WIND_RANGE[0]) * torch.rand((), generator=g),
            "temperature": TEMPERATURE_RANGE[0] + (TEMPERATURE_RANGE[1] - TEMPERATURE_RANGE[0]) * torch.rand((), generator=g),
            "source_x": 0.5 + 0.08 * (2 * torch.rand((), generator=g) - 1),
            "flicker": 0.7 + 0.6 * torch.rand(STEPS, generator=g),
            "noise": torch.randn(math.ceil(STEPS / NOISE_EVERY), 2, NOISE_CELLS, NOISE_CELLS, generator=g),
        })
    return {key: torch.stack([d[key] for d in draws]) for key in draws[0]}


def simulate(seeds: Sequence[int], grid: int = MIN_GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One plume per seed on a `grid` x `grid` view: density and temperature (B, grid, grid), params (B, 2)."""
    b = len(seeds)
    r = draw_inputs(seeds)
    pad = round(MARGIN * grid)
    n = grid + 2 * pad
    cell = 1.0 / grid                                   # view units per cell
    coords = (torch.arange(n, dtype=torch.float32) - pad + 0.5) * cell
    y, x = coords.view(1, 1, n, 1), coords.view(1, 1, 1, n)
    source = torch.exp(-((x - r["source_x"].view(b, 1, 1, 1)) ** 2 + (y - SOURCE_Y) ** 2) / (2 * SOURCE_RADIUS**2))
    # Smoke is absorbed in the outer half of the margin, so nothing re-enters through the periodic edges.
    inside = ((coords > -0.5 * MARGIN) & (coords < 1 + 0.5 * MARGIN)).float()
    keep = (inside.view(n, 1) * inside.view(1, n)).view(1, 1, n, n)
    keep = F.avg_pool2d(F.pad(keep, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    keep = keep * torch.tensor([1.0, math.exp(-COOLING * DT)]).view(1, 2, 1, 1)
    # Per step, the source sets density to its flickering strength and temperature to the sample's.
    emission = torch.stack((r["flicker"], r["temperature"].view(b, 1).expand(b, STEPS)), dim=1)
    wind = torch.stack((WIND_SPEED * r["wind"] / cell, torch.zeros(b)), dim=1).view(b, 2, 1, 1)

    scalars = torch.zeros(b, 2, n, n)                   # channel 0 density, channel 1 temperature
    velocity = wind.expand(b, 2, n, n).clone()
    for step in range(STEPS):
        scalars = torch.maximum(scalars, source * emission[:, :, step].view(b, 2, 1, 1))
        if step % NOISE_EVERY == 0:
            gust = F.interpolate(r["noise"][:, step // NOISE_EVERY], size=(n, n), mode="bicubic", align_corners=False)
            gust = NOISE_STRENGTH * DT / cell * gust
        velocity = velocity + gust
        velocity[:, 1] -= DT / cell * (BUOYANCY * scalars[:, 1] - WEIGHT * scalars[:, 0])  # up is -y
        velocity = project(velocity)
        # The mean flow is the wind: buoyancy's net push is balanced by the (hydrostatic) background pressure.
        velocity += wind - velocity.mean(dim=(2, 3), keepdim=True)
        moved = advect(torch.cat((scalars, velocity), dim=1), velocity, DT)
        scalars, velocity = moved[:, :2] * keep, moved[:, 2:]
    view = scalars[:, :, pad:pad + grid, pad:pad + grid]
    params = torch.stack((r["wind"], r["temperature"]), dim=1).float()
    return view[:, 0], view[:, 1], params


def render(density: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Density and temperature (B, H, W) -> RGB (B, 3, H, W) in [0, 1]: lit, self-shadowed smoke on black."""
    b, h, w = density.shape
    assert temperature.shape == (b, h, w), f"temperature {tuple(temperature.shape)} != density {(b, h, w)}"
    d = density.clamp(min=0)
    # Light comes from above: each cell is shadowed by the smoke between it and the top of the image.
    above = (torch.cumsum(d, dim=1) - d) / h
    grey = 0.25 + 0.75 * torch.exp(-SHADOW * above)
    opacity = 1 - torch.exp(-OPACITY * d)
    # Hot smoke near the source glows warm; it fades to neutral grey as it cools.
    heat = 0.6 * (temperature.clamp(min=0) / TEMPERATURE_RANGE[1]).clamp(max=1) ** 2
    smoke = torch.tensor([0.92, 0.93, 0.96]).view(1, 3, 1, 1)
    glow = torch.tensor([1.0, 0.62, 0.3]).view(1, 3, 1, 1)
    colour = grey.unsqueeze(1) * torch.lerp(smoke, glow, heat.unsqueeze(1))
    return (opacity.unsqueeze(1) * colour).clamp(0, 1)


def generate(seeds: Sequence[int], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (B, 3, R, R) and params float32 (B, 2) [wind, temperature] for the given seeds."""
    density, temperature, params = simulate(seeds, grid=max(MIN_GRID, resolution))
    images = (render(density, temperature) * 255).round().to(torch.uint8)
    images = resize_uint8(images, resolution)
    assert images.shape == (len(seeds), 3, resolution, resolution) and params.shape == (len(seeds), 2)
    return images, params


def cache_path(cache_dir: str | Path, resolution: int, num_samples: int, seed: int, train: bool) -> Path:
    split = "train" if train else "test"
    return Path(cache_dir) / f"plumes-v{VERSION}-{split}-r{resolution}-n{num_samples}-s{seed}.npz"


def _read_cache(path: Path, num_samples: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(images, params, seeds) from a cache file, or None when it is missing, unreadable or the wrong shape."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, params, seeds = z["images"], z["params"], z["seeds"]
        if (images.shape != (num_samples, 3, resolution, resolution) or images.dtype != np.uint8
                or params.shape != (num_samples, len(PARAM_NAMES)) or seeds.shape != (num_samples,)):
            raise UserError(f"arrays of shapes {images.shape}, {params.shape}, {seeds.shape}")
        if not np.isfinite(params).all():
            raise UserError("NaN or infinite parameters")
    except MemoryError:
        raise  # the machine's limit, not the file's fault: the entry point says so
    except Exception as err:  # a damaged archive raises anything from BadZipFile to NotImplementedError
        # (compression) and RuntimeError (encryption flag); an interruption passes
        warnings.warn(f"Plume cache {path} is unreadable ({err}); regenerating it.", stacklevel=3)
        return None
    return torch.from_numpy(images), torch.from_numpy(params).float(), torch.from_numpy(seeds).long()


def _write_cache(path: Path, images: torch.Tensor, params: torch.Tensor, seeds: torch.Tensor) -> None:
    # All or nothing, so an interrupted run never leaves a truncated cache behind.
    atomic_write(path, lambda f: np.savez(f, images=images.numpy(), params=params.numpy(), seeds=seeds.numpy()))


def _part_path(path: Path, start: int, count: int) -> Path:
    return path.with_name(f"{path.stem}.part{start}-{start + count}.npz")


def _simulate_in_parts(path: Path, seeds: list[int], resolution: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simulate `seeds` batch by batch into the cache at `path`.

    Each finished batch is cached on its own first, so a run interrupted after hours of simulation
    goes on from the batches it finished; the parts are removed once the whole set is cached.
    """
    n = len(seeds)
    batches = [(start, seeds[start:start + BATCH]) for start in range(0, n, BATCH)]
    # A set of one batch is cached whole at once: a part of it would be the same file twice.
    part_paths = [_part_path(path, start, len(batch)) for start, batch in batches] if len(batches) > 1 else []
    parts = []
    for i, (start, batch) in enumerate(tqdm(batches, desc=f"Simulating {n} plumes at {resolution}x{resolution}",
                                            unit="batch", disable=launched_rank() > 0)):
        part = _read_cache(part_paths[i], len(batch), resolution) if part_paths else None
        if part is None or part[2].tolist() != batch:
            images, params = generate(batch, resolution)
            part = images, params, torch.tensor(batch, dtype=torch.int64)
            if part_paths:
                _write_cache(part_paths[i], *part)
        parts.append(part)
    whole = tuple(torch.cat([part[i] for part in parts]) for i in range(3))
    _write_cache(path, *whole)
    for part_path in part_paths:
        part_path.unlink(missing_ok=True)
    return whole


def load_plumes(resolution: int, cache_dir: str | Path, train: bool = True, num_samples: int | None = None,
                seed: int = 0, channels: int | None = None) -> ImageDataset:
    """The plumes dataset, read from the cache or simulated (with a progress bar) and cached."""
    n = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
    if n < 1:
        raise UserError(f"num_samples must be at least 1, got {n}.")
    check_fits_memory(n * 3 * resolution**2, torch.device("cpu"),  # the set is held whole, as bytes
                      f"{n:,} plumes at {resolution}x{resolution} as a dataset", "ask for fewer (--num-samples)")
    path = cache_path(cache_dir, resolution, n, seed, train)
    cached = _read_cache(path, n, resolution)
    if cached is None:
        # One process simulates; any other that wants the same set (a torchrun job's ranks) waits, then reads it.
        with taking_turns(path.with_name(path.name + ".lock"), f"the plumes of {path}"):
            cached = _read_cache(path, n, resolution)
            if cached is None:
                cached = _simulate_in_parts(path, sample_seeds(seed, n, train), resolution)
    images, params, seeds = cached
    images = to_channels(images, channels or 3)
    info = DatasetInfo(name="plumes", resolution=resolution, channels=images.shape[1], class_names=(),
                       param_names=PARAM_NAMES, param_ranges=param_ranges(params), num_samples=n)
    return ImageDataset(images, torch.zeros(n, dtype=torch.int64), params, info, seeds=seeds)
