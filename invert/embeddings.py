"""The table of learned vectors, one per real image, and where each vector starts.

A vector lives in the U-Net's conditioning slot (`UNet.forward(..., cond_emb=)`: added to the time
embedding, where a class's or a parameter vector's embedding would go), so it needs no change to the
network. It starts from what the model already knows about its image, its class embedding or the
embedding of its parameters, when the real data's class or parameter names are the model's; else
from the learned null embedding, the model's "any image".
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data import DatasetInfo
from ddpm.unet import UNet

# A vector this many times the RMS of the model's own embeddings drowns the time embedding it is added to:
# the inversion has diverged. AdamW moves an element by about --lr per visit, so at the presets' 3e-2 and
# ~40 visits a vector stays within a few times that RMS; an absurd --lr takes it to 1e7 in a step.
DIVERGED_RMS = 100.0


class EmbeddingStore(nn.Module):
    """N learned vectors of width E; `store(index)` gives the rows of a batch's images."""

    def __init__(self, initial: Tensor):
        super().__init__()
        assert initial.ndim == 2, f"initial embeddings must be (N, E), got {tuple(initial.shape)}"
        self.weight = nn.Parameter(initial.detach().clone().float())

    def forward(self, index: Tensor) -> Tensor:
        return self.weight[index]

    @torch.no_grad()
    def largest_rms(self) -> float:
        """The root mean square of the largest vector (NaN if any holds a NaN)."""
        return self.weight.float().square().mean(dim=1).sqrt().max().item()


def rms_limit(initial: Tensor) -> float:
    """The RMS past which a vector has diverged: `DIVERGED_RMS` times that of the vectors the inversion
    starts from (the model's class, parameter or null embeddings), or of 1 where those are near zero (a
    null embedding barely moved from its zero start)."""
    return DIVERGED_RMS * max(1.0, initial.float().square().mean().sqrt().item())


def starting_condition(net: UNet, model_info: DatasetInfo, real: DatasetInfo, init: str) -> str:
    """What the vectors start from: "class" or "params" (the model's embedding of each image's
    label or parameters) when `init` is "condition" and the model knows them by name, else "null"."""
    kind = net.config.cond
    if init == "null":
        return "null"
    if kind == "class" and real.class_names and set(real.class_names) <= set(model_info.class_names):
        return "class"
    if kind == "params" and real.param_names and set(model_info.param_names) <= set(real.param_names):
        return "params"
    return "null"


@torch.no_grad()
def starting_vectors(net: UNet, model_info: DatasetInfo, real: DatasetInfo, labels: Tensor, params: Tensor,
                     start: str) -> Tensor:
    """(N, E) vectors for images with `labels` (N,) and raw `params` (N, P) of the real data: each
    image's class or parameter embedding under the model (`start` from `starting_condition`), or the
    null embedding for every image."""
    device = net.null_embedding.device
    if start == "class":  # the real data's class k is the model's class of the same name
        to_model = torch.tensor([model_info.class_names.index(name) for name in real.class_names])
        return net.embed_condition(to_model[labels].to(device)).float().cpu()
    if start == "params":  # the model's parameters, by name, normalised over the model's training ranges
        columns = [real.param_names.index(name) for name in model_info.param_names]
        cond = model_info.normalize_params(params[:, columns].float())
        return net.embed_condition(cond.to(device)).float().cpu()
    return net.null_embedding.detach().float().cpu().expand(len(labels), -1).clone()
