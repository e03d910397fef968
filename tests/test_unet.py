"""Tests for the DDPM U-Net: shapes, the paper's parameter count, conditioning, attention, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ddpm.unet import AttentionBlock, ResBlock, UNet, UNetConfig, timestep_embedding


def tiny_config(**overrides) -> UNetConfig:
    fields = dict(image_size=16, in_channels=3, base_channels=32, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(8,), num_heads=2, dropout=0.0)
    return UNetConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> UNet:
    """An eval-mode tiny model whose zero-initialised layers are perturbed, so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = UNet(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(batch: int = 3, channels: int = 3, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)


# ---- shapes, size, initialisation --------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape(size, channels):
    model = tiny_model(in_channels=channels)
    x, t = inputs(batch=2, channels=channels, size=size)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (2, channels, size, size)
    assert torch.isfinite(out).all()


def test_ddpm_cifar10_parameter_count():
    # Ho et al. 2020 report 35.7M parameters for CIFAR-10; the TF release and its PyTorch port count
    # 35,746,307. By part: time MLP 328,704; conv_in 3,584; down res/attn blocks 8,862,976;
    # downsamples 1,327,744; middle 2,888,704; up res/attn blocks 20,560,640; upsamples 1,770,240;
    # norm_out 256; conv_out 3,459. Our fused qkv conv has as many weights as DDPM's separate q, k, v.
    with torch.device("meta"):  # counting needs shapes, not memory or initialisation time
        model = UNet(UNetConfig.ddpm_cifar10())
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_unconditional_model_has_no_conditioning_parameters():
    names = [n for n, _ in UNet(tiny_config()).named_parameters()]
    assert not any(n.startswith(("null_embedding", "cond_encoder")) for n in names)
    names = [n for n, _ in UNet(tiny_config(cond="class", num_classes=4)).named_parameters()]
    assert "null_embedding" in names and "cond_encoder.weight" in names


def test_group_norms_keep_at_least_four_channels_per_group():
    """DDPM widths get GroupNorm(32); a 32-channel model gets 8 groups of 4, not an instance norm that
    would erase each channel's mean (and so the noise's mean colour)."""
    groups = lambda config: {m.num_channels: m.num_groups for m in UNet(config).modules() if isinstance(m, torch.nn.GroupNorm)}
    assert set(groups(UNetConfig.ddpm_cifar10()).values()) == {32}
    narrow = groups(UNetConfig(base_channels=32, channel_mult=(1, 2), attention_resolutions=()))
    assert narrow[32] == 8 and narrow[64] == 16 and narrow[96] == 24
    assert all(channels // g >= 4 for channels, g in narrow.items())


def test_zero_init_makes_initial_output_zero():
    # DDPM zero-initialises the output conv and the last layer of every residual branch.
    model = UNet(tiny_config())
    x, t = inputs()
    assert torch.equal(model(x, t), torch.zeros_like(x))
    for m in model.modules():
        if isinstance(m, ResBlock):
            assert not m.conv2.weight.any()
        if isinstance(m, AttentionBlock):
            assert not m.proj_out.weight.any()


def test_config_round_trips_through_asdict_with_lists():
    config = tiny_config(cond="params", num_params=2)
    stored = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    restored = UNetConfig(**stored)
    assert restored == config and isinstance(restored.channel_mult, tuple)
    UNet(restored).load_state_dict(UNet(config).state_dict())


def test_resample_without_conv_and_scale_shift_variants_run():
    model = tiny_model(resample_with_conv=False, scale_shift_norm=True)
    x, t = inputs()
    assert model(x, t).shape == x.shape


def test_channels_last_and_autocast_match_float32():
    model = tiny_model()
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_forward_traces_as_one_graph():
    # fullgraph=True fails on any graph break, i.e. on Python control flow that depends on tensor
    # values; the "eager" backend checks tracing without paying for code generation.
    model = tiny_model(cond="class", num_classes=4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = inputs()
    labels, mask = torch.tensor([0, 1, 2]), torch.tensor([True, False, False])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, labels, null_mask=mask), model(x, t, labels, null_mask=mask))


# ---- time embedding ----------------------------------------------------------------------------


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    # half = 4 frequencies, f_i = 10000^(-i/3): 1, 10000^(-1/3), 10000^(-2/3), 1e-4.
    for row, tv in enumerate([0.0, 1.0, 999.0]):
        freqs = [10000 ** (-i / 3) for i in range(4)]
        expected = [math.sin(tv * f) for f in freqs] + [math.cos(tv * f) for f in freqs]
        torch.testing.assert_close(emb[row], torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_timestep_changes_output_and_float_timesteps_work():
    model = tiny_model()
    x, _ = inputs(batch=1)
    with torch.no_grad():
        out2, out3 = model(x, torch.tensor([2])), model(x, torch.tensor([3]))
        out_mid = model(x, torch.tensor([2.5]))
    assert not torch.allclose(out2, out3, atol=1e-4)
    assert not torch.allclose(out_mid, out2, atol=1e-5) and not torch.allclose(out_mid, out3, atol=1e-5)
    torch.testing.assert_close(model(x, torch.tensor([2.0])), out2)


# ---- attention and residual blocks -------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_equals_naive_softmax_attention(num_heads):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_heads)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 64, 5, 6)
    B, C, H, W = x.shape
    d = C // num_heads
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3 * C, H * W).split(C, dim=1)
    heads = []
    for h in range(num_heads):
        qh, kh, vh = (z[:, h * d:(h + 1) * d, :] for z in (q, k, v))  # (B, d, HW)
        weights = torch.softmax(torch.einsum("bci,bcj->bij", qh, kh) / math.sqrt(d), dim=-1)
        heads.append(torch.einsum("bij,bcj->bci", weights, vh))
    expected = x + block.proj_out(torch.cat(heads, dim=1).reshape(B, C, H, W))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("resolutions, expected", [((16,), [16, 8, 16, 16]), ((8,), [8, 8, 8, 8])])
def test_attention_runs_at_configured_resolutions(resolutions, expected):
    # Tiny model, one res block per level: attention after the down block, in the middle (always,
    # as in DDPM), and after both up blocks of each listed resolution, in that order.
    model = tiny_model(attention_resolutions=resolutions)
    seen = []
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        model(*inputs())
    assert seen == expected


def test_scale_shift_norm_is_one_plus_scale_then_shift():
    # With scale = -1 the normalised features are multiplied by 0, so the residual branch sees only
    # the shift: the block's output minus its input no longer depends on the input.
    torch.manual_seed(0)
    block = ResBlock(32, 32, emb_dim=16, dropout=0.0, scale_shift_norm=True)
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    with torch.no_grad():
        block.emb_proj.weight.zero_()
        block.emb_proj.bias.copy_(torch.cat([-torch.ones(32), torch.randn(32)]))
    emb = torch.randn(2, 16)
    x1, x2 = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(block(x1, emb) - x1, block(x2, emb) - x2, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        block.emb_proj.bias[:32] = 0.0  # scale 0: the input matters again
    assert not torch.allclose(block(x1, emb) - x1, block(x2, emb) - x2, atol=1e-3)


# ---- conditioning ------------------------------------------------------------------------------


def class_model(**overrides) -> UNet:
    model = tiny_model(cond="class", num_classes=4, **overrides)
    with torch.no_grad():  # a non-zero null vector, so "null" differs from "no conditioning added"
        model.null_embedding.normal_()
    return model


def test_class_labels_and_params_change_output():
    x, t = inputs(batch=2)
    with torch.no_grad():
        model = class_model()
        assert not torch.allclose(model(x, t, torch.tensor([0, 1])), model(x, t, torch.tensor([2, 3])), atol=1e-4)
        model = tiny_model(cond="params", num_params=2)
        a, b = torch.tensor([[0.5, -0.5], [0.1, 0.9]]), torch.tensor([[-0.5, 0.5], [0.9, 0.1]])
        assert not torch.allclose(model(x, t, a), model(x, t, b), atol=1e-4)


@pytest.mark.parametrize("kind", ["class", "params"])
def test_null_mask_rows_equal_unconditional_rows_and_ignore_the_condition(kind):
    if kind == "class":
        model = class_model()
        cond, other = torch.tensor([0, 1, 2]), torch.tensor([3, 1, 0])
    else:
        model = tiny_model(cond="params", num_params=2)
        with torch.no_grad():
            model.null_embedding.normal_()
        cond, other = torch.rand(3, 2) * 2 - 1, torch.rand(3, 2) * 2 - 1
        other[1] = cond[1]
    x, t = inputs()
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        masked = model(x, t, cond, null_mask=mask)
        all_null = model(x, t)
        conditioned = model(x, t, cond)
        torch.testing.assert_close(masked[mask], all_null[mask], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(masked[~mask], conditioned[~mask], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(masked[~mask], all_null[~mask], atol=1e-4)
        torch.testing.assert_close(model(x, t, other, null_mask=mask), masked, atol=1e-6, rtol=1e-6)


def test_cond_emb_path_equals_label_path():
    model = class_model()
    x, t = inputs()
    labels, mask = torch.tensor([0, 3, 1]), torch.tensor([False, True, False])
    with torch.no_grad():
        emb = model.embed_condition(labels)
        assert emb.shape == (3, model.config.embedding_dim)
        torch.testing.assert_close(model(x, t, cond_emb=emb), model(x, t, labels), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x, t, cond_emb=emb, null_mask=mask), model(x, t, labels, null_mask=mask),
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model.embed_condition(labels, null_mask=mask)[1], model.null_embedding)


def test_gradients_reach_null_embedding_only_through_masked_rows():
    model = class_model()
    x, t = inputs()
    labels = torch.tensor([0, 1, 2])
    model(x, t, labels, null_mask=torch.tensor([False, True, False])).square().sum().backward()
    assert model.null_embedding.grad is not None and model.null_embedding.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x, t, labels, null_mask=torch.zeros(3, dtype=torch.bool)).square().sum().backward()
    assert model.null_embedding.grad is None or not model.null_embedding.grad.any()


def test_cond_emb_receives_gradients_for_inversion():
    model = class_model().requires_grad_(False)
    x, t = inputs()
    emb = model.embed_condition(torch.tensor([0, 1, 2])).clone().requires_grad_(True)
    model(x, t, cond_emb=emb).square().sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize("kind", ["class", "params"])
def test_batch_rows_are_independent(kind):
    model = class_model() if kind == "class" else tiny_model(cond="params", num_params=3)
    x, t = inputs(batch=4)
    cond = torch.tensor([0, 1, 2, 3]) if kind == "class" else torch.rand(4, 3) * 2 - 1
    mask = torch.tensor([False, True, False, False])
    with torch.no_grad():
        batched = model(x, t, cond, null_mask=mask)
        for k in range(4):
            alone = model(x[k:k + 1], t[k:k + 1], cond[k:k + 1], null_mask=mask[k:k + 1])
            torch.testing.assert_close(alone[0], batched[k], atol=1e-5, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------------


def test_conditioning_errors():
    """check_inputs, which the samplers call once per draw, refuses what forward cannot compute."""
    x, t = inputs(batch=2)
    with pytest.raises(ValueError, match="trained without conditioning"):
        UNet(tiny_config()).check_inputs(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="trained without conditioning"):
        UNet(tiny_config()).check_inputs(x, t, cond_emb=torch.zeros(2, 128))
    model = UNet(tiny_config(cond="class", num_classes=4))
    with pytest.raises(ValueError, match="integer labels of shape"):
        model.check_inputs(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="integer labels of shape"):
        model.check_inputs(x, t, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="one row per image"):
        model.check_inputs(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="null_mask must be a bool"):
        model.check_inputs(x, t, torch.tensor([0, 1]), null_mask=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="either cond or cond_emb"):
        model.check_inputs(x, t, torch.tensor([0, 1]), cond_emb=torch.zeros(2, 128))
    with pytest.raises(ValueError, match=r"cond_emb must have shape \(2, 128\)"):
        model.check_inputs(x, t, cond_emb=torch.zeros(2, 64))
    with pytest.raises(ValueError, match=r"parameters of shape \(B, 2\)"):
        UNet(tiny_config(cond="params", num_params=2)).check_inputs(x, t, torch.zeros(2, 3))


def test_input_shape_errors():
    model = UNet(tiny_config())
    with pytest.raises(ValueError, match="divisible by 2"):
        model.check_inputs(torch.randn(1, 3, 17, 17), torch.tensor([1]))
    with pytest.raises(ValueError, match="input channels"):
        model.check_inputs(torch.randn(1, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="t must have shape"):
        model.check_inputs(torch.randn(2, 3, 16, 16), torch.tensor(1))


@pytest.mark.parametrize("overrides, message", [
    (dict(cond="class"), "num_classes"),
    (dict(cond="params"), "num_params"),
    (dict(cond="text"), "cond must be one of"),
    (dict(attention_resolutions=(4,)), "feature-map sizes"),
    (dict(base_channels=48), "must be a multiple of 32"),
    (dict(num_heads=3), "^num_heads 3 must divide"),
    (dict(image_size=18, channel_mult=(1, 2, 2)), "divisible"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet(tiny_config(**overrides))  # size checks run once the size is known, at the latest here


def test_a_config_from_an_older_checkpoint_with_out_channels_still_loads():
    from core.config import from_dict, to_dict
    saved = {**to_dict(tiny_config()), "out_channels": 3}  # written when the field existed (always in_channels)
    assert from_dict(UNetConfig, saved) == tiny_config()
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(UNetConfig, {**to_dict(tiny_config()), "learned_sigma": True})
