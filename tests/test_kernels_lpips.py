"""Tests for LPIPS's fused per-tap distance (kernels.lpips) and the perceptual distance that calls it.

The PyTorch reference is checked against the definition written out position by position; the Triton
op (run by Triton's CPU interpreter) against the reference, the distance and both gradients, on odd
shapes, both memory formats and two dtypes; then the whole perceptual distance under both backends, and
torch.compile. Tolerances, relative to the largest magnitude of the expected tensor: 1e-5 in float32;
in bfloat16, 1e-5 for the distance and 1e-2 for the gradients against the float32 reference on the same
values (the module docstring states the same).
"""

import pytest
import torch

import kernels
from helpers import opcheck, skip_unless_kernels_run
from kernels import lpips as module
from kernels.lpips import NORM_EPS, normalise_channels, tap_distance, tap_distance_reference
from vae.perceptual import PerceptualDistance

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("on_the_gpu_when_there_is_one")


@pytest.fixture
def triton_kernels():
    skip_unless_kernels_run(module._forward_kernel)


def no_reference(*args, **kwargs):
    raise AssertionError("the Triton path ran the PyTorch reference")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Every element within tolerance * max |expected| (a relative error that near-zero entries cannot inflate)."""
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=tolerance * scale)


def features(shape, seed: int, channels_last: bool = False) -> torch.Tensor:
    """ReLU-like features: nonnegative, about half of them zero."""
    f = torch.randn(shape, generator=torch.Generator(torch.get_default_device()).manual_seed(seed)).relu()
    return f.contiguous(memory_format=torch.channels_last) if channels_last else f


def head(channels: int, seed: int = 9) -> torch.Tensor:
    return torch.rand(channels, generator=torch.Generator(torch.get_default_device()).manual_seed(seed)) + 0.05


def distance_and_gradients(fn, fx, fy, weight, grad, fy_grad: bool = True) -> list[torch.Tensor]:
    """[fn(fx, fy, weight), then the gradient of (distance * grad).sum() at fx, and at fy if fy_grad]."""
    fx, fy = fx.detach().requires_grad_(), fy.detach().requires_grad_(fy_grad)
    distance = fn(fx, fy, weight)
    distance.backward(grad)
    assert (fy.grad is not None) == fy_grad
    return [distance, fx.grad] + ([fy.grad] if fy_grad else [])


# ---- the reference against the definition ----------------------------------------------------------


def test_reference_is_the_lpips_definition_written_out():
    fx, fy, weight = features((2, 5, 3, 4), 0).double(), features((2, 5, 3, 4), 1).double(), head(5).double()
    fx[1, :, 2, 3] = 0  # a position where every ReLU is off: its unit vector is 0
    expected = torch.zeros(2, dtype=F64)
    for b in range(2):
        for h in range(3):
            for w in range(4):
                u = fx[b, :, h, w] / (fx[b, :, h, w].square().sum().sqrt() + 1e-10)
                v = fy[b, :, h, w] / (fy[b, :, h, w].square().sum().sqrt() + 1e-10)
                expected[b] += (weight * (u - v) ** 2).sum() / 12
    actual = tap_distance_reference(fx, fy, weight)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=0)
    unit = normalise_channels(fx)
    torch.testing.assert_close(unit.norm(dim=1)[1, 2, 3], torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(unit.norm(dim=1)[0], torch.ones(3, 4, dtype=F64))
    assert NORM_EPS == 1e-10


def test_reference_gives_channels_last_features_a_channels_last_gradient():
    # The trunk's backward then runs in one layout (a contiguous gradient of channels_last features made each
    # of its ReLU backward passes mix layouts); the values do not depend on the layout.
    generator = torch.Generator().manual_seed(0)
    fx, fy = (torch.randn(2, 6, 3, 4, dtype=F64, generator=generator).relu() for _ in range(2))
    weight = torch.rand(6, dtype=F64, generator=generator)
    gradients = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        leaf = fx.contiguous(memory_format=layout).requires_grad_(True)
        seen = []
        leaf.register_hook(seen.append)  # the gradient as it arrives, before autograd matches it to the leaf
        distance = tap_distance_reference(leaf, fy.contiguous(memory_format=layout), weight)
        distance.sum().backward()
        assert seen[0].is_contiguous(memory_format=layout)
        gradients[layout] = (distance, seen[0])
    for a, b in zip(*gradients.values()):
        # Each layout sums in its own order: equal to float64 rounding, which near a zero gradient is absolute.
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# ---- the Triton op against the reference -----------------------------------------------------------

SHAPES = [(1, 5, 3, 7),     # batch 1; 5 channels of a block of 8, 21 positions of one block of 32
          (2, 300, 6, 7),   # 300 channels of 512; 42 positions in blocks of 8, the last one partial
          (3, 64, 1, 9)]    # one row


@pytest.mark.parametrize("fy_grad", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_op_equals_the_reference_in_float32(triton_kernels, monkeypatch, shape, channels_last, fy_grad):
    fx, fy, weight = features(shape, 0, channels_last), features(shape, 1, channels_last), head(shape[1])
    grad = torch.randn(shape[0], generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    expected = distance_and_gradients(tap_distance_reference, fx, fy, weight, grad, fy_grad)
    monkeypatch.setattr(module, "tap_distance_reference", no_reference)
    with kernels.using("triton"):
        actual = distance_and_gradients(tap_distance, fx, fy, weight, grad, fy_grad)
    assert actual[0].dtype == torch.float32 and actual[0].shape == (shape[0],)
    for gradient, f in zip(actual[1:], (fx, fy)):
        assert gradient.stride() == f.stride()  # the gradients keep the features' layout
    for a, e in zip(actual, expected):
        assert_close(a, e, 1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_op_in_bfloat16_equals_the_float32_reference(triton_kernels, channels_last):
    shape = (2, 300, 6, 7)
    fx, fy = features(shape, 0, channels_last).bfloat16(), features(shape, 1, channels_last).bfloat16()
    weight, grad = head(shape[1]), torch.randn(2, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    # The reference in float32 on the same (bfloat16) values: the kernel accumulates in float32.
    expected = distance_and_gradients(tap_distance_reference, fx.float(), fy.float(), weight, grad)
    with kernels.using("triton"):
        actual = distance_and_gradients(tap_distance, fx, fy, weight, grad)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == actual[2].dtype == torch.bfloat16
    assert_close(actual[0], expected[0], 1e-5)
    for a, e in zip(actual[1:], expected[1:]):
        assert_close(a, e, 1e-2)


def test_all_zero_feature_vectors_give_what_the_reference_gives(triton_kernels):
    # Where both images have every ReLU off, the position adds nothing and gets no gradient. Where only x
    # has, its unit vector is 0 and the gradient there is the direct term q / NORM_EPS, large but finite
    # (the trunk's ReLU mask zeroes it): vector_norm's backward, which the kernel follows, adds nothing.
    shape = (1, 5, 3, 7)
    fx, fy, weight = features(shape, 0), features(shape, 1), head(5)
    fx[0, :, 0, :2], fy[0, :, 0, 0], fy[0, :, 0, 1] = 0, 0, 0.5
    grad = torch.ones(1)
    expected = distance_and_gradients(tap_distance_reference, fx, fy, weight, grad)
    with kernels.using("triton"):
        actual = distance_and_gradients(tap_distance, fx, fy, weight, grad)
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        assert_close(a, e, 1e-5)
    assert (actual[1][0, :, 0, 0] == 0).all() and (actual[2][0, :, 0, 0] == 0).all()
    assert actual[1][0, :, 0, 1].abs().max() > 1e6
    inner = (slice(None), slice(None), slice(1, None))  # away from the zero vectors, at ordinary magnitudes
    for a, e in zip(actual[1:], expected[1:]):
        assert_close(a[inner], e[inner], 1e-5)


def test_all_zero_feature_vectors_stay_zero_in_float16():
    # 1e-10 is below float16's smallest subnormal: added to a zero norm it rounded away, giving 0/0.
    f = torch.zeros(2, 4, 3, 3, dtype=torch.float16)
    f[:, :, 0, 0] = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float16)
    u = normalise_channels(f)
    assert (u[:, :, 1:, :] == 0).all() and (u[:, :, :, 1:] == 0).all()
    assert_close(u[:, :, 0, 0].float(), torch.tensor([0.6, 0.0, 0.8, 0.0]).expand(2, 4), 1e-3)
    distance = tap_distance_reference(f, 2 * f.flip(0), torch.ones(4, dtype=torch.float16))
    assert torch.isfinite(distance).all()


def test_a_head_that_needs_a_gradient_runs_the_reference(triton_kernels):
    fx, fy = features((1, 5, 3, 7), 0), features((1, 5, 3, 7), 1)
    weights = [head(5).requires_grad_() for _ in range(2)]
    for weight, backend in zip(weights, ("torch", "triton")):
        with kernels.using(backend):
            tap_distance(fx, fy, weight).sum().backward()
    torch.testing.assert_close(weights[1].grad, weights[0].grad)


# ---- the perceptual distance under both backends ---------------------------------------------------


def test_perceptual_distance_and_its_gradient_are_the_same_under_both_backends(triton_kernels, monkeypatch):
    net = PerceptualDistance(taps=2)
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    x, y = torch.rand(2, 3, 10, 14, generator=g) * 2 - 1, torch.rand(2, 3, 10, 14, generator=g) * 2 - 1
    results = []
    for backend in ("torch", "triton"):
        if backend == "triton":
            monkeypatch.setattr(module, "tap_distance_reference", no_reference)
        image = x.clone().requires_grad_()
        with kernels.using(backend):
            distances = net.tap_distances(image, y)
            distances.sum().backward()
        results.append((distances, image.grad))
    (expected, expected_grad), (actual, actual_grad) = results
    assert actual.shape == (2, 2) and actual.dtype == torch.float32
    assert_close(actual, expected, 1e-5)
    assert_close(actual_grad, expected_grad, 1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_ops_pass_opcheck(triton_kernels, channels_last):
    """Schema, autograd registration, fakes and AOT dispatch of both ops (`helpers.opcheck`)."""
    shape = (2, 5, 3, 7)
    fx, fy = (features(shape, seed, channels_last).requires_grad_() for seed in (0, 1))
    with kernels.using("triton"):
        opcheck(torch.ops.synthdiff.lpips_tap_distance.default, (fx, fy, head(5)))
        opcheck(torch.ops.synthdiff.lpips_tap_distance_backward.default,
                (torch.rand(2), fx.detach(), fy.detach(), head(5), True, not channels_last))


# ---- torch.compile and life without Triton ---------------------------------------------------------


def test_op_compiles_without_graph_breaks(triton_kernels):
    shape = (1, 5, 3, 7)
    fx, fy, weight = features(shape, 0, True), features(shape, 1, True), head(5)

    def f(fx, fy):
        return tap_distance(fx, fy, weight).sum()

    def run(fn):
        a, b = fx.detach().requires_grad_(), fy.detach().requires_grad_()
        distance = fn(a, b)
        distance.backward()
        return distance, a.grad, b.grad

    with kernels.using("triton"):
        eager = run(f)
        # The interpreter cannot run kernels on the fake tensors AOTAutograd traces with, so keep the op
        # opaque there; on a GPU the default decomposition hands the kernels themselves to the backend.
        with torch._functorch.config.patch(decompose_custom_triton_ops=not kernels.interpreting()):
            torch._dynamo.reset()
            assert torch._dynamo.explain(f)(fx, fy).graph_break_count == 0
            traced = run(torch.compile(f, backend="aot_eager", fullgraph=True))
    for a, e in zip(traced, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_a_head_that_is_a_strided_view_is_read_through_its_stride(triton_kernels):
    # The op is handed any (C,) weight: one that is every other entry of a longer tensor (a view with stride
    # 2) must weigh channel c by weight[c], not by the c-th value of its storage.
    shape = (2, 5, 3, 4)
    fx, fy = features(shape, 0), features(shape, 1)
    weight = head(2 * shape[1])[::2]
    assert not weight.is_contiguous()
    grad = torch.randn(2, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    expected = distance_and_gradients(tap_distance_reference, fx, fy, weight.contiguous(), grad)
    with kernels.using("triton"):
        actual = distance_and_gradients(tap_distance, fx, fy, weight, grad)
    for a, e in zip(actual, expected):
        assert_close(a, e, 1e-5)
