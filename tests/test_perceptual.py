"""Tests of vae/perceptual.py: the LPIPS distance (Zhang et al. 2018) and its random-network fallback.

The published files are never needed: weight files with random values are written under exactly the
published key names and shapes (listed out below from torchvision's VGG-16 and LPIPS v0.1), and the
distance is checked against a hand computation with plain convolutions. Every test runs with an
empty torch hub directory of its own and with downloads made to fail, so the network is never used.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import MissingFileError
from vae.perceptual import (LPIPS_FILENAME, PERCEPTUAL_KINDS, TAPS, VGG16_FILENAME, PerceptualDistance,
                            build_perceptual)

# torchvision vgg16().features: (index, in channels, out channels) of each 3x3 convolution.
PUBLISHED_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
                   (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
                   (26, 512, 512), (28, 512, 512)]
PUBLISHED_POOLS = [4, 9, 16, 23]
TAP_RELUS = [3, 8, 15, 22, 29]  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
HEAD_CHANNELS = [64, 128, 256, 512, 512]  # lin0..lin4 of LPIPS v0.1 vgg.pth
# LPIPS v0.1 input scaling, written out independently of the module.
SHIFT = [-0.030, -0.088, -0.188]
SCALE = [0.458, 0.448, 0.450]


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch, tmp_path):
    """An empty torch hub directory, and downloads that fail as they would offline."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    downloads = []

    def offline(url, dst, *args, **kwargs):
        downloads.append(url)
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub, downloads


def published_vgg(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, c_in, c_out in PUBLISHED_CONVS:
        # He-scaled, so activations stay O(1) through the trunk and the comparisons are well conditioned.
        state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=generator) * math.sqrt(2 / (9 * c_in))
        state[f"features.{index}.bias"] = 0.1 * torch.randn(c_out, generator=generator)
    # The real fully connected layers are ~500 MB; only their names matter, and they must be ignored.
    for layer in (0, 3, 6):
        state[f"classifier.{layer}.weight"] = torch.zeros(2, 2)
        state[f"classifier.{layer}.bias"] = torch.zeros(2)
    return state


def published_heads(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{tap}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) + 0.05
            for tap, c in enumerate(HEAD_CHANNELS)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    vgg, heads = published_vgg(), published_heads()
    torch.save(vgg, folder / "vgg.pth")
    torch.save(heads, folder / "heads.pth")
    return folder / "vgg.pth", folder / "heads.pth", vgg, heads


@pytest.fixture(scope="module")
def random_net():
    return build_perceptual("random", taps=5)


def make_images(batch: int = 2, size: int = 32) -> torch.Tensor:
    """Smooth gradients, stripes and a disc per channel, in [-0.8, 0.8], different per image."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for b in range(batch):
        channels = []
        for c in range(3):
            phase = 1.3 * b + 0.7 * c
            disc = (((xs - 0.4 - 0.1 * b) ** 2 + (ys - 0.5) ** 2) < 0.06).float()
            channels.append(0.4 * torch.sin(6 * xs + 4 * ys + phase) + 0.3 * disc + 0.3 * (xs - ys) * (c - 1))
        images.append(torch.stack(channels))
    return torch.stack(images).clamp(-0.8, 0.8)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(3, 1, -1, 1), groups=3)


# ----------------------------------------------------------------------------------------------
# The distance


def test_zero_for_identical_images_symmetric_and_positive_otherwise(random_net):
    x = make_images()
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    with torch.no_grad():
        same, forward, backward = random_net(x, x), random_net(x, y), random_net(y, x)
    assert same.shape == (2,) and same.dtype == torch.float32
    assert same.abs().max() < 1e-6
    assert (forward > 1e-3).all()
    torch.testing.assert_close(forward, backward, rtol=1e-6, atol=0)


def test_grows_with_the_strength_of_noise_blur_and_shift(random_net):
    x = make_images()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    distortions = {
        "noise": [x + amplitude * noise for amplitude in (0.05, 0.1, 0.2)],
        "blur": [gaussian_blur(x, sigma) for sigma in (0.5, 1.0, 2.0)],
        "shift": [torch.roll(x, shifts=(pixels, pixels), dims=(2, 3)) for pixels in (1, 2, 4)],
    }
    with torch.no_grad():
        for name, distorted in distortions.items():
            d = torch.stack([random_net(x, y) for y in distorted])  # (strength, batch)
            assert (d[1:] > d[:-1]).all(), f"{name}: {d.tolist()}"


def test_gradients_reach_the_input_and_not_the_frozen_parameters(random_net):
    assert not random_net.training
    assert all(not p.requires_grad for p in random_net.parameters())
    target = make_images()
    x = gaussian_blur(target, 1.0).requires_grad_(True)
    random_net(x, target).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in random_net.parameters())


def test_distance_and_gradients_stay_finite_where_every_feature_of_a_pixel_is_zero(random_net):
    # Where the image equals the shift, the scaled input is 0, so the zero-bias random trunk gives
    # all-zero feature vectors there at every tap: the normalisation must not divide 0 by 0.
    x = torch.tensor(SHIFT).view(1, 3, 1, 1).repeat(1, 1, 32, 32)
    x[..., 12:20, 12:20] = 0.5
    x.requires_grad_(True)
    d = random_net(x, torch.zeros(1, 3, 32, 32))
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("taps", [1, 2])
def test_matches_a_hand_computation_with_plain_convolutions(files, taps):
    vgg_path, heads_path, vgg, heads = files
    net = build_perceptual("lpips", taps=taps, vgg_weights=str(vgg_path), lpips_weights=str(heads_path))
    x = make_images()
    y = gaussian_blur(x, 1.0) + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def conv_relu(h, index):
        w, b = vgg[f"features.{index}.weight"].double(), vgg[f"features.{index}.bias"].double()
        return F.relu(F.conv2d(h, w, b, padding=1))

    def tap_outputs(image):
        h = (image.double() - torch.tensor(SHIFT, dtype=torch.float64).view(1, 3, 1, 1)) \
            / torch.tensor(SCALE, dtype=torch.float64).view(1, 3, 1, 1)
        relu1_2 = conv_relu(conv_relu(h, 0), 2)
        relu2_2 = conv_relu(conv_relu(F.max_pool2d(relu1_2, 2), 5), 7)
        return [relu1_2, relu2_2][:taps]

    expected = torch.zeros(x.shape[0], dtype=torch.float64)
    for tap, (fx, fy) in enumerate(zip(tap_outputs(x), tap_outputs(y))):
        fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        weighted = F.conv2d((fx - fy) ** 2, heads[f"lin{tap}.model.1.weight"].double())  # (B, 1, H, W)
        expected += weighted.mean(dim=(1, 2, 3))
    with torch.no_grad():
        actual = net(x, y)
    torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=0)


# ----------------------------------------------------------------------------------------------
# Network layout and published weights


@pytest.mark.parametrize("taps", [1, 2, 3, 4, 5])
def test_trunk_is_torchvision_vgg16_cut_after_the_last_used_tap(taps):
    net = PerceptualDistance(taps)
    assert net.taps == taps and net.kind == "random"
    assert len(net.features) == TAP_RELUS[taps - 1] + 1
    for index, c_in, c_out in PUBLISHED_CONVS:
        if index < len(net.features):
            conv = net.features[index]
            assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (c_in, c_out, (3, 3), (1, 1))
            assert isinstance(net.features[index + 1], torch.nn.ReLU)
    for index in PUBLISHED_POOLS:
        if index < len(net.features):
            assert isinstance(net.features[index], torch.nn.MaxPool2d) and net.features[index].kernel_size == 2
    assert [head.numel() for head in net.heads] == HEAD_CHANNELS[:taps]


def test_lpips_kind_loads_every_published_tensor(files):
    vgg_path, heads_path, vgg, heads = files
    net = build_perceptual("lpips", taps=5, vgg_weights=str(vgg_path), lpips_weights=str(heads_path))
    assert net.kind == "lpips" and not net.training
    assert all(not p.requires_grad for p in net.parameters())
    for index, _, _ in PUBLISHED_CONVS:
        assert torch.equal(net.features[index].weight, vgg[f"features.{index}.weight"])
        assert torch.equal(net.features[index].bias, vgg[f"features.{index}.bias"])
    for tap in range(5):
        assert torch.equal(net.heads[tap], heads[f"lin{tap}.model.1.weight"].flatten())


def _renamed(state, old, new):
    state = dict(state)
    state[new] = state.pop(old)
    return state


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


def _reshaped(state, key, shape):
    return {**state, key: torch.ones(shape)}


@pytest.mark.parametrize("which, edit, key", [
    ("vgg", lambda s: _renamed(s, "features.0.weight", "features.0.weights"), "features.0.weight"),
    # relu5_3's layer is checked even though taps=1 never uses it.
    ("vgg", lambda s: _without(s, "features.28.bias"), "features.28.bias"),
    ("vgg", lambda s: _reshaped(s, "features.5.weight", (128, 64, 1, 1)), "features.5.weight"),
    ("heads", lambda s: _renamed(s, "lin3.model.1.weight", "lin3.model.0.weight"), "lin3.model.0.weight"),
    ("heads", lambda s: _without(s, "lin4.model.1.weight"), "lin4.model.1.weight"),
    ("heads", lambda s: _reshaped(s, "lin1.model.1.weight", (1, 64, 1, 1)), "lin1.model.1.weight"),
])
def test_a_renamed_missing_or_misshaped_key_is_refused_before_anything_is_copied(files, which, edit, key):
    _, _, vgg, heads = files
    vgg, heads = (edit(vgg), heads) if which == "vgg" else (vgg, edit(heads))
    net = PerceptualDistance(taps=1)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        net.load_published(vgg, heads, vgg_source="vgg.pth", lpips_source="heads.pth")
    assert net.kind == "random"
    assert all(torch.equal(value, before[name]) for name, value in net.state_dict().items())


def test_a_wrong_file_is_refused_through_build_with_its_path_and_key(files, tmp_path):
    vgg_path, _, _, heads = files
    torch.save(_reshaped(heads, "lin2.model.1.weight", (1, 256, 3, 3)), tmp_path / "bad_heads.pth")
    with pytest.raises(ValueError, match=r"bad_heads\.pth.*lin2\.model\.1\.weight"):
        build_perceptual("lpips", taps=1, vgg_weights=str(vgg_path), lpips_weights=str(tmp_path / "bad_heads.pth"))


def test_a_head_file_with_a_negative_weight_is_refused(files, tmp_path):
    vgg_path, _, _, heads = files
    heads = {key: value.clone() for key, value in heads.items()}
    heads["lin2.model.1.weight"][0, 7, 0, 0] = -0.01
    torch.save(heads, tmp_path / "negative.pth")
    with pytest.raises(ValueError, match=r"negative.*lin2\.model\.1\.weight"):
        build_perceptual("lpips", taps=1, vgg_weights=str(vgg_path), lpips_weights=str(tmp_path / "negative.pth"))


# ----------------------------------------------------------------------------------------------
# Finding the files: explicit paths, the torch hub cache, downloads


def _cache(hub, files, *, vgg=True, heads=True):
    checkpoints = hub / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    if vgg:
        (checkpoints / VGG16_FILENAME).symlink_to(files[0])
    if heads:
        (checkpoints / LPIPS_FILENAME).symlink_to(files[1])


def test_auto_is_random_without_both_files_and_never_downloads(isolated_hub, files):
    hub, downloads = isolated_hub
    assert build_perceptual("auto", taps=1).kind == "random"
    _cache(hub, files, heads=False)
    assert build_perceptual("auto", taps=1).kind == "random"
    assert downloads == []


def test_auto_is_lpips_with_both_files_in_the_hub_cache(isolated_hub, files):
    hub, downloads = isolated_hub
    _cache(hub, files)
    net = build_perceptual("auto", taps=1)
    assert net.kind == "lpips"
    assert torch.equal(net.features[0].weight, files[2]["features.0.weight"])
    assert torch.equal(net.heads[0], files[3]["lin0.model.1.weight"].flatten())
    assert downloads == []


def test_auto_with_explicit_paths_is_lpips_and_a_missing_explicit_path_is_an_error(files, tmp_path):
    assert build_perceptual("auto", taps=1, vgg_weights=str(files[0]), lpips_weights=str(files[1])).kind == "lpips"
    with pytest.raises(FileNotFoundError, match=r"typo\.pth does not exist"):
        build_perceptual("auto", taps=1, vgg_weights=str(tmp_path / "typo.pth"), lpips_weights=str(files[1]))


def test_lpips_offline_without_files_says_where_to_put_them(isolated_hub, files):
    hub, downloads = isolated_hub
    with pytest.raises(MissingFileError) as info:  # a UserError: one line on the command line, not a traceback
        build_perceptual("lpips", taps=1)
    message = str(info.value)
    assert VGG16_FILENAME in message and str(hub / "checkpoints") in message and "--vgg-weights" in message
    assert downloads == ["https://download.pytorch.org/models/vgg16-397923af.pth"]
    _cache(hub, files, heads=False)
    with pytest.raises(MissingFileError, match=r"lpips_v0\.1_vgg\.pth.*--lpips-weights"):
        build_perceptual("lpips", taps=1)
    assert downloads[-1].endswith("lpips/weights/v0.1/vgg.pth")


# ----------------------------------------------------------------------------------------------
# The random network and argument checks


def test_random_kind_is_deterministic_and_leaves_the_global_rng_alone(random_net):
    x, y = make_images(), gaussian_blur(make_images(), 1.0)
    state = torch.get_rng_state()
    other = build_perceptual("random", taps=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(random_net.state_dict().values(), other.state_dict().values()))
    assert all(bool((head == 1).all()) for head in other.heads)  # uniform heads: LPIPS's "baseline"
    with torch.no_grad():
        assert torch.equal(random_net(x, y), other(x, y))
        # Fewer taps is the same network cut short: its terms are the full network's leading ones.
        torch.testing.assert_close(build_perceptual("random", taps=2).tap_distances(x, y),
                                   random_net.tap_distances(x, y)[:, :2], rtol=1e-6, atol=0)


def test_random_trunk_has_kaiming_fan_out_scale_and_zero_bias(random_net):
    for index, _, c_out in PUBLISHED_CONVS:
        conv = random_net.features[index]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * c_out)), rel=0.05)
        assert not conv.bias.any()


@pytest.mark.parametrize("taps", [0, 6, 2.0])
def test_taps_outside_one_to_five_are_refused(taps):
    with pytest.raises(ValueError, match="taps must be one of 1, 2, 3, 4, 5"):
        build_perceptual("random", taps=taps)


def test_unknown_kind_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=", ".join(PERCEPTUAL_KINDS)):
        build_perceptual("vgg", taps=1)
    assert TAPS == ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def test_mismatched_or_too_small_images_are_refused(random_net):
    with pytest.raises(ValueError, match="one shape"):
        random_net(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 16))
    with pytest.raises(ValueError, match="one shape"):
        random_net(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="too small for 5 taps"):
        random_net(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------
# Against the reference implementation (the `lpips` package, a bench extra; skipped without it)


@pytest.mark.parametrize("scale", [1.0, 0.05])  # far apart, and near (where the distance is small)
def test_equals_the_lpips_package_with_its_published_heads(tmp_path, scale):
    """The package's own distance with the head file it ships (the published LPIPS v0.1 vgg.pth, loaded
    by our reader from the package's folder) and its VGG-16 trunk at random weights, copied into ours."""
    lpips = pytest.importorskip("lpips")
    import os
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():  # the package still passes torchvision the deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}
    for part in (reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4,
                 reference.net.slice5):
        for index, layer in part.named_children():  # the slices keep torchvision's feature indices
            if isinstance(layer, torch.nn.Conv2d):
                trunk[f"features.{index}.weight"] = layer.weight.detach().clone()
                trunk[f"features.{index}.bias"] = layer.bias.detach().clone()
    for layer in (0, 3, 6):  # never read; present because a torchvision file has them
        trunk[f"classifier.{layer}.weight"], trunk[f"classifier.{layer}.bias"] = torch.zeros(2, 2), torch.zeros(2)
    torch.save(trunk, tmp_path / "vgg16.pth")
    heads_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    ours = build_perceptual("lpips", taps=5, vgg_weights=str(tmp_path / "vgg16.pth"), lpips_weights=heads_path)

    generator = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 48, 40, generator=generator) * 2 - 1
    y = (x + scale * (torch.rand(x.shape, generator=generator) * 2 - 1)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).flatten()  # inputs in [-1, 1], the package's default
        actual = ours(x, y)
    assert expected.min() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=0)
