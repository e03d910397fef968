"""Conditioning accuracy: images drawn for requested classes or parameters, judged by a classifier
whose answers are known in advance, give exactly the agreement or error those answers imply."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

import sample
from classify import consistency
from classify.model import Classifier, ClassifierConfig
from ddpm.config import SamplingConfig
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
    model, _ = sample.load_model(class_ckpt, torch.device("cpu"), "ema")
    colour_of = {"red": 0, "green": 1, "blue": 2}
    names = model.info.class_names                                  # blue, green, red
    result = consistency.measure(model, judge(model, MeanColour([colour_of[n] for n in names]), "class", names),
                                 SAMPLING, per_class=2, batch_size=4)
    dominant = [("red", "green", "blue")[int(i)] for i in result["images"].mean(dim=(2, 3)).argmax(dim=1)]
    requested = [r["requested"] for r in result["rows"]]
    assert requested == [names[k % 3] for k in range(6)]            # image k asks for class k mod 3
    assert [r["predicted"] for r in result["rows"]] == dominant
    assert result["report"]["agreement"] == pytest.approx(sum(a == d for a, d in zip(requested, dominant)) / 6)
    # The same judge with its outputs in another order: classes are matched by name, not position.
    shuffled = ("red", "blue", "green")
    again = consistency.measure(model, judge(model, MeanColour([colour_of[n] for n in shuffled]), "class", shuffled),
                                SAMPLING, per_class=2, batch_size=4)
    assert again["report"]["agreement"] == result["report"]["agreement"]
    assert torch.equal(again["images"], result["images"])           # same seeds, same images


def test_a_judge_that_always_says_one_class_agrees_one_time_in_c(class_ckpt):
    model, _ = sample.load_model(class_ckpt, torch.device("cpu"), "ema")
    names = model.info.class_names
    report = consistency.measure(model, judge(model, Constant([5.0, 0.0, 0.0]), "class", names), SAMPLING,
                                 per_class=3, batch_size=5)["report"]
    assert report["agreement"] == pytest.approx(1 / 3)
    assert report["per_class"] == {names[0]: 1.0, names[1]: 0.0, names[2]: 0.0}
    assert report["confusion"]["counts"] == [[3, 0, 0], [3, 0, 0], [3, 0, 0]]


def test_parameter_error_is_the_distance_between_requested_and_judged_values(params_ckpt):
    model, _ = sample.load_model(params_ckpt, torch.device("cpu"), "ema")
    info = model.info
    # Normalised output (0, 1) is the middle of wind's range and the top of heat's.
    regressor = judge(model, Constant([0.0, 1.0]), "params", info.param_names)
    result = consistency.measure(model, regressor, SAMPLING, num=6, batch_size=4, params=["heat=3"])
    said = info.denormalize_params(torch.tensor([[0.0, 1.0]]))[0].double()
    wanted = torch.tensor(result["report"]["requested"], dtype=torch.float64)
    assert wanted[:, 1].eq(3).all()
    assert result["report"]["mae"]["wind"] == pytest.approx((wanted[:, 0] - said[0]).abs().mean().item())
    assert result["report"]["mae"]["heat"] == pytest.approx(abs(3 - said[1].item()))
    rows = result["rows"]
    assert [r["requested_wind"] for r in rows] == pytest.approx(wanted[:, 0].tolist())


def test_the_command_writes_its_report_and_refuses_judges_that_cannot_judge(class_ckpt, params_ckpt, tmp_path):
    good = classifier_checkpoint(tmp_path / "judge.pt", 0, classes=("blue", "green", "red"))
    out = tmp_path / "out"
    report = consistency.main(["--ckpt", str(class_ckpt), "--judge", str(good), "--per-class", "2", "--out", str(out),
                               "--device", "cpu", "--sampler", "ddim", "--steps", "2"])
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert json.loads((out / "report.json").read_text())["agreement"] == report["agreement"]
    assert (out / "confusion.png").is_file() and (out / "grid.png").is_file()
    two = classifier_checkpoint(tmp_path / "two.pt", 0, classes=("blue", "red"))
    for ckpt, judge_ckpt, message in ((class_ckpt, two, "does not know the classes green"),
                                      (params_ckpt, good, "needs a parameter regressor")):
        with pytest.raises(ValueError, match=message):
            consistency.main(["--ckpt", str(ckpt), "--judge", str(judge_ckpt), "--out", str(tmp_path / "bad"),
                              "--device", "cpu"])
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="needs 'classify'"):
        consistency.main(["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--device", "cpu"])
