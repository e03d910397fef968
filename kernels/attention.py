"""Self-attention, `softmax(q k^T / sqrt(head_dim)) v`, by whichever implementation is fastest for the
tensors at hand: PyTorch's fused `scaled_dot_product_attention` (SDPA), or two batched matmuls and a
softmax on the CPU in bf16 when the sequence is of moderate length.

SDPA is the right call on CUDA (flash / memory-efficient attention) and for long sequences anywhere:
it never materialises the L x L score matrix. On the CPU in bf16, though, its flash kernel works in
small blocks and spends more time moving them than multiplying when the sequence is not much longer
than the head is wide; then a plain `q @ k^T`, softmax, `@ v` (oneDNN's bf16 GEMMs) is faster, provided
the scores are made in chunks small enough for the cache (at most 2^22 values: in one piece the fp32
softmax of 16 x 4 heads of L = 512 ran the forward at 0.4x SDPA's speed, in chunks at 0.8x to 1.45x). Speed-up of
the matmul form over SDPA in bf16, forward and forward + backward, on a 2-core AMD EPYC with
AVX512-BF16 (`python -m bench.attention`; one run to the next the ratios move by up to 0.3):

| batch x heads, L, head_dim | fwd | fwd+bwd | used |
|---|---|---|---|
| 16 x 1, 256, 256 (ddpm-cifar10's 16x16 attention) | 1.72x | 1.30x | matmul |
| 8 x 1, 64, 512 (the kl-f8 autoencoder's middle at 64 px) | 1.64x | 1.24x | matmul |
| 2 x 1, 1024, 512 (the same at 256 px) | 1.92x | 1.67x | matmul |
| 4 x 4, 1024, 128 | 1.58x | 1.31x | matmul |
| 2 x 1, 2048, 128 | 1.44x | 1.39x | matmul |
| 8 x 2, 1024, 64 | 1.18x | 1.16x | matmul |
| 8 x 8, 256, 64 | 1.29x | 1.02x | matmul |
| 16 x 4, 512, 64 | 1.16x | 0.75x | matmul |
| 8 x 1, 128, 64 | 1.17x | 1.87x | matmul |
| 8 x 1, 64, 256 | 1.26x | 1.21x | matmul |
| 8 x 1, 64, 64 (ddpm-demo's 8x8 attention) | 0.84x | 1.40x | SDPA |
| 8 x 1, 16, 512 | 0.75x | 1.04x | SDPA |
| 2 x 1, 2048, 64 | 0.50x | 0.68x | SDPA |
| 1 x 4, 4096, 64 | 0.38x | 0.46x | SDPA |
| 8 x 8, 256, 32 | 1.01x | 0.88x | SDPA |

So the matmul form is used on the CPU in bf16 when `head_dim >= 64`, `L <= 16 * head_dim`, `L <= 2048`
(one head's scores fit a chunk) and the sequence is not too short for the matmuls to pay: `L >= 128`, or
`L >= 64` with `head_dim >= 256` (below that the forward, all that sampling runs, is slower than SDPA's,
though forward + backward is faster); SDPA everywhere else. In fp32 neither form is
consistently faster (0.7x to 1.5x, mostly near 1), so fp32 keeps SDPA and its O(L) memory. In the
`ddpm-cifar10` training step in bf16 (batch 16, the two timed alternately in one process) the matmul
form made the step 2.3% faster (8.79 -> 8.99 img/s).

CPUs with AMX (Intel Xeon since Sapphire Rapids) turn most of that around: PyTorch's CPU flash attention
multiplies its blocks with oneDNN's brgemm in AMX tiles, and there SDPA is faster wherever heads are
narrower than 256 (the same bench, 2-core Intel Xeon with AMX, bf16, 9 rounds; single cells move by up
to 0.5 from run to run, the ddpm-cifar10 cell most):

| batch x heads, L, head_dim | fwd | fwd+bwd | used |
|---|---|---|---|
| 16 x 1, 256, 256 (ddpm-cifar10) | 0.7x-1.7x | 0.9x-1.2x | matmul |
| 8 x 1, 64, 512 (kl-f8 at 64 px) | 1.02x-1.09x | 1.14x-1.20x | matmul |
| 8 x 1, 256, 512 | 1.14x | 1.24x | matmul |
| 2 x 1, 1024, 512 (kl-f8 at 256 px) | 0.89x-0.97x | 0.84x-1.05x | SDPA |
| 8 x 1, 1024, 256 | 0.49x | 0.58x | SDPA |
| 16 x 1, 128, 128 | 0.79x | 1.90x | SDPA |
| 8 x 8, 256, 64 | 0.65x-0.70x | 0.83x-1.05x | SDPA |
| 16 x 4, 512, 64 | 0.43x-0.48x | 0.51x-0.62x | SDPA |
| 4 x 4, 1024, 128 | 0.51x-0.58x | 0.73x-0.77x | SDPA |

So on an AMX CPU the matmul form is used only for `head_dim >= 256` and `L <= 256`, where it is at
least as fast (the ddpm-cifar10 training step in bf16, alternating in one process: 18.48 img/s with it,
18.27 with SDPA); before this rule, narrow heads at 256 positions and more ran their attention at half
SDPA's speed there. In training, narrow heads over at most 256 positions are often faster in the matmul
form (1.2x-1.9x forward + backward), but not always (0.83x for 8 heads of 64 at L = 256), so the rule
follows the forward pass, which sampling runs alone. `AMX` is read once from the CPU's flags
(`core.runtime.cpu_has_amx`).

Precision: q and k arrive in bf16 under autocast either way; here each score is rounded to bf16 once
more before an fp32 softmax (SDPA keeps it in fp32), which is how guided-diffusion's attention runs in
half precision. Against a float64 reference (scores of std 3) its relative error is about 0.9%, SDPA's
0.5%; the tests bound it at three times SDPA's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.runtime import cpu_has_amx

SCORE_CHUNK = 1 << 22  # most score values (batch x heads x L x L) one matmul-form chunk holds
# Read once, here: torch.compile cannot trace the read of /proc/cpuinfo, and would split every network there.
AMX = cpu_has_amx()


def uses_matmul_form(q: Tensor) -> bool:
    """Whether `attention` computes q (B, heads, L, head_dim) with matmuls rather than SDPA (see above)."""
    length, head_dim = q.shape[-2:]
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or head_dim < 64:
        return False
    if AMX:  # SDPA's flash kernel multiplies in AMX tiles: the matmuls keep up only for wide heads
        return head_dim >= 256 and length <= 256
    return (length >= 128 or (length >= 64 and head_dim >= 256)) and length <= min(16 * head_dim, 2048)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for q, k, v of shape (B, heads, L, head_dim), any strides."""
    return matmul_attention(q, k, v) if uses_matmul_form(q) else sdpa_attention(q, k, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused attention, given head_dim contiguous: its fused kernels (the CPU's flash attention too)
    need that, and one copy here beats SDPA's unfused fallback (4x slower on the CPU)."""
    if q.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, chunk: int = SCORE_CHUNK) -> Tensor:
    """The same attention as two batched matmuls around a softmax in fp32 (or wider), in batch chunks whose score
    matrices hold at most `chunk` values. The matmuls take q, k, v with either of the last two
    dimensions contiguous, so channel-first heads need no copy."""
    batch, heads, length, head_dim = q.shape
    q = q * head_dim ** -0.5  # scale the (L, head_dim) queries rather than the (L, L) scores
    per_chunk = max(1, chunk // max(1, heads * length * length))
    out = []
    for i in range(0, max(batch, 1), per_chunk):  # one (empty) chunk for an empty batch, as SDPA returns
        scores = q[i:i + per_chunk] @ k[i:i + per_chunk].transpose(-1, -2)
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        out.append(weights @ v[i:i + per_chunk])
    return out[0] if len(out) == 1 else torch.cat(out)
