"""Guidance wrappers: they turn a conditional network into the plain `model(x_t, t) -> eps` that samplers take."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ddpm.samplers import Model


def classifier_free_guidance(model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], scale: float) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_uncond + scale * (eps_cond - eps_uncond).

    `model_fn(x, t, null_mask)` returns eps, using the null (unconditional) embedding where the bool (B,)
    `null_mask` is True. `scale` is the paper's 1 + w: 1 is the plain conditional model, 0 the unconditional
    one, and each of those takes a single call of batch B. Any other scale runs one call of batch 2B: x
    repeated twice, the first half conditional and the second null; a `model_fn` that closes over per-sample
    labels must tile them to match (e.g. `labels.repeat(len(x) // len(labels))`).
    """

    def model(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        assert t.shape == (b,), f"t must have shape ({b},), got {tuple(t.shape)}"
        if scale == 1:
            return model_fn(x, t, torch.zeros(b, dtype=torch.bool, device=x.device))
        if scale == 0:
            return model_fn(x, t, torch.ones(b, dtype=torch.bool, device=x.device))
        null_mask = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        eps = model_fn(torch.cat([x, x]), torch.cat([t, t]), null_mask)
        assert eps.shape == (2 * b, *x.shape[1:]), f"model_fn returned {tuple(eps.shape)} for a batch of {2 * b}"
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return model
