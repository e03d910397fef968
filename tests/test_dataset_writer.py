"""Writing datasets: `sample.py --dataset-out` (synthetic sets from any conditional model) and
`python -m data.export` (real ones), both in the ImageFolder layout with a manifest and params.csv,
reproducible image by image, resumable after an interruption, and never mixed with another request."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

import sample
from core.errors import UserError
from data import load_dataset
from data import export
from data.writer import Binning, parse_binning
from sampling.draw import Drawer
from helpers import RES


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def write(ckpt: Path, out: Path, *extra: str) -> Path:
    return sample.main(["--ckpt", str(ckpt), "--dataset-out", str(out), "--device", "cpu", "--sampler", "ddim",
                        "--steps", "2", "--batch-size", "4", *extra])


# ---------------------------------------------------------------------------------------------
# sample.py --dataset-out


def test_class_dataset_has_the_imagefolder_layout_and_image_k_is_plain_sample_k(class_ckpt, tmp_path):
    out = write(class_ckpt, tmp_path / "set", "--per-class", "3")
    names = ["blue", "green", "red"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    manifest = rows(out / "manifest.csv")
    assert [int(r["index"]) for r in manifest] == list(range(9))
    assert all(r["file"] == f"{names[int(r['index']) % 3]}/{int(r['index']):06d}.png" for r in manifest)
    assert all(r["class"] == r["file"].split("/")[0] for r in manifest)
    folder = ImageFolder(str(out))
    assert folder.class_to_idx == {n: i for i, n in enumerate(names)} and len(folder) == 9
    ours = load_dataset(f"folder:{out}", RES)
    assert ours.info.class_names == tuple(names) and ours.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Image 7 (class k mod 3 = green) redrawn alone by plain sampling is the same picture.
    alone = sample.main(["--ckpt", str(class_ckpt), "--out", str(tmp_path / "alone"), "--device", "cpu",
                         "--sampler", "ddim", "--steps", "2", "--first-index", "7", "--num", "1"])
    assert np.array_equal(pixels(alone / "images" / "000007.png"), pixels(out / "green" / "000007.png"))


def test_one_class_only(class_ckpt, tmp_path):
    out = write(class_ckpt, tmp_path / "set", "--per-class", "2", "--class", "red")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["red/000002.png", "red/000005.png"]


def test_an_interrupted_run_continues_without_redrawing_and_ends_as_an_uninterrupted_one(class_ckpt, tmp_path,
                                                                                         monkeypatch):
    whole = write(class_ckpt, tmp_path / "whole", "--per-class", "3")
    calls = {"n": 0}
    original = Drawer.batch

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Drawer, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write(class_ckpt, tmp_path / "part", "--per-class", "3")
    part = tmp_path / "part"
    first = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in part.rglob("*.png")}
    assert len(first) == 4                                          # the first batch, saved before the second
    assert len(rows(part / "manifest.csv")) == 4                   # and the manifest covers exactly those
    assert len(load_dataset(f"folder:{part}", RES)) == 4           # an interrupted folder is a loadable dataset
    monkeypatch.setattr(Drawer, "batch", original)
    write(class_ckpt, part, "--per-class", "3")
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first} == first     # never rewritten
    files = sorted(p.relative_to(part) for p in part.rglob("*.png"))
    assert files == sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
    assert all(np.array_equal(pixels(part / f), pixels(whole / f)) for f in files)
    assert rows(part / "manifest.csv") == rows(whole / "manifest.csv")


def test_a_larger_count_extends_the_set_and_other_requests_are_refused(class_ckpt, tmp_path):
    out = write(class_ckpt, tmp_path / "set", "--per-class", "1")
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    write(class_ckpt, out, "--per-class", "2")
    assert len(list(out.rglob("*.png"))) == 6 and all(p.read_bytes() == b for p, b in before.items())
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="made with other options"):
        write(class_ckpt, out, "--per-class", "2", "--seed", "1")
    with pytest.raises(ValueError, match=r"made with other options \(sampling.guidance_scale \S+ there, 2.0 now\)"):
        write(class_ckpt, out, "--per-class", "2", "--guidance-scale", "2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dataset of ours"):
        write(class_ckpt, foreign, "--per-class", "1")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    in_the_way = sorted(out.rglob("*.png"))[-1]
    in_the_way.unlink()
    in_the_way.mkdir()  # a folder where an image belongs (was an IsADirectoryError once the image was drawn)
    with pytest.raises(ValueError, match=rf"{in_the_way.name} is a folder where an image of this set belongs"):
        write(class_ckpt, out, "--per-class", "2")


def test_images_a_stopped_larger_request_left_unlisted_are_refused_by_a_smaller_one_and_recorded_by_it(class_ckpt,
                                                                                                      tmp_path):
    out = write(class_ckpt, tmp_path / "set", "--per-class", "2")
    table = (out / "manifest.csv").read_bytes()
    (out / "manifest.csv").unlink()  # as a kill between the last images and the manifest's update leaves it
    files = {p: p.read_bytes() for p in out.rglob("*.png")}
    with pytest.raises(ValueError, match=r"holds 3 image\(s\) its manifest does not list .* \(stopped before it listed "
                                         r"them, or listed in a manifest since deleted\); run that larger request "
                                         r"again to finish and record them, or delete those images"):
        write(class_ckpt, out, "--per-class", "1")
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == files
    write(class_ckpt, out, "--per-class", "2")
    assert (out / "manifest.csv").read_bytes() == table


def test_a_set_records_the_precision_auto_resolved_to_and_continues_only_in_it(class_ckpt, tmp_path, monkeypatch):
    import core.runtime
    monkeypatch.setattr(core.runtime, "cpu_computes_bf16", lambda: True)
    out = write(class_ckpt, tmp_path / "set", "--per-class", "1", "--amp", "auto")
    assert json.loads((out / "dataset.json").read_text())["request"]["precision"] == "bf16"
    write(class_ckpt, out, "--per-class", "2", "--amp", "bf16")   # what auto meant here: the same request
    monkeypatch.setattr(core.runtime, "cpu_computes_bf16", lambda: False)
    with pytest.raises(ValueError, match=r'made with other options \(precision "bf16" there, "fp32" now \(--amp bf16\)\)'):
        write(class_ckpt, out, "--per-class", "3", "--amp", "auto")  # auto on a CPU without native bf16
    # A set written before the precision was recorded (--amp as typed): an --amp that names a precision is
    # checked as that precision; "auto" (whichever the machine gave) is continued without that check.
    record = json.loads((out / "dataset.json").read_text())
    record["request"]["amp"] = record["request"].pop("precision")
    (out / "dataset.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r'made with other options \(precision "bf16" there, "fp32" now \(--amp bf16\)\)'):
        write(class_ckpt, out, "--per-class", "3", "--amp", "none")
    record["request"]["amp"] = "auto"
    (out / "dataset.json").write_text(json.dumps(record))
    write(class_ckpt, out, "--per-class", "3", "--amp", "none")
    assert len(list(out.rglob("*.png"))) == 9


def test_a_class_by_name_or_index_and_a_value_however_written_are_one_request(class_ckpt, params_ckpt, tmp_path):
    out = write(class_ckpt, tmp_path / "red", "--per-class", "1", "--class", "red")
    write(class_ckpt, out, "--per-class", "2", "--class", "2")    # red is class 2 of blue, green, red
    assert sorted(p.name for p in (out / "red").iterdir()) == ["000002.png", "000005.png"]
    with pytest.raises(ValueError, match=r"made with other options \(class 2 there, 0 now\)"):
        write(class_ckpt, out, "--per-class", "2", "--class", "blue")
    out = write(params_ckpt, tmp_path / "wind", "--num", "1", "--param", "wind=0.5")
    write(params_ckpt, out, "--num", "2", "--param", "wind=.5")
    with pytest.raises(ValueError, match=r"made with other options \(param.wind 0.5 there, 0.4 now\)"):
        write(params_ckpt, out, "--num", "3", "--param", "wind=0.4")
    # Sets written before requests were resolved recorded the options as typed: read the same way.
    def as_typed_before(folder: Path, label: str | None, params: list[str]) -> None:
        record = json.loads((folder / "dataset.json").read_text())
        record["request"].update({"class": label, "param": params})
        (folder / "dataset.json").write_text(json.dumps(record))

    as_typed_before(tmp_path / "red", "red", [])
    write(class_ckpt, tmp_path / "red", "--per-class", "3", "--class", "2")
    with pytest.raises(ValueError, match=r'made with other options \(class "red" there, 0 now\)'):
        write(class_ckpt, tmp_path / "red", "--per-class", "4", "--class", "blue")
    as_typed_before(out, None, ["wind=5e-1"])
    write(params_ckpt, out, "--num", "3", "--param", "wind=.5")
    with pytest.raises(ValueError, match="made with other options"):
        write(params_ckpt, out, "--num", "4", "--param", "wind=0.4")
    assert len(list((tmp_path / "red").rglob("*.png"))) == 3 and len(list(out.rglob("*.png"))) == 3


def test_a_batch_is_checked_for_memory_at_the_images_it_holds(class_ckpt, tmp_path, monkeypatch):
    """A batch never holds more than the images drawn: a --batch-size beyond any memory is harmless for a set of
    3 (as for --num 3), and refused where that many images are drawn."""
    huge = str(2 * 10 ** 9)
    out = write(class_ckpt, tmp_path / "set", "--per-class", "1", "--batch-size", huge)
    assert len(list(out.rglob("*.png"))) == 3
    monkeypatch.setattr("core.runtime.device_memory", lambda device: 2**30)  # 1 GiB: 349,525 16x16 images
    many = str(10 ** 6)
    with pytest.raises(ValueError, match=rf"^--batch-size {many} asks for 16x16 images whose pixels alone take"):
        sample.main(["--ckpt", str(class_ckpt), "--out", str(tmp_path / "out"), "--device", "cpu", "--num", many,
                     "--batch-size", huge])
    assert not (tmp_path / "out").exists()


def test_a_dataset_folder_is_refused_as_the_out_of_a_drawing_even_with_overwrite(class_ckpt, tmp_path):
    out = write(class_ckpt, tmp_path / "set", "--per-class", "1")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(ValueError, match=r"is a dataset folder \(it holds dataset\.json\), not one for sample\.py's grids"):
        sample.main(["--ckpt", str(class_ckpt), "--out", str(out), "--overwrite", "--device", "cpu", "--sampler",
                     "ddim", "--steps", "2", "--sweep", "class", "--num", "1"])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # its manifest.csv kept


def test_parameter_dataset_writes_a_params_csv_the_folder_loader_reads(params_ckpt, tmp_path):
    out = write(params_ckpt, tmp_path / "set", "--num", "6", "--param", "heat=3.5")
    manifest = rows(out / "manifest.csv")
    loaded = load_dataset(f"folder:{out}", RES)
    assert loaded.info.param_names == ("wind", "heat") and loaded.info.class_names == ()
    expected = torch.tensor([[float(r["wind"]), float(r["heat"])] for r in manifest])
    assert torch.allclose(loaded.params, expected) and loaded.params[:, 1].eq(3.5).all()
    assert loaded.params[:, 0].min() >= -1 and loaded.params[:, 0].max() <= 1   # drawn over the training range
    again = sample.main(["--ckpt", str(params_ckpt), "--out", str(tmp_path / "plain"), "--device", "cpu", "--sampler",
                         "ddim", "--steps", "2", "--num", "6", "--param", "heat=3.5"])
    assert [float(r["wind"]) for r in rows(again / "manifest.csv")] == pytest.approx(expected[:, 0].tolist())


def test_classes_from_parameter_bins(params_ckpt, tmp_path):
    out = write(params_ckpt, tmp_path / "set", "--num", "12", "--classes", "wind:3:-1:1")
    binning = Binning("wind", 3, -1.0, 1.0)
    for r in rows(out / "manifest.csv"):
        wind = float(r["wind"])
        low, high = binning.edges[int(r["class"][-1])], binning.edges[int(r["class"][-1]) + 1]
        assert low <= wind <= high and r["file"].startswith(r["class"] + "/")
    loaded = load_dataset(f"folder:{out}", RES)
    assert set(loaded.info.class_names) <= {"wind0", "wind1", "wind2"} and loaded.info.param_names == ("wind", "heat")


@pytest.mark.parametrize("extra, message", [
    (["--per-class", "2", "--sweep", "class"], "--sweep does not apply"),
    (["--per-class", "2", "--gif"], "--gif does not apply"),
    (["--per-class", "2", "--first-index", "3"], "--first-index does not apply"),
    (["--num", "4"], "use --per-class"),
    (["--per-class", "2", "--classes", "wind:3"], "not conditioned on parameters"),
    (["--per-class", "0"], "--per-class must be at least 1"),
])
def test_bad_dataset_options_are_refused_before_anything_is_written(class_ckpt, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        write(class_ckpt, tmp_path / "set", *extra)
    assert not (tmp_path / "set").exists()


def test_nothing_is_written_inside_the_models_own_training_images(class_ckpt):
    import json
    spec = json.loads((class_ckpt.parent / "config.json").read_text())["data"]["dataset"]
    real = Path(spec.removeprefix("folder:"))
    before = sorted(real.rglob("*"))
    with pytest.raises(ValueError, match=r"--dataset-out .* lies inside the image folder of the model's --dataset"):
        write(class_ckpt, real / "synthetic", "--per-class", "1")
    with pytest.raises(ValueError, match=r"--out .* is the image folder of the model's --dataset"):
        sample.main(["--ckpt", str(class_ckpt), "--out", str(real), "--device", "cpu", "--steps", "2", "--num", "1"])
    assert sorted(real.rglob("*")) == before


def test_nothing_is_written_inside_a_dataset_of_ours(class_ckpt, tmp_path):
    # A folder inside a written dataset would be read as one more class of it by every later command.
    out = write(class_ckpt, tmp_path / "set", "--per-class", "1")
    before = sorted(out.rglob("*"))
    with pytest.raises(ValueError, match=r"--dataset-out .* lies inside the dataset .*set \(it holds dataset.json\)"):
        write(class_ckpt, out / "more", "--per-class", "1")
    with pytest.raises(ValueError, match=r"OUT .* lies inside the dataset"):
        export.main(["plumes", str(out / "blue" / "real"), "--num-samples", "4", "--resolution", str(RES)])
    assert sorted(out.rglob("*")) == before
    write(class_ckpt, out / ".hidden" / "set", "--per-class", "1")  # hidden folders are never read as images
    assert load_dataset(f"folder:{out}", RES).info.class_names == ("blue", "green", "red")


def test_bad_bins_are_refused_before_anything_is_written(params_ckpt, tmp_path):
    for spec, message in (("speed:3", "NAME one of wind, heat"), ("wind:1", "from 2 to 256"), ("wind:3:1:-1", "empty"),
                          ("wind:3:1e6:2e6", r"the bins over \[1e\+06, 2e\+06\] miss the range of wind in the data"),
                          # Wider than the training range [-1, 1]: every image would land in the middle bin.
                          ("wind:3:-5:5", r"reaches only 1 of the 3 bins over \[-5, 5\], so wind0, wind2 would hold "
                                          r"no image")):
        with pytest.raises(ValueError, match=message):
            write(params_ckpt, tmp_path / "set", "--num", "2", "--classes", spec)
        assert not (tmp_path / "set").exists()
    with pytest.raises(ValueError, match="applies to --dataset-out only"):
        sample.main(["--ckpt", str(params_ckpt), "--per-class", "3", "--device", "cpu"])


# ---------------------------------------------------------------------------------------------
# python -m data.export


def test_bins_label_by_equal_width_over_the_range():
    b = Binning("wind", 3, -1.0, 1.0)
    assert b.edges == pytest.approx([-1, -1 / 3, 1 / 3, 1]) and b.class_names == ["wind0", "wind1", "wind2"]
    assert [b.label(v) for v in (-1, -0.34, -0.33, 0.33, 0.34, 1, 5, -5)] == [0, 0, 1, 1, 2, 2, 2, 0]
    assert Binning("t", 12, 0, 1).class_names[:2] == ["t00", "t01"]            # sorts in bin order


def test_export_plumes_by_wind_bins_with_the_same_edges_for_both_splits(tmp_path):
    cache = str(tmp_path / "cache")
    common = ["--classes", "wind:3:-1:1", "--resolution", "16", "--cache-dir", cache]
    train_dir = export.main(["plumes", str(tmp_path / "real"), "--num-samples", "24", *common])
    test_dir = export.main(["plumes", str(tmp_path / "test"), "--num-samples", "12", "--split", "test", *common])
    for folder in (train_dir, test_dir):
        loaded = load_dataset(f"folder:{folder}", 16)
        assert loaded.info.param_names == ("wind", "temperature")
        wind = loaded.params[:, 0].contiguous()
        expected = torch.bucketize(wind, torch.tensor([-1 / 3, 1 / 3]))
        assert torch.equal(torch.tensor([int(loaded.info.class_names[y][-1]) for y in loaded.labels]), expected)
    original = load_dataset("plumes", 16, cache_dir=cache, num_samples=24)
    exported = load_dataset(f"folder:{train_dir}", 16)
    by_index = {int(r["index"]): r["file"] for r in rows(train_dir / "manifest.csv")}
    for k in range(24):                                             # pixels survive the round trip exactly
        assert np.array_equal(pixels(train_dir / by_index[k]), original.images[k].permute(1, 2, 0).numpy())
    assert sorted(exported.params[:, 0].tolist()) == pytest.approx(sorted(original.params[:, 0].tolist()))


def test_export_with_another_seed_gives_other_plumes_for_a_validation_set(tmp_path):
    cache = str(tmp_path / "cache")
    common = ["--num-samples", "6", "--split", "test", "--resolution", "16", "--cache-dir", cache]
    test = export.main(["plumes", str(tmp_path / "test"), *common])
    val = export.main(["plumes", str(tmp_path / "val"), "--seed", "1", *common])
    seeds = [{int(r["seed"]) for r in rows(folder / "manifest.csv")} for folder in (test, val)]
    assert len(seeds[0]) == len(seeds[1]) == 6 and not seeds[0] & seeds[1]
    assert torch.equal(load_dataset(f"folder:{val}", 16).images,
                       load_dataset("plumes", 16, cache_dir=cache, train=False, num_samples=6, seed=1).images)
    with pytest.raises(ValueError, match="made with other options"):           # a folder holds one request
        export.main(["plumes", str(val), *common])


def test_export_a_folder_keeps_its_classes_and_resumes(tmp_path):
    source = tmp_path / "source"
    for name in ("cat", "dog"):
        (source / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((RES, RES, 3), 40 * k + (100 if name == "dog" else 0), np.uint8)).save(
                source / name / f"{k}.png")
    (source / "params.csv").write_text("path,level\n" + "".join(f"{name}/{k}.png,{(1e-8, 0.1, 0.2)[k]}\n"
                                                               for name in ("cat", "dog") for k in range(3)))
    out = export.main([f"folder:{source}", str(tmp_path / "out"), "--resolution", str(RES)])
    assert ImageFolder(str(out)).class_to_idx == {"cat": 0, "dog": 1}
    # Each exported image names the file it came from; parameters are written in float32's shortest digits.
    manifest = rows(out / "manifest.csv")
    assert [r["source"] for r in manifest] == [f"{name}/{k}.png" for name in ("cat", "dog") for k in range(3)]
    assert [r["level"] for r in manifest[:3]] == ["1e-08", "0.1", "0.2"]
    assert torch.equal(load_dataset(f"folder:{out}", RES).params, load_dataset(f"folder:{source}", RES).params)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    export.main([f"folder:{source}", str(out), "--resolution", str(RES)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    assert torch.equal(load_dataset(f"folder:{out}", RES).images, load_dataset(f"folder:{source}", RES).images)
    with pytest.raises(ValueError, match="NAME one of"):
        parse_binning("wind:3", load_dataset(f"folder:{source}", RES).info)
    table = (source / "params.csv").read_text()
    for k in range(3, 5):  # the source grows: its files sort among the others, so indices would move
        Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(source / "cat" / f"{k}.png")
    (source / "params.csv").write_text(table + "cat/3.png,0\ncat/4.png,0\n")
    with pytest.raises(ValueError, match=rf"The images of folder:{source} changed since {out} was exported"):
        export.main([f"folder:{source}", str(out), "--resolution", str(RES)])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps
    request = json.loads((out / "dataset.json").read_text())  # a set written before the fingerprint was recorded
    request["request"].pop("source_fingerprint")
    (out / "dataset.json").write_text(json.dumps(request))
    for k in range(3, 5):
        (source / "cat" / f"{k}.png").unlink()
    (source / "params.csv").write_text(table)
    export.main([f"folder:{source}", str(out), "--resolution", str(RES)])  # continued without that check


def test_export_refuses_a_folder_of_another_set_or_of_other_files_before_decoding_the_source(tmp_path, monkeypatch):
    source = tmp_path / "source"
    for name in ("cat", "dog"):
        (source / name).mkdir(parents=True)
        Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(source / name / "a.png")
    made = export.main([f"folder:{source}", str(tmp_path / "made"), "--resolution", str(RES)])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    monkeypatch.setattr("data.folder.load_image", lambda *a: pytest.fail("the source was decoded"))
    with pytest.raises(ValueError, match=r"holds a dataset made with other options \(resolution 16 there, 24 now\)"):
        export.main([f"folder:{source}", str(made), "--resolution", str(RES + 8)])
    with pytest.raises(FileExistsError, match="already holds files that are not a dataset of ours"):
        export.main([f"folder:{source}", str(tmp_path / "notes"), "--resolution", str(RES)])


@pytest.mark.parametrize("reserved", ["manifest.csv", "dataset.json", "params.csv", "Manifest.CSV"])
def test_a_class_named_like_a_file_of_the_set_is_refused_before_anything_is_written(tmp_path, reserved):
    source = tmp_path / "source"
    for name in (reserved, "other"):
        (source / name).mkdir(parents=True)
        Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(source / name / "a.png")
    with pytest.raises(ValueError, match=f"A class named '{re.escape(reserved)}' would be a folder where"):
        export.main([f"folder:{source}", str(tmp_path / "out"), "--resolution", str(RES)])
    assert not [p for p in (tmp_path / "out").rglob("*") if not p.name.startswith(".")]


def test_a_smaller_count_keeps_the_larger_set_and_says_so(class_ckpt, tmp_path, capsys):
    out = write(class_ckpt, tmp_path / "set", "--per-class", "2")
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    write(class_ckpt, out, "--per-class", "1")
    said = capsys.readouterr().out
    assert "already holds 3 images beyond the 3 asked for" in said and "the set has 6 images" in said
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing deleted or rewritten
    write(class_ckpt, out, "--per-class", "2")
    assert "beyond" not in capsys.readouterr().out


def test_parameters_named_like_manifest_columns_overwrite_none_of_them(tmp_path):
    # A simulation's own "seed" (or "index", "class", "file") as a parameter: the manifest keeps the image's
    # seed and index and records the parameter as "param:NAME"; params.csv and the folder loader keep its
    # name; and a rerun that extends the set reads that manifest back.
    from data.writer import DatasetWriter, Item
    from sampling.draw import manifest_row
    names = ["seed", "index", "wind"]
    request = {"param_names": names}

    def items(n):
        return [Item(k, params={"seed": 100.5 + k, "index": 7.25 * k, "wind": -k / 10}, record={"seed": 9000 + k})
                for k in range(n)]

    def write_items(n):
        writer = DatasetWriter(tmp_path / "set", request)
        wanted = items(n)
        writer.open(wanted)
        pending = writer.pending(wanted)
        writer.write(pending, torch.zeros(len(pending), 3, RES, RES), every_item=wanted)

    write_items(2)
    write_items(3)  # extends: reads the manifest it wrote
    manifest = rows(tmp_path / "set" / "manifest.csv")
    assert [(int(r["index"]), int(r["seed"]), r["file"]) for r in manifest] == [(k, 9000 + k, f"{k:06d}.png")
                                                                                 for k in range(3)]
    assert [float(r["param:seed"]) for r in manifest] == [100.5, 101.5, 102.5]
    assert [float(r["param:index"]) for r in manifest] == [0.0, 7.25, 14.5] and "param:wind" not in manifest[0]
    assert list(rows(tmp_path / "set" / "params.csv")[0]) == ["path", *names]
    loaded = load_dataset(f"folder:{tmp_path / 'set'}", RES)
    assert loaded.info.param_names == tuple(names)
    torch.testing.assert_close(loaded.params, torch.tensor([[100.5 + k, 7.25 * k, -k / 10] for k in range(3)]))
    # sample.py's grid and sweep manifests: the same rule for their own columns.
    row = manifest_row({"index": 3, "file": "images/000003.png", "seed": 42}, {"seed": 0.5, "wind": 0.1})
    assert row == {"index": 3, "file": "images/000003.png", "seed": 42, "param:seed": 0.5, "wind": 0.1}


def test_a_rerun_draws_damaged_images_again_and_refuses_images_not_of_the_set(class_ckpt, tmp_path, capsys):
    """A rerun took every image on disk as done: one cut short or overwritten with other bytes stayed, and a
    foreign image in a class folder was later read as one of the set's."""
    out = write(class_ckpt, tmp_path / "set", "--per-class", "2")
    whole = {p: p.read_bytes() for p in out.rglob("*.png")}
    cut, junk = sorted(whole)[:2]
    cut.write_bytes(whole[cut][:50])
    junk.write_bytes(b"junk")
    write(class_ckpt, out, "--per-class", "2")
    assert f"2 image(s) of {out} are damaged (such as {cut.relative_to(out)}); they are drawn again." in (
        capsys.readouterr().out.splitlines())
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == whole             # drawn again as they were
    foreign = next(out.glob("*/")) / "notes.jpg"
    foreign.write_bytes(b"not ours")
    with pytest.raises(UserError, match=rf"^{re.escape(str(out))} holds 1 image\(s\) that are not of this set \(such "
                                        rf"as {foreign.parent.name}/notes.jpg\); move them out"):
        write(class_ckpt, out, "--per-class", "2")
    foreign.unlink()
    (out / "purple").mkdir()
    (out / "purple" / "000006.png").write_bytes(next(iter(whole.values())))
    with pytest.raises(UserError, match=rf"^{re.escape(str(out))} holds 1 image\(s\) in folders that are no class of "
                                        rf"this set \(such as purple/000006.png\)"):
        write(class_ckpt, out, "--per-class", "2")
