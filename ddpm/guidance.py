"""Guidance wrappers: they turn a conditional network into the plain `model(x_t, t) -> eps` that samplers take."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import Tensor

from ddpm.samplers import GuidedEps, GuidedModel


class ClassifierFreeGuidance:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_ref + scale * (eps_cond - eps_ref).

    `model_fn(x, t, reference_mask)` returns eps (a `model_fn` that also takes `float64=True` is asked for eps
    in float64 near pure noise, where `ddpm.samplers` wants it; one without is not), conditioned on each
    sample's own condition where the bool (B,) `reference_mask` is False and on the reference condition
    where it is True. The
    reference is the null (unconditional) embedding in the paper; diffusion inversion guides against
    another one, the mean of its learned embeddings (Zhou et al. 2023), with the same formula.
    `scale` is the paper's 1 + w: 1 is the plain conditional model, 0 the reference one, and each of
    those takes a single call of batch B. Any other scale runs one call of batch 2B: x repeated
    twice, the first half conditional and the second on the reference; a `model_fn` that closes over
    per-sample conditions must tile them to match (e.g. `labels.repeat(len(x) // len(labels))`).

    Called, it is a plain `Model`. It is also a `GuidedModel`: the samplers take its two halves from
    `guided_eps` and combine them in the same fused step as their update, saving a pass over both.
    """

    def __init__(self, model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], scale: float):
        self.model_fn = model_fn
        self.scale = scale
        self.gives_float64 = _takes_keyword(model_fn, "float64")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        eps = self.guided_eps(x, t)
        return eps.combined() if isinstance(eps, GuidedEps) else eps

    def guided_eps(self, x: Tensor, t: Tensor, float64: bool = False) -> Tensor | GuidedEps:
        """The halves (eps_cond, eps_ref) to combine, or the one eps that scale 1 or 0 needs; with float64,
        `model_fn` is called with float64=True where it takes it (eps in float64 near pure noise: `ddpm.samplers`)."""
        b = x.shape[0]
        assert t.shape == (b,), f"t must have shape ({b},), got {tuple(t.shape)}"
        model_fn = functools.partial(self.model_fn, float64=True) if float64 and self.gives_float64 else self.model_fn
        if self.scale == 1:
            return model_fn(x, t, torch.zeros(b, dtype=torch.bool, device=x.device))
        if self.scale == 0:
            return model_fn(x, t, torch.ones(b, dtype=torch.bool, device=x.device))
        reference_mask = torch.arange(2 * b, device=x.device) >= b  # made there: a copy to a GPU would wait for it
        eps = model_fn(torch.cat([x, x]), torch.cat([t, t]), reference_mask)
        assert eps.shape == (2 * b, *x.shape[1:]), f"model_fn returned {tuple(eps.shape)} for a batch of {2 * b}"
        eps_cond, eps_ref = eps.chunk(2)
        return GuidedEps(eps_cond, eps_ref, self.scale)


def _takes_keyword(fn: Callable, name: str) -> bool:
    """Whether `fn` accepts the keyword argument `name` (by name, or through **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature Python can read: call it plainly
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
               for p in parameters)


def classifier_free_guidance(model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], scale: float) -> GuidedModel:
    """`model_fn` guided with `scale` (see `ClassifierFreeGuidance`), as the model the samplers take."""
    return ClassifierFreeGuidance(model_fn, scale)
