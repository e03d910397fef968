"""Guidance wrappers: they turn a conditional network into the plain `model(x_t, t) -> eps` that samplers take."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ddpm.samplers import Model


def classifier_free_guidance(model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_ref + scale * (eps_cond - eps_ref).

    `model_fn(x, t, reference_mask)` returns eps, conditioned on each sample's own condition where the
    bool (B,) `reference_mask` is False and on the reference condition where it is True. The
    reference is the null (unconditional) embedding in the paper; diffusion inversion guides against
    another one, the mean of its learned embeddings (Zhou et al. 2023), with the same formula.
    `scale` is the paper's 1 + w: 1 is the plain conditional model, 0 the reference one, and each of
    those takes a single call of batch B. Any other scale runs one call of batch 2B: x repeated
    twice, the first half conditional and the second on the reference; a `model_fn` that closes over
    per-sample conditions must tile them to match (e.g. `labels.repeat(len(x) // len(labels))`).
    """

    def model(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        assert t.shape == (b,), f"t must have shape ({b},), got {tuple(t.shape)}"
        if scale == 1:
            return model_fn(x, t, torch.zeros(b, dtype=torch.bool, device=x.device))
        if scale == 0:
            return model_fn(x, t, torch.ones(b, dtype=torch.bool, device=x.device))
        reference_mask = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        eps = model_fn(torch.cat([x, x]), torch.cat([t, t]), reference_mask)
        assert eps.shape == (2 * b, *x.shape[1:]), f"model_fn returned {tuple(eps.shape)} for a batch of {2 * b}"
        eps_cond, eps_ref = eps.chunk(2)
        return eps_ref + scale * (eps_cond - eps_ref)

    return model
