"""kernels.dropout: the CPU dropout whose mask is cut from 64-bit random words, its statistics, gradient and
use in the networks; and the other CPU training-step changes beside it (attention inputs for the fused
kernel, the fused optimizer)."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from core.contract import Trainable
from ddpm.unet import UNet, UNetConfig
from kernels.dropout import Dropout, dropout, effective_probability, keep_mask
from training.loop import make_optimizer


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_value_is_dropped_with_the_stated_probability_whatever_its_place_in_a_word(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    # Four values share a 64-bit word: each of the four places must be dropped at the same rate (a
    # generator that left a word's top bit 0 would never drop the values in its last place).
    dropped = 1.0 - keep.view(-1, 4).double().mean(dim=0)
    sigma = math.sqrt(p * (1 - p) / (n / 4))
    assert (dropped - effective_probability(p)).abs().max().item() < 5 * sigma, dropped


def test_masks_of_neighbouring_values_are_uncorrelated_and_differ_between_draws():
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([1 << 20]), 0.3, torch.device("cpu")).double()
    centred = keep - keep.mean()
    for lag in (1, 2, 3, 4, 5, 8):  # within a word, across words
        corr = (centred[:-lag] * centred[lag:]).mean() / centred.square().mean()
        assert abs(corr.item()) < 5 / math.sqrt(keep.numel()), (lag, corr)
    again = keep_mask(torch.Size([1 << 20]), 0.3, torch.device("cpu")).double()
    assert (again != keep).double().mean().item() == pytest.approx(2 * 0.3 * 0.7, abs=0.01)


def test_a_seed_gives_the_same_mask():
    x = torch.ones(3, 5, 7, 9)
    torch.manual_seed(7)
    a = dropout(x, 0.2, True)
    torch.manual_seed(7)
    b = dropout(x, 0.2, True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_values_are_scaled_so_the_expectation_is_the_input_and_the_gradient_is_the_mask(dtype):
    torch.manual_seed(2)
    p = 0.1
    x = (torch.rand(4, 8, 16, 16) + 0.5).to(dtype).requires_grad_()
    y = dropout(x, p, True)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    scale = 1.0 / (1.0 - effective_probability(p))
    torch.testing.assert_close(y[kept], (x * scale)[kept])
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, (grad * kept * scale).to(dtype))
    ones = torch.ones(1 << 20)
    sigma = math.sqrt(p / (1 - p) / ones.numel())  # of the mean of n values each 0 or 1 / (1 - p)
    assert dropout(ones, p, True).double().mean().item() == pytest.approx(1.0, abs=5 * sigma)


def test_it_is_the_identity_in_eval_mode_and_plain_dropout_at_the_extremes():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(dropout(x, 0.1, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            dropout(x, bad, True)
    module = Dropout(0.25)
    assert isinstance(module, torch.nn.Dropout) and module.state_dict() == {}
    assert torch.equal(module.eval()(x), x)


def dropout_unet() -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), dropout=0.3, cond="class", num_classes=3)).train()
    with torch.no_grad():  # the zero-initialised output layers would make every output 0
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_the_unet_drops_through_it_in_training_and_compiles_without_graph_breaks():
    net = dropout_unet()
    assert all(type(m) is Dropout for m in net.modules() if isinstance(m, torch.nn.Dropout))
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 2])
    torch.manual_seed(3)
    a = net(x, t, labels)
    torch.manual_seed(3)
    b = net(x, t, labels)
    torch.manual_seed(4)
    c = net(x, t, labels)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch._dynamo.reset()
    assert torch._dynamo.explain(net)(x, t, labels).graph_break_count == 0


def test_attention_hands_sdpa_a_contiguous_head_dim_in_both_memory_formats(monkeypatch):
    net = dropout_unet().eval()
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 2])
    strides = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        strides.append((q.stride(-1), k.stride(-1), v.stride(-1)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        plain = net(x, t, labels)
        last = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, labels)
    assert strides and all(s == (1, 1, 1) for s in strides)
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_training_loop_takes_pytorchs_fused_optimizer_on_the_cpu_and_it_steps_as_the_plain_one(optimizer):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    model, twin = torch.nn.ParameterList(params), torch.nn.ParameterList(twins)
    options = dict(lr=0.1, weight_decay=0.01, momentum=0.9 if optimizer == "sgd" else 0.0)
    fused = make_optimizer(Trainable(model, optimizer=optimizer, **options), model, torch.device("cpu"))
    assert fused.param_groups[0]["fused"]
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    extra = dict(momentum=0.9) if optimizer == "sgd" else {}
    plain = cls(twin.parameters(), lr=0.1, weight_decay=0.01, **extra)
    for step in range(3):
        for group, opt in ((params, fused), (twins, plain)):
            for p in group:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach()
            opt.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
