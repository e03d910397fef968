"""Grad-CAM against its closed form (CAM, for a network that ends in global pooling and a linear
layer), its statistics against distributions whose values are known, and the comparison tool."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluate import gradcam
from classify.model import ClassifierConfig, build_resnet18, load_classifier
from evaluate.gradcam import grad_cam, map_statistics
from core.checkpoint import save_checkpoint
from core.config import to_dict
from core.errors import UserError
from data import DatasetInfo
from data.imageio import from_uint8, make_grid
from helpers import image_size


def resnet(outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_resnet18(ClassifierConfig(num_outputs=outputs), resolution=16).eval()


def test_grad_cam_at_the_last_stage_is_cam():
    # layer4 -> global average pool -> fc is linear, so alpha_k = W[c, k] / (h w) and the map is
    # ReLU(sum_k W[c, k] A_k) / (h w) (Zhou et al. 2016).
    net = resnet()
    images, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 2, 1, 2])
    captured = {}
    handle = net.layer4.register_forward_hook(lambda m, i, o: captured.__setitem__("A", o.detach()))
    maps = grad_cam(net, images, "layer4", target, raw=True)
    handle.remove()
    a = captured["A"]
    h, w = a.shape[-2:]
    expected = torch.relu(torch.einsum("bk,bkij->bij", net.fc.weight[target], a)) / (h * w)
    assert torch.allclose(maps, expected, atol=1e-6, rtol=1e-4)


def test_batched_maps_equal_single_ones_and_leave_the_weights_alone():
    net = resnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images, target = torch.randn(3, 3, 16, 16), torch.tensor([1, 0, 2])
    batched = grad_cam(net, images, "layer3", target)
    single = torch.cat([grad_cam(net, images[k:k + 1], "layer3", target[k:k + 1]) for k in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert batched.shape == (3, 16, 16) and batched.min() >= 0 and batched.flatten(1).max(dim=1).values.eq(1).all()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert not net.layer3._forward_hooks


def test_hooks_are_removed_when_the_forward_pass_fails():
    net = resnet()
    with pytest.raises(RuntimeError):
        grad_cam(net, torch.randn(2, 5, 16, 16), "layer4", torch.tensor([0, 1]))   # wrong channel count
    assert not net.layer4._forward_hooks
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        grad_cam(net, torch.randn(1, 3, 16, 16), "layer9", torch.tensor([0]))


def test_the_map_lies_where_the_evidence_is():
    class Brightness(nn.Module):
        """Logit 0 = mean of features that respond to bright pixels; logit 1 = minus that."""
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(3, 4, 1)
            nn.init.constant_(self.features.weight, 0.5)
            nn.init.zeros_(self.features.bias)

        def forward(self, x):
            score = torch.relu(self.features(x)).mean(dim=(1, 2, 3))
            return torch.stack([score, -score], dim=1)

    images = torch.zeros(2, 3, 16, 16)
    images[0, :, 8:, 8:] = 1                                        # evidence in one corner
    images[1, :, :4, :] = 1                                         # or along the top
    maps = grad_cam(Brightness(), images, "features", torch.tensor([0, 0]))
    inside = images[:, 0] > 0
    assert maps[~inside].eq(0).all() and maps[inside].eq(1).all()
    assert grad_cam(Brightness(), images, "features", torch.tensor([1, 1])).eq(0).all()   # nothing raises logit 1


def test_statistics_of_known_maps():
    h = w = 10
    uniform, point = torch.ones(1, h, w), torch.zeros(1, h, w)
    point[0, 3, 4] = 1
    two = torch.zeros(1, h, w)
    two[0, 2, 1] = two[0, 2, 7] = 1                                # 6 pixels apart: 0.6 of the side
    quarter = torch.zeros(1, h, w)
    quarter[0, :5, :5] = 1
    s = {name: map_statistics(m) for name, m in (("u", uniform), ("p", point), ("t", two), ("q", quarter))}
    grid = torch.arange(10, dtype=torch.float64) / 10
    assert s["u"]["focus"].item() == pytest.approx(0.1) and s["u"]["entropy"].item() == pytest.approx(1.0)
    assert s["u"]["spread"].item() == pytest.approx((2 * grid.var(unbiased=False)).sqrt().item())
    assert s["p"]["focus"].item() == 1 and s["p"]["entropy"].item() == pytest.approx(0, abs=1e-12)
    assert s["p"]["spread"].item() == pytest.approx(0, abs=1e-12)
    assert s["t"]["spread"].item() == pytest.approx(0.3) and s["t"]["focus"].item() == 1
    assert s["t"]["entropy"].item() == pytest.approx(np.log(2) / np.log(100))
    assert s["q"]["intensity"].item() == pytest.approx(0.25) and s["q"]["focus"].item() == pytest.approx(0.4)
    empty = map_statistics(torch.zeros(1, h, w))
    assert empty["focus"].isnan().all() and empty["intensity"].item() == 0


def classifier_checkpoint(path: Path, seed: int, classes=("blue", "red"), info: DatasetInfo | None = None,
                          data: dict[str, str] | None = None) -> Path:
    """A random classifier of `classes`, or of `info`'s classes or parameters (a regressor where it has any);
    `data`: its run's data options, as its config records them ({"test_dataset": "folder:DIR"})."""
    info = info or DatasetInfo("folder:x", 16, 3, tuple(classes), (), (), 4)
    names = info.param_names or info.class_names
    config = ClassifierConfig(target="params" if info.param_names else "class", num_outputs=len(names))
    save_checkpoint({"stage": "classify", "config": {"model": to_dict(config), **({"data": data} if data else {})},
                     "data_info": {**info.to_dict(), "fingerprint": "0"},
                     "models": {"model": resnet(len(names), seed).state_dict()}}, path)
    load_classifier(path)
    return path


def test_no_pass_takes_more_images_than_the_batch_size_and_each_image_is_predicted_once():
    """The predictions went through the network 256 images at a time whatever --batch-size said (where the maps'
    batches fit, a large --num of large images could not), and twice: for the class to explain, for the accuracy."""
    from classify.model import Classifier
    info = DatasetInfo("folder:x", 16, 3, ("blue", "red"), (), (), 4)
    classifier = Classifier(resnet(2).eval(), ClassifierConfig(target="class", num_outputs=2), info)
    seen = []
    classifier.net.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    maps, rows, summary = gradcam.compare([("a", classifier)], images, torch.tensor([0, 1, 0, 1, 0]), layer="layer4",
                                          batch_size=2)
    assert max(seen) == 2 and sum(seen) == 2 * len(images)                     # a prediction and a map per image
    assert [row["predicted"] for row in rows] == [row["explained"] for row in rows]
    assert summary["a"]["accuracy"] == pytest.approx(np.mean([row["predicted"] == row["label"] for row in rows]))


def noisy_colours(images: Path) -> Path:
    """A folder of 3 noisy blue and 3 noisy red 16 px images, in class folders."""
    for name, colour in (("blue", (20, 20, 230)), ("red", (230, 20, 20))):
        (images / name).mkdir(parents=True)
        for k in range(3):
            pixels = np.clip(np.array(colour) + np.random.default_rng(k).normal(0, 30, (16, 16, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(images / name / f"{k}.png")
    return images


def test_comparison_tool_writes_maps_and_statistics_for_every_classifier(tmp_path):
    images = noisy_colours(tmp_path / "images")
    a, b = classifier_checkpoint(tmp_path / "a.pt", 0), classifier_checkpoint(tmp_path / "b.pt", 1)
    out = gradcam.main(["--ckpt", str(a), "--ckpt", str(b), "--name", "real", "--name", "synthetic", "--images",
                        f"folder:{images}", "--num", "5", "--out", str(tmp_path / "out"), "--device", "cpu"])
    with open(out / "stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and {r["classifier"] for r in rows} == {"real", "synthetic"}
    for r in rows:
        assert 0.1 - 1e-9 <= float(r["focus"]) <= 1 and 0 <= float(r["entropy"]) <= 1 and r["label"] in ("blue", "red")
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert set(summary) == {"real", "synthetic"} and 0 <= summary["real"]["accuracy"] <= 1
    assert image_size(out / "overlays.png") == (3 * 18 + 2, 5 * 18 + 2)      # rows: images; 3 columns
    with pytest.raises(FileExistsError, match="already holds files"):
        gradcam.main(["--ckpt", str(a), "--images", f"folder:{images}", "--out", str(out), "--device", "cpu"])


@pytest.mark.parametrize("extra, message", [
    (["--layer", "nope"], "no layer 'nope'"),
    (["--class", "green"], "not a class of"),
    (["--name", "x", "--name", "y"], "one --name per --ckpt"),
    (["--class", "red", "--explain", "label"], r"^--explain label explains each image's own label, and --class red "
                                               r"that class in every image; give one of them\.$"),
])
def test_bad_gradcam_options_write_nothing(tmp_path, extra, message):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "images" / "a.png")
    ckpt = classifier_checkpoint(tmp_path / "a.pt", 0)
    with pytest.raises(ValueError, match=message):
        gradcam.main(["--ckpt", str(ckpt), "--images", f"folder:{tmp_path / 'images'}", "--out",
                      str(tmp_path / "out"), "--device", "cpu", *extra])
    assert not (tmp_path / "out").exists()


def test_a_layer_without_image_positions_is_refused_and_not_suggested():
    net = resnet()
    for layer in ("fc", "avgpool"):
        with pytest.raises(ValueError, match=rf"^--layer {layer} leaves no image positions to map .*; pass one of "
                                             r"conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4\.$"):
            gradcam.find_layer(net, layer)
    with pytest.raises(ValueError, match=r"no layer 'head'; pass --layer one of conv1, .*, layer4 \(or a nested"):
        gradcam.find_layer(net, "head")
    assert gradcam.find_layer(net, "layer3.1.conv2") is net.layer3[1].conv2


def test_a_layer_whose_output_is_later_changed_in_place_maps_its_own_activation():
    """torchvision's block adds the shortcut into bn2's output and applies ReLU in place: the map at bn2
    weighs bn2's output, not the sum after it (eqs. 1-2 written out by hand)."""
    net = resnet()
    images, target = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    block = net.layer4[1]
    with torch.no_grad():
        h = net.layer4[0](net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(images))))))))
    a = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h))))).detach().requires_grad_(True)
    score = net.fc(torch.flatten(net.avgpool(torch.relu(a + h)), 1))[torch.arange(2), target]
    (gradient,) = torch.autograd.grad(score.sum(), a)
    expected = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
    assert expected.abs().max() > 0
    torch.testing.assert_close(grad_cam(net, images, "layer4.1.bn2", target, raw=True), expected.detach(),
                               rtol=1e-4, atol=1e-6)


def test_a_layer_that_runs_twice_per_pass_and_targets_that_are_no_output_are_refused():
    with pytest.raises(ValueError, match=r"--layer layer4.1.relu runs 2 times in one forward pass"):
        grad_cam(resnet(), torch.randn(1, 3, 16, 16), "layer4.1.relu", torch.tensor([0]))
    with pytest.raises(ValueError, match=r"targets must be outputs 0 to 2 of the network, got \[-1\]"):
        grad_cam(resnet(), torch.randn(1, 3, 16, 16), "layer4", torch.tensor([-1]))


def test_classifiers_of_other_class_lists_are_not_compared(tmp_path):
    """Labels index the first classifier's classes: a second one with them in another order would be scored
    against the wrong ones."""
    (tmp_path / "images" / "red").mkdir(parents=True)
    Image.new("RGB", (16, 16), (230, 20, 20)).save(tmp_path / "images" / "red" / "a.png")
    a = classifier_checkpoint(tmp_path / "a.pt", 0, classes=("blue", "red"))
    b = classifier_checkpoint(tmp_path / "b.pt", 1, classes=("red", "blue"))
    (tmp_path / "images" / "blue").mkdir()
    Image.new("RGB", (16, 16), (20, 20, 230)).save(tmp_path / "images" / "blue" / "a.png")
    with pytest.raises(ValueError, match=r"Classifier b has the classes \(red, blue\) and a \(blue, red\), in this order"):
        gradcam.main(["--ckpt", str(a), "--ckpt", str(b), "--name", "a", "--name", "b", "--images",
                      f"folder:{tmp_path / 'images'}", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()
    loose = tmp_path / "loose"  # unlabelled: each explains its own prediction by its own class names
    loose.mkdir()
    Image.new("RGB", (16, 16), (230, 20, 20)).save(loose / "a.png")
    gradcam.main(["--ckpt", str(a), "--ckpt", str(b), "--name", "a", "--name", "b", "--images", f"folder:{loose}",
                  "--out", str(tmp_path / "out"), "--device", "cpu"])


def test_a_greyscale_classifier_is_drawn_beside_its_images(tmp_path):
    (tmp_path / "images" / "dark").mkdir(parents=True)
    Image.new("L", (16, 16), 40).save(tmp_path / "images" / "dark" / "a.png")
    info = DatasetInfo("folder:x", 16, 1, ("dark", "light"), (), (), 4)
    config = ClassifierConfig(num_outputs=2, in_channels=1)
    torch.manual_seed(0)
    save_checkpoint({"stage": "classify", "config": {"model": to_dict(config)},
                     "data_info": {**info.to_dict(), "fingerprint": "0"},
                     "models": {"model": build_resnet18(config, resolution=16).state_dict()}}, tmp_path / "grey.pt")
    out = gradcam.main(["--ckpt", str(tmp_path / "grey.pt"), "--images", f"folder:{tmp_path / 'images'}", "--out",
                        str(tmp_path / "out"), "--device", "cpu"])
    with Image.open(out / "overlays.png") as drawn:
        assert drawn.size == (2 * 18 + 2, 18 + 2) and drawn.mode == "RGB"


def red_images(root: Path, classes=("red",)) -> Path:
    """root/CLASS/k.png, two reddish squares in each class folder (a set sample.py --class red writes)."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), (230 - 40 * k, 20, 20)).save(root / name / f"{k}.png")
    return root


def test_the_maps_are_never_written_among_a_classifiers_training_or_test_images(tmp_path):
    train, test = red_images(tmp_path / "train", ("blue", "red")), red_images(tmp_path / "test", ("blue", "red"))
    ckpt = classifier_checkpoint(tmp_path / "a.pt", 0, info=DatasetInfo(f"folder:{train}", 16, 3, ("blue", "red"),
                                                                        (), (), 4),
                                 data={"dataset": f"folder:{train}", "test_dataset": f"folder:{test}"})
    images = red_images(tmp_path / "images")
    for folder, option in ((train, "--dataset"), (test, "--test-dataset")):
        before = sorted(folder.rglob("*"))
        with pytest.raises(ValueError, match=rf"^--out .* lies inside the image folder of classifier real's {option} "):
            gradcam.main(["--ckpt", str(ckpt), "--name", "real", "--images", f"folder:{images}", "--out",
                          str(folder / "gradcam"), "--device", "cpu"])
        assert sorted(folder.rglob("*")) == before


def test_a_regressor_is_not_asked_to_explain_a_class(tmp_path):
    info = DatasetInfo("folder:x", 16, 3, (), ("wind",), ((-1.0, 1.0),), 4)
    ckpt = classifier_checkpoint(tmp_path / "r.pt", 0, info=info)
    images = red_images(tmp_path / "images")
    for extra, option in ((["--explain", "label"], "--explain label"), (["--class", "wind"], "--class")):
        with pytest.raises(ValueError, match=rf"^r is a parameter regressor, whose maps explain the parameter --output "
                                             rf"names, not a class; drop {option}\.$"):
            gradcam.main(["--ckpt", str(ckpt), "--name", "r", "--images", f"folder:{images}", "--out",
                          str(tmp_path / "out"), "--device", "cpu", *extra])
        assert not (tmp_path / "out").exists()


def test_a_set_of_some_of_the_classes_is_labelled_by_name(tmp_path):
    """A set of one class (sample.py --dataset-out --class red) is labelled by its folder's name, as the
    consistency check labels it: accuracy, and --explain label, work."""
    images = red_images(tmp_path / "images")
    ckpt = classifier_checkpoint(tmp_path / "a.pt", 0, classes=("blue", "red"))
    out = gradcam.main(["--ckpt", str(ckpt), "--name", "a", "--images", f"folder:{images}", "--explain", "label",
                        "--out", str(tmp_path / "out"), "--device", "cpu"])
    with open(out / "stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["label"] == "red" and r["explained"] == "red" for r in rows)
    written = json.loads((out / "summary.json").read_text())
    assert written["explain"] == "label"
    assert written["summary"]["a"]["accuracy"] == pytest.approx(sum(r["predicted"] == "red" for r in rows) / 2)
    out = gradcam.main(["--ckpt", str(ckpt), "--images", f"folder:{images}", "--class", "blue", "--out",
                        str(tmp_path / "blue"), "--device", "cpu"])
    assert json.loads((out / "summary.json").read_text())["explain"] == "class blue"   # not "pred"
    green = red_images(tmp_path / "green", ("green", "red"))  # its own labels: green is none of a's classes
    with pytest.raises(ValueError, match=r"^--explain label explains each image's own class, and the classes green "
                                         r"of --images are not classes of a \(blue, red\); move the folders .*green "
                                         r"out of it, or use --explain pred, which explains those images too\.$"):
        gradcam.main(["--ckpt", str(ckpt), "--name", "a", "--images", f"folder:{green}", "--explain", "label",
                      "--out", str(tmp_path / "bad"), "--device", "cpu"])
    assert not (tmp_path / "bad").exists()


def test_the_images_are_held_as_uint8_and_the_outputs_are_those_of_their_floats(tmp_path, monkeypatch):
    """Every --num image was held as floats (4 bytes a value) for overlays.png, which drew them all at once: they
    are held as the dataset's uint8 now, each batch made floats as it is used, and every pixel and number written
    is what the floats of all the images at once give."""
    from data import load_dataset
    from data.dataset import subset_indices
    images = noisy_colours(tmp_path / "images")
    a, b = classifier_checkpoint(tmp_path / "a.pt", 0), classifier_checkpoint(tmp_path / "b.pt", 1)
    held, compare = [], gradcam.compare
    monkeypatch.setattr(gradcam, "compare", lambda classifiers, given, *args, **kwargs: held.append(given) or
                        compare(classifiers, given, *args, **kwargs))
    out = gradcam.main(["--ckpt", str(a), "--ckpt", str(b), "--name", "real", "--name", "synthetic", "--images",
                        f"folder:{images}", "--num", "5", "--batch-size", "2", "--out", str(tmp_path / "out"),
                        "--device", "cpu"])
    assert held[0].dtype == torch.uint8 and held[0].shape == (5, 3, 16, 16)
    # The five images as floats, all at once, as overlays.png was drawn from them (the maps in the same batches).
    data = load_dataset(f"folder:{images}", 16, channels=3)
    data = data.subset(subset_indices(len(data), 5, 0, "the images"))
    floats = from_uint8(data.images)
    maps, rows, _ = compare([("real", load_classifier(a)), ("synthetic", load_classifier(b))], floats,
                            data.labels, layer="layer4", batch_size=2)
    columns = [floats.expand(-1, 3, -1, -1)] + [gradcam.overlay(floats, maps[name]) for name in ("real", "synthetic")]
    expected = make_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=len(columns))
    assert np.array_equal(np.asarray(Image.open(out / "overlays.png")), expected)
    with open(out / "stats.csv", newline="") as f:
        written = list(csv.DictReader(f))
    np.testing.assert_array_equal([[float(row[s]) for s in gradcam.STATISTICS] for row in written],
                                  [[row[s] for s in gradcam.STATISTICS] for row in rows])


def test_overlay_rows_made_a_batch_at_a_time_are_one_grid_of_them_all():
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    maps = [torch.rand(5, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    floats = from_uint8(images)
    columns = [floats.expand(-1, 3, -1, -1)] + [gradcam.overlay(floats, m) for m in maps]   # grey as RGB
    whole = make_grid(torch.stack(columns, dim=1).flatten(0, 1), nrow=3)
    for batch_size in (1, 2, 5, 64):
        assert np.array_equal(gradcam.overlay_rows(images, maps, batch_size), whole)


def test_a_num_beyond_the_images_is_said_and_every_image_used(tmp_path, capsys):
    """--num larger than the images available silently became their number."""
    images = red_images(tmp_path / "images")
    ckpt = classifier_checkpoint(tmp_path / "a.pt", 0)
    out = gradcam.main(["--ckpt", str(ckpt), "--images", f"folder:{images}", "--num", "500", "--out",
                        str(tmp_path / "out"), "--device", "cpu"])
    said = capsys.readouterr().out.splitlines()
    assert f"--num 500 asks for more images than --images folder:{images} holds (2); using 2." in said
    assert json.loads((out / "summary.json").read_text())["num"] == 2
    gradcam.main(["--ckpt", str(ckpt), "--images", f"folder:{images}", "--num", "2", "--out", str(tmp_path / "two"),
                  "--device", "cpu"])
    assert "asks for more" not in capsys.readouterr().out
    out = gradcam.main(["--ckpt", str(ckpt), "--images", f"folder:{images}", "--out", str(tmp_path / "default"),
                        "--device", "cpu"])                           # not typed: the default takes what there is
    assert "asks for more" not in capsys.readouterr().out and json.loads((out / "summary.json").read_text())["num"] == 2
    with pytest.raises(UserError, match=r"^--batch-size must be at least 1, got 0\.$"):  # (not "--num and ...")
        gradcam.main(["--ckpt", str(ckpt), "--images", f"folder:{images}", "--batch-size", "0", "--out",
                      str(tmp_path / "never"), "--device", "cpu"])
