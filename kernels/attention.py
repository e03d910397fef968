"""Self-attention, `softmax(q k^T / sqrt(head_dim)) v`, by whichever implementation is fastest for the
tensors at hand: PyTorch's fused `scaled_dot_product_attention` (SDPA), or two batched matmuls and a
softmax on the CPU in bf16 when the sequence is of moderate length.

SDPA is the right call on CUDA (flash / memory-efficient attention) and for long sequences anywhere:
it never materialises the L x L score matrix. On the CPU in bf16, though, its flash kernel works in
small blocks and spends more time moving them than multiplying when the sequence is not much longer
than the head is wide; then a plain `q @ k^T`, softmax, `@ v` (oneDNN's GEMMs) is faster, provided
the scores are made in chunks small enough for the cache (at most 2^22 values: in one piece the fp32
softmax of 16 x 4 heads of L = 512 ran the forward at 0.4x SDPA's speed, in chunks at 0.8x to 1.45x). Speed-up of
the matmul form over SDPA in bf16, forward and forward + backward, on a 2-core AMD EPYC with
AVX512-BF16 (`python -m bench.attention`; one run to the next the ratios move by up to 0.3). These were
measured when `q @ k^T` was a bf16 GEMM; it is an fp32 one now (precision, below), and AVX512-BF16
multiplies bf16 at twice fp32's rate, so expect smaller speed-ups, and cells near 1x may have turned: not
measured again yet, for want of such a CPU.

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

CPUs with AMX (Intel Xeon since Sapphire Rapids) use SDPA everywhere: PyTorch's CPU flash attention
multiplies its blocks with oneDNN's brgemm in AMX tiles and keeps the scores in fp32, while the matmul
form's fp32 `q @ k^T` cannot use AMX. Milliseconds per call, SDPA / matmul form with bf16 scores (as it
was) / with fp32 scores (as it is), bf16, one thread of a 2-core Intel Xeon with AMX, medians of 15
alternating rounds:

| batch x heads, L, head_dim | fwd | fwd+bwd |
|---|---|---|
| 16 x 1, 256, 256 (ddpm-cifar10) | 6.60 / 7.07 / 11.55 | 30.1 / 23.4 / 42.7 |
| 8 x 1, 64, 512 (kl-f8 at 64 px) | 0.87 / 0.67 / 0.85 | 5.16 / 4.03 / 4.57 |
| 8 x 1, 256, 512 | 4.94 / 3.42 / 6.24 | 25.7 / 21.3 / 30.0 |
| 8 x 1, 128, 256 | 1.12 / 0.87 / 1.22 | 6.52 / 4.23 / 5.26 |
| 8 x 1, 64, 256 | 0.33 / 0.42 / 0.44 | 2.80 / 2.00 / 2.20 |
| 2 x 1, 1024, 512 (kl-f8 at 256 px) | 8.84 / 12.37 / 20.86 | 40.3 / 36.7 / 66.6 |

With bf16 scores the matmul form had been used there for `head_dim >= 256` and `L <= 256` (the
ddpm-cifar10 training step in bf16: 18.48 img/s with it, 18.27 with SDPA); with fp32 scores its forward,
all that sampling runs, is nowhere faster than SDPA's (forward + backward is, by 1.1x-1.3x, for the
short sequences only). Narrower heads were always SDPA's there (it is 1.4x-2.3x faster). `AMX` is read
once from the CPU's flags (`core.runtime.cpu_has_amx`).

Precision: q and k arrive in bf16 under autocast either way, and both forms keep the scores in fp32. A bf16
`q @ k^T` would round each score to 8 bits once more (a score of 64 to a multiple of 0.5, which moves its
softmax weight by up to 28%): so the matmul form did before, as guided-diffusion's attention does in half
precision, and its error against float64 was 2x SDPA's (scores of std 3: 1.0% against 0.5% of the output;
std 30, the largest ~150: 3.0% against 1.4%, and 9.5% against 4.6% of dq). Now it is SDPA's within 6%;
the tests bound it at 1.25x.
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
    # With AMX, SDPA's flash kernel multiplies in AMX tiles, and the matmuls' fp32 scores cannot.
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or head_dim < 64 or AMX:
        return False
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
    """The same attention as two batched matmuls around a softmax, in batch chunks whose score matrices hold
    at most `chunk` values. The scores and the softmax are in fp32 (float64 stays float64): the first matmul
    takes q and k in fp32, since a bf16 one would round every score to bf16 (see above). The matmuls take
    q, k, v with either of the last two dimensions contiguous, so channel-first heads need no copy."""
    batch, heads, length, head_dim = q.shape
    wide = torch.promote_types(q.dtype, torch.float32)
    per_chunk = max(1, chunk // max(1, heads * length * length))
    out = []
    for i in range(0, max(batch, 1), per_chunk):  # one (empty) chunk for an empty batch, as SDPA returns
        # Scale the (L, head_dim) queries rather than the (L, L) scores.
        scores = (q[i:i + per_chunk].to(wide) * head_dim ** -0.5) @ k[i:i + per_chunk].to(wide).transpose(-1, -2)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out.append(weights @ v[i:i + per_chunk])
    return out[0] if len(out) == 1 else torch.cat(out)
