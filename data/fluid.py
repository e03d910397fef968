"""Incompressible 2D flow on a grid: the two operators of Stam's "Stable Fluids".

Advection is semi-Lagrangian (Stam, "Stable Fluids", SIGGRAPH 1999): every cell traces back along
the velocity for one time step and bilinearly interpolates the old field there, which is stable for
any step size. The pressure projection removes the divergent part of the velocity (Helmholtz-Hodge
decomposition); on a periodic domain the Poisson solve is diagonal in Fourier space, so it is done
exactly with one FFT pair (Stam, "A Simple Fluid Solver based on the FFT", JGT 2001) instead of
Jacobi iterations whose count would have to grow with the grid. Callers absorb whatever reaches the
edges (see `data.plumes`), so the periodic wrap of the projection is never seen.

All tensors are batched over independent simulations and laid out like images: (B, C, H, W), row 0 at
the top. Velocity is (B, 2, H, W): channel 0 is the x (column) component, channel 1 the y (row)
component, both in cells per unit time, so "up" is negative y.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def advect(fields: torch.Tensor, velocity: torch.Tensor, dt: float) -> torch.Tensor:
    """Carry `fields` (B, C, H, W) along `velocity` (B, 2, H, W) for time `dt` (bilinear back-trace).

    A back-trace that leaves the grid reads the nearest edge value instead of wrapping around: callers
    keep an absorbing margin at the edges, and this lets one fused `grid_sample` do the interpolation.
    """
    b, c, h, w = fields.shape
    assert velocity.shape == (b, 2, h, w), f"velocity {tuple(velocity.shape)} does not match fields {tuple(fields.shape)}"
    ys = torch.arange(h, dtype=velocity.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=velocity.dtype).view(1, 1, w)
    # Departure points in grid_sample's [-1, 1] coordinates (align_corners=True: -1 and 1 are cell centres).
    x = (xs - dt * velocity[:, 0]) * (2 / (w - 1)) - 1
    y = (ys - dt * velocity[:, 1]) * (2 / (h - 1)) - 1
    return F.grid_sample(fields, torch.stack((x, y), dim=-1), mode="bilinear", padding_mode="border", align_corners=True)


def divergence(velocity: torch.Tensor) -> torch.Tensor:
    """Central-difference divergence (B, H, W) of a periodic velocity field (B, 2, H, W)."""
    assert velocity.dim() == 4 and velocity.shape[1] == 2, f"expected (B, 2, H, W), got {tuple(velocity.shape)}"
    u, v = velocity[:, 0], velocity[:, 1]
    return 0.5 * (u.roll(-1, dims=2) - u.roll(1, dims=2) + v.roll(-1, dims=1) - v.roll(1, dims=1))


def _difference_symbol(n: int, half: bool) -> torch.Tensor:
    """Fourier symbol (without the factor i) of the central difference (f[k+1] - f[k-1]) / 2."""
    freqs = torch.fft.rfftfreq(n) if half else torch.fft.fftfreq(n)
    symbol = torch.sin(2 * math.pi * freqs.double())
    # sin(pi) is ~1e-16, not 0: snap it so the Nyquist mode counts as divergence-free, as it is.
    return torch.where(symbol.abs() < 1e-9, torch.zeros_like(symbol), symbol)


def project(velocity: torch.Tensor) -> torch.Tensor:
    """Make `velocity` (B, 2, H, W) divergence-free under `divergence`, keeping its mean (the wind).

    With d the symbol of the discrete gradient, the projection in Fourier space is
    u_hat <- u_hat - d (d . u_hat) / |d|^2: exactly the solve of the pressure Poisson equation built
    from the same differences that `divergence` measures, so the result's divergence is round-off.
    """
    b, two, h, w = velocity.shape
    assert two == 2, f"expected (B, 2, H, W), got {tuple(velocity.shape)}"
    spectrum = torch.fft.rfft2(velocity)
    sx = _difference_symbol(w, half=True).view(1, -1).to(velocity.dtype)
    sy = _difference_symbol(h, half=False).view(-1, 1).to(velocity.dtype)
    norm2 = sx**2 + sy**2
    # Modes the difference cannot see (the mean, Nyquist) carry no divergence: leave them alone.
    norm2 = torch.where(norm2 == 0, torch.ones_like(norm2), norm2)
    along_gradient = (sx * spectrum[:, 0] + sy * spectrum[:, 1]) / norm2
    spectrum = torch.stack((spectrum[:, 0] - sx * along_gradient, spectrum[:, 1] - sy * along_gradient), dim=1)
    return torch.fft.irfft2(spectrum, s=(h, w))
