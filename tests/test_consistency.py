"""Conditioning accuracy: images drawn for requested classes or parameters, judged by a classifier
whose answers are known in advance, give exactly the agreement or error those answers imply."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluate import consistency, judging
from classify.model import Classifier, ClassifierConfig
from data import load_dataset
from data.dataset import DatasetInfo
from ddpm.config import SamplingConfig
from stages import open_source
from test_gradcam import classifier_checkpoint

SAMPLING = SamplingConfig(sampler="ddim", steps=2)


class MeanColour(nn.Module):
    """Logits = each image's mean R, G, B, reordered to `order`: predicts the dominant colour."""
    def __init__(self, order):
        super().__init__()
        self.order = list(order)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (x.mean(dim=(2, 3)) * self.scale)[:, self.order]


class Constant(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values))

    def forward(self, x):
        return self.values.expand(x.shape[0], -1)


def judge(model, net, target, names) -> Classifier:
    info = model.info
    import dataclasses
    info = dataclasses.replace(info, class_names=tuple(names) if target == "class" else info.class_names,
                               param_names=tuple(names) if target == "params" else info.param_names)
    return Classifier(net.eval(), ClassifierConfig(target=target, num_outputs=len(names)), info)


def test_agreement_is_what_the_judge_says_of_each_image(class_ckpt):
    model = open_source(class_ckpt, torch.device("cpu")).model
    colour_of = {"red": 0, "green": 1, "blue": 2}
    names = model.info.class_names                                  # blue, green, red
    result = judging.measure(model, judge(model, MeanColour([colour_of[n] for n in names]), "class", names),
                                 SAMPLING, per_class=2, batch_size=4)
    dominant = [("red", "green", "blue")[int(i)] for i in result["images"].mean(dim=(2, 3)).argmax(dim=1)]
    requested = [r["requested"] for r in result["rows"]]
    assert requested == [names[k % 3] for k in range(6)]            # image k asks for class k mod 3
    assert [r["predicted"] for r in result["rows"]] == dominant
    assert result["report"]["agreement"] == pytest.approx(sum(a == d for a, d in zip(requested, dominant)) / 6)
    # The same judge with its outputs in another order: classes are matched by name, not position.
    shuffled = ("red", "blue", "green")
    again = judging.measure(model, judge(model, MeanColour([colour_of[n] for n in shuffled]), "class", shuffled),
                                SAMPLING, per_class=2, batch_size=4)
    assert again["report"]["agreement"] == result["report"]["agreement"]
    assert torch.equal(again["images"], result["images"])           # same seeds, same images


def test_a_judge_that_always_says_one_class_agrees_one_time_in_c(class_ckpt):
    model = open_source(class_ckpt, torch.device("cpu")).model
    names = model.info.class_names
    report = judging.measure(model, judge(model, Constant([5.0, 0.0, 0.0]), "class", names), SAMPLING,
                                 per_class=3, batch_size=5)["report"]
    assert report["agreement"] == pytest.approx(1 / 3)
    assert report["per_class"] == {names[0]: 1.0, names[1]: 0.0, names[2]: 0.0}
    assert report["confusion"]["counts"] == [[3, 0, 0], [3, 0, 0], [3, 0, 0]]


def test_parameter_error_is_the_distance_between_requested_and_judged_values(params_ckpt):
    model = open_source(params_ckpt, torch.device("cpu")).model
    info = model.info
    # Normalised output (0, 1) is the middle of wind's range and the top of heat's.
    regressor = judge(model, Constant([0.0, 1.0]), "params", info.param_names)
    result = judging.measure(model, regressor, SAMPLING, num=6, batch_size=4, params=["heat=3"])
    said = info.denormalize_params(torch.tensor([[0.0, 1.0]]))[0].double()
    wanted = torch.tensor(result["report"]["requested"], dtype=torch.float64)
    assert wanted[:, 1].eq(3).all()
    assert result["report"]["mae"]["wind"] == pytest.approx((wanted[:, 0] - said[0]).abs().mean().item())
    assert result["report"]["mae"]["heat"] == pytest.approx(abs(3 - said[1].item()))
    rows = result["rows"]
    assert [r["requested_wind"] for r in rows] == pytest.approx(wanted[:, 0].tolist())


def test_the_slope_is_how_strongly_judged_values_follow_requested_ones(params_ckpt):
    info = open_source(params_ckpt, torch.device("cpu")).model.info
    regressor = judge(open_source(params_ckpt, torch.device("cpu")).model, Constant([0.0, 0.0]), "params",
                      info.param_names)
    wanted = torch.tensor([[-1.0, 1.5], [0.0, 2.0], [0.5, 2.5], [1.0, 3.0], [-0.5, 1.0]])
    noise = torch.tensor([0.1, -0.2, 0.3, -0.1, -0.1])  # sums to 0 and is orthogonal to neither column
    predicted = torch.stack((0.5 * wanted[:, 0] + 0.2, 2 * wanted[:, 1] - 1 + noise), dim=1)
    _, report = judging.compare(regressor, "params", info, predicted, [{}] * 5, wanted)
    assert report["slope"]["wind"] == pytest.approx(0.5)
    x = wanted[:, 1].double() - wanted[:, 1].double().mean()
    assert report["slope"]["heat"] == pytest.approx(2 + float((x * noise.double()).sum() / (x * x).sum()))
    assert report["pearson_r"]["wind"] == pytest.approx(1.0)
    _, flat = judging.compare(regressor, "params", info, predicted, [{}] * 5, wanted[:, :1].expand(5, 2) * 0)
    assert np.isnan(flat["slope"]["wind"])


def test_the_command_writes_its_report_and_refuses_judges_that_cannot_judge(class_ckpt, params_ckpt, tmp_path):
    good = classifier_checkpoint(tmp_path / "judge.pt", 0, classes=("blue", "green", "red"))
    out = tmp_path / "out"
    report = consistency.main(["--ckpt", str(class_ckpt), "--judge", str(good), "--per-class", "2", "--out", str(out),
                               "--device", "cpu", "--sampler", "ddim", "--steps", "2"])
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert json.loads((out / "report.json").read_text())["agreement"] == report["agreement"]
    assert (out / "confusion.png").is_file() and (out / "grid.png").is_file()
    (out / "scatter.png").write_bytes(b"a regressor's figure, from an earlier run into this folder")
    consistency.main(["--ckpt", str(class_ckpt), "--judge", str(good), "--per-class", "2", "--out", str(out),
                      "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--overwrite"])
    assert not (out / "scatter.png").exists() and (out / "confusion.png").is_file()
    two = classifier_checkpoint(tmp_path / "two.pt", 0, classes=("blue", "red"))
    for ckpt, judge_ckpt, message in ((class_ckpt, two, "does not know the classes green"),
                                      (params_ckpt, good, "needs a parameter regressor")):
        with pytest.raises(ValueError, match=message):
            consistency.main(["--ckpt", str(ckpt), "--judge", str(judge_ckpt), "--out", str(tmp_path / "bad"),
                              "--device", "cpu"])
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="needs 'classify'"):
        consistency.main(["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--device", "cpu"])
    # The other kind of model's drawing options, refused rather than ignored.
    params_judge = classifier_checkpoint(tmp_path / "regressor.pt", 0,
                                         info=open_source(params_ckpt, torch.device("cpu")).model.info)
    for ckpt, judge_ckpt, option, kind in ((class_ckpt, good, ["--num", "5"], "parameters"),
                                           (class_ckpt, good, ["--param", "heat=1"], "parameters"),
                                           (params_ckpt, params_judge, ["--per-class", "5"], "classes")):
        with pytest.raises(ValueError, match=rf"{option[0]} applies to models conditioned on {kind}, and"):
            consistency.main(["--ckpt", str(ckpt), "--judge", str(judge_ckpt), *option, "--out", str(tmp_path / "bad"),
                              "--device", "cpu"])
        assert not (tmp_path / "bad").exists()


def colour_folder(root, labelled: dict[str, list[str]], params: dict[str, float] | None = None):
    """root/<label>/<k>.png: a 16 px square of the colour named by each entry of labelled[label]."""
    rgb = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    rows = []
    for label, colours in labelled.items():
        (root / label).mkdir(parents=True)
        for k, colour in enumerate(colours):
            Image.fromarray(np.full((16, 16, 3), rgb[colour], dtype=np.uint8)).save(root / label / f"{k}.png")
            rows.append(f"{label}/{k}.png,{(params or {}).get(colour, 0.0)}")
    if params is not None:
        (root / "params.csv").write_text("file,heat\n" + "\n".join(rows) + "\n")
    return root


def set_judge(net, target, names) -> Classifier:
    info = DatasetInfo("folder:x", 16, 3, tuple(names) if target == "class" else (),
                       tuple(names) if target == "params" else (), ((0.0, 10.0),) if target == "params" else (), 4)
    return Classifier(net.eval(), ClassifierConfig(target=target, num_outputs=len(names)), info)


def test_a_judge_of_the_other_target_or_of_other_labels_is_refused_with_what_to_pass():
    """One path for both kinds of labels: the refusal names the judge the labels need, and the labels it lacks."""
    labels = DatasetInfo("folder:x", 16, 3, ("red", "blue"), ("wind",), ((0.0, 10.0),), 4)
    classifier, regressor = set_judge(Constant([0.0, 1.0]), "class", ("red", "green")), set_judge(
        Constant([0.5]), "params", ("heat",))
    for kind, judge_, message in (
            ("class", regressor, "A class-conditional image set needs a classifier as --judge (trained with train.py "
                                 "--stage classify --target class), not a parameter regressor; pass one."),
            ("params", classifier, "A parameter-conditional image set needs a parameter regressor as --judge (trained "
                                   "with train.py --stage classify --target params), not a classifier; pass one."),
            ("class", classifier, "The --judge classifier does not know the classes blue of the image set (it knows "
                                  "red, green); pass one trained on the same classes."),
            ("params", regressor, "The --judge parameter regressor does not predict the parameters wind of the image "
                                  "set (it predicts heat); pass one trained on the same parameters.")):
        with pytest.raises(ValueError) as refused:
            judging.check_pair(kind, labels, judge_, what="image set")
        assert str(refused.value) == message
    judging.check_pair("class", labels, set_judge(Constant([0.0, 1.0]), "class", ("blue", "red")))
    judging.check_pair("params", labels, set_judge(Constant([0.5]), "params", ("wind",)))


def test_a_written_set_is_judged_against_its_own_labels(tmp_path):
    # Two of the six images sit in the wrong class folder: a judge that sees colours agrees on 4 of 6.
    folder = colour_folder(tmp_path / "set", {"blue": ["blue", "blue"], "green": ["green", "red"],
                                              "red": ["red", "blue"]}, params={"red": 7.0, "green": 2.0, "blue": 4.0})
    dataset = load_dataset(f"folder:{folder}", 16)
    colour_of = {"red": 0, "green": 1, "blue": 2}
    names = ("red", "blue", "green")                                # the judge's own order
    result = judging.judge_dataset(dataset, set_judge(MeanColour([colour_of[n] for n in names]), "class", names))
    report = result["report"]
    assert report["agreement"] == pytest.approx(4 / 6)
    assert report["per_class"] == pytest.approx({"blue": 1.0, "green": 0.5, "red": 0.5})
    assert report["confusion"]["counts"] == [[0, 2, 0], [1, 0, 1], [1, 1, 0]]   # rows blue, green, red; cols red, blue, green
    assert [r["source"] for r in result["rows"]][:3] == ["blue/0.png", "blue/1.png", "green/0.png"]
    # A regressor that always says heat = 5 (output 0 over the range 0..10) errs by |heat - 5| on average.
    regressor = set_judge(Constant([0.0]), "params", ("heat",))
    result = judging.judge_dataset(dataset, regressor)
    heat = dataset.params[:, 0].double()
    assert result["report"]["mae"]["heat"] == pytest.approx(float((heat - 5).abs().mean()))
    assert [r["requested_heat"] for r in result["rows"]] == pytest.approx(heat.tolist())


def test_the_command_judges_a_folder_beside_it_and_refuses_what_it_cannot_judge(tmp_path, monkeypatch):
    folder = colour_folder(tmp_path / "set", {"blue": ["blue"] * 2, "red": ["red", "blue"]})
    judge_ckpt = classifier_checkpoint(tmp_path / "judge.pt", 0, classes=("blue", "red"))
    report = consistency.main(["--images", f"folder:{folder}", "--judge", str(judge_ckpt), "--device", "cpu"])
    out = tmp_path / "set-consistency"                              # beside the set: inside would be a class
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["source"] for r in rows] == ["blue/0.png", "blue/1.png", "red/0.png", "red/1.png"]
    assert report["agreement"] == pytest.approx(sum(r["requested"] == r["predicted"] for r in rows) / 4)
    assert json.loads((out / "report.json").read_text())["image_set"] == f"folder:{folder}"
    assert load_dataset(f"folder:{folder}", 16).info.class_names == ("blue", "red")
    # Named from inside ("folder:.") or from home ("folder:~/set"), it is still the folder beside the set.
    shutil.rmtree(out)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(tmp_path))
    for images in ("folder:.", "folder:~/set"):
        consistency.main(["--images", images, "--judge", str(judge_ckpt), "--device", "cpu", "--overwrite"])
        assert (out / "predictions.csv").is_file() and sorted(p.name for p in folder.iterdir()) == ["blue", "red"]
    assert not (folder / "~").exists()
    unlabelled = tmp_path / "loose"
    unlabelled.mkdir()
    Image.new("RGB", (16, 16)).save(unlabelled / "a.png")
    three = colour_folder(tmp_path / "three", {"blue": ["blue"], "green": ["green"], "red": ["red"]})
    decode = consistency.load_dataset  # each refusal comes from listing the folders, before any image is decoded
    monkeypatch.setattr(consistency, "load_dataset", lambda *a, **k: pytest.fail("the images were decoded"))
    for images, extra, message in ((f"folder:{folder}", ["--per-class", "3"], "drop --per-class"),
                                   (f"folder:{folder}", ["--sampler", "ddim"], "--sampler and its options"),
                                   (f"folder:{folder}", ["--seed", "3"], "drop --seed"),
                                   ("plumes", [], "takes folder:DIR"),
                                   (f"folder:{unlabelled}", [], "no class folders"),
                                   (f"folder:{three}", [], "does not know the classes green")):
        bad = tmp_path / "bad"
        with pytest.raises(ValueError, match=message):
            consistency.main(["--images", images, "--judge", str(judge_ckpt), "--out", str(bad), "--device", "cpu",
                              *extra])
        assert not bad.exists()
    monkeypatch.setattr(consistency, "load_dataset", decode)
    with pytest.raises(SystemExit):                                 # one source: a model or a set, not both
        consistency.main(["--images", f"folder:{folder}", "--ckpt", str(judge_ckpt), "--judge", str(judge_ckpt)])


def test_the_report_is_never_written_inside_the_models_training_images(class_ckpt, tmp_path):
    """sample.py refuses to write there, and so does the check: its grid would become training images."""
    judge_ckpt = classifier_checkpoint(tmp_path / "judge.pt", 0, classes=("blue", "green", "red"))
    spec = json.loads((class_ckpt.parent / "config.json").read_text())["data"]["dataset"]
    real = Path(spec.removeprefix("folder:"))
    before = sorted(real.rglob("*"))
    with pytest.raises(ValueError, match=r"^--out .* lies inside the image folder of the model's --dataset"):
        consistency.main(["--ckpt", str(class_ckpt), "--judge", str(judge_ckpt), "--per-class", "1", "--out",
                          str(real / "check"), "--device", "cpu", "--sampler", "ddim", "--steps", "2"])
    assert sorted(real.rglob("*")) == before


def test_the_report_is_never_written_inside_the_judges_images(class_ckpt, tmp_path):
    """Nor inside the images the judge was trained or tested on (evaluate.gradcam refuses that for its
    classifiers): the report's folder was read as one more class of them, its grid as one more image."""
    from helpers import colour_folder
    trained, tested = colour_folder(tmp_path / "trained", 1, seed=0), colour_folder(tmp_path / "tested", 1, seed=1)
    info = DatasetInfo(f"folder:{trained}", 16, 3, ("blue", "green", "red"), (), (), 3)  # (its loader's name)
    judge_ckpt = classifier_checkpoint(tmp_path / "judge.pt", 0, info=info,
                                       data={"dataset": f"folder:{trained}", "test_dataset": f"folder:{tested}"})
    before = sorted(tmp_path.rglob("*"))
    for folder, option in ((trained, "--dataset"), (tested, "--test-dataset")):
        with pytest.raises(ValueError, match=rf"^--out .* lies inside the image folder of the judge's {option}"):
            consistency.main(["--ckpt", str(class_ckpt), "--judge", str(judge_ckpt), "--per-class", "1", "--out",
                              str(folder / "check"), "--device", "cpu", "--sampler", "ddim", "--steps", "2"])
        with pytest.raises(ValueError, match=rf"^--out .* lies inside the image folder of the judge's {option}"):
            consistency.main(["--images", f"folder:{tested if folder == trained else trained}", "--judge",
                              str(judge_ckpt), "--out", str(folder / "check"), "--device", "cpu"])
    assert sorted(tmp_path.rglob("*")) == before


def test_a_parameter_held_fixed_has_no_slope_or_correlation(params_ckpt, tmp_path):
    """Requested values that do not vary say nothing of how the judged ones follow them: NaN, not the slope of
    float residue left after subtracting their mean (six times 0.1 has the mean 0.09999999999999999)."""
    info = open_source(params_ckpt, torch.device("cpu")).model.info
    regressor = classifier_checkpoint(tmp_path / "regressor.pt", 0, info=info)
    out = tmp_path / "out"
    report = consistency.main(["--ckpt", str(params_ckpt), "--judge", str(regressor), "--num", "6", "--param",
                               "wind=0.1", "--out", str(out), "--device", "cpu", "--sampler", "ddim", "--steps", "2"])
    assert np.isnan(report["slope"]["wind"]) and np.isnan(report["pearson_r"]["wind"])
    assert not np.isnan(report["slope"]["heat"])                    # drawn over its range: it varies
    written = json.loads((out / "report.json").read_text())
    assert np.isnan(written["slope"]["wind"]) and "(r = nan, slope nan), heat" in written["summary"]


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "ddpm", "--eta", "0.5"], r"^--eta applies to --sampler ddim only, and this is --sampler ddpm"),
    (["--variance", "large"], r"^--variance applies to --sampler ddpm only"),
])
def test_sampler_options_sample_py_refuses_are_refused_here_too(tmp_path, extra, message):
    """Recorded in the report as used, they would have changed nothing; refused before any checkpoint is read (both
    files here are damaged, which reading either would report instead)."""
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=message):
        consistency.main(["--ckpt", str(damaged), "--judge", str(damaged), "--per-class", "1", "--out",
                          str(tmp_path / "out"), "--device", "cpu", "--steps", "2", *extra])
    assert not (tmp_path / "out").exists()
