"""FID and KID in a domain's own features (`python -m fid A B --features CKPT`): a classifier trained
here, read at its penultimate layer, with the statistics, files and refusals of Inception's FID."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from classify.model import ClassifierConfig, build_resnet18, load_classifier
from core.checkpoint import save_checkpoint, state_fingerprint
from core.config import to_dict
from data import DatasetInfo
from fid.__main__ import run as cli_main
from fid.domain import network_name
from fid.features import NETWORK
from fid.frechet import frechet_distance
from fid.stats import Provenance, Statistics, load_statistics, save_statistics
from test_gradcam import classifier_checkpoint

CPU = ["--device", "cpu", "--num-workers", "0", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def no_inception(monkeypatch):
    """Domain features must never build (or download) the Inception network."""
    def refuse(weights):
        raise AssertionError("the Inception network was built")
    monkeypatch.setattr("fid.features.build_fid_inception", refuse)


def params_checkpoint(path: Path, seed: int = 0) -> Path:
    """A greyscale parameter regressor at 16 px, as the classify stage saves one."""
    torch.manual_seed(seed)
    info = DatasetInfo("folder:x", 16, 1, (), ("wind",), ((0.0, 1.0),), 4)
    config = ClassifierConfig(target="params", in_channels=1, num_outputs=1)
    save_checkpoint({"stage": "classify", "config": {"model": to_dict(config)},
                     "data_info": {**info.to_dict(), "fingerprint": "0"},
                     "models": {"model": build_resnet18(config, 16).state_dict()}}, path)
    return path


def image_folder(root: Path, count: int, size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
    return str(root)


def by_hand(path: Path, folder: str) -> np.ndarray:
    """Penultimate features computed without fid, from each file as training decodes it: in the classifier's
    channels (L for one), its centre square resized with Lanczos to the classifier's size, [-1, 1], then every
    child of the ResNet but `fc`, flattened."""
    classifier = load_classifier(path)
    size, mode = classifier.info.resolution, "L" if classifier.info.channels == 1 else "RGB"
    images = []
    for file in sorted(Path(folder).glob("*.png")):
        image = Image.open(file).convert(mode)
        side = min(image.size)
        left, top = (image.size[0] - side) / 2, (image.size[1] - side) / 2
        pixels = np.array(image.resize((size, size), Image.LANCZOS, box=(left, top, left + side, top + side)))
        x = torch.from_numpy(pixels.reshape(size, size, -1)).permute(2, 0, 1).float() / 255
        images.append(x[None])
    x = classifier.prepare(torch.cat(images) * 2 - 1)
    body = torch.nn.Sequential(*list(classifier.net.children())[:-1])  # conv1 ... avgpool, without fc
    with torch.no_grad():
        return torch.flatten(body(x), 1).numpy()


@pytest.mark.parametrize("kind", ["class", "params"])
def test_features_are_the_classifiers_penultimate_layer(tmp_path, kind):
    ckpt = (classifier_checkpoint(tmp_path / "c.pt", 0) if kind == "class"
            else params_checkpoint(tmp_path / "c.pt"))       # RGB classes; or greyscale parameters (luma)
    for size in ((24, 20), (16, 16)):                          # resized from a non-square image; taken as it is
        folder = image_folder(tmp_path / f"{size}", 3, size, seed=size[0])
        got = fid.compute_features(folder, fid.FeatureOptions(features=ckpt, device="cpu", batch_size=2,
                                                                  progress=False))
        assert got.shape == (3, 512)
        np.testing.assert_allclose(got, by_hand(ckpt, folder), rtol=1e-5, atol=1e-6)
    mixed = tmp_path / "mixed"                                 # sizes met in one batch: each fitted on its own
    mixed.mkdir()
    for i, size in enumerate(((16, 16), (24, 20), (12, 30))):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            mixed / f"{i}.png")
    options = fid.FeatureOptions(features=ckpt, device="cpu", batch_size=3, progress=False)
    got = fid.compute_features(str(mixed), options)
    np.testing.assert_allclose(got, by_hand(ckpt, str(mixed)), rtol=1e-5, atol=1e-6)


def test_a_folder_gives_the_features_of_the_images_training_reads_from_it(tmp_path):
    """The sweep measures images load_dataset decoded; `python -m fid --features` reads the folder itself: transparent,
    larger and JPEG files must give both the same features."""
    from data import load_dataset
    ckpt = classifier_checkpoint(tmp_path / "c.pt", 0)
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
        rgba[:6, :, 3] = 0                                         # the top rows transparent
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    decoded = load_dataset(f"folder:{folder}", 16, channels=3).images.float() / 255
    options = fid.FeatureOptions(features=ckpt, device="cpu", batch_size=3, progress=False)
    got = fid.compute_features(str(folder), dataclasses.replace(options, files="all"))
    np.testing.assert_allclose(got, fid.compute_features(decoded, options), rtol=1e-5, atol=1e-6)
    (folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # read by pytorch-fid's file selection only
    with pytest.raises(ValueError, match=r"\._0\.png .*: it is a hidden file, .* pass --files all"):
        fid.compute_features(str(folder), options)


def test_a_folder_is_at_distance_zero_from_itself(tmp_path):
    ckpt = classifier_checkpoint(tmp_path / "c.pt", 0)
    folder = image_folder(tmp_path / "a", 6, (16, 16), seed=1)
    options = fid.FeatureOptions(features=ckpt, device="cpu", batch_size=4, progress=False)
    first, second = fid.compute_statistics(folder, options), fid.compute_statistics(folder, options)
    assert first.mu.shape == (512,) and first.mu.dtype == np.float64 and first.sigma.shape == (512, 512)
    assert frechet_distance(first.mu, first.sigma, second.mu, second.sigma) == pytest.approx(0.0, abs=1e-6)
    other = image_folder(tmp_path / "b", 6, (16, 16), seed=2)
    assert fid.fid_between(folder, other, options).fid > 1e-3


def test_saved_statistics_round_trip_with_the_classifier_that_made_them(tmp_path, capsys):
    ckpt = classifier_checkpoint(tmp_path / "c.pt", 0)
    folder = image_folder(tmp_path / "a", 4, (16, 16), seed=1)
    stats = tmp_path / "a.npz"
    assert cli_main(["--save-stats", folder, str(stats), "--features", str(ckpt), *CPU]) == 0
    loaded = load_statistics(stats)
    classifier = load_classifier(ckpt)
    expected = fid.compute_statistics(folder, fid.FeatureOptions(features=ckpt, device="cpu", batch_size=2,
                                                                 progress=False))
    assert loaded.provenance == Provenance(
        "classify ResNet-18/penultimate-512 (class target, 16 px, 3 channels)",
        state_fingerprint({k: v for k, v in classifier.net.state_dict().items()
                           if not k.endswith("num_batches_tracked")}),
        "pytorch-fid", 4)
    assert loaded.provenance.network == network_name(classifier)
    assert loaded.mu.dtype == loaded.sigma.dtype == np.float64  # saved at the precision computed
    np.testing.assert_allclose(loaded.mu, expected.mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(loaded.sigma, expected.sigma, rtol=1e-12, atol=1e-15)
    # The saved file then stands in for the folder against images.
    assert cli_main([str(stats), folder, "--features", str(ckpt), *CPU]) == 0
    assert float(re.search(r"FID: (\S+)", capsys.readouterr().out).group(1)) == pytest.approx(0.0, abs=1e-6)


def test_statistics_of_other_networks_are_refused_in_one_sentence(tmp_path, capsys):
    ckpt, other = classifier_checkpoint(tmp_path / "c.pt", 0), classifier_checkpoint(tmp_path / "d.pt", 1)
    folder = image_folder(tmp_path / "a", 4, (16, 16), seed=1)
    domain = tmp_path / "domain.npz"
    assert cli_main(["--save-stats", folder, str(domain), "--features", str(ckpt), *CPU]) == 0
    inception = tmp_path / "inception.npz"
    save_statistics(Statistics(np.zeros(2048), np.eye(2048), Provenance(NETWORK, "0123456789abcdef", "", 4)),
                    inception)
    capsys.readouterr()

    def refusal(argv):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.count(". ") == 0, err
        return err

    err = refusal([str(inception), str(domain), *CPU])                         # Inception against a classifier
    assert f"holds features of {NETWORK} but" in err and "classify ResNet-18/penultimate-512" in err
    err = refusal([str(domain), folder, "--features", str(other), *CPU])      # two classifiers' weights
    assert "was computed with feature weights" in err and err.endswith("the same --features.")
    err = refusal([str(domain), folder, *CPU])                                 # a classifier's file, Inception run
    assert "holds features of classify ResNet-18/penultimate-512" in err
    # Two files and --features: the option names the features wanted, not a network left unused.
    err = refusal([str(domain), str(domain), "--features", str(other), *CPU])
    assert "was computed with feature weights" in err
    err = refusal([str(inception), str(inception), "--features", str(ckpt), *CPU])
    assert f"holds features of {NETWORK} but this run's features" in err
    assert cli_main([str(domain), str(domain), "--features", str(ckpt), *CPU]) == 0
    assert float(re.search(r"FID: (\S+)", capsys.readouterr().out).group(1)) == pytest.approx(0.0, abs=1e-6)
    params = params_checkpoint(tmp_path / "p.pt")                              # a regressor: another network
    err = refusal([str(domain), folder, "--features", str(params), "--no-kid", *CPU])
    assert "(class target, 16 px, 3 channels) but this run's features" in err and "(params target" in err


def test_cli_prints_fid_and_kid_in_the_classifiers_features(tmp_path, capsys):
    ckpt = params_checkpoint(tmp_path / "c.pt")
    a = image_folder(tmp_path / "a", 4, (16, 16), seed=1)
    b = image_folder(tmp_path / "b", 4, (32, 32), seed=2)
    assert cli_main([a, b, "--features", str(ckpt), "--kid-subsets", "5", "--kid-subset-size", "3", *CPU]) == 0
    out = capsys.readouterr().out
    fid_value = float(re.search(r"FID: (\S+)", out).group(1))
    kid_mean, kid_std = map(float, re.search(r"KID: (\S+) \+/- (\S+)", out).groups())
    options = fid.FeatureOptions(features=ckpt, device="cpu", progress=False)
    f_a, f_b = (fid.compute_features(x, options) for x in (a, b))
    expected = fid.fid_between(a, b, options, fid.KIDOptions(subsets=5, subset_size=3))
    assert fid_value == pytest.approx(expected.fid, rel=1e-5) and fid_value > 0
    assert (kid_mean, kid_std) == pytest.approx((expected.kid_mean, expected.kid_std), rel=1e-4, abs=1e-8)
    assert (kid_mean, kid_std) == pytest.approx(fid.kid(f_a, f_b, num_subsets=5, subset_size=3), rel=1e-4, abs=1e-8)


def test_a_checkpoint_of_another_stage_is_refused_naming_the_option(tmp_path, capsys):
    not_classify = tmp_path / "vae.pt"
    save_checkpoint({"stage": "vae"}, not_classify)
    folder = image_folder(tmp_path / "a", 2, (16, 16), seed=1)
    for ckpt in (not_classify, tmp_path / "missing.pt"):
        assert cli_main([folder, folder, "--features", str(ckpt), "--no-kid", *CPU]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--features" in err, err


def test_domain_features_compiled_give_the_eager_distance(tmp_path, capsys):
    # A real Inductor compilation of the classifier (dynamic shapes, as fid compiles it).
    ckpt = params_checkpoint(tmp_path / "c.pt")
    a = image_folder(tmp_path / "a", 4, (16, 16), seed=1)
    b = image_folder(tmp_path / "b", 4, (16, 16), seed=2)
    from torch._dynamo.utils import counters
    distances = []
    for extra in ([], ["--compile"]):
        counters.clear()
        assert cli_main([a, b, "--features", str(ckpt), "--no-kid", *CPU, *extra]) == 0
        distances.append(float(re.search(r"FID: (\S+)", capsys.readouterr().out).group(1)))
    assert counters["stats"]["unique_graphs"] >= 1  # the second run's classifier did run compiled
    assert distances[1] == pytest.approx(distances[0], rel=1e-3) and distances[0] > 0
