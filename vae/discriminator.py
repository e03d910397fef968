"""The PatchGAN discriminator and the adversarial terms of the autoencoder's training loss.

The discriminator is pix2pix's (Isola et al. 2017, Sec. 3.2.2) as VQGAN (Esser et al. 2021) and
latent diffusion (Rombach et al. 2022) configure it: a stack of strided 4x4 convolutions whose
output is a grid of logits, each judging one overlapping patch of the input (70x70 pixels for three
layers) as real or reconstructed. Its layers sit in a `main` Sequential at the indices that
taming-transformers' `NLayerDiscriminator` uses, so the `loss.discriminator.*` tensors of a CompVis
first-stage checkpoint have the same names here.

The losses are the hinge losses of VQGAN / latent diffusion, and the generator's term is weighted
adaptively so that its gradient at the decoder's last layer matches the reconstruction term's
(Esser et al. 2021, eq. 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, h, w); (B, 1, 30, 30) for 256x256 with three layers."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        self.in_channels = in_channels  # image channels, as the autoencoder's
        if num_layers < 1:
            raise UserError(f"num_layers must be >= 1, got {num_layers}.")
        # Width doubles per layer up to 8 * base_channels (pix2pix's "C64-C128-C256-C512").
        widths = [base_channels * min(2**n, 8) for n in range(num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # the last hidden layer keeps the resolution
            # No conv bias before a BatchNorm, which would remove it.
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(widths[n]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self._init_weights()

    @staticmethod
    def min_image_size(num_layers: int) -> int:
        """The smallest image side the discriminator can judge. A 4x4 convolution with padding 1 halves the
        side, rounding down, at stride 2 (the first layer and every hidden one but the last) and takes 1 off it
        at stride 1 (the last two), so the logit grid is floor(side / 2**num_layers) - 2 wide: at least 1 from
        side 3 * 2**num_layers on (24 px for three layers)."""
        return 3 * 2**num_layers

    def _init_weights(self) -> None:
        # DCGAN's init (Radford et al. 2016), used by pix2pix: weights N(0, 0.02), BatchNorm scales N(1, 0.02).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, *more: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Patch logits of `x`; given more batches of images, a tuple of logits, one per batch.

        Each batch takes its own pass, so in training mode BatchNorm normalises it with its own
        statistics: taming-transformers and latent diffusion call the discriminator once on the real
        and once on the reconstructed images, never on the two concatenated. Passing both in one call
        keeps that to one forward per backward through a DistributedDataParallel wrapper.
        """
        for images in (x, *more):
            if images.ndim != 4 or images.shape[1] != self.in_channels:
                raise UserError(f"Expected images of shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}.")
        if not more:
            return self.main(x)
        return tuple(self.main(images) for images in (x, *more))


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) (Lim & Ye 2017; VQGAN)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator (decoder) loss: -E[D(x_rec)], lower when reconstructions look real to the discriminator.

    Averaged in float32 (the logits are fp16 under fp16 autocast): a gradient scale on the way back is then
    divided among the logits before it meets fp16, where 2^16 alone would be infinite."""
    return -logits_fake.float().mean()


GRAD_SCALE = 2.0 ** 16  # see adaptive_weight


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: nn.Parameter, disc_weight: float,
                    pixels: int = 1) -> Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7): lambda = ||grad L_rec|| / (||grad L_G|| + 1e-4), with
    the 1e-4 of their code (taming-transformers) as the equation's small delta.

    `nll_loss` is the reconstruction term as it enters the loss: latent diffusion takes the gradient
    of its negative log-likelihood rec / exp(s) + s (s the output log-variance), not of the plain
    reconstruction loss. Both gradients are taken at the decoder's last layer; lambda is clamped to
    [0, 1e4] and detached (it scales the generator loss but is not itself trained), then multiplied
    by `disc_weight`. The graph is kept, so the caller can still backpropagate the weighted sum.

    A loss averaged over the `pixels` (C H W) values of an image, where latent diffusion's sums over them,
    has a lambda `pixels` times smaller than theirs: its clamp is then 1e4 / `pixels`, theirs in our units
    (at 256 px, 0.05: it binds early in training, and a clamp at 1e4 would let the generator term grow
    80 times beyond theirs there).
    """
    nll_norm, g_norm = (_gradient_norm(loss, last_layer) for loss in (nll_loss, g_loss))
    weight = nll_norm / (g_norm + 1e-4)
    # A gradient that still overflowed leaves the generator term out of this step rather than making the
    # loss NaN (or, with the reconstruction's gradient infinite, weighting it by the clamp's 1e4).
    weight = torch.where(torch.isfinite(nll_norm) & torch.isfinite(g_norm), weight, torch.zeros_like(weight))
    return weight.clamp(0.0, 1e4 / pixels).detach() * disc_weight


def _gradient_norm(loss: Tensor, param: nn.Parameter) -> Tensor:
    """||d loss / d param|| (float32), the graph kept.

    The loss is scaled by 2^16 on the way back and the norm scaled down again: under fp16 autocast the
    gradient passes through half-precision activations, where unscaled it can underflow to zero (the
    GradScaler does not see this backward pass). Where the scaled gradient overflows instead, under fp16
    autocast only, it is taken again at a scale 2^8 times smaller, down to 1; checking costs a host sync,
    which bf16 and float32 runs never pay.
    """
    device = loss.device.type
    half = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    scale = GRAD_SCALE
    while True:
        grad, = torch.autograd.grad(loss.float() * scale, param, retain_graph=True)
        norm = grad.float().norm() / scale
        if not half or scale <= 1.0 or bool(torch.isfinite(norm)):
            return norm
        scale /= 2.0 ** 8
