"""Late checks and lost stops: sample.py refuses what its command line alone refuses before it reads a
checkpoint; a stop signal that comes inside a weakref callback (torch.compile runs many while it compiles)
is answered, not printed as "Exception ignored" and lost; a stop that killed torch.compile's compiler, and a
library such a stop left empty in its cache, are one line each; Grad-CAM explains images of classes its
classifier does not know instead of refusing the run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sample
from core import cli
from core.errors import UserError
from evaluate import gradcam
from test_gradcam import classifier_checkpoint, red_images

ROOT = Path(sample.__file__).parent

WEAKREF_STOP = """
import os, signal, sys, time, weakref
from core import cli

class Cached:  # a key of a weak-keyed cache, as torch.compile's dynamo keeps them
    pass

def entry(argv):
    key = Cached()
    def forget(ref):  # what the cache does when its key goes
        os.kill(os.getpid(), getattr(signal, argv[0]))  # answered at the next bytecode: in here
        time.sleep(0.01)
    ref = weakref.ref(key, forget)
    del key
    time.sleep(10)
    print("worked on", flush=True)

cli.main(entry)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stop_that_comes_inside_a_weakref_callback_stops_the_command(tmp_path, name):
    """sample.py --compile stopped by a Ctrl-C to its process group about 10 s in (while dynamo compiled) printed
    "Exception ignored in: <function ExactWeakKeyDictionary...>" with a KeyboardInterrupt traceback, and drew on
    to the end with exit code 0: Python cannot raise from a weakref callback."""
    script = tmp_path / "script.py"
    script.write_text(WEAKREF_STOP)
    done = subprocess.run([sys.executable, str(script), name], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60)
    signum = getattr(signal, name)
    assert done.returncode == 128 + signum and "worked on" not in done.stdout, done.stderr[-2000:]
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert done.stderr.strip() == f"error: {cli.interrupted(how)}"


def compile_failure(returncode: int) -> BaseException:
    """What torch.compile raises when g++ ends with `returncode` (-2: killed by SIGINT) while it builds Inductor's
    CPU code: InductorError(CppCompileError from CalledProcessError), as in a training run stopped by a Ctrl-C to
    its process group, which printed all 1,500 lines of it, exit code 1."""
    from torch._inductor.exc import CppCompileError, InductorError
    cmd = ["g++", "kernel.cpp", "-o", "kernel.so"]
    try:
        try:
            raise subprocess.CalledProcessError(returncode, cmd, b"warning: ...\n" * 1000)
        except subprocess.CalledProcessError as err:
            raise CppCompileError(cmd, err.stdout.decode()) from err
    except CppCompileError as err:
        return InductorError(err, None)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_compiler_stopped_with_its_process_group_is_an_interruption(signum):
    how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert cli.explain(compile_failure(-signum)) == (
        cli.interrupted(f"{how} while torch.compile was compiling"), 128 + signum)
    assert cli.explain(compile_failure(1)) is None  # a real compile error: a bug worth its traceback
    assert cli.explain(subprocess.CalledProcessError(-signum, ["ffmpeg"])) is None  # not torch.compile's


def test_a_library_that_a_stopped_build_left_empty_in_the_compile_cache_is_named_with_the_folder_to_delete(
        tmp_path, monkeypatch):
    """A SIGTERM to the process group while the linker wrote left a 0-byte .so in Inductor's cache (measured), which
    Inductor uses without a check from then on: every later compile that needs it ended in a traceback ending
    "ImportError: ....so: file too short"."""
    import importlib.util

    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.runtime import cache_dir_utils
    cache = tmp_path / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    library = cache / "au" / "caub4x.main.so"
    library.parent.mkdir(parents=True)
    library.touch()
    try:
        importlib.util.module_from_spec(importlib.util.spec_from_file_location("caub4x", library))
    except ImportError as err:
        failure = BackendCompilerFailed(lambda: None, err, None)
    assert cache_dir_utils.cache_dir() == str(cache)
    assert cli.explain(failure) == (
        f"torch.compile's cache holds a damaged file, {library} (from a compile that was stopped part way); delete "
        f"the folder {cache} (torch.compile builds it anew) and run again.", 1)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cli.explain(failure) is None  # a library of someone else's: not ours to advise on


@pytest.fixture
def not_a_checkpoint(tmp_path) -> Path:
    """A --ckpt that fails to load: a check that comes after loading would report it instead."""
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 not a checkpoint")
    return path


@pytest.mark.parametrize("options, message", [
    (["--sampler", "pndm", "--eta", "0.5"], "--eta applies to --sampler ddim only, and this is --sampler pndm"),
    (["--sampler", "spndm", "--variance", "large"], "--variance applies to --sampler ddpm only, and this is "
                                                    "--sampler spndm"),
    (["--variance", "small"], "--variance applies to --sampler ddpm only, and this is --sampler ddim"),
    (["--sampler", "ddpm", "--eta", "0"], "--eta applies to --sampler ddim only, and this is --sampler ddpm"),
])
def test_options_of_another_sampler_are_refused_before_the_checkpoint_is_read(not_a_checkpoint, options, message):
    with pytest.raises(UserError, match=f"^{message}; drop it\\.$"):
        sample.main(["--ckpt", str(not_a_checkpoint), "--device", "cpu", *options])
    assert sorted(p.name for p in not_a_checkpoint.parent.iterdir()) == ["checkpoint.pt"]


def test_gradcam_explains_images_of_a_class_the_classifier_does_not_know(tmp_path):
    """A folder with one class more than the classifier's used to refuse the whole run; those images are now
    explained (the predicted class), marked "unknown class" in the figure and the table, and left out of the
    accuracy."""
    images = red_images(tmp_path / "images", ("green", "red"))  # green: no class of the classifier's
    ckpt = classifier_checkpoint(tmp_path / "a.pt", 0, classes=("blue", "red"))
    out = gradcam.main(["--ckpt", str(ckpt), "--name", "a", "--images", f"folder:{images}", "--out",
                        str(tmp_path / "out"), "--device", "cpu"])
    with open(out / "stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["unknown_class"]) for r in rows] == [("green", "1")] * 2 + [("red", "0")] * 2
    assert all(r["explained"] == r["predicted"] in ("blue", "red") for r in rows)
    written = json.loads((out / "summary.json").read_text())
    assert written["unknown_class_images"] == 2
    assert written["summary"]["a"]["accuracy"] == sum(r["predicted"] == "red" for r in rows[2:]) / 2
    assert "2 of the 4 images are of classes the classifiers do not know (green)" in (out / "summary.md").read_text()
    figure = Image.open(out / "overlays.png").convert("RGB")
    width, height = figure.size
    grid = 2 * 18 + 2  # the image and one classifier's map, as without unknown classes
    assert height == 4 * 18 + 2 and width > grid
    caption = width - grid  # a column of captions in front: text on the first two rows only
    assert all(figure.crop((0, 2 + 18 * k, caption, 18 + 18 * k)).getbbox() for k in (0, 1))
    assert not any(figure.crop((0, 2 + 18 * k, caption, 18 + 18 * k)).getbbox() for k in (2, 3))


def test_gradcam_explain_label_names_the_folders_of_unknown_classes_before_decoding(tmp_path, monkeypatch):
    images = red_images(tmp_path / "images", ("green", "purple", "red"))
    ckpt = classifier_checkpoint(tmp_path / "a.pt", 0, classes=("blue", "red"))
    monkeypatch.setattr(gradcam, "load_dataset", lambda *a, **k: pytest.fail("decoded before the refusal"))
    folders = f"{images.resolve() / 'green'}, {images.resolve() / 'purple'}"
    with pytest.raises(UserError, match=rf"^--explain label explains each image's own class, and the classes green, "
                                        rf"purple of --images are not classes of a \(blue, red\); move the folders "
                                        rf"{folders} out of it, or use --explain pred, which explains those images "
                                        rf"too\.$"):
        gradcam.main(["--ckpt", str(ckpt), "--name", "a", "--images", f"folder:{images}", "--explain", "label",
                      "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert not (tmp_path / "out").exists()


def test_a_recompile_stopped_after_some_steps_checkpoints_them_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    """A stop that kills the compiler of a later step's recompile (after a preview, eval mode changed what was
    compiled) saves the steps before it, as a stop between steps does, and the run goes on from them as if never
    stopped; before, the error ended the run with only the last checkpoint (none here)."""
    import torch

    import train
    from core.checkpoint import load_checkpoint
    from helpers import noise_folder, tiny_args
    from training.loop import Trainer
    images = noise_folder(tmp_path / "images", 8)
    step_of = Trainer._step

    def stopped_at_step_3(self, step, batch, generator):
        if step == 3:
            raise compile_failure(-signal.SIGTERM)
        return step_of(self, step, batch, generator)
    run_dir, straight = tmp_path / "stopped", tmp_path / "straight"
    monkeypatch.setattr(Trainer, "_step", stopped_at_step_3)
    with pytest.raises(cli.RunInterrupted, match=r"stopped by SIGTERM at step 3 of 5 and saved .*--resume"):
        train.main(tiny_args(run_dir, images, steps=5))
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(Trainer, "_step", step_of)
    train.main(["--run-dir", str(run_dir), "--resume", "--device", "cpu"])
    train.main(tiny_args(straight, images, steps=5))
    resumed, expected = (load_checkpoint(d / "checkpoint.pt")["models"]["model"] for d in (run_dir, straight))
    assert all(torch.equal(v, expected[k]) for k, v in resumed.items())
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (run_dir, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == 5
