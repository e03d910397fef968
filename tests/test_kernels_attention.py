"""kernels.attention: the matmul form equals softmax attention, is used exactly where the module says, and
loses no more precision in bf16 than SDPA does."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddpm.unet import AttentionBlock
from kernels import attention as attention_module
from kernels.attention import attention, matmul_attention, uses_matmul_form


def naive(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out head by head in float64."""
    q, k, v = (z.double() for z in (q, k, v))
    weights = torch.softmax(torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


def channel_first(batch, heads, length, head_dim, dtype=torch.float64, seed=0):
    """q, k, v as the U-Net makes them: (B, heads, L, head_dim) views of channel-first (B, 3, heads, d, L)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3, heads, head_dim, length, generator=g, dtype=torch.float64).to(dtype)
    return qkv.transpose(-1, -2).unbind(dim=1)


@pytest.mark.parametrize("chunk", [1, 2 * 3 * 7 * 7, 10 ** 9])  # one image per chunk, 2 of 5 (uneven), all
def test_matmul_form_equals_softmax_attention_in_chunks(chunk):
    q, k, v = channel_first(batch=5, heads=3, length=7, head_dim=4)
    assert q.stride(-1) != 1  # the non-contiguous heads the matmuls take without a copy
    torch.testing.assert_close(matmul_attention(q, k, v, chunk=chunk), naive(q, k, v), rtol=1e-12, atol=1e-12)


def test_matmul_form_gradients_equal_sdpa():
    leaves = [z.detach().clone().requires_grad_() for z in channel_first(batch=3, heads=2, length=9, head_dim=5)]
    reference = [z.detach().clone().requires_grad_() for z in leaves]
    g = torch.randn(3, 2, 9, 5, dtype=torch.float64)
    (matmul_attention(*leaves, chunk=2 * 81) * g).sum().backward()
    (F.scaled_dot_product_attention(*reference) * g).sum().backward()
    for ours, theirs in zip(leaves, reference):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape, dtype, expected", [
    ((16, 1, 256, 256), torch.bfloat16, True),    # ddpm-cifar10's 16x16 attention
    ((2, 1, 64, 512), torch.bfloat16, True),      # the kl-f8 autoencoder's middle at 64 px
    ((2, 4, 1024, 64), torch.bfloat16, True),     # L = 16 * head_dim
    ((2, 1, 2048, 128), torch.bfloat16, True),    # L = 2048: one head's scores fill a chunk
    ((2, 1, 2048, 64), torch.bfloat16, False),    # L > 16 * head_dim
    ((1, 1, 4096, 512), torch.bfloat16, False),   # L > 2048
    ((2, 8, 256, 32), torch.bfloat16, False),     # head_dim < 64
    ((8, 1, 128, 64), torch.bfloat16, True),      # L >= 128
    ((8, 1, 64, 256), torch.bfloat16, True),      # L = 64 with a wide head
    ((8, 1, 64, 64), torch.bfloat16, False),      # L = 64, head_dim 64: SDPA's forward is faster
    ((8, 1, 16, 512), torch.bfloat16, False),     # too short
    ((16, 1, 256, 256), torch.float32, False),    # fp32: SDPA
    ((16, 1, 256, 256), torch.float16, False),
])
def test_matmul_form_is_chosen_where_measured_faster(shape, dtype, expected, monkeypatch):
    monkeypatch.setattr(attention_module, "AMX", False)
    assert uses_matmul_form(torch.empty(shape, dtype=dtype)) == expected


@pytest.mark.parametrize("shape", [(16, 1, 256, 256), (2, 1, 64, 512), (2, 1, 16, 256), (8, 1, 128, 128),
                                   (2, 1, 1024, 512)])
def test_on_cpus_with_amx_attention_is_sdpas(shape, monkeypatch):
    # SDPA's flash kernel multiplies in AMX tiles; the matmul form's fp32 scores cannot, and its forward is slower.
    monkeypatch.setattr(attention_module, "AMX", True)
    assert not uses_matmul_form(torch.empty(shape, dtype=torch.bfloat16))


@pytest.mark.parametrize("score_std", [3, 30])
def test_bf16_error_is_sdpas(score_std, monkeypatch):
    """The matmul form keeps its scores in fp32, as SDPA does, and is as precise in bf16: against float64, within
    1.25x SDPA's error, forward and every gradient, for scores of realistic spread (std 3) and for large queries
    (std 30, the largest ~150), whose scores bf16 would round by up to 0.25 (it was 2x SDPA's error then)."""
    q, k, v = channel_first(batch=2, heads=2, length=128, head_dim=64, seed=1)
    q = score_std * q  # q.k / sqrt(d) has std score_std
    grad = torch.randn(2, 2, 128, 64, dtype=torch.float64)
    monkeypatch.setattr(attention_module, "AMX", False)  # the rule that takes these heads
    assert uses_matmul_form(q.bfloat16())

    def run(fn, dtype):
        leaves = [z.detach().to(dtype).requires_grad_() for z in (q, k, v)]
        out = fn(*leaves)
        (out.double() * grad).sum().backward()
        return [out.double()] + [z.grad.double() for z in leaves]

    exact = run(naive, torch.float64)
    ours = run(attention, torch.bfloat16)
    sdpa = run(F.scaled_dot_product_attention, torch.bfloat16)
    for name, e, a, b in zip(["out", "dq", "dk", "dv"], exact, ours, sdpa):
        error, sdpa_error = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
        assert error < 1.25 * sdpa_error, (name, error.item(), sdpa_error.item())


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_uses_the_matmul_form_under_cpu_autocast(channels_last, monkeypatch):
    monkeypatch.setattr(attention_module, "AMX", False)  # the rule that takes a 128-wide head
    torch.manual_seed(0)
    block = AttentionBlock(128, num_heads=1)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(3, 128, 16, 16)
    expected = block(x)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)

    def refuse(*args, **kwargs):
        raise AssertionError("SDPA was called where the matmul form is faster")
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_matmul_form_compiles_without_graph_breaks():
    q, k, v = channel_first(batch=3, heads=1, length=16, head_dim=64, dtype=torch.bfloat16)
    explained = torch._dynamo.explain(lambda q, k, v: matmul_attention(q, k, v, chunk=2 * 256))(q, k, v)
    assert explained.graph_break_count == 0


@pytest.mark.parametrize("shape", [(0, 1, 128, 256), (2, 1, 0, 256)], ids=["no images", "no positions"])
def test_matmul_form_of_an_empty_batch_or_sequence_is_empty_as_sdpas(shape):
    # An empty batch (or sequence) where the matmul form is chosen gives SDPA's empty answer, not an error.
    q = torch.randn(shape, dtype=torch.bfloat16)
    out = matmul_attention(q, q, q)
    assert out.shape == shape and out.dtype == torch.bfloat16
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q))
