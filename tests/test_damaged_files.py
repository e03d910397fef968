"""Damaged and hand-edited files: every kind of file a command reads back (checkpoint.pt, the config
inside it, metrics.jsonl, a dataset's dataset.json and manifest.csv, an inversion's record, FID
statistics) is given variants that are not our format, lack a key, hold a field of the wrong type or
are not a record, and each answers with one sentence naming the file, never a KeyError, TypeError or
AttributeError traceback. Where the sentence suggests an option, the command in hand has it."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import sample
import train
from core import cli
from core.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from core.config import from_dict, to_dict
from core.errors import UserError
from data.writer import MANIFEST, REQUEST, DatasetWriter, Item
from ddpm.config import DDPMConfig
from helpers import NPZ_DAMAGE, damaged_npz

OPTION = re.compile(r"--[a-z][a-z0-9-]+")


def options_of(module: str) -> set[str]:
    """Every option the command `module` (train, sample, evaluate.consistency, ...) lists in its --help."""
    import importlib
    if module == "train":
        return set(OPTION.findall(train.full_help()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    return set(OPTION.findall(out.getvalue()))


def the_error(main: Callable, args: list[str], capsys) -> str:
    """The one line a command prints for an expected failure (checked: non-zero exit, no traceback)."""
    capsys.readouterr()
    code = cli.run(main, args)  # a bug would raise here instead of returning an exit code
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def assert_names_only(line: str, module: str) -> None:
    named = set(OPTION.findall(line))
    assert named <= options_of(module), f"{sorted(named - options_of(module))} is not an option of {module}: {line}"


# ---------------------------------------------------------------------------------------------
# checkpoint.pt


def _set(key: str, value: Any) -> Callable[[dict], None]:
    def edit(payload: dict) -> None:
        target = payload
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return edit


def _drop(key: str) -> Callable[[dict], None]:
    def edit(payload: dict) -> None:
        target = payload
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        del target[last]
    return edit


def _raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _saved(obj: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


def _edited(*edits: Callable[[dict], None]) -> Callable[[Path], None]:
    """The checkpoint at a path, loaded, edited by hand and saved again."""
    def damage(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        for edit in edits:
            edit(payload)
        torch.save(payload, path)
    return damage


def _flipped_bit(path: Path) -> None:
    """One bit in the middle of the largest tensor's bytes changed in place, as a failing disk or copy does:
    the file still loads with torch.load, one weight changed."""
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name, extra = struct.unpack("<HH", data[entry.header_offset + 26:entry.header_offset + 30])
    data[entry.header_offset + 30 + name + extra + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


class Code:
    """An object a pickle would have to run code to rebuild."""


# (what is wrong, the damage done to a run's checkpoint.pt, what the one sentence says)
CHECKPOINT_CASES = [
    ("a text file", _raw(b"these are my notes, not weights\n"), "is not a PyTorch file at all"),
    ("an empty file", _raw(b""), "is empty"),
    # (refused before torch reads it, which printed a warning about the pickle's protocol first)
    ("a plain pickle", _raw(pickle.dumps({"format": FORMAT}, protocol=4)), "is a pickle of plain Python objects, not "
                                                                          "a PyTorch file"),
    ("an old-format PyTorch file", lambda path: torch.save([1, 2], path, _use_new_zipfile_serialization=False),
     "not a checkpoint written by this toolkit"),
    ("a flipped bit", _flipped_bit, "is damaged: its entry"),
    ("a list", _saved([1, 2, 3]), "not a checkpoint written by this toolkit"),
    ("a foreign state dict", _saved({"state_dict": {"w": torch.zeros(1)}}), "not a checkpoint written by this toolkit"),
    ("an object that runs code", _saved({"format": FORMAT, "version": 2, "x": Code()}), "holds Python objects"),
    ("no version", _edited(_drop("version")), "has no format version, so it was damaged or edited"),
    ("a version that is text", _edited(_set("version", "2")), "format version '2', which is not a version number"),
    ("a newer version", _edited(_set("version", 99)), "newer than this code understands"),
    ("no stage", _edited(_drop("stage")), "lacks stage"),
    ("a stage that is a number", _edited(_set("stage", 3)), "holds stage as the number 3 where text belongs"),
    ("data_info of None", _edited(_set("data_info", None)), "holds data_info as None where a record belongs"),
    ("a step that is text", _edited(_set("step", "12")), "holds step as the text '12' where a whole number"),
    ("a step that is a fraction", _edited(_set("step", 1.5)), "holds step as the number 1.5"),
    ("models as a list", _edited(_set("models", [1])), "holds models as the list [1] where a record belongs"),
    ("a config that is text", _edited(_set("config", "garbage")), "holds config as the text 'garbage'"),
    ("data_info without resolution", _edited(_drop("data_info.resolution")), "lacks data_info.resolution"),
    ("class names that are text", _edited(_set("data_info.class_names", "blue")),
     "holds data_info.class_names as the text 'blue'"),
    ("seven channels", _edited(_set("data_info.channels", 7)), "holds a data_info with 7 channels"),
    ("a range without its parameter", _edited(_set("data_info.param_ranges", [[0, 1]])),
     "holds a data_info with 1 param_ranges for 0 parameters"),
    ("a class name that is a number", _edited(_set("data_info.class_names", ["blue", 2, "red"])),
     "holds a data_info with class or parameter names that are not text"),
]
# The config inside, and what only resuming reads: train.py --resume names the file in these; the
# stage loaders sample.py goes through do not pass it to from_dict yet.
RESUME_CASES = [
    ("a config section that is text", _edited(_set("config.train", "x")), "holds train as the text 'x' where a"),
    ("a setting that is text", _edited(_set("config.train.steps", "many")), "holds train.steps as the text 'many'"),
    ("an unknown setting", _edited(_set("config.unet.wings", 2)), "has unknown keys (unet.wings)"),
    ("a setting that fails its checks", _edited(_set("config.train.batch_size", 0)), "fails its own checks"),
    ("no optimizers", _edited(_drop("optimizers")), "lacks optimizers"),
]


def damaged_copy(checkpoint: Path, folder: Path, damage: Callable) -> Path:
    """A copy of the run folder of `checkpoint` whose checkpoint.pt has `damage` done to it."""
    shutil.copytree(checkpoint.parent, folder)
    damage(folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


@pytest.mark.parametrize("damage, message", [c[1:] for c in CHECKPOINT_CASES + RESUME_CASES],
                         ids=[c[0] for c in CHECKPOINT_CASES + RESUME_CASES])
def test_resuming_from_a_damaged_checkpoint_is_one_sentence_with_advice_train_py_can_follow(
        class_ckpt, tmp_path, capsys, damage, message):
    path = damaged_copy(class_ckpt, tmp_path / "run", damage)
    before = path.read_bytes()
    line = the_error(train.main, ["--run-dir", str(path.parent), "--resume", "--steps", "9", "--device", "cpu"], capsys)
    assert message in line and str(path) in line
    assert_names_only(line, "train")
    assert "--ckpt" not in line and path.read_bytes() == before


@pytest.mark.parametrize("damage, message", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_sampling_from_a_damaged_checkpoint_is_one_sentence_naming_it(class_ckpt, tmp_path, capsys, damage, message):
    path = damaged_copy(class_ckpt, tmp_path / "run", damage)
    out = tmp_path / "out"
    line = the_error(sample.main, ["--ckpt", str(path), "--out", str(out), "--device", "cpu", "--num", "1",
                                   "--sampler", "ddim", "--steps", "2"], capsys)
    assert message in line and str(path) in line
    assert_names_only(line, "sample")
    assert not out.exists()


def test_a_checkpoint_of_a_stage_no_one_has_is_refused_as_damaged_not_as_a_mistyped_option(class_ckpt, tmp_path,
                                                                                           capsys):
    """sample.py said "Unknown stage 'nope'; choose one of ...", as to a --stage typed wrong."""
    path = damaged_copy(class_ckpt, tmp_path / "run", _edited(_set("stage", "nope")))
    line = the_error(sample.main, ["--ckpt", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert line == (f"error: {path} records the stage 'nope', which is none of ddpm, vae, ldm, classify, invert; it "
                    f"is damaged or was edited, so point --ckpt at an intact checkpoint.pt.")


def test_a_damaged_judge_or_classifier_is_one_sentence_naming_it_and_no_option_of_another_command(
        class_ckpt, tmp_path, capsys):
    from evaluate import consistency, gradcam
    text = tmp_path / "judge.pt"
    text.write_text("my notes")
    no_info = tmp_path / "no-info.pt"
    save_checkpoint({"stage": "classify", "config": {"model": {}}, "data_info": None, "models": {}}, no_info)
    for path, message in ((text, "is not a PyTorch file at all"), (no_info, "holds data_info as None"),
                          (class_ckpt, "is from stage 'ddpm', but this needs 'classify'")):
        line = the_error(consistency.main, ["--ckpt", str(class_ckpt), "--judge", str(path), "--device", "cpu",
                                            "--out", str(tmp_path / "c")], capsys)
        assert message in line and str(path) in line
        assert_names_only(line, "evaluate.consistency")
        line = the_error(gradcam.main, ["--ckpt", str(path), "--images", "plumes", "--device", "cpu",
                                        "--out", str(tmp_path / "g")], capsys)
        assert message in line and str(path) in line
        assert_names_only(line, "evaluate.gradcam")


def test_a_damaged_autoencoder_for_ldm_is_one_sentence_naming_it(tmp_path, capsys):
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.new("RGB", (16, 16), (9 * k, 0, 0)).save(images / f"{k}.png")
    vae = tmp_path / "vae.pt"
    vae.write_text("not an autoencoder")
    line = the_error(train.main, ["--stage", "ldm", "--vae-ckpt", str(vae), "--run-dir", str(tmp_path / "run"),
                                  "--device", "cpu", "--dataset", f"folder:{images}", "--resolution", "16", "--cond", "none"],
                     capsys)
    assert "is not a PyTorch file at all" in line and str(vae) in line
    assert_names_only(line, "train")


# ---------------------------------------------------------------------------------------------
# the config inside a checkpoint


@pytest.mark.parametrize("values, message", [
    ("garbage", "is the text 'garbage', not a record of settings"),
    (["a", "b"], "is the list ['a', 'b'], not a record of settings"),
    ({"unet": None}, "holds unet as None where a record of settings belongs"),
    ({"train": {"lr": "fast"}}, "holds train.lr as the text 'fast' where a number belongs"),
    ({"train": {"compile": 1}}, "holds train.compile as the number 1 where true or false belongs"),
    ({"unet": {"channel_mult": [1, "2"]}}, "holds unet.channel_mult as the list [1, '2'] where a list of whole"),
    ({"train": {"steps": -3}}, "fails its own checks in its train section (steps must be 0 or positive"),
    ({"zoom": 1}, "has unknown keys (zoom)"),
])
def test_a_config_of_the_wrong_shape_is_refused_naming_its_file_and_field(values, message):
    with pytest.raises(UserError) as caught:
        from_dict(DDPMConfig, values, "runs/x/checkpoint.pt")
    assert message in str(caught.value) and "runs/x/checkpoint.pt" in str(caught.value)


def test_a_config_that_is_a_string_is_not_read_as_its_letters():
    with pytest.raises(UserError) as caught:
        from_dict(DDPMConfig, "garbage")  # once "unknown keys ['a', 'b', 'e', 'g', 'r']"
    assert str(caught.value) == "The config is the text 'garbage', not a record of settings; fix it."


def test_a_config_that_is_whole_still_round_trips():
    config = DDPMConfig()
    assert from_dict(DDPMConfig, json.loads(json.dumps(to_dict(config)))) == config
    assert from_dict(DDPMConfig, {"train": {"lr": 1}}).train.lr == 1  # a whole number is a number


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


@pytest.mark.parametrize("line", ['[1, 2]', '"a note"', '3', 'null', '{"loss": 0.5}', '{"step": "2"}',
                                  '{"step": 2.0}', '{"step": true}'])
def test_a_metrics_line_that_is_json_but_not_a_record_is_refused_naming_the_line(tmp_path, line):
    from core.runtime import read_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n' + line + '\n{"step": 3, "loss": 0.5}\n')
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} line 2 is not a metrics record"):
        read_metrics(path)


def test_torn_metrics_lines_are_dropped_with_a_warning(tmp_path):
    from core.runtime import read_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n\xff\xfe\x00\n{"step": 3}\n\x00\x00\x00')
    with pytest.warns(UserWarning, match="torn") as warned:
        records = read_metrics(path)
    assert [r["step"] for _, r in records] == [1, 3] and len(warned) == 3


def test_resuming_with_an_edited_metrics_file_is_one_line_and_changes_nothing(class_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(class_ckpt.parent, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('["not", "a", "record"]\n')
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = the_error(train.main, ["--run-dir", str(run), "--resume", "--steps", "4", "--device", "cpu"], capsys)
    assert f"{run / 'metrics.jsonl'} line" in line and "not a metrics record" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------------------------------------
# dataset.json and manifest.csv of a written dataset


def written_set(root: Path) -> DatasetWriter:
    """A dataset of four 8 px images with one parameter, as sample.py --dataset-out writes it."""
    request = {"seed": 0, "param_names": ["wind"]}
    items = [Item(k, "", params={"wind": k / 4}, record={"seed": k}) for k in range(4)]
    writer = DatasetWriter(root, request)
    writer.open(items)
    writer.write(items, torch.zeros(4, 3, 8, 8), every_item=items)
    return DatasetWriter(root, request), items


GOOD_MANIFEST = "index,file,seed,wind\n0,000000.png,0,0.0\n1,000001.png,1,0.25\n"


@pytest.mark.parametrize("file, text, message", [
    (REQUEST, b"hello", "is not a dataset description written by this toolkit"),
    (REQUEST, b"\xff\xfe{}", "is not a dataset description written by this toolkit"),
    (REQUEST, b"[1, 2]", "is not a dataset description written by this toolkit"),
    (REQUEST, json.dumps({"format": "other", "request": {}}).encode(), "is not a dataset description"),
    (REQUEST, json.dumps({"format": "synthdiff-dataset"}).encode(), "and a \"request\" record"),
    (REQUEST, json.dumps({"format": "synthdiff-dataset", "request": "x"}).encode(), "and a \"request\" record"),
    (MANIFEST, b"file,seed,wind\n000000.png,0,0.0\n", "has no column index"),
    (MANIFEST, b"index,file,seed\n0,000000.png,0\n", "has no column wind"),
    (MANIFEST, b"index,file,seed,wind\nzero,000000.png,0,0.0\n", "line 2 names image 'zero'"),
    (MANIFEST, b"index,file,seed,wind\n-1,000000.png,0,0.0\n", "line 2 names image '-1'"),
    (MANIFEST, b"index,file,seed,wind\n0,000001.png,0,0.0\n", "as '000001.png', not an index and its file"),
    (MANIFEST, b"index,file,seed,wind\n0,000000.png,0\n", "line 2 does not have one cell per column"),
    (MANIFEST, b"index,file,seed,wind\n0,000000.png,0,0.0,extra\n", "line 2 does not have one cell per column"),
    (MANIFEST, (GOOD_MANIFEST + "1,000001.png,1,0.25\n").encode(), "lists image 1 twice"),
    (MANIFEST, b"index,file,seed,wind\n0,000000.png,0,windy\n", "line 2 has a parameter (wind) that is not a number"),
    (MANIFEST, b"index,file\n\xff\xfe\n", "is not a CSV table of UTF-8 text"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_a_damaged_dataset_description_or_manifest_is_refused_naming_the_file(tmp_path, file, text, message):
    writer, _ = written_set(tmp_path / "set")
    (tmp_path / "set" / file).write_bytes(text)
    with pytest.raises(UserError) as caught:
        writer.open([])
    assert message in str(caught.value) and str(tmp_path / "set" / file) in str(caught.value)


def test_the_advice_for_a_damaged_manifest_works_deleting_it_and_rerunning_rebuilds_it(tmp_path):
    writer, items = written_set(tmp_path / "set")
    manifest = tmp_path / "set" / MANIFEST
    intact = manifest.read_text()
    manifest.write_text("index,file\nzero,x.png\n")
    with pytest.raises(UserError, match="delete manifest.csv and run the same command again"):
        writer.open(items)
    manifest.unlink()
    writer.open(items)  # the same command again: nothing pending, the tables brought up to date
    writer.write([], torch.zeros(0, 3, 8, 8), every_item=items)
    assert manifest.read_text() == intact


# ---------------------------------------------------------------------------------------------
# an inversion's record


def inversion_payload() -> dict:
    info = {"name": "folder:x", "resolution": 8, "channels": 3, "class_names": ["a", "b"], "param_names": ["wind"],
            "param_ranges": [[0.0, 1.0]], "num_samples": 3, "fingerprint": "0"}
    return {"stage": "invert", "data_info": info, "models": {"model": {"weight": torch.zeros(3, 4)}},
            "inversion": {"model": {"path": "runs/m/checkpoint.pt", "stage": "ddpm", "weights": "ema",
                                    "fingerprint": "abc"},
                          "start": "null", "sources": ["a.png", "b.png", "c.png"],
                          "labels": torch.tensor([0, 1, 1]), "params": torch.zeros(3, 1)}}


@pytest.mark.parametrize("damage, message", [
    (_drop("inversion"), "lacks inversion"),
    (_set("inversion", "x"), "no path, weights and fingerprint of the frozen model"),
    (_drop("models.model"), "no learned vectors"),
    (_set("models.model.weight", torch.zeros(3)), "no learned vectors"),
    (_drop("inversion.model.fingerprint"), "no path, weights and fingerprint"),
    (_set("inversion.labels", torch.tensor([0.0, 1.0, 1.0])), "no label among its classes for every vector"),
    (_set("inversion.labels", torch.tensor([0, 1])), "no label among its classes for every vector"),
    (_set("inversion.labels", torch.tensor([0, 1, 5])), "no label among its classes for every vector"),
    (_set("inversion.params", torch.zeros(3, 2)), "no parameters for every vector"),
    (_set("inversion.sources", "a.png"), "no source image for every vector"),
    (_set("data_info.param_names", "wind"), "holds data_info.param_names as the text 'wind'"),
])
def test_a_damaged_inversion_record_is_refused_naming_the_checkpoint(damage, message):
    from invert.variations import check_inversion
    check_inversion(inversion_payload(), Path("inv.pt"))  # intact: accepted
    payload = inversion_payload()
    damage(payload)
    with pytest.raises(UserError) as caught:
        check_inversion(payload, Path("inv.pt"))
    assert message in str(caught.value) and "inv.pt" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# FID statistics


@pytest.mark.parametrize("content, message", [
    (b"mu = 0\n", "is not a NumPy .npz file (it holds text or another format)"),
    (b"", "is not a NumPy .npz file (it is empty)"),
    (pickle.dumps({"mu": [0.0]}), "is not a NumPy .npz file"),
])
def test_a_statistics_file_that_is_not_npz_says_so_not_pickled_data(tmp_path, content, message):
    from fid.stats import load_statistics
    path = tmp_path / "real.npz"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_statistics(path)
    assert message in str(caught.value) and str(path) in str(caught.value) and "pickled" not in str(caught.value)


@pytest.mark.parametrize("how", sorted(NPZ_DAMAGE))
def test_a_damaged_statistics_archive_is_one_sentence(tmp_path, how):
    from fid.stats import load_statistics
    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2))
    (tmp_path / "s.npz").write_bytes(damaged_npz((tmp_path / "s.npz").read_bytes(), how))
    with pytest.raises(UserError, match=r"Cannot read statistics file .*s\.npz .*; recreate it with --save-stats"):
        load_statistics(tmp_path / "s.npz")


def test_a_statistics_file_of_complex_numbers_is_refused_not_read_as_its_real_part(tmp_path):
    from fid.stats import load_statistics
    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2) * (1 + 1j))
    with pytest.raises(UserError, match=r"s\.npz \(it holds complex numbers\)"):
        load_statistics(tmp_path / "s.npz")


def test_a_statistics_file_that_is_npz_still_loads(tmp_path):
    from fid.stats import load_statistics
    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2))
    assert load_statistics(tmp_path / "s.npz").sigma.shape == (2, 2)


def test_checkpoints_load_intact_and_extra_fields_are_kept(tmp_path):
    save_checkpoint({"stage": "toy", "step": 3, "extra": [1]}, tmp_path / "c.pt")
    assert load_checkpoint(tmp_path / "c.pt", "toy")["extra"] == [1]


@pytest.mark.parametrize("config_text, metrics_text, message", [
    ("not json", '{"step": 1}\n', "is not the JSON config a run writes"),
    ('{"train": "fast"}', '{"step": 1}\n', "config.json"),
    ('{"train": {"steps": 1}}', '[1, 2]\n', "line 1 is not a metrics record"),
])
def test_a_finished_classify_run_read_back_with_damaged_files_is_one_sentence(tmp_path, config_text, metrics_text,
                                                                               message):
    from classify.stage import final_results
    from core.errors import UserError
    (tmp_path / "config.json").write_text(config_text)
    (tmp_path / "metrics.jsonl").write_text(metrics_text)
    with pytest.raises(UserError, match=message):
        final_results(tmp_path)


def test_a_flipped_bit_in_published_weights_is_one_sentence_though_torch_load_reads_them(tmp_path):
    from core.weights import read_state_dict
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save({"conv_in.weight": torch.randn(64, 3, 3, 3)}, path)
    _flipped_bit(path)
    assert torch.load(path, weights_only=True)["conv_in.weight"].shape == (64, 3, 3, 3)  # torch.load takes it
    with pytest.raises(UserError, match=r"^U-Net file .* is damaged: its entry .* fails its checksum \(a broken "
                                        r"download or copy\); download the published file again\.$"):
        read_state_dict(path, "U-Net")
    read_state_dict(path, "U-Net", mmap=True)  # a start-up check of the names reads almost nothing: not checked
