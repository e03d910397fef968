"""Tests for the fused GroupNorm + modulation + SiLU (kernels.group_norm).

The PyTorch reference is checked against the formula written out by hand; the Triton op (run by
Triton's CPU interpreter) against the reference, forward and every gradient, on odd shapes, both
memory formats and three dtypes; then whole networks under both backends, and torch.compile.
Tolerances, relative to the largest magnitude of the expected tensor: 1e-5 in float32, 1e-2 in
bfloat16, 2e-3 in float16 (the module docstring states the same).
"""

import copy

import pytest
import torch
from torch import nn

import kernels
from helpers import opcheck, skip_unless_kernels_run
from kernels import group_norm
from kernels.group_norm import group_norm_act, group_norm_act_reference

pytestmark = pytest.mark.usefixtures("on_the_gpu_when_there_is_one")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture
def triton_kernels():
    skip_unless_kernels_run(group_norm._forward_stats_kernel)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Every element within tolerance * max |expected| (a relative error that near-zero entries cannot
    inflate). Every tensor compared here is of order one, except gradients that vanish analytically (d add
    with one channel per group: GroupNorm removes a per-channel constant); those are held to `tolerance`."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=tolerance * scale)


def make_norm(groups: int, channels: int, seed: int = 0) -> nn.GroupNorm:
    torch.manual_seed(seed)
    norm = nn.GroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():  # away from the identity initialisation, so weight and bias matter
        norm.weight.copy_(1 + 0.5 * torch.randn(channels))
        norm.bias.copy_(torch.randn(channels))
    return norm


def make_inputs(shape, which: str, dtype=torch.float32, channels_last: bool = False, seed: int = 1) -> dict:
    """x with a mean far from 0, and (B, C) add / scale / shift for the letters in `which` ("a", "s", "h")."""
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    B, C = shape[:2]
    x = (3 + 2 * torch.randn(shape, generator=g)).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    extras = {name: torch.randn(B, C, generator=g).to(dtype) for letter, name in
              (("a", "add"), ("s", "scale"), ("h", "shift")) if letter in which}
    return {"x": x, **extras}


def run(fn, inputs: dict, dy: torch.Tensor, norm: nn.GroupNorm) -> list[torch.Tensor]:
    """[y = fn(**inputs), then the gradient of (y * dy).sum() for every input and for weight and bias]."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    y = fn(**leaves)
    grads = torch.autograd.grad(y, [*leaves.values(), norm.weight, norm.bias], dy)
    return [y, *grads]


def formula(x, weight, bias, groups, eps, add=None, scale=None, shift=None, silu=False):
    """GroupNorm written out: mean and biased variance over each group's channels and positions."""
    B, C, H, W = x.shape
    if add is not None:
        x = x + add.view(B, C, 1, 1)
    v = x.reshape(B, groups, -1)
    mean = v.sum(-1, keepdim=True) / v.shape[-1]
    var = ((v - mean) ** 2).sum(-1, keepdim=True) / v.shape[-1]
    y = ((v - mean) / torch.sqrt(var + eps)).view(B, C, H, W) * weight.view(1, C, 1, 1) + bias.view(1, C, 1, 1)
    if scale is not None:
        y = y * (1 + scale.view(B, C, 1, 1))
    if shift is not None:
        y = y + shift.view(B, C, 1, 1)
    return y * torch.sigmoid(y) if silu else y


# ---- the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("which, silu", [("", False), ("", True), ("a", True), ("sh", True), ("s", False),
                                         ("ha", False)])
def test_reference_equals_the_formula(which, silu):
    norm = make_norm(3, 6).double()
    inputs = {k: v.double() for k, v in make_inputs((2, 6, 4, 5), which).items()}
    expected = formula(**inputs, weight=norm.weight, bias=norm.bias, groups=3, eps=norm.eps, silu=silu)
    torch.testing.assert_close(group_norm_act_reference(norm=norm, silu=silu, **inputs), expected,
                               rtol=1e-12, atol=1e-12)


def test_public_function_runs_the_reference_under_the_torch_backend():
    norm = make_norm(2, 4)
    inputs = make_inputs((1, 4, 3, 3), "sh")
    with kernels.using("torch"):
        assert torch.equal(group_norm_act(**inputs, norm=norm, silu=True),
                           group_norm_act_reference(**inputs, norm=norm, silu=True))


@pytest.mark.parametrize("which", ["sh", "s", "h"])
def test_reference_modulation_rounds_once_in_bfloat16(which):
    """Under bf16 autocast, as the CPU trains and samples, the reference applies scale and shift in float32 inside
    the GroupNorm and rounds once, as the kernels do: without the SiLU (which rounds once more) its output is the
    exact result rounded to bf16, where modulating in bf16 differed from it at a third of the values."""
    norm = make_norm(8, 32).cpu()
    inputs = {name: t.cpu() for name, t in make_inputs((4, 32, 8, 8), which, torch.bfloat16).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = group_norm_act_reference(norm=norm, **inputs)
    exact = group_norm_act_reference(norm=copy.deepcopy(norm).double(), **{k: v.double() for k, v in inputs.items()})
    assert y.dtype == torch.bfloat16
    # Float32 arithmetic can land on the other side of a rounding midpoint from float64's, rarely.
    assert (y != exact.bfloat16()).double().mean() < 0.01
    torch.testing.assert_close(y.double(), exact, rtol=2 ** -8, atol=1e-6)


# ---- the Triton op against the reference --------------------------------------------------------

# (B, C, H, W, groups): batch 1, channels not a power of two, one group, 1 and 3 channels per group.
SHAPES = [(1, 6, 3, 5, 2), (2, 5, 4, 3, 5), (1, 7, 2, 9, 1), (2, 12, 3, 3, 4)]
# (add "a" / scale "s" / shift "h", silu): every argument alone and in the combinations the networks use.
MODULATIONS = [("", False), ("", True), ("a", True), ("sh", True), ("s", False), ("h", False)]


def compare_backends(shape, which, silu, dtype=torch.float32, channels_last=False):
    B, C, H, W, G = shape
    norm = make_norm(G, C)
    inputs = make_inputs((B, C, H, W), which, dtype, channels_last)
    # dy in the other memory format than x: the backward reads each through its own strides.
    dy = torch.randn(B, C, H, W, generator=torch.Generator(torch.get_default_device()).manual_seed(2)).to(dtype)
    dy = dy if channels_last else dy.to(memory_format=torch.channels_last)
    with kernels.using("triton"):
        assert kernels.runs_triton(inputs["x"])
        actual = run(lambda **t: group_norm_act(norm=norm, silu=silu, **t), inputs, dy, norm)
    # The reference in float64 on the same (rounded) inputs: the exact answer the kernel approximates.
    norm64 = copy.deepcopy(norm).double()
    expected = run(lambda **t: group_norm_act_reference(norm=norm64, silu=silu, **t),
                   {k: v.double() for k, v in inputs.items()}, dy.double(), norm64)
    names = ["y", *inputs, "weight", "bias"]
    assert actual[0].dtype == dtype and actual[0].stride() == inputs["x"].stride()
    for name, a, e in zip(names, actual, expected):
        try:
            assert_close(a, e, TOLERANCE[dtype])
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_equals_reference_float32(shape, channels_last):
    for which, silu in MODULATIONS:
        compare_backends(shape, which, silu, channels_last=channels_last)


@pytest.mark.usefixtures("triton_kernels")
def test_triton_loops_over_channel_blocks_tiles_and_splits(monkeypatch):
    # Blocks far smaller than the group, so one program loops over several channel blocks (the last
    # one partial) and several position tiles, and each group is split over two programs.
    monkeypatch.setattr(group_norm, "TILE", 8)
    monkeypatch.setattr(group_norm, "VALUES_PER_PROGRAM", 40)
    monkeypatch.setattr(group_norm, "MAX_CHANNEL_BLOCK", 2)
    assert group_norm._launch_shape(5, 15) == (2, 4, 8, 2)  # (BLOCK_C, BLOCK_S, span, n_split)
    for channels_last in (False, True):
        compare_backends((2, 10, 5, 3, 2), "ash", True, channels_last=channels_last)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_with_float32_parameters(dtype):
    # As under autocast: x and the embedding in half precision, the norm's parameters in float32.
    for which, silu in [("sh", True), ("a", True)]:
        compare_backends((2, 12, 3, 5, 4), which, silu, dtype=dtype, channels_last=True)


@pytest.mark.usefixtures("triton_kernels")
def test_statistics_survive_a_mean_far_from_zero():
    # Values 1000 +- 1: float32 sums of v and v^2 would lose the variance to cancellation (~10%);
    # the shifted sums keep it.
    norm = make_norm(2, 4)
    x = 1000 + torch.randn(1, 4, 8, 8, generator=torch.Generator(torch.get_default_device()).manual_seed(3))
    with kernels.using("triton"):
        y = group_norm_act(x, norm)
    assert_close(y, group_norm_act_reference(x.double(), norm.double()), 1e-4)


# ---- groups of one value, and of none ----------------------------------------------------------


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("batch", [1, 3])
def test_groups_of_one_value_normalise_to_zero(batch):
    """1x1 maps, one channel per group: each group's variance is 0, so x - mean = 0 and y = silu(bias * (1 + scale)
    + shift), F.group_norm's answer, and no gradient reaches x, add or weight; forward and backward against the
    float64 reference (which takes batch 1, where F.group_norm raises). Those three gradients are 0 up to rounding
    times 1 / sqrt(eps) (F.group_norm's own in float32 are off by ~5e-4; the interpreter's are exactly 0)."""
    B, C = batch, 4
    norm = make_norm(C, C)
    inputs = make_inputs((B, C, 1, 1), "ash")
    dy = torch.randn(B, C, 1, 1, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    with kernels.using("triton"):
        actual = run(lambda **t: group_norm_act(norm=norm, silu=True, **t), inputs, dy, norm)
    norm64 = copy.deepcopy(norm).double()
    expected = run(lambda **t: group_norm_act_reference(norm=norm64, silu=True, **t),
                   {k: v.double() for k, v in inputs.items()}, dy.double(), norm64)
    u = norm.bias * (1 + inputs["scale"]) + inputs["shift"]
    assert_close(actual[0], (u * torch.sigmoid(u)).view(B, C, 1, 1), TOLERANCE[torch.float32])
    for name, a, e in zip(["y", *inputs, "weight", "bias"], actual, expected):
        vanishing = name in ("x", "add", "weight")
        if vanishing:
            assert e.abs().max() < 1e-9, name
        try:
            assert_close(a, e, TOLERANCE[torch.float32] / (norm.eps ** 0.5 if vanishing else 1))
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(2, 4, 0, 5), (2, 4, 0, 0), (0, 4, 3, 3), (0, 4, 0, 3)],
                         ids=["no rows", "no positions", "no images", "neither"])
def test_groups_of_no_values_give_an_empty_output(shape, backend):
    """An empty batch or empty maps: an empty y of x's shape and dtype, no error (F.group_norm raises for
    H * W = 0), and zero gradients for every per-channel input, none of them NaN (a mean over no values is)."""
    if backend == "triton":
        skip_unless_kernels_run(group_norm._forward_stats_kernel)
    norm = make_norm(2, 4)
    for which, silu, dropout in [("", False, 0.0), ("ash", True, 0.0), ("a", True, 0.2)]:
        inputs = make_inputs(shape, which)
        dy = torch.randn(shape)
        with kernels.using(backend):
            y, *grads = run(lambda **t: group_norm_act(norm=norm, silu=silu, dropout=dropout, **t), inputs, dy, norm)
        assert y.shape == shape and y.dtype == torch.float32
        assert grads[0].shape == shape
        for name, g in zip([*list(inputs)[1:], "weight", "bias"], grads[1:]):
            assert torch.equal(g, torch.zeros_like(g)), (which, name, g)


# ---- dropout folded into the op ------------------------------------------------------------------


def fused_with_dropout(norm, p, seed, silu=True, **inputs):
    """The public function with dropout p, its seed drawn after torch.manual_seed(seed); and that seed."""
    torch.manual_seed(seed)
    with kernels.using("triton"):
        y = group_norm_act(norm=norm, silu=silu, dropout=p, **inputs)
    torch.manual_seed(seed)
    return y, torch.randint(0, group_norm.SEED_LIMIT, (1,), dtype=torch.int64)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 6, 3, 5, 2), (2, 12, 3, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_triton_dropout_equals_the_reference_times_the_mask(shape, channels_last):
    # Forward and every gradient: the reference (float64) times the kernel's mask written out over a flat
    # NCHW index (a launch of its own), scaled by 1 / (1 - p).
    B, C, H, W, G = shape
    p = 0.3
    norm = make_norm(G, C)
    for which, silu in [("", True), ("a", True), ("sh", True), ("h", False)]:
        inputs = make_inputs((B, C, H, W), which, channels_last=channels_last)
        dy = torch.randn(B, C, H, W, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
        leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
        y, seed = fused_with_dropout(norm, p, 5, silu, **leaves)
        actual = [y, *torch.autograd.grad(y, [*leaves.values(), norm.weight, norm.bias], dy)]
        keep = group_norm.dropout_keep_mask(seed, p, (B, C, H, W))
        norm64 = copy.deepcopy(norm).double()
        expected = run(lambda **t: group_norm_act_reference(norm=norm64, silu=silu, **t) * keep / (1 - p),
                       {k: v.double() for k, v in inputs.items()}, dy.double(), norm64)
        assert 0 < keep.sum() < keep.numel() and torch.equal(y == 0, ~keep)  # the zeros are the mask's
        assert y.stride() == inputs["x"].stride()
        for name, a, e in zip(["y", *inputs, "weight", "bias"], actual, expected):
            try:
                assert_close(a, e, TOLERANCE[torch.float32])
            except AssertionError as error:
                raise AssertionError(f"{which} {silu} {name}: {error}") from None


@pytest.mark.usefixtures("triton_kernels")
def test_triton_dropout_mask_statistics_layout_and_seeds():
    B, C, H, W, p = 2, 8, 24, 24, 0.25
    norm = make_norm(4, C)
    x = make_inputs((B, C, H, W), "")["x"]
    y, seed = fused_with_dropout(norm, p, 0, x=x)
    last, _ = fused_with_dropout(norm, p, 0, x=x.to(memory_format=torch.channels_last))
    other, _ = fused_with_dropout(norm, p, 1, x=x)
    assert torch.equal(last, y)  # the mask is a function of (seed, NCHW index), not of the layout
    dropped, dropped_other = (y == 0), (other == 0)
    n = y.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.double().mean().item() - p) < 5 * sigma
    # Another seed draws another mask, independent of the first: P(both dropped) = p^2.
    assert abs((dropped & dropped_other).double().mean().item() - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    # Neither repeated across images nor across channels (a wrong row index would repeat the pattern).
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[:, 0], dropped[:, 1])
    with kernels.using("triton"):  # without dropout (or outside training) nothing is zeroed
        assert torch.equal(group_norm_act(x, norm, silu=True, dropout=0.0), group_norm_act(x, norm, silu=True))


@pytest.mark.usefixtures("triton_kernels")
def test_triton_dropout_in_bfloat16():
    norm = make_norm(4, 12)
    inputs = make_inputs((2, 12, 3, 5), "a", torch.bfloat16, channels_last=True)
    y, seed = fused_with_dropout(norm, 0.1, 3, **inputs)
    keep = group_norm.dropout_keep_mask(seed, 0.1, y.shape)
    expected = group_norm_act_reference(norm=copy.deepcopy(norm).double(), silu=True,
                                        **{k: v.double() for k, v in inputs.items()}) * keep / 0.9
    assert y.dtype == torch.bfloat16
    assert_close(y, expected, TOLERANCE[torch.bfloat16])


@pytest.mark.usefixtures("triton_kernels")
def test_unet_drops_inside_the_fused_op_in_training_only():
    # One of the U-Net's own residual blocks, switched by the model's train()/eval() (the whole U-Net
    # in Triton's interpreter takes a minute on 2 cores).
    from ddpm.unet import ResBlock, UNet, UNetConfig
    config = UNetConfig(image_size=4, base_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(), dropout=0.3, cond="class", num_classes=3)
    model = perturbed(UNet(config))
    block = next(m for m in model.modules() if isinstance(m, ResBlock))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, config.embedding_dim)

    def forward(backend, seed):
        torch.manual_seed(seed)
        with kernels.using(backend), torch.no_grad():
            return block(x, emb)

    model.train()
    dropped = forward("triton", 0)
    assert torch.equal(dropped, forward("triton", 0))
    assert not torch.equal(dropped, forward("triton", 1))
    assert not torch.equal(dropped, forward("torch", 0))  # another stream than the CPU's
    model.eval()
    assert_close(forward("triton", 0), forward("torch", 1), 1e-4)


# ---- whole networks (the Triton forward compiled with fullgraph=True: no graph breaks) ----------


def perturbed(model: nn.Module) -> nn.Module:
    """The model with every parameter nudged, so zero-initialised layers pass gradients on."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def outputs_and_gradients(model: nn.Module, backend: str, forward) -> list[torch.Tensor]:
    """[forward(), then the gradient of its mean square for every parameter that gets one]. Under
    "triton", forward is compiled with fullgraph=True, which fails on any graph break."""
    model.zero_grad()
    torch._dynamo.reset()
    with kernels.using(backend):
        out = (torch.compile(forward, backend="eager", fullgraph=True) if backend == "triton" else forward)()
    out.square().mean().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("scale_shift_norm", [False, True])
def test_unet_is_the_same_under_both_backends(scale_shift_norm):
    from ddpm.unet import UNet, UNetConfig
    # One level of 32 channels (8 groups): res blocks with either embedding, attention, concatenated skips.
    config = UNetConfig(image_size=4, base_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(4,), num_heads=2, dropout=0.0, scale_shift_norm=scale_shift_norm,
                        cond="class", num_classes=3)
    model = perturbed(UNet(config))
    x, t, labels = torch.randn(1, 3, 4, 4), torch.tensor([500]), torch.tensor([2])
    expected = outputs_and_gradients(model, "torch", lambda: model(x, t, labels))
    actual = outputs_and_gradients(model, "triton", lambda: model(x, t, labels))
    assert len(actual) == len(expected) > 10
    for a, e in zip(actual, expected):
        assert_close(a, e, 1e-4)


@pytest.mark.usefixtures("triton_kernels")
def test_autoencoder_is_the_same_under_both_backends():
    from vae.autoencoder import AutoencoderConfig, AutoencoderKL
    # One level of 8 channels (2 groups); the middle has the attention block.
    config = AutoencoderConfig(in_channels=3, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                               latent_channels=2, resolution=4)
    model = perturbed(AutoencoderKL(config))
    x, noise = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)

    def reconstruct():
        return model.decode(model.encode(x).sample(noise))

    expected = outputs_and_gradients(model, "torch", reconstruct)
    actual = outputs_and_gradients(model, "triton", reconstruct)
    assert len(actual) == len(expected) > 10
    for a, e in zip(actual, expected):
        assert_close(a, e, 1e-4)


@pytest.mark.usefixtures("triton_kernels")
@pytest.mark.parametrize("modulated", [True, False], ids=["add-scale-shift-silu-dropout", "plain"])
def test_ops_pass_opcheck(modulated):
    """Schema, autograd registration, fakes and AOT dispatch of both ops (`helpers.opcheck`), channels-last
    with every input and dropout, contiguous without."""
    norm = make_norm(4, 8)
    inputs = make_inputs((2, 8, 3, 5), "ash" if modulated else "", channels_last=modulated)
    x = inputs["x"].requires_grad_()
    extras = [inputs.get(name) for name in ("add", "scale", "shift")]
    silu, p, seed = (True, 0.1, torch.tensor([5])) if modulated else (False, 0.0, None)
    with kernels.using("triton"):
        forward = (x, norm.weight, norm.bias, *[e if e is None else e.requires_grad_() for e in extras], 4, 1e-6,
                   silu, p, seed)
        opcheck(torch.ops.synthdiff.group_norm_act.default, forward)
        _, mean, rstd = torch.ops.synthdiff.group_norm_act(*forward)
        detached = [e if e is None else e.detach() for e in extras]
        opcheck(torch.ops.synthdiff.group_norm_act_backward.default,
                (torch.randn_like(x), x.detach(), norm.weight.detach(), norm.bias.detach(), *detached,
                 mean.detach(), rstd.detach(), 4, silu, p, seed, True))


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.mark.usefixtures("triton_kernels")
def test_op_compiles_without_graph_breaks():
    norm = make_norm(2, 6)
    inputs = make_inputs((1, 6, 3, 5), "sh", channels_last=True)

    def f(x, scale, shift):
        return group_norm_act(x, norm, scale=scale, shift=shift, silu=True)

    dy = torch.randn(1, 6, 3, 5)
    with kernels.using("triton"):
        eager = run(f, inputs, dy, norm)
        # The interpreter cannot run kernels on the fake tensors AOTAutograd traces with, so keep the op
        # opaque there; on a GPU the default decomposition hands the kernels themselves to the backend.
        with torch._functorch.config.patch(decompose_custom_triton_ops=not kernels.interpreting()):
            torch._dynamo.reset()
            assert torch._dynamo.explain(f)(**inputs).graph_break_count == 0
            compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
            traced = run(compiled, inputs, dy, norm)
    for a, e in zip(traced, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.usefixtures("triton_kernels")
def test_op_with_dropout_compiles_without_graph_breaks():
    # The seed is a device tensor drawn inside the graph: compiled and eager draw the same mask from the
    # same generator state, and no recompilation follows from a new seed.
    norm = make_norm(2, 6)
    inputs = make_inputs((1, 6, 3, 5), "a", channels_last=True)

    def f(x, add):
        return group_norm_act(x, norm, add=add, silu=True, dropout=0.2)

    dy = torch.randn(1, 6, 3, 5)
    with kernels.using("triton"):
        torch.manual_seed(0)
        eager = run(f, inputs, dy, norm)
        with torch._functorch.config.patch(decompose_custom_triton_ops=not kernels.interpreting()):
            torch._dynamo.reset()
            assert torch._dynamo.explain(f)(**inputs).graph_break_count == 0
            compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
            torch.manual_seed(0)
            traced = run(compiled, inputs, dy, norm)
            torch.manual_seed(1)
            again = run(compiled, inputs, dy, norm)
    assert (eager[0] == 0).any()
    for a, e in zip(traced, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert not torch.equal(again[0], eager[0])


# ---- arguments the networks never pass, which the op must still get right -------------------------


@pytest.mark.usefixtures("triton_kernels")
def test_parameters_that_are_strided_views_are_read_through_their_strides():
    # A norm whose weight and bias are every other entry of longer tensors (views with stride 2): channel c
    # must be scaled by weight[c], not by the c-th value of its storage; forward and every gradient.
    norm = make_norm(2, 6)
    with torch.no_grad():
        norm.weight = nn.Parameter(torch.cat([norm.weight[:, None], torch.zeros(6, 1)], 1).view(-1)[::2])
        norm.bias = nn.Parameter(torch.cat([norm.bias[:, None], torch.ones(6, 1)], 1).view(-1)[::2])
    assert not norm.weight.is_contiguous() and not norm.bias.is_contiguous()
    inputs = make_inputs((2, 6, 3, 4), "sh")
    dy = torch.randn(2, 6, 3, 4, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    with kernels.using("triton"):
        actual = run(lambda **t: group_norm_act(norm=norm, silu=True, **t), inputs, dy, norm)
    norm64 = copy.deepcopy(norm).double()
    expected = run(lambda **t: group_norm_act_reference(norm=norm64, silu=True, **t),
                   {k: v.double() for k, v in inputs.items()}, dy.double(), norm64)
    for name, a, e in zip(["y", *inputs, "weight", "bias"], actual, expected):
        try:
            assert_close(a, e, TOLERANCE[torch.float32])
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.usefixtures("triton_kernels")
def test_float64_runs_the_reference_under_triton():
    # As the sampler step and LPIPS do: the kernels compute in float32, which would hand float64 callers
    # (gradcheck, analytic tests) float32 results in float64 tensors.
    norm = make_norm(2, 4).double()
    inputs = {k: v.double() for k, v in make_inputs((1, 4, 2, 3), "ash").items()}
    with kernels.using("triton"):
        assert torch.equal(group_norm_act(norm=norm, silu=True, **inputs),
                           group_norm_act_reference(norm=norm, silu=True, **inputs))
        leaves = [t.detach().clone().requires_grad_() for t in inputs.values()]
        assert torch.autograd.gradcheck(
            lambda x, add, scale, shift: group_norm_act(x, norm, add=add, scale=scale, shift=shift, silu=True), leaves)
